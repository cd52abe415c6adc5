"""tandem.sim.runner: simulator choice, parameters, build cache and failure reporting."""

# No `from __future__ import annotations`: Component reads its annotations as members.
from pathlib import Path

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from tandem.sim import runner

TB = Path(__file__).with_name("runner_tb.py")


class Counter(wiring.Component):
    step: In(8)
    count: Out(8)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.count.eq(self.count + self.step)
        return m


class PlainCounter(Elaboratable):
    """Not a component: ports must be given to the runner."""

    def __init__(self):
        self.step = Signal(8)
        self.count = Signal(8)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.count.eq(self.count + self.step)
        return m


def test_simulator_choice(monkeypatch):
    monkeypatch.delenv("SIM", raising=False)
    assert runner.simulators() == ["verilator", "icarus"]
    assert runner.default_simulator() == "verilator"
    monkeypatch.setenv("SIM", "icarus")
    assert runner.simulators() == ["icarus"]
    monkeypatch.setenv("SIM", "questa")
    with pytest.raises(ValueError, match="SIM='questa' is not supported"):
        runner.simulators()


@pytest.mark.parametrize("sim", runner.simulators())
def test_run_passes_params_and_caches(sim, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SIM_BUILD", str(tmp_path))
    runner.run(
        Counter(), TB, name="counter", sim=sim, params={"step": 3}, testcase="counts_by_param"
    )
    stamp = tmp_path / f"counter-{sim}" / "build.hash"
    built = stamp.stat().st_mtime_ns
    runner.run(Counter, TB, name="counter", sim=sim, params={"step": 5}, testcase="counts_by_param")
    assert stamp.stat().st_mtime_ns == built, "an unchanged design must not be rebuilt"


def test_elaboratable_with_ports(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SIM_BUILD", str(tmp_path))
    design = PlainCounter()
    text = runner.to_verilog(design, ports=[design.step, design.count])
    assert "module top" in text and "count" in text
    design = PlainCounter()
    runner.run(
        design,
        TB,
        name="plain",
        sim="icarus",
        ports=[design.step, design.count],
        params={"step": 7},
        testcase="counts_by_param",
    )


def test_failing_cocotb_test_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SIM_BUILD", str(tmp_path))
    with pytest.raises(AssertionError, match="1 of 1 cocotb tests failed for counter on icarus"):
        runner.run(
            Counter(), TB, name="counter", sim="icarus", params={"step": 1}, testcase="always_fails"
        )


@pytest.mark.parametrize("sim", runner.simulators())
def test_waves(sim, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_SIM_BUILD", str(tmp_path))
    runner.run(
        Counter(),
        TB,
        name="counter",
        sim=sim,
        params={"step": 2},
        testcase="counts_by_param",
        waves=True,
    )
    dump = tmp_path / f"counter-{sim}" / ("dump.vcd" if sim == "verilator" else "top.fst")
    assert dump.is_file() and dump.stat().st_size > 0
