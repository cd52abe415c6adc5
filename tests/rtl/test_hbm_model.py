# amaranth: UnusedElaboratable=no
"""The simulated HBM (sim/hbm_model.py) under cocotb on Verilator and Icarus: alone against
cocotbext-axi masters, and under the DMA engine as the cycle benchmark uses it
(hbm_model_tb.py). Plus the backdoor file format and construction checks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from tandem.geometry import geometry
from tandem.rtl.axi import vitis_ports
from tandem.rtl.dma import DMAEngine
from tandem.sim import runner
from tandem.sim.hbm_model import (
    HBMChannelModel,
    HBMModel,
    link_rate,
    memory_verilog_file,
    read_hex,
    write_hex,
)

TB = Path(__file__).with_name("hbm_model_tb.py")
SIZE = 0x10000  # bytes per channel


class DmaOverHbm(wiring.Component):
    """The benchmark's memory system: a DMAEngine whose channels are HBMChannelModels. Every DMA
    member but the AXI ports is a member here, plus the backdoor ports and two monitor outputs:
    ``ar0`` / ``r0`` are channel 0's AR and R handshakes."""

    def __init__(self, geom, **hbm_kwargs):
        self.dma = DMAEngine(geom)
        self.hbm = HBMModel(geom, **hbm_kwargs)
        members = {
            name: member
            for name, member in self.dma.signature.members.items()
            if name not in self.dma.ports
        }
        members.update(
            {n: m for n, m in self.hbm.signature.members.items() if n not in self.hbm.ports}
        )
        members.update({"ar0": Out(1), "r0": Out(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.dma = dma = self.dma
        m.submodules.hbm = hbm = self.hbm
        for port in dma.ports:
            wiring.connect(m, getattr(dma, port), getattr(hbm, port))
        for inner in (dma, hbm):
            for name, member in inner.signature.members.items():
                if name in dma.ports:
                    continue
                ours, theirs = getattr(self, name), getattr(inner, name)
                if member.is_signature:
                    wiring.connect(m, wiring.flipped(ours), theirs)
                elif member.flow == wiring.In:
                    m.d.comb += theirs.eq(ours)
                else:
                    m.d.comb += ours.eq(theirs)
        axi = dma.axi(0)
        m.d.comb += [
            self.ar0.eq(axi.arvalid & axi.arready),
            self.r0.eq(axi.rvalid & axi.rready),
        ]
        return m


def _run(design, sim, name, params, testcase):
    runner.run(
        design,
        TB,
        name=name,
        sim=sim,
        ports=vitis_ports(design),
        params=params,
        testcase=testcase,
        verilog_sources=[memory_verilog_file(runner.build_root() / "verilog")],
    )


def _rate_params(g) -> dict:
    rate = link_rate(g) / g.beat_bytes
    return {"rate_num": rate.numerator, "rate_den": rate.denominator, "bucket_beats": 2}


@pytest.mark.parametrize("sim", runner.simulators())
def test_hbm_model(sim):
    """Backdoor, AXI reads and strobed writes, DECERR, exact read latency, exact sustained
    rate on all channels at once."""
    g = geometry("tiny")
    latency = 24  # short, to keep the simulation short; test_dma_over_hbm uses 100
    params = {"geometry": "tiny", "size_bytes": SIZE, "read_latency": latency, **_rate_params(g)}
    design = HBMModel(g, size_bytes=SIZE, read_latency=latency)
    _run(
        design,
        sim,
        "hbm-model-tiny",
        params,
        ["backdoor_and_axi", "decode_errors", "read_latency", "sustained_rate"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("sim", runner.simulators())
def test_dma_over_hbm(sim):
    """Sustained bandwidth and latency as configured, at the U55C's rate and an HBM-like
    latency of 100 cycles."""
    g = geometry("tiny")
    latency = 100
    params = {"geometry": "tiny", "size_bytes": SIZE, "read_latency": latency, **_rate_params(g)}
    design = DmaOverHbm(g, size_bytes=SIZE, read_latency=latency)
    _run(
        design,
        sim,
        "dma-over-hbm-tiny",
        params,
        ["sustained_bandwidth", "latency_through_dma", "stores_reach_memory"],
    )


def test_link_rate():
    assert link_rate(geometry("u55c")) == Fraction(115, 2)  # 14.375 GB/s / 250 MHz
    assert link_rate(geometry("tiny").replace(clock_mhz=225.0)) == Fraction(14375, 225)
    m = HBMChannelModel(geometry("u55c"), size_bytes=4096)
    assert m.beats_per_cycle == Fraction(115, 128)
    fast = HBMChannelModel(geometry("u55c"), size_bytes=4096, bytes_per_cycle=100)
    assert fast.beats_per_cycle == 1


def test_hex_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1000, dtype=np.uint8)
    write_hex(tmp_path / "a.hex", data, 64, word=5)
    text = (tmp_path / "a.hex").read_text().split("\n")
    assert text[0] == "@5" and len(text[1]) == 128
    # byte 0 is the least significant: the last two hex digits of the first word
    assert text[1][-2:] == f"{data[0]:02x}"
    back = read_hex(tmp_path / "a.hex", 64)
    assert (back[:1000] == data).all() and (back[1000:] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size_bytes": 100}, "multiple"),
        ({"size_bytes": 4096, "read_latency": 2}, "read_latency"),
        ({"size_bytes": 4096, "base": 0x800}, "4 KiB"),
        ({"size_bytes": 4096, "name": "hbm 0"}, "identifier"),
        ({"size_bytes": 4096, "bytes_per_cycle": 0}, "positive"),
    ],
)
def test_rejects_bad_parameters(kwargs, error):
    with pytest.raises(ValueError, match=error):
        HBMChannelModel(geometry("tiny"), **kwargs)
