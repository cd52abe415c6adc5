# amaranth: UnusedElaboratable=no
"""The MPU (rtl/mpu.py) under cocotb on Verilator and Icarus, bit-exact against tandem.numerics;
plus construction checks.

The cocotb testbench is mpu_tb.py next to this file. Each pytest function runs it for one
geometry on one simulator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.geometry import CoreGeometry, geometry
from tandem.rtl.mpu import MatrixUnit
from tandem.sim import runner

TB = Path(__file__).with_name("mpu_tb.py")


def run_mpu(geom_name: str, sim: str, *, max_cols=None, testcase=None, **params):
    # The MPU depends on the geometry only through lanes (and the x buffer, max_cols), so
    # geometries with equal lanes and max_cols are one circuit: they share a build folder
    # (the runner's cache then builds it once) and differ only in how the TB packs tiles.
    unit = MatrixUnit(geometry(geom_name), max_cols=max_cols)
    runner.run(
        lambda: MatrixUnit(geometry(geom_name), max_cols=max_cols),
        TB,
        name=f"mpu-lanes{unit.lanes}-cols{unit.max_cols}",
        sim=sim,
        testcase=testcase,
        params={"geometry": geom_name, "max_cols": unit.max_cols, **params},
    )


@pytest.mark.parametrize("sim", runner.simulators())
def test_mpu_tiny(sim):
    """Shapes and modes with the cycle formula, special values, stalls, sampling, quantized
    weights: the whole TB on Verilator. Icarus, where a cycle of the DSP array's Verilog costs
    several hundred times Verilator's, runs the lite workload of the shapes and the quantized
    tests (every format's path, the cycle formula, a bias, an argmax, a stalled case)."""
    if sim == "verilator":
        run_mpu("tiny", sim, seed=1, random_cases=6, workload="full")
    else:
        lite = ["shapes_and_cycle_formula", "quantized_weights"]
        run_mpu("tiny", sim, seed=1, workload="lite", testcase=lite)


@pytest.mark.long
def test_mpu_small_verilator():
    """small: 8 channels x 256 bits per tile instead of 4 x 512 (same lanes, same circuit)."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    run_mpu("small", "verilator", max_cols=4096, seed=7, random_cases=3)


@pytest.mark.slow
def test_mpu_u55c_verilator():
    """The full 16-lane MPU: 64/16 = 4 tiles per row group, the tightest case for the
    no-bubble claim (result FIFO and bias credits) in the cycle formula."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    run_mpu("u55c", "verilator", max_cols=4096, seed=5, random_cases=2, workload="lite")


# ----------------------------------------------------------------------------------------------
# construction


def _fake_geometry(**changes) -> CoreGeometry:
    """A CoreGeometry that skips its own checks, to reach the MPU's."""
    fake = object.__new__(CoreGeometry)
    for k, v in {**vars(geometry("tiny")), **changes}.items():
        object.__setattr__(fake, k, v)
    return fake


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="CoreGeometry"):
        MatrixUnit("tiny")
    with pytest.raises(ValueError, match="max_cols"):
        MatrixUnit(geometry("tiny"), max_cols=100)
    with pytest.raises(ValueError, match="max_cols"):
        MatrixUnit(geometry("tiny"), max_cols=1 << 20)
    with pytest.raises(ValueError, match="lanes must be a power of two"):
        MatrixUnit(_fake_geometry(lanes=3))
    with pytest.raises(ValueError, match="lanes must be a power of two"):
        MatrixUnit(_fake_geometry(lanes=128))
    with pytest.raises(ValueError, match="tree"):
        MatrixUnit(_fake_geometry(tree=32))
    with pytest.raises(ValueError, match="one beat of every channel"):
        MatrixUnit(_fake_geometry(channels=8))


def test_cycle_formula_counts_one_cycle_per_tile():
    mpu = MatrixUnit(geometry("u55c"))
    assert mpu.lanes == 16
    one = mpu.cycles(1, 1)
    # each further x block costs 1 cycle to load, each further tile 1 cycle: no bubbles
    assert mpu.cycles(16, 16) - one == 15 + (16 * 16 - 1) * 4
    assert mpu.cycles(16, 1) - one == 15 * 4
    assert mpu.cycles(1, 1, argmax=True) - one == mpu.argmax_latency  # waits for the index
    assert mpu.cycles(0, 5) == 2  # no live row: the command only
    assert mpu.cycles(5, 0) == mpu.cycles(5, 1)  # no live column: one all-zero block


def test_sampling_limits_follow_the_contract():
    """The MPU's sampling lists hold tandem.sampling.TOP_K_MAX entries; the tail of a sampling
    command is bounded as documented."""
    from tandem.sampling import TOP_K_MAX

    mpu = MatrixUnit(geometry("u55c"))
    # the bound docs/rtl.md and docs/numerics.md state: every lane's list full, then K scanned
    assert mpu.sample_tail(TOP_K_MAX) == mpu.sample_latency + 16 * (TOP_K_MAX + 1) + TOP_K_MAX
    assert mpu.sample_tail(TOP_K_MAX) < 1200
    # one live row: one lane has it, the others are skipped in a cycle each
    assert mpu.sample_tail(40, 1) == mpu.sample_latency + 16 + 1 + 1
    # a sampling command of the LM head's size costs its tiles plus the tail
    assert mpu.cycles(10, 3, argmax=True, sample=(5, 640)) == mpu.cycles(10, 3) + mpu.sample_tail(
        5, 640
    )
    # the shortest commands wait for the key schedule
    assert mpu.cycles(1, 1, argmax=True, sample=(1, 1)) >= 29 + 15 + 1
