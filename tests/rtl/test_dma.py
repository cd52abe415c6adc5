# amaranth: UnusedElaboratable=no
"""The DMA (rtl/dma.py) under cocotb on Verilator and Icarus against cocotbext-axi AxiRams
(dma_tb.py), plus construction checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.geometry import geometry
from tandem.rtl.axi import AXI4Signature, burst_limit, vitis_ports
from tandem.rtl.dma import ChannelDMA, DMAEngine
from tandem.sim import runner

TB = Path(__file__).with_name("dma_tb.py")


def run_tb(sim: str, geom_name: str, testcase=None):
    dma = DMAEngine(geometry(geom_name))
    runner.run(
        dma,
        TB,
        name=f"dma-{geom_name}",
        sim=sim,
        ports=vitis_ports(dma),
        params={"geometry": geom_name},
        testcase=testcase,
    )


@pytest.mark.parametrize("sim", runner.simulators())
def test_dma(sim):
    run_tb(sim, "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("sim", runner.simulators())
def test_dma_256_bit_ports(sim):
    """The small geometry: 8 channels of 256-bit ports (128-beat bursts, two-beat status)."""
    run_tb(sim, "small")


def test_ports_follow_regmap():
    g = geometry("u55c")
    dma = DMAEngine(g)
    assert dma.ports == [f"m_axi_hbm{ch}" for ch in range(32)]
    names = {n for n, _, _ in vitis_ports(dma)}
    for sig in (
        "awvalid",
        "awaddr",
        "awlen",
        "wdata",
        "wstrb",
        "wlast",
        "bresp",
        "araddr",
        "rlast",
    ):
        assert f"m_axi_hbm31_{sig}" in names
    assert dma.signature.members["m_axi_hbm0"].signature == AXI4Signature(data_width=512)


def test_burst_limit():
    assert burst_limit(64) == 64 and burst_limit(32) == 128 and burst_limit(8) == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fifo_beats": 200}, "power of two"),
        ({"fifo_beats": 64}, "fifo_beats"),
        ({"max_reads": 0}, "max_reads"),
        ({"write_fifo_beats": 1}, "write_fifo_beats"),
    ],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChannelDMA(geometry("tiny"), **kwargs)
    with pytest.raises(ValueError, match=message):
        DMAEngine(geometry("tiny"), **kwargs)
    with pytest.raises(TypeError, match="CoreGeometry"):
        DMAEngine("tiny")
