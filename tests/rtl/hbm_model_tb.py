"""cocotb testbenches for sim/hbm_model.py, run from test_hbm_model.py.

Two designs:

* ``HBMModel`` alone (tiny geometry), driven by a cocotbext-axi ``AxiMaster`` per channel: the
  backdoor (``$readmemh`` / ``$writememh``), reads and strobed writes through AXI, DECERR outside
  the memory, and the read latency, counted in cycles from each AR handshake to its first R
  handshake.
* the benchmark's memory system, ``DMAEngine`` over ``HBMModel`` (``DmaOverHbm`` in
  test_hbm_model.py): sustained bandwidth measured on the DMA's tile stream must equal the
  configured rate (115/128 of a beat per cycle per channel at 14.375 GB/s and 250 MHz) within the
  bucket's burst allowance, and the data must be the layout's.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiMaster, AxiResp
from dma_tb import Model, read_command, store_command

from tandem import seeds
from tandem.geometry import geometry
from tandem.numerics import BLOCK
from tandem.rtl.dma import ReadCommand, ReadKind, StoreCommand, StoreKind
from tandem.rtl.shell import args_layout
from tandem.sim import streams
from tandem.sim.hbm_model import Backdoor, HBMModel
from tandem.sim.runner import tb_params


def model_of(p) -> HBMModel:
    """The same HBMModel the pytest side built (for the backdoor's names and sizes)."""
    m = HBMModel(geometry(p["geometry"]), size_bytes=p["size_bytes"])
    m._MustUse__silence = True
    return m


def timing(p, name: str) -> dict:
    """The named timing configuration the pytest side wrote (``HBMTiming.registers`` and the
    packed ``cfg`` value)."""
    return p["configs"][name]


def rate_of(t: dict) -> Fraction:
    """A configuration's link rate in beats per cycle."""
    return min(Fraction(1), Fraction(t["gain"], t["cost"]))


class Edges:
    """Counts clock edges and records the edges at which ``(valid, ready)`` pairs handshake."""

    def __init__(self, clk, pairs: dict[str, tuple]):
        self.cycle = 0
        self.pairs = pairs
        self.at = {name: [] for name in pairs}
        cocotb.start_soon(self._run(clk))

    async def _run(self, clk):
        edge = RisingEdge(clk)
        while True:
            await edge
            self.cycle += 1
            for name, (valid, ready) in self.pairs.items():
                if int(valid.value) and int(ready.value):
                    self.at[name].append(self.cycle)


# --------------------------------------------------------------------------------------------
# HBMModel alone


async def model_setup(dut, config: str = "plain"):
    p = tb_params()
    dut.hbm_cfg.value = timing(p, config)["cfg"]
    tb = streams.ClockedTB(dut)
    g = geometry(p["geometry"])
    hbm = model_of(p)
    masters = []
    for ch, port in enumerate(hbm.ports):
        master = AxiMaster(AxiBus.from_prefix(dut, port), dut.clk, dut.rst)
        for if_ in (master.read_if, master.write_if):
            if_.log.setLevel("WARNING")
        masters.append(master)
        del ch
    backdoor = Backdoor(dut, hbm)
    await tb.reset()
    return tb, g, hbm, masters, backdoor, {**p, **timing(p, config)}


async def read_every_page(masters, hbm, images) -> None:
    """Back-to-back 4 KiB reads of every channel's whole memory, all channels at once; each
    page must be the loaded image's."""
    pages = images.shape[1] // 4096
    reads = [
        [masters[ch].init_read(hbm.base(ch) + 4096 * k, 4096) for k in range(pages)]
        for ch in range(len(masters))
    ]
    for ch, events in enumerate(reads):
        for k, event in enumerate(events):
            await event.wait()
            got = event.data.data
            assert got == images[ch, 4096 * k : 4096 * (k + 1)].tobytes(), f"ch{ch} page {k}"


@cocotb.test()
async def backdoor_and_axi(dut):
    """Backdoor-loaded images read back through AXI; AXI writes (any alignment, so partial
    strobes) dumped back through the backdoor, byte for byte."""
    _, g, hbm, masters, backdoor, p = await model_setup(dut)
    rng = np.random.default_rng(seeds.seed(1))
    size = p["size_bytes"]
    images = rng.integers(0, 256, (g.channels, size), dtype=np.uint8)
    await backdoor.load(images)
    pyrng = random.Random(seeds.seed(2))
    for _ in range(12):
        ch = pyrng.randrange(g.channels)
        addr = pyrng.randrange(size - 600)
        n = pyrng.randint(1, 600)
        got = await masters[ch].read(hbm.base(ch) + addr, n)
        assert got.resp == AxiResp.OKAY
        assert got.data == images[ch, addr : addr + n].tobytes(), f"ch{ch} read at {addr:#x}"
    for _ in range(12):
        ch = pyrng.randrange(g.channels)
        addr = pyrng.randrange(size - 300)
        blob = rng.integers(0, 256, pyrng.randint(1, 300), dtype=np.uint8)
        resp = await masters[ch].write(hbm.base(ch) + addr, blob.tobytes())
        assert resp.resp == AxiResp.OKAY
        images[ch, addr : addr + blob.size] = blob
    dumped = await backdoor.dump(0, size)
    bad = np.argwhere(dumped != images)
    assert bad.size == 0, f"{len(bad)} bytes differ after AXI writes, first {bad[:4].tolist()}"
    part = await backdoor.dump(0x1230, 0x345)
    assert (part == images[:, 0x1230 : 0x1230 + 0x345]).all(), "a partial dump is wrong"
    # a load at an offset leaves the rest alone
    patch = rng.integers(0, 256, (g.channels, 4 * g.beat_bytes), dtype=np.uint8)
    await backdoor.load(patch, offset=0x800)
    images[:, 0x800 : 0x800 + patch.shape[1]] = patch
    assert (await backdoor.dump(0, size) == images).all(), "a load at an offset went wrong"


@cocotb.test()
async def decode_errors(dut):
    """Bursts outside the memory answer DECERR and leave memory alone."""
    _, g, hbm, masters, backdoor, p = await model_setup(dut)
    size = p["size_bytes"]
    before = await backdoor.dump(0, size)
    beyond = hbm.base(0) + size
    got = await masters[0].read(beyond, 64)
    assert got.resp == AxiResp.DECERR, got.resp
    resp = await masters[0].write(beyond, bytes(64))
    assert resp.resp == AxiResp.DECERR, resp.resp
    # a burst that starts inside and runs out: DECERR for the whole write
    resp = await masters[0].write(beyond - g.beat_bytes, bytes(2 * g.beat_bytes))
    assert resp.resp == AxiResp.DECERR
    after = await backdoor.dump(0, size)
    assert (after[1:] == before[1:]).all()
    assert (after[0, : size - g.beat_bytes] == before[0, : size - g.beat_bytes]).all()


@cocotb.test()
async def read_latency(dut):
    """An isolated burst's first beat moves exactly read_latency cycles after its address."""
    tb, g, hbm, masters, _, p = await model_setup(dut)
    prefix = hbm.ports[1]
    edges = Edges(
        dut.clk,
        {
            "ar": (getattr(dut, f"{prefix}_arvalid"), getattr(dut, f"{prefix}_arready")),
            "r": (getattr(dut, f"{prefix}_rvalid"), getattr(dut, f"{prefix}_rready")),
        },
    )
    latency = p["read_latency"]
    for n_beats in (1, 3, 16):
        edges.at["ar"].clear()
        edges.at["r"].clear()
        await masters[1].read(hbm.base(1) + 0x400, n_beats * g.beat_bytes)
        await ClockCycles(dut.clk, 8)  # let the token bucket refill
        (ar,) = edges.at["ar"]
        r = edges.at["r"]
        assert len(r) == n_beats
        assert r[0] - ar == latency, f"first beat {r[0] - ar} cycles after AR, not {latency}"
        tb.log.info(f"{n_beats} beats: first after {r[0] - ar} cycles, beats at {r}")


@cocotb.test()
async def sustained_rate(dut):
    """Back-to-back 4 KiB reads on every channel at once: each channel's R beats move at
    exactly the configured rate (115/128 beat per cycle for 14.375 GB/s at 250 MHz), within
    the bucket's burst allowance, and the data is the loaded image's."""
    tb, g, hbm, masters, backdoor, p = await model_setup(dut)
    size = p["size_bytes"]
    rng = np.random.default_rng(seeds.seed(5))
    images = rng.integers(0, 256, (g.channels, size), dtype=np.uint8)
    await backdoor.load(images)
    pairs = {}
    for ch, port in enumerate(hbm.ports):
        pairs[f"r{ch}"] = (getattr(dut, f"{port}_rvalid"), getattr(dut, f"{port}_rready"))
    edges = Edges(dut.clk, pairs)
    await read_every_page(masters, hbm, images)
    rate = rate_of(p)
    for ch in range(g.channels):
        at = edges.at[f"r{ch}"]
        n, span = len(at) - 1, at[-1] - at[0]
        tb.log.info(
            f"ch{ch}: {n + 1} beats, {n} in {span} cycles = {n / span:.5f} beats/cycle "
            f"(configured {float(rate):.5f})"
        )
        assert len(at) == size // g.beat_bytes
        assert abs(n - span * rate) <= p["bucket_beats"] + 1, (
            f"ch{ch}: {n} beats in {span} cycles is {n / span:.5f}/cycle, not {float(rate):.5f}"
        )


@cocotb.test()
async def refresh_gaps(dut):
    """Refresh on (``refresh`` configuration): each channel refreshes for exactly
    ``refresh_cycles`` of every ``refresh_interval`` cycles, at its own phase; no R beat moves
    while it does; back-to-back reads move at the link rate in the cycles between, so the
    sustained rate is the rate times the share of cycles not refreshing."""
    tb, g, hbm, masters, backdoor, p = await model_setup(dut, "refresh")
    size = p["size_bytes"]
    interval, busy = p["refresh_interval"], p["refresh_cycles"]
    rng = np.random.default_rng(seeds.seed(11))
    images = rng.integers(0, 256, (g.channels, size), dtype=np.uint8)
    await backdoor.load(images)
    # sample refreshing and R handshakes at every edge
    samples = {ch: [] for ch in range(g.channels)}  # (refreshing, r beat) per edge
    ports = hbm.ports
    stop = False

    async def watch():
        edge = RisingEdge(dut.clk)
        while not stop:
            await edge
            ref = int(dut.hbm_refreshing.value)
            for ch, port in enumerate(ports):
                r = int(getattr(dut, f"{port}_rvalid").value) and int(
                    getattr(dut, f"{port}_rready").value
                )
                samples[ch].append(((ref >> ch) & 1, r))

    cocotb.start_soon(watch())
    await read_every_page(masters, hbm, images)
    stop = True
    rate = rate_of(p)
    phases = []
    for ch in range(g.channels):
        ref = [a for a, _ in samples[ch]]
        beats = [b for _, b in samples[ch]]
        # a beat handshaking in cycle i was issued in cycle i - 1 (R is registered; the
        # master's rready stays high): never while refreshing
        issued_in_refresh = [i for i in range(1, len(ref)) if beats[i] and ref[i - 1]]
        assert not issued_in_refresh, f"ch{ch}: R beats issued in refresh: {issued_in_refresh}"
        starts = [i for i in range(1, len(ref)) if ref[i] and not ref[i - 1]]
        assert len(starts) >= 3, f"ch{ch}: only {len(starts)} refreshes seen"
        assert all(b - a == interval for a, b in itertools.pairwise(starts)), (ch, starts)
        for s0 in starts[:-1]:
            run = ref[s0 : s0 + interval]
            assert run[:busy] == [1] * busy and not any(run[busy:]), f"ch{ch}: window at {s0}"
        phases.append(starts[0] % interval)
        first = beats.index(1)
        last = len(beats) - 1 - beats[::-1].index(1)
        free = sum(1 for i in range(first, last) if not ref[i])
        n = sum(beats[first:last])
        tb.log.info(
            f"ch{ch}: refresh at phase {starts[0] % interval}, {n} beats in {last - first} "
            f"cycles, {free} of them not refreshing: {n / free:.5f} beats per free cycle "
            f"(rate {float(rate):.5f})"
        )
        assert abs(n - free * rate) <= p["bucket_beats"] + 1, (ch, n, free, float(rate))
    assert len(set(phases)) == len(phases), f"channels refresh in step: phases {phases}"


@cocotb.test()
async def latency_distribution(dut):
    """Jitter on (``jitter`` configuration): isolated single-beat reads wait
    ``read_latency + 0..read_jitter`` cycles, every value of the range occurs and the mean is
    the middle; writes are acknowledged ``write_latency`` cycles after their last W beat."""
    tb, g, hbm, masters, _, p = await model_setup(dut, "jitter")
    prefix = hbm.ports[2]

    def pair(ch):
        return (getattr(dut, f"{prefix}_{ch}valid"), getattr(dut, f"{prefix}_{ch}ready"))

    edges = Edges(dut.clk, {c: pair(c) for c in ("ar", "r", "w", "b")})
    lat, jit = p["read_latency"], p["read_jitter"]
    n = 256
    got = []
    for k in range(n):
        edges.at["ar"].clear()
        edges.at["r"].clear()
        await masters[2].read(hbm.base(2) + 64 * (k % 16), g.beat_bytes)
        await ClockCycles(dut.clk, 4)
        (ar,) = edges.at["ar"]
        (r,) = edges.at["r"]
        got.append(r - ar)
    hist = {v: got.count(v) for v in sorted(set(got))}
    tb.log.info(f"read latency histogram over {n} reads: {hist}")
    assert min(got) >= lat and max(got) <= lat + jit, hist
    assert set(got) == set(range(lat, lat + jit + 1)), f"values missing from {hist}"
    mean = sum(got) / n
    assert abs(mean - (lat + jit / 2)) < jit / 8, (mean, lat + jit / 2)
    for k in range(4):
        edges.at["w"].clear()
        edges.at["b"].clear()
        await masters[2].write(hbm.base(2) + 4096 + 64 * k, bytes(range(64)))
        await ClockCycles(dut.clk, 2)
        (w,) = edges.at["w"]
        (b,) = edges.at["b"]
        assert b - w == p["write_latency"], (b - w, p["write_latency"])


# --------------------------------------------------------------------------------------------
# DMAEngine over HBMModel


class SystemTB(streams.ClockedTB):
    def __init__(self, dut, config: str = "plain"):
        super().__init__(dut)
        p = tb_params()
        self.p = {**p, **timing(p, config)}
        dut.hbm_cfg.value = self.p["cfg"]
        self.g = geometry(p["geometry"])
        self.hbm = model_of(p)
        self.backdoor = Backdoor(dut, self.hbm)
        self.read_cmd = streams.Packer(ReadCommand)
        self.store_cmd = streams.Packer(StoreCommand)
        self.src_read = streams.StreamSource(dut, "read")
        self.src_store = streams.StreamSource(dut, "store")
        self.src_rows = streams.StreamSource(dut, "store_data")
        self.tiles = streams.StreamSink(dut, "tiles")
        self.rows = streams.StreamSink(dut, "rows")
        self.words = streams.StreamSink(dut, "word")
        args = streams.Packer(args_layout(self.g.channels))
        pointers = {f"hbm{ch}": self.hbm.base(ch) for ch in range(self.g.channels)}
        dut.args.value = args.pack(hbm_bytes=p["size_bytes"], **pointers)
        dut.clear.value = 0
        dut.record.value = 0
        self.tile_edges: list[int] = []
        self.ar_edges: list[int] = []
        self.r_edges: list[int] = []

    def _edge(self, cycle: int) -> None:
        if self.tiles.items and len(self.tiles.items) != len(self.tile_edges):
            self.tile_edges.append(cycle)
        if int(self.dut.ar0.value):
            self.ar_edges.append(cycle)
        if int(self.dut.r0.value):
            self.r_edges.append(cycle)

    async def run(self, until, timeout=100_000) -> int:
        return await streams.pump(
            self.clk,
            [self.src_read, self.src_store, self.src_rows],
            [self.tiles, self.rows, self.words],
            until=until,
            timeout=timeout,
            on_edge=self._edge,
        )


async def system_setup(dut, config: str = "plain"):
    tb = SystemTB(dut, config)
    await tb.reset()
    rng = np.random.default_rng(seeds.seed(7))
    model = Model.__new__(Model)
    model.g = tb.g
    model.data = rng.integers(0, 256, (tb.g.channels, tb.p["size_bytes"]), dtype=np.uint8)
    await tb.backdoor.load(model.data)
    return tb, model


@cocotb.test()
async def sustained_bandwidth(dut):
    """A dense matrix filling the channels, then head-interleaved K tiles: the tile stream
    moves at exactly the configured beats per cycle, and carries the layout's data."""
    tb, model = await system_setup(dut)
    g = tb.g
    rate = rate_of(tb.p)
    ds = BLOCK // g.lanes
    size = tb.p["size_bytes"]
    tiles = size // g.beat_bytes
    cols = 512
    rows = tiles // (cols // BLOCK * ds) * BLOCK
    n_head = 3
    k_rows = (size // g.beat_bytes) // (n_head * ds) * BLOCK  # every group of one head
    cases = [
        (
            "dense",
            read_command(ReadKind.TILES, rows=rows, cols=cols, live_rows=rows, live_cols=cols),
        ),
        (
            "kv",
            read_command(
                ReadKind.TILES,
                rows=k_rows,
                cols=BLOCK,
                live_rows=k_rows,
                live_cols=BLOCK,
                stride=n_head * ds,
                offset=ds * g.beat_bytes,  # head 1
            ),
        ),
    ]
    for name, c in cases:
        want = model.tiles(c)
        tb.tiles.items.clear()
        tb.tile_edges.clear()
        tb.src_read.send([tb.read_cmd.pack(**c)])
        await tb.run(until=lambda want=want: len(tb.tiles.items) >= len(want))
        assert tb.tiles.items == want, f"{name}: tiles differ from the layout"
        n = len(tb.tile_edges) - 1
        span = tb.tile_edges[-1] - tb.tile_edges[0]
        measured = Fraction(n, span)
        allowance = tb.p["bucket_beats"] + 1  # beats of credit the bucket may add
        tb.log.info(
            f"{name}: {n + 1} tiles, {n} in {span} cycles = {float(measured):.5f} tiles/cycle "
            f"(configured {float(rate):.5f}, {float(rate) * g.beat_bytes:.2f} B/cycle per channel)"
        )
        assert abs(n - span * rate) <= allowance, (
            f"{name}: {n} tiles in {span} cycles is {float(measured):.5f}/cycle, not "
            f"{float(rate):.5f}"
        )
        await ClockCycles(dut.clk, 20)


@cocotb.test()
async def latency_through_dma(dut):
    """The DMA's first AR to the first R beat on channel 0 is the configured latency, and the
    DMA keeps enough reads in flight that the link never waits on it."""
    tb, _ = await system_setup(dut)
    g = tb.g
    c = read_command(ReadKind.ROWS, length=g.tile_elems * 3, vbuf_row=0)
    tb.ar_edges.clear()
    tb.r_edges.clear()
    tb.src_read.send([tb.read_cmd.pack(**c)])
    await tb.run(until=lambda: len(tb.rows.items) >= 3 * g.lanes)
    assert tb.r_edges[0] - tb.ar_edges[0] == tb.p["read_latency"], (tb.ar_edges, tb.r_edges)


@cocotb.test()
async def stores_reach_memory(dut):
    """DMA stores through the model, checked by a backdoor dump."""
    tb, model = await system_setup(dut)
    g = tb.g
    rng = np.random.default_rng(seeds.seed(3))
    n = g.tile_elems + 100
    src = rng.integers(0, 1 << 16, -(-n // BLOCK) * BLOCK, dtype=np.uint16)
    cmds = [
        (store_command(StoreKind.VECTOR, offset=0x1000, length=n), src),
        (store_command(StoreKind.COL, offset=0x3000, index=77, length=130, cols=192), src[:192]),
        (store_command(StoreKind.WORD, offset=0x2A4, value=0x12345678), None),
    ]
    for c, rows in cmds:
        model.store(c, rows, None)
        if rows is not None:
            nrows = -(-c["length"] // BLOCK)
            tb.src_rows.send(
                int.from_bytes(rows[k * BLOCK : (k + 1) * BLOCK].astype("<u2").tobytes(), "little")
                for k in range(nrows)
            )
        tb.src_store.send([tb.store_cmd.pack(**c)])
    await tb.run(until=lambda: tb.src_store.idle and bool(dut.write_idle.value))
    got = await tb.backdoor.dump(0, tb.p["size_bytes"])
    bad = np.argwhere(got != model.data)
    assert bad.size == 0, f"{len(bad)} bytes differ, first {bad[:4].tolist()}"
    assert int(dut.error.value) == 0


@cocotb.test()
async def bandwidth_under_refresh(dut):
    """The calibrated model (refresh at independent phases, jittered latency): a dense matrix
    streams at the channels' sustained rate -- the refresh gaps cost no more than they take
    from the slowest channel, because every channel's DMA keeps enough reads in flight and
    enough beats buffered to cover a gap while the others run on."""
    await _stream_at_sustained_rate(dut, "calibrated")


@cocotb.test()
async def bandwidth_at_250_cycles(dut):
    """As :func:`bandwidth_under_refresh` with 250-275 cycles of read latency (the slow end of
    the sweep): the read FIFO (``READ_FIFO_BEATS``) still covers latency and refresh."""
    await _stream_at_sustained_rate(dut, "slow")


async def _stream_at_sustained_rate(dut, config: str):
    tb, model = await system_setup(dut, config)
    g = tb.g
    p = tb.p
    size = p["size_bytes"]
    cols = 512
    tiles = size // g.beat_bytes
    rows = tiles // (cols // BLOCK * (BLOCK // g.lanes)) * BLOCK
    c = read_command(ReadKind.TILES, rows=rows, cols=cols, live_rows=rows, live_cols=cols)
    want = model.tiles(c)
    tb.tile_edges.clear()
    tb.src_read.send([tb.read_cmd.pack(**c)])
    await tb.run(until=lambda: len(tb.tiles.items) >= len(want), timeout=10 * len(want))
    assert tb.tiles.items == want, "tiles differ from the layout"
    n = len(tb.tile_edges) - 1
    span = tb.tile_edges[-1] - tb.tile_edges[0]
    sustained = rate_of(p) * (1 - Fraction(p["refresh_cycles"], p["refresh_interval"]))
    got = Fraction(n, span)
    tb.log.info(
        f"{n + 1} tiles, {n} in {span} cycles = {float(got):.5f} tiles/cycle; the channels' "
        f"sustained rate {float(sustained):.5f}: {float(got / sustained):.2%}"
    )
    assert got >= sustained * Fraction(97, 100), (float(got), float(sustained))
