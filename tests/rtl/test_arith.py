"""The arithmetic units (rtl/arith.py) under cocotb on Verilator and Icarus, bit-exact against
tandem.numerics; plus construction checks and quick Amaranth-simulator tests.

The cocotb testbench is arith_tb.py next to this file, the units and stimulus are in
arith_cases.py. Each pytest function builds one unit for one simulator in its own build folder.
"""

from __future__ import annotations

from pathlib import Path

import arith_cases
import pytest

from tandem.sim import runner

TB = Path(__file__).with_name("arith_tb.py")
TABLES = ("exp", "recip", "rsqrt", "gelu")


def run_unit(unit: str, sim: str, *, name: str | None = None, **params):
    runner.run(
        lambda: arith_cases.build_unit(unit),
        TB,
        name=f"arith-{name or unit}",
        sim=sim,
        params={"unit": unit, **params},
    )


@pytest.mark.parametrize("sim", runner.simulators())
@pytest.mark.parametrize("unit", ["add", "mul"])
def test_fp16_binary(unit, sim):
    """Every pair of special classes plus 20,000 seeded random pairs (add: random add/sub)."""
    run_unit(unit, sim, seed=1, pairs=20000)


@pytest.mark.parametrize("sim", runner.simulators())
@pytest.mark.parametrize(
    "table", [t if t == "exp" else pytest.param(t, marks=pytest.mark.long) for t in TABLES]
)
def test_fp16_table_exhaustive(table, sim):
    """All 65,536 inputs, then 4,000 random ones under idle cycles and backpressure."""
    run_unit(f"table-{table}", sim, seed=2)


@pytest.mark.parametrize("sim", runner.simulators())
def test_fp16_table_two_ports(sim):
    """The two-port GELU ROM: per port the plan's edge inputs and 3,000 random ones, both ports
    at full rate together, then each under its own idle and backpressure patterns."""
    run_unit("table2-gelu", sim, seed=5)


@pytest.mark.long
@pytest.mark.parametrize("sim", runner.simulators())
@pytest.mark.parametrize("table", ["exp", "gelu"])
def test_fp16_table_two_ports_exhaustive(table, sim):
    """All 65,536 inputs on each port at once (port 0 upwards, port 1 downwards), then edges
    and random inputs under independent stalls."""
    run_unit(f"table2-{table}", sim, seed=6, exhaustive=True)


def cheapest_build() -> str:
    """Icarus unless SIM excludes it: for designs whose Verilator build takes longest (a
    65,536-entry ROM, two 64-wide aligners), the default suite runs one simulator only."""
    return "icarus" if "icarus" in runner.simulators() else runner.simulators()[0]


@pytest.mark.long
@pytest.mark.parametrize("sim", [cheapest_build()])
def test_fp16_table_full_rom(sim):
    """The unreduced 65,536-entry ROM, exhaustively, for one function."""
    run_unit("table-full-gelu", sim, seed=2)


@pytest.mark.parametrize("sim", runner.simulators())
@pytest.mark.parametrize(
    ("unit", "size"),
    [
        ("align", {"blocks": 400}),
        ("dot", {"blocks": 400}),
        ("shift", {"items": 4000}),
        ("acc", {"rows": 600}),
        ("round", {"items": 6000}),
    ],
)
def test_block_floating_point(unit, size, sim):
    run_unit(unit, sim, seed=3, **size)


@pytest.mark.parametrize("sim", [cheapest_build()])
def test_dot_row(sim):
    """BlockAlign -> BlockDot -> AccumulatorShift -> Accumulator -> AccToFP16 as one MPU row,
    against numerics.matvec (accumulator and binary16), 120 rows of 1..4 blocks with and
    without bias."""
    run_unit("dotrow", sim, seed=3, rows=120)


@pytest.mark.slow
def test_dot_row_verilator():
    """The same on Verilator with 2,000 rows (its build takes about a minute)."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    run_unit("dotrow", "verilator", seed=4, rows=2000)


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["add", "mul"])
def test_fp16_binary_million(unit):
    """Benchmark size: 1,000,000 random pairs at full rate on Verilator."""
    if "verilator" not in runner.simulators():
        pytest.skip("SIM selects another simulator")
    run_unit(unit, "verilator", seed=11, pairs=1_000_000, schedule="full")
