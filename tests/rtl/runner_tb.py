"""cocotb side of test_runner.py: a counter whose step comes from the pytest parameters."""

import cocotb
from cocotb.triggers import ClockCycles, RisingEdge

from tandem.sim.runner import tb_params
from tandem.sim.streams import ClockedTB


@cocotb.test()
async def counts_by_param(dut):
    step = tb_params()["step"]
    tb = ClockedTB(dut)
    dut.step.value = step
    await tb.reset()
    start = int(dut.count.value)
    await ClockCycles(dut.clk, 10)
    await RisingEdge(dut.clk)
    assert int(dut.count.value) == (start + 11 * step) % 256


@cocotb.test()
async def always_fails(dut):
    raise AssertionError("this test fails on purpose")
