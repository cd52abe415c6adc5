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


def run_vpu(sim: str, name: str | None = None, **params):
    params = {"geom": "tiny", "seed": 1, **params}
    runner.run(
        lambda: vpu_tb.build(params),
        TB,
        name=name or f"vpu-{params['geom']}",
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


@pytest.mark.long
def test_vpu_small():
    """The small geometry once on Verilator: a 128-row VBUF, 8 lanes, and other table widths
    (exp 2, GELU 1 lanes: fewer ROMs to build)."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    vpu = {"table_lanes": {"exp": 2, "gelu": 1}}
    run_vpu("verilator", geom="small", seed=2, runs=15, contexts=[65], vpu=vpu)


@pytest.mark.long
def test_vpu_adds_a_whole_row_per_cycle():
    """Adds and multiplies on 64 lanes, a whole VBUF row per cycle (as u55c's, whose exp and
    GELU tables keep 32), beside the tiny geometry's 4-lane tables, once on Verilator."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    run_vpu("verilator", name="vpu-tiny-64", seed=3, runs=15, vpu={"lanes": 64})


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
    assert v.lanes == 64 and v.table_lanes == {"exp": 32, "recip": 1, "rsqrt": 1, "gelu": 32}
    assert v.cycles(VectorOp.VADD, 768) == 12 + 5 + 5
    assert v.cycles(VectorOp.VMUL, 0) == 1 + 5 + 4
    assert v.cycles(VectorOp.VEXP, 768) == 24 + 5 + 2
    assert v.cycles(VectorOp.VGELU, 3072) == 96 + 5 + 2
    assert v.cycles(VectorOp.VRECIP, 1) == 1 + 5 + 2
    assert v.cycles(VectorOp.VMAX, 130) == 3 + 5 + 4
    assert v.cycles(VectorOp.VDOT, 768) == 12 + 12 + 5 + 15
    assert v.cycles(VectorOp.VDOT, 768, b_scalar=True) == 12 + 5 + 15
    assert v.cycles(VectorOp.VSET, 1) == 1 + 5


def test_table_roms_are_shared_by_two_lanes():
    """Two lanes read one two-port FP16Table ROM; a function with one lane has its own."""
    v = VectorUnit(geometry("u55c"))
    assert v.table_roms == {"exp": 16, "recip": 1, "rsqrt": 1, "gelu": 16}
    assert v.table_entries == 16 * (31_201 + 34_825) + 31_484 + 31_742
    small = VectorUnit(geometry("small"), table_lanes={"exp": 2, "gelu": 1})
    assert small.table_roms == {"exp": 1, "recip": 1, "rsqrt": 1, "gelu": 1}


def test_schedule_overlaps_only_independent_commands():
    """VectorUnit.schedule (which the RTL tests check cycle by cycle): a LayerNorm is a chain
    and gains the decode and buffer cycles (each command waits in the buffer while the one
    before finishes); the softmax of 12 heads, op by op over the heads, overlaps; a VRECIP behind a
    VDOT waits for the VDOT's result to be written first; one-beat VDOTs with a scalar b start
    16 back to back (the ring), the decode register and the buffer take three more."""
    from types import SimpleNamespace

    v = VectorUnit(geometry("u55c"))

    def cmd(op, dst, a=0, b=0, length=64, b_scalar=False):
        return SimpleNamespace(op=op, dst=dst, a=a, b=b, length=length, b_scalar=b_scalar)

    def serial(cmds):
        return sum(v.cycles(c.op, c.length, b_scalar=c.b_scalar) for c in cmds)

    x, mu, d, ds, var, y, g, bias, c_n, eps = (64 * k for k in range(0, 640, 64))
    ln = [
        cmd(VectorOp.VDOT, mu, x, c_n, 768, True),
        cmd(VectorOp.VSUB, d, x, mu, 768, True),
        cmd(VectorOp.VMUL, ds, d, c_n, 768, True),
        cmd(VectorOp.VDOT, var, d, ds, 768),
        cmd(VectorOp.VADD, var, var, eps, 1, True),
        cmd(VectorOp.VRSQRT, var, var, length=1),
        cmd(VectorOp.VMUL, y, d, var, 768, True),
        cmd(VectorOp.VMUL, y, y, g, 768),
        cmd(VectorOp.VADD, y, y, bias, 768),
    ]
    plan = v.schedule(ln)
    # u55c adds and multiplies 64 elements per cycle (262 and 246 with 32 lanes); reads that
    # follow a row-rate op's writes row by row (the VMUL after the VSUB, the VDOT's first pass
    # over ds, the last VMUL and VADD) save 28 cycles
    assert serial(ln) == 202 and plan[-1][1] == 158
    assert v.schedule(ln, chain=False)[-1][1] == 186
    # each is taken into the buffer before the one before it is done, and waits there
    assert all(t0 < p1 for (t0, _), (_, p1) in zip(plan[1:], plan, strict=False))
    # the VMUL reading d starts 7 cycles before the VSUB's last write, its done 7 earlier
    assert plan[2][1] == plan[1][1] + 12 and v.schedule(ln[:3], chain=False)[2][1] == 71

    s = [65536 - 64 * 16 * (h + 1) for h in range(12)]
    sc = [64 * h for h in range(12)]
    one, T = 64 * 12, 5
    soft = [cmd(VectorOp.VMAX, sc[h], s[h], length=T) for h in range(12)]
    soft += [cmd(VectorOp.VSUB, s[h], s[h], sc[h], T, True) for h in range(12)]
    soft += [cmd(VectorOp.VEXP, s[h], s[h], length=T) for h in range(12)]
    soft += [cmd(VectorOp.VDOT, sc[h], s[h], one, T, True) for h in range(12)]
    soft += [cmd(VectorOp.VRECIP, sc[h], sc[h], length=1) for h in range(12)]
    plan = v.schedule(soft)
    assert serial(soft) == 696 and plan[-1][1] == 83
    assert [a for a, _ in plan[:12]] == list(range(12))  # the VMAXes are taken one per cycle
    # a command takes at least its cycles from accept to done, exactly the first (idle unit)
    took = [t1 - t0 - v.cycles(c.op, c.length, b_scalar=c.b_scalar)
            for c, (t0, t1) in zip(soft, plan, strict=True)]  # fmt: skip
    assert took[0] == 0 and min(took) == 0 and max(took) > 0
    # the first VRECIP writes after the last VDOT (write order): it waited in the buffer
    last_vdot_write = plan[47][1] - 1
    assert plan[48][1] - 1 == last_vdot_write + 1 and took[48] > 0

    dots = [cmd(VectorOp.VDOT, 64 * h, 64 * 200, 64 * 300, 64, True) for h in range(40)]
    accepts = [t0 for t0, _ in v.schedule(dots)]
    assert v.cycles(VectorOp.VDOT, 64, b_scalar=True) == 21
    assert accepts[:20] == [*range(19), 23]  # 16 started and 3 held, then 4 cycles
