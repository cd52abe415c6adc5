# amaranth: UnusedElaboratable=no
"""The vector unit (rtl/vpu.py) on the vector buffer (rtl/vbuf.py) under cocotb on Verilator and
Icarus, bit-exact against the ISA simulator and the faithful model; plus construction checks.

The cocotb testbench and the harness are in vpu_tb.py next to this file. One pytest function
builds the harness for one simulator and runs all of its cocotb tests in one simulation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vpu_tb

from tandem import isa
from tandem.geometry import geometry
from tandem.rtl.vbuf import VectorBuffer
from tandem.rtl.vpu import VectorOp, VectorUnit
from tandem.sim import runner

TB = Path(__file__).with_name("vpu_tb.py")


# Verilator: cocotb needs only the harness's ports, so everything below the top module is left
# private (top_ports.vlt); Verilator then optimises it, which makes the build several times
# smaller and faster.
BUILD_ARGS = {"verilator": ["--no-public-flat-rw"], "icarus": []}
EXTRA_SOURCES = {"verilator": [Path(__file__).with_name("top_ports.vlt")], "icarus": []}


def run_vpu(sim: str, **params):
    params = {"geom": "tiny", "seed": 1, **params}
    runner.run(
        lambda: vpu_tb.build(params),
        TB,
        name=f"vpu-{params['geom']}",
        sim=sim,
        params=params,
        build_args=BUILD_ARGS[sim],
        verilog_sources=EXTRA_SOURCES[sim],
    )


@pytest.mark.parametrize("sim", runner.simulators())
def test_vpu_tiny(sim):
    """The default VPU of the tiny geometry (4 lanes; exp and GELU 4 lanes, recip and rsqrt 1):
    every op, special pairs, random runs under idle and backpressure, LayerNorm and attention."""
    run_vpu(sim, runs=30)


def test_vpu_small():
    """The small geometry once on Verilator: a 128-row VBUF, 8 lanes, and other table widths
    (exp 2, GELU 1 lanes: fewer ROMs to build)."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    vpu = {"table_lanes": {"exp": 2, "gelu": 1}}
    run_vpu("verilator", geom="small", seed=2, runs=15, contexts=[65], vpu=vpu)


# --------------------------------------------------------------------------------------------
# construction and the cycle formula


def test_ops_follow_the_isa():
    vpu_ops = {op for op, unit in isa.UNITS.items() if unit is isa.Unit.VPU}
    assert {op.name for op in VectorOp} == {op.name for op in vpu_ops}
    assert all(VectorOp[op.name].value == op.value for op in vpu_ops)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lanes": 3}, "lanes must be a power of two"),
        ({"lanes": 128}, "lanes must be a power of two"),
        ({"table_lanes": {"exp": 0}}, r"table_lanes\['exp'\]"),
        ({"table_lanes": {"tanh": 4}}, "unknown functions"),
    ],
)
def test_vpu_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorUnit(geometry("tiny"), **kwargs)


def test_construction_errors():
    with pytest.raises(TypeError, match="CoreGeometry"):
        VectorUnit("tiny")
    with pytest.raises(ValueError, match="read_ports must be"):
        VectorBuffer(geometry("tiny"), read_ports=0)
    with pytest.raises(ValueError, match="write_ports must be"):
        VectorBuffer(geometry("tiny"), write_ports=9)
    with pytest.raises(ValueError, match="length must be"):
        VectorUnit(geometry("tiny")).cycles(VectorOp.VADD, 5000)


def test_cycle_formula():
    """The documented formula at the u55c geometry (the RTL tests check it cycle by cycle)."""
    v = VectorUnit(geometry("u55c"))
    assert v.lanes == 32 and v.table_lanes == {"exp": 32, "recip": 1, "rsqrt": 1, "gelu": 32}
    assert v.cycles(VectorOp.VADD, 768) == 24 + 3 + 4
    assert v.cycles(VectorOp.VMUL, 0) == 1 + 3 + 3
    assert v.cycles(VectorOp.VGELU, 3072) == 96 + 3 + 1
    assert v.cycles(VectorOp.VRECIP, 1) == 1 + 3 + 1
    assert v.cycles(VectorOp.VMAX, 130) == 3 + 3 + 3
    assert v.cycles(VectorOp.VDOT, 768) == 12 + 12 + 3 + 12
    assert v.cycles(VectorOp.VDOT, 768, b_scalar=True) == 12 + 3 + 12
    assert v.cycles(VectorOp.VSET, 1) == 1 + 3
