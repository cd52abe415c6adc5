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
    CALIBRATED,
    TIMING_LAYOUT,
    HBMChannelModel,
    HBMModel,
    HBMTiming,
    hbm_timing,
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


def _configs(g, **named: HBMTiming) -> dict:
    """Timing configurations by name, as the testbench reads them (``timing(p, name)``)."""
    return {name: {"cfg": t.pack(g), **t.registers(g)} for name, t in named.items()}


def _plain(g, latency: int) -> HBMTiming:
    return HBMTiming("plain", read_latency=latency, rate=link_rate(g))


@pytest.mark.parametrize("sim", runner.simulators())
def test_hbm_model(sim):
    """Backdoor, AXI reads and strobed writes, DECERR, exact read latency, exact sustained
    rate on all channels at once; with refresh on, the refresh windows, their independent
    phases and the rate between them; with jitter on, the latency histogram and the write
    response latency. One build: every configuration is set at run time."""
    g = geometry("tiny")
    plain = _plain(g, 24)  # short, to keep the simulation short; test_dma_over_hbm uses 100
    configs = _configs(
        g,
        plain=plain,
        refresh=plain.replace(name="refresh", refresh_interval=200, refresh_cycles=30, seed=3),
        jitter=plain.replace(name="jitter", read_jitter=15, write_latency=9, seed=5),
    )
    params = {"geometry": "tiny", "size_bytes": SIZE, "bucket_beats": 2, "configs": configs}
    design = HBMModel(g, size_bytes=SIZE)
    _run(
        design,
        sim,
        "hbm-model-tiny",
        params,
        [
            "backdoor_and_axi",
            "decode_errors",
            "read_latency",
            "sustained_rate",
            "refresh_gaps",
            "latency_distribution",
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("sim", runner.simulators())
def test_dma_over_hbm(sim):
    """Sustained bandwidth and latency as configured, at the U55C's rate and an HBM-like
    latency of 100 cycles; and under the calibrated model (refresh, jitter), at its latency and
    at 250 cycles, the tile stream at the channels' sustained rate."""
    g = geometry("tiny")
    size = 4 * SIZE  # 4,096 beats a channel: about five refresh intervals of the calibrated
    configs = _configs(
        g,
        plain=_plain(g, 100),
        calibrated=hbm_timing("calibrated", g),
        slow=hbm_timing("calibrated", g, read_latency=250),
    )
    params = {"geometry": "tiny", "size_bytes": size, "bucket_beats": 2, "configs": configs}
    design = DmaOverHbm(g, size_bytes=size)
    _run(
        design,
        sim,
        "dma-over-hbm-tiny",
        params,
        [
            "sustained_bandwidth",
            "latency_through_dma",
            "stores_reach_memory",
            "bandwidth_under_refresh",
            "bandwidth_at_250_cycles",
        ],
    )


def test_link_rate():
    g = geometry("u55c")
    assert link_rate(g) == Fraction(115, 2)  # 14.375 GB/s / 250 MHz
    assert link_rate(geometry("tiny").replace(clock_mhz=225.0)) == Fraction(14375, 225)
    ideal = hbm_timing("ideal", g)
    assert ideal.beats_per_cycle(g) == Fraction(115, 128)
    assert ideal.registers(g)["gain"] == 115 and ideal.registers(g)["cost"] == 128
    fast = ideal.replace(rate=100)
    assert fast.beats_per_cycle(g) == 1 and fast.registers(g)["gain"] == 1


def test_calibrated_timing():
    """The calibrated model at 250 MHz: cycles from its physical parameters; the link rate
    between refreshes from the measured 13.1 GB/s with the measuring card's 260 ns refresh;
    the U55C's 350 ns refresh on top: 12.77 GB/s sustained per channel, 409 GB/s in all; every
    parameter with its source."""
    g = geometry("u55c")
    cal = hbm_timing("calibrated", g)
    assert (cal.read_latency, cal.read_jitter, cal.write_latency) == (150, 25, 60)
    assert (cal.refresh_interval, cal.refresh_cycles) == (975, 88)
    measured = Fraction(131, 10) * 1000 / 250  # 52.4 bytes per cycle
    assert cal.rate == measured / (1 - Fraction(260, 3900))
    assert cal.rate < link_rate(g)  # within the link
    assert cal.sustained(g) == cal.rate * (1 - Fraction(88, 975))
    assert round(cal.sustained_gbps(g), 2) == 12.77
    assert round(cal.sustained_gbps(g) * g.channels) == 409
    smooth = hbm_timing("calibrated", g, refresh=False)
    assert not smooth.refresh and smooth.rate == cal.rate
    assert smooth.sustained(g) == cal.rate
    ideal_ref = hbm_timing("ideal", g, refresh=True)
    assert (ideal_ref.refresh_interval, ideal_ref.refresh_cycles) == (975, 88)
    assert ideal_ref.rate == link_rate(g)
    assert hbm_timing("calibrated", g, read_latency=250).read_latency == 250
    assert set(dict(cal.sources)) == set(CALIBRATED)
    assert all(len(src) > 20 for _, src in cal.sources)
    assert "409 GB/s over 32" in cal.describe(g)
    # at another clock the same physical model has other cycle counts
    slow = hbm_timing("calibrated", g.replace(clock_mhz=200.0))
    assert (slow.read_latency, slow.refresh_interval, slow.refresh_cycles) == (120, 780, 70)


def test_timing_registers_pack():
    """The packed ``hbm_cfg`` value holds every register at its layout offset."""
    g = geometry("u55c")
    t = hbm_timing("calibrated", g, seed=77)
    value = t.pack(g)
    regs = t.registers(g)
    for name, field in TIMING_LAYOUT:
        assert (value >> field.offset) & ((1 << field.width) - 1) == regs[name], name
    assert Fraction(regs["gain"], regs["cost"]) == (t.rate / 64).limit_denominator(65535)


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
        ({"size_bytes": 4096, "base": 0x800}, "4 KiB"),
        ({"size_bytes": 4096, "name": "hbm 0"}, "identifier"),
        ({"size_bytes": 4096, "index": 300}, "index"),
    ],
)
def test_rejects_bad_parameters(kwargs, error):
    with pytest.raises(ValueError, match=error):
        HBMChannelModel(geometry("tiny"), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"read_latency": 2}, "read_latency"),
        ({"rate": 0}, "positive"),
        ({"refresh_interval": 100, "refresh_cycles": 100}, "below refresh_interval"),
        ({"read_jitter": -1}, "read_jitter"),
        ({"seed": 1 << 16}, "seed"),
    ],
)
def test_timing_rejects_bad_values(kwargs, error):
    g = geometry("tiny")
    with pytest.raises(ValueError, match=error):
        _plain(g, 80).replace(**kwargs)


def test_timing_names():
    g = geometry("tiny")
    with pytest.raises(ValueError, match=r"unknown HBM model 'fast'.*ideal, calibrated"):
        hbm_timing("fast", g)
    assert hbm_timing("calibrated", g, refresh=True) == hbm_timing("calibrated", g)
