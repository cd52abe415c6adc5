"""cocotb testbench for rtl/dma.py (DMAEngine), run from test_dma.py.

Every HBM channel is a cocotbext-axi ``AxiRam`` holding the channel's buffer at a kernel pointer
that is deliberately not 4 KiB aligned, so runs cross 4 KiB boundaries at odd places. Expected
results come from :class:`Model`, which knows nothing of the engine: it addresses every element
through ``tandem.layout`` (``tiled_address``, ``vector_address``) on a NumPy copy of the
channels; a quantized matrix (``wfmt`` INT8/INT4) is packed by
``tandem.layout.pack_quant_tiled`` and must come back as its region's beats, scale beats
included. A monitor records every AR and AW handshake. Every burst must be beat aligned, at
most 256 beats and 4 KiB long and inside one 4 KiB page; the read bursts must moreover be exactly
the layout's runs of each command cut at every 4 KiB boundary and at the burst limit (the write
path splits with the same logic, and its result is checked byte for byte in memory).

With ``stalled``, every AXI channel of every RAM pauses at random (cocotbext-axi pause
generators) and the output streams see random backpressure.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiBus, AxiRam

from tandem import seeds
from tandem.geometry import geometry
from tandem.isa import WFMT_BITS, WFmt
from tandem.layout import (
    STATUS_BYTES,
    StatusRecord,
    pack_quant_tiled,
    quant_tiles,
    quant_wgroup,
    scale_run,
    tiled_address,
    vector_address,
    wfmt_for,
)
from tandem.numerics import BLOCK
from tandem.qweights import PER_CHANNEL, quantize_rtn
from tandem.rtl.axi import burst_limit
from tandem.rtl.dma import ReadCommand, ReadKind, StoreCommand, StoreKind, row_write_layout
from tandem.rtl.shell import args_layout
from tandem.sim import streams
from tandem.sim.runner import tb_params

BUFFER = 0x10000  # bytes of every channel's buffer (the hbm_bytes argument)
RAM = 0x40000  # bytes of every AxiRam (it wraps addresses modulo its size)


# --------------------------------------------------------------------------------------------
# the naive model


class Model:
    """What the channels' buffers hold and what each command must produce, by tandem.layout."""

    def __init__(self, geom, rng: np.random.Generator):
        self.g = geom
        self.data = rng.integers(0, 256, (geom.channels, BUFFER), dtype=np.uint8)

    @property
    def u16(self):
        return self.data.view(np.uint16)

    def quant_beats(self, c: dict) -> int:
        """Beats of a quantized matrix's region (tandem.layout): its tiles and scale beats."""
        bits = WFMT_BITS[WFmt(c["wfmt"])]
        n = quant_tiles(self.g, c["rows"], c["cols"], bits)
        return n + -(-n // scale_run(bits, c["wgroup"]))

    def tiles(self, c: dict) -> list[int]:
        """The MPU's weight stream of a MATVEC: tiles in (group, column block, row block) order,
        element (lane, j) of a tile = W[row, col] as tiled_address places it; for a quantized
        matrix the region's beats in order (a beat of every channel each)."""
        g, L = self.g, self.g.lanes
        if c.get("wfmt"):
            B, off = g.beat_bytes, c["offset"]
            return [_beat_row(self.data, off + k * B, B) for k in range(self.quant_beats(c))]
        rows = min(c["rows"], c["live_rows"])
        cols = min(c["cols"], c["live_cols"])
        stride = c["stride"] or BLOCK // L
        out = []
        lane, j = np.meshgrid(np.arange(L), np.arange(BLOCK), indexing="ij")
        for grp in range(-(-rows // BLOCK)):
            for cb in range(-(-cols // BLOCK)):
                for rb in range(BLOCK // L):
                    r = grp * BLOCK + rb * L + lane
                    col = cb * BLOCK + j
                    ch, off = tiled_address(g, c["offset"], c["cols"], stride, r, col)
                    out.append(_pack16(self.u16[ch, off // 2].ravel()))
        return out

    def rows(self, c: dict) -> list[tuple[int, int, int]]:
        """LOADV: (VBUF row, data, mask) per row; elements past the length are don't-care."""
        n = c["length"]
        out = []
        for k in range(-(-n // BLOCK)):
            idx = np.arange(k * BLOCK, min(n, (k + 1) * BLOCK))
            ch, off = vector_address(self.g, c["offset"], idx)
            vals = np.zeros(BLOCK, np.uint16)
            vals[: idx.size] = self.u16[ch, off // 2]
            out.append((c["vbuf_row"] + k, _pack16(vals), (1 << idx.size) - 1))
        return out

    def word(self, c: dict) -> int:
        a = c["offset"]
        return int.from_bytes(self.data[0, a : a + 4].tobytes(), "little")

    def store(self, c: dict, src: np.ndarray, record: StatusRecord) -> None:
        g, n = self.g, c["length"]
        kind = StoreKind(c["kind"])
        if kind is StoreKind.VECTOR:
            ch, off = vector_address(g, c["offset"], np.arange(n))
        elif kind in (StoreKind.ROW, StoreKind.COL):
            stride = c["stride"] or BLOCK // g.lanes
            r, col = (
                (c["index"], np.arange(n)) if kind is StoreKind.ROW else (np.arange(n), c["index"])
            )
            ch, off = tiled_address(g, c["offset"], c["cols"], stride, r, col)
        elif kind is StoreKind.WORD:
            a = c["offset"]
            self.data[0, a : a + 4] = np.frombuffer(c["value"].to_bytes(4, "little"), np.uint8)
            return
        else:
            self.data[0, :STATUS_BYTES] = np.frombuffer(record.pack(), np.uint8)
            return
        self.u16[ch, off // 2] = src[:n]

    # the beats each channel must read, in order

    def read_beats(self, c: dict) -> list[list[int]]:
        g, B = self.g, self.g.beat_bytes
        kind = ReadKind(c["kind"])
        if kind is ReadKind.WORD:
            return [[c["offset"] // B * B]] + [[] for _ in range(g.channels - 1)]
        if kind is ReadKind.ROWS:
            n = -(-c["length"] // g.tile_elems)
            beats = [c["offset"] + s * B for s in range(n)]
        elif c.get("wfmt"):  # the whole region, in order
            beats = [c["offset"] + k * B for k in range(self.quant_beats(c))]
        else:
            L = g.lanes
            rows = min(c["rows"], c["live_rows"])
            cols = min(c["cols"], c["live_cols"])
            stride = c["stride"] or BLOCK // L
            n_cb = -(-c["cols"] // BLOCK)
            beats = [
                c["offset"] + ((grp * n_cb + cb) * stride + rb) * B
                for grp in range(-(-rows // BLOCK))
                for cb in range(-(-cols // BLOCK))
                for rb in range(BLOCK // L)
            ]
        return [list(beats) for _ in range(g.channels)]


def split_bursts(base: int, offsets: list[int], beat_bytes: int) -> list[tuple[int, int]]:
    """The bursts a run of beats at ``offsets`` (one command's beats in one channel) must
    become: each contiguous segment cut at every 4 KiB boundary and at the burst limit."""
    limit = burst_limit(beat_bytes)
    out: list[tuple[int, int]] = []
    seg_start, seg_len = None, 0
    segments = []
    for off in offsets:
        if seg_start is not None and off == seg_start + seg_len * beat_bytes:
            seg_len += 1
        else:
            if seg_start is not None:
                segments.append((seg_start, seg_len))
            seg_start, seg_len = off, 1
    if seg_start is not None:
        segments.append((seg_start, seg_len))
    for start, n in segments:
        addr = base + start
        while n:
            k = min(n, limit, (4096 - addr % 4096) // beat_bytes)
            out.append((addr, k))
            addr += k * beat_bytes
            n -= k
    return out


def _beat_row(data: np.ndarray, offset: int, beat_bytes: int) -> int:
    """The beat at ``offset`` of every channel of ``data`` (uint8 [channels, bytes]) as one
    integer, channel 0 in the low bits: one transfer on ``tiles``."""
    return int.from_bytes(data[:, offset : offset + beat_bytes].tobytes(), "little")


def _pack16(values: np.ndarray) -> int:
    return int.from_bytes(np.asarray(values, np.uint16).astype("<u2").tobytes(), "little")


def _unpack16(word: int, n: int) -> np.ndarray:
    return np.frombuffer(word.to_bytes(2 * n, "little"), "<u2").astype(np.uint16)


# --------------------------------------------------------------------------------------------
# testbench


class BurstMonitor:
    """Records AR or AW handshakes of every channel as (address, beats)."""

    def __init__(self, dut, channels: int, prefix: str):
        self.handles = [
            tuple(
                getattr(dut, f"m_axi_hbm{ch}_{prefix}{s}")
                for s in ("valid", "ready", "addr", "len")
            )
            for ch in range(channels)
        ]
        self.bursts: list[list[tuple[int, int]]] = [[] for _ in range(channels)]

    def sample(self) -> None:
        for ch, (valid, ready, addr, length) in enumerate(self.handles):
            if int(valid.value) and int(ready.value):
                self.bursts[ch].append((int(addr.value), int(length.value) + 1))

    def check_rules(self, beat_bytes: int) -> None:
        """Every burst: beat aligned, 1..limit beats, inside one 4 KiB page."""
        limit = burst_limit(beat_bytes)
        for ch, bursts in enumerate(self.bursts):
            for addr, n in bursts:
                end = addr + n * beat_bytes
                assert addr % beat_bytes == 0, f"ch{ch}: burst at {addr:#x} is not beat aligned"
                assert 1 <= n <= limit, f"ch{ch}: burst of {n} beats (limit {limit})"
                assert addr // 4096 == (end - 1) // 4096, (
                    f"ch{ch}: burst [{addr:#x}, {end:#x}) crosses a 4 KiB boundary"
                )

    def clear(self) -> None:
        self.bursts = [[] for _ in self.bursts]


class DmaTB(streams.ClockedTB):
    def __init__(self, dut, *, stalled: bool, seed: int):
        super().__init__(dut)
        p = tb_params()
        self.g = geometry(p["geometry"])
        g = self.g
        self.rng = np.random.default_rng(seeds.seed(seed))
        self.pyrng = random.Random(seeds.seed(seed))
        self.base = [0x1000 * (ch + 1) + 0x40 * (2 * ch + 1) for ch in range(g.channels)]
        self.rams = []
        for ch in range(g.channels):
            ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_hbm{ch}"), dut.clk, dut.rst, size=RAM)
            for if_ in (ram.read_if, ram.write_if):
                if_.log.setLevel("WARNING")
            if stalled:
                for k, chan in enumerate(
                    (
                        ram.read_if.ar_channel,
                        ram.read_if.r_channel,
                        ram.write_if.aw_channel,
                        ram.write_if.w_channel,
                        ram.write_if.b_channel,
                    )
                ):
                    chan.set_pause_generator(streams.bernoulli(0.3, seed * 100 + ch * 10 + k))
            self.rams.append(ram)
        self.model = Model(g, self.rng)
        self.load()
        self.args = streams.Packer(args_layout(g.channels))
        self.set_args(hbm_bytes=BUFFER)
        self.read_cmd = streams.Packer(ReadCommand)
        self.store_cmd = streams.Packer(StoreCommand)
        ready = (lambda s: streams.bernoulli(0.6, s)) if stalled else (lambda s: None)
        self.src_read = streams.StreamSource(dut, "read")
        self.src_store = streams.StreamSource(dut, "store")
        self.src_rows = streams.StreamSource(dut, "store_data")
        self.tiles = streams.StreamSink(dut, "tiles", pattern=ready(seed + 1))
        self.rows = streams.StreamSink(dut, "rows", pattern=ready(seed + 2))
        self.words = streams.StreamSink(dut, "word", pattern=ready(seed + 3))
        self.ar = BurstMonitor(dut, g.channels, "ar")
        self.aw = BurstMonitor(dut, g.channels, "aw")
        dut.clear.value = 0
        dut.record.value = 0

    def load(self) -> None:
        for ch, ram in enumerate(self.rams):
            ram.write(self.base[ch], self.model.data[ch].tobytes())

    def memory(self) -> np.ndarray:
        return np.stack(
            [
                np.frombuffer(r.read(self.base[ch], BUFFER), np.uint8)
                for ch, r in enumerate(self.rams)
            ]
        )

    def set_args(self, **values) -> None:
        fields = {f"hbm{ch}": b for ch, b in enumerate(self.base)}
        fields.update(values)
        self.dut.args.value = self.args.pack(**fields)

    def errors(self) -> tuple[int, int]:
        word = int(self.dut.error.value)
        return word & 1, (word >> 1) & 1

    async def clear_errors(self) -> None:
        self.dut.clear.value = 1
        await ClockCycles(self.clk, 1)
        self.dut.clear.value = 0
        await ClockCycles(self.clk, 1)  # reads right after an edge show the values before it

    def _edge(self, _cycle: int) -> None:
        self.ar.sample()
        self.aw.sample()

    async def run(self, until, timeout: int = 200_000) -> int:
        sources = [self.src_read, self.src_store, self.src_rows]
        sinks = [self.tiles, self.rows, self.words]
        return await streams.pump(
            self.clk, sources, sinks, until=until, timeout=timeout, on_edge=self._edge
        )

    def idle(self) -> bool:
        return (
            self.src_read.idle
            and self.src_store.idle
            and self.src_rows.idle
            and bool(self.dut.read_idle.value)
            and bool(self.dut.write_idle.value)
        )


def read_command(kind: ReadKind, **fields) -> dict:
    c = dict.fromkeys(
        (
            *("offset", "rows", "cols", "live_rows", "live_cols", "stride", "length", "vbuf_row"),
            *("tag", "wfmt", "wgroup"),
        ),
        0,
    )
    c.update(fields)
    c["kind"] = kind.value
    return c


def store_command(kind: StoreKind, **fields) -> dict:
    c = dict.fromkeys(("offset", "length", "index", "cols", "stride", "value", "tag"), 0)
    c.update(fields)
    c["kind"] = kind.value
    return c


def random_reads(tb: DmaTB, n: int) -> list[dict]:
    """A mix of dense and strided (KV-like) matrices, vectors and words, all in range."""
    g, rng = tb.g, tb.pyrng
    B, L = g.beat_bytes, g.lanes
    ds = BLOCK // L
    cmds = []
    while len(cmds) < n:
        kind = rng.choice(["dense", "dense", "k", "vt", "rows", "word"])
        if kind == "dense":
            rows, cols = rng.randint(1, 160), rng.randint(1, 200)
            tiles = -(-rows // BLOCK) * -(-cols // BLOCK) * ds
            c = read_command(
                ReadKind.TILES,
                rows=rows,
                cols=cols,
                live_rows=rng.choice([rows, rng.randint(0, rows + 5)]),
                live_cols=rng.choice([cols, rng.randint(1, cols + 5)]),
                offset=rng.randrange(0, (BUFFER - tiles * B) // 64) * 64,
            )
        elif kind in ("k", "vt"):
            n_head, n_ctx = rng.randint(2, 3), rng.choice([64, 128, 192])
            stride = n_head * ds
            head = rng.randrange(n_head)
            span = -(-n_ctx // BLOCK) * stride * B
            region = rng.randrange(0, (BUFFER - span) // 64) * 64
            live = rng.randint(1, n_ctx)
            rows, cols = (n_ctx, BLOCK) if kind == "k" else (BLOCK, n_ctx)
            c = read_command(
                ReadKind.TILES,
                rows=rows,
                cols=cols,
                live_rows=live if kind == "k" else rows,
                live_cols=live if kind == "vt" else cols,
                stride=stride,
                offset=region + head * ds * B,
            )
        elif kind == "rows":
            length = rng.randint(1, 5 * g.tile_elems)
            span = -(-length // g.tile_elems) * B
            c = read_command(
                ReadKind.ROWS,
                length=length,
                vbuf_row=rng.randrange(0, 32),
                offset=rng.randrange(0, (BUFFER - span) // 64) * 64,
            )
        else:
            c = read_command(ReadKind.WORD, offset=rng.randrange(0, BUFFER // 4) * 4)
        c["tag"] = len(cmds)
        cmds.append(c)
    return cmds


async def run_reads(tb: DmaTB, cmds: list[dict]) -> None:
    """Issue ``cmds`` and check every output and every burst against the model."""
    m = tb.model
    want_tiles, want_rows, want_words = [], [], []
    want_bursts = [[] for _ in range(tb.g.channels)]
    for c in cmds:
        kind = ReadKind(c["kind"])
        if kind is ReadKind.TILES:
            want_tiles += m.tiles(c)
        elif kind is ReadKind.ROWS:
            want_rows += m.rows(c)
        else:
            want_words.append(m.word(c))
        for ch, beats in enumerate(m.read_beats(c)):
            want_bursts[ch] += split_bursts(tb.base[ch], beats, tb.g.beat_bytes)
    tb.tiles.items.clear()
    tb.rows.items.clear()
    tb.words.items.clear()
    tb.ar.clear()
    tb.src_read.send(tb.read_cmd.pack(**c) for c in cmds)
    cycles = await tb.run(
        until=lambda: (
            tb.idle()
            and len(tb.tiles.items) >= len(want_tiles)
            and len(tb.rows.items) >= len(want_rows)
            and len(tb.words.items) >= len(want_words)
        )
    )
    assert tb.errors() == (0, 0), f"error flags {tb.errors()} after in-range reads"
    assert len(tb.tiles.items) == len(want_tiles), (
        f"{len(tb.tiles.items)} tiles, want {len(want_tiles)}"
    )
    for k, (got, want) in enumerate(zip(tb.tiles.items, want_tiles, strict=True)):
        assert got == want, f"tile {k} differs from the layout"
    assert len(tb.rows.items) == len(want_rows)
    row_layout = streams.Packer(row_write_layout(tb.g))
    for k, (got, (addr, data, mask)) in enumerate(zip(tb.rows.items, want_rows, strict=True)):
        f = row_layout.unpack(got)
        assert f["addr"] == addr, f"row {k}: VBUF row {f['addr']}, want {addr}"
        assert f["mask"] == mask, f"row {k}: mask {f['mask']:#x}, want {mask:#x}"
        got_vals = _unpack16(_pack16(f["data"]), BLOCK)
        want_vals = _unpack16(data, BLOCK)
        live = mask.bit_length()
        assert (got_vals[:live] == want_vals[:live]).all(), f"row {k}: data differs"
    assert tb.words.items == want_words, f"words {tb.words.items} != {want_words}"
    tb.ar.check_rules(tb.g.beat_bytes)
    for ch in range(tb.g.channels):
        assert tb.ar.bursts[ch] == want_bursts[ch], (
            f"ch{ch}: bursts are not the layout's runs split at 4 KiB and the burst limit"
        )
    n_bursts = sum(len(b) for b in tb.ar.bursts)
    tb.log.info(
        f"{len(cmds)} reads: {len(want_tiles)} tiles, {len(want_rows)} rows, "
        f"{len(want_words)} words, {n_bursts} bursts in {cycles} cycles"
    )


async def setup(dut, *, stalled: bool, seed: int) -> DmaTB:
    tb = DmaTB(dut, stalled=stalled, seed=seed)
    await tb.reset()
    return tb


# --------------------------------------------------------------------------------------------
# tests


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def reads(dut, stalled):
    """Dense and strided matrices, vectors and words: outputs and bursts as the layout says."""
    tb = await setup(dut, stalled=stalled, seed=11 + stalled)
    await run_reads(tb, random_reads(tb, 24 if stalled else 40))


@cocotb.test()
async def boundary_bursts(dut):
    """Long runs starting just below 4 KiB boundaries, in every channel at once (each channel's
    pointer puts the boundary at a different beat): split exactly at the boundaries."""
    tb = await setup(dut, stalled=False, seed=3)
    g = tb.g
    ds = BLOCK // g.lanes
    cmds = []
    for k in range(4):
        rows = 64 * (k + 1)
        cmds.append(
            read_command(
                ReadKind.TILES,
                rows=rows,
                cols=128,
                live_rows=rows,
                live_cols=128,
                offset=4096 * (k + 1) - 64 * (k + 1),
                tag=k,
            )
        )
    assert sum(len(tb.model.tiles(c)) for c in cmds) == 10 * 2 * ds
    await run_reads(tb, cmds)
    assert any(n == burst_limit(g.beat_bytes) for b in tb.ar.bursts for _, n in b)


QUANT_CASES = [  # (rows, cols, bits, group): odd shapes, K = 32, 16, 8, 16 and 32
    (70, 200, 8, PER_CHANNEL),
    (70, 200, 8, 64),
    (130, 300, 4, 64),
    (130, 300, 4, 128),
    (130, 300, 4, PER_CHANNEL),
]


def place_quant(tb: DmaTB, rows, cols, bits, group, offset, **fields) -> tuple[dict, list[int]]:
    """A random matrix quantized (``quantize_rtn``) and packed (``pack_quant_tiled``) into
    every channel at ``offset``, in the model and in the RAMs: its TILES command (``fields``
    added) and the transfers the packed bytes say it must deliver, a beat of every channel
    each, channel 0 in the low bits."""
    g, B = tb.g, tb.g.beat_bytes
    m = quantize_rtn(tb.rng.standard_normal((rows, cols)), bits, group)
    packed = pack_quant_tiled(g, m)
    c = read_command(
        ReadKind.TILES,
        rows=rows,
        cols=cols,
        live_rows=rows,
        live_cols=cols,
        offset=offset,
        wfmt=int(wfmt_for(bits)),
        wgroup=quant_wgroup(bits, m.group, cols),
    )
    c.update(fields)
    beats = tb.model.quant_beats(c)
    assert beats * B <= packed.shape[1] and not packed[:, beats * B :].any()
    assert offset + packed.shape[1] <= BUFFER
    tb.model.data[:, offset : offset + packed.shape[1]] = packed
    for ch, ram in enumerate(tb.rams):
        ram.write(tb.base[ch] + offset, packed[ch].tobytes())
    want = [_beat_row(packed, k * B, B) for k in range(beats)]
    assert tb.model.tiles(c) == want
    return c, want


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def quant_reads(dut, stalled):
    """Quantized TILES reads (INT8 and INT4; per channel, groups of 64 and 128; odd shapes):
    each delivers its packed region's beats in order, scale beats included, as one run per
    channel (cut only at 4 KiB and the burst limit), between FP16 reads; ``live_*`` and
    ``stride`` are ignored; an empty matrix streams nothing."""
    tb = await setup(dut, stalled=stalled, seed=61 + stalled)
    rng = tb.pyrng
    fp16 = random_reads(tb, len(QUANT_CASES))
    cmds, offset = [], 0
    for k, case in enumerate(QUANT_CASES):
        offset += rng.randrange(0, 6) * 64
        odd = {"live_rows": 1, "live_cols": 3, "stride": 5} if k == 2 else {}
        c, want = place_quant(tb, *case, offset, tag=100 + k, **odd)
        offset += len(want) * tb.g.beat_bytes
        cmds += [c, fp16[k]]
    cmds.insert(3, read_command(ReadKind.TILES, cols=200, wfmt=1, offset=64, tag=99))  # 0 rows
    await run_reads(tb, cmds)


@cocotb.test()
async def quant_range(dut):
    """A quantized region ending a line past hbm_bytes: HBM_RANGE with its tag, as many zero
    transfers as its beats, no burst; the same region ending at hbm_bytes reads normally."""
    tb = await setup(dut, stalled=True, seed=71)
    B = tb.g.beat_bytes
    limit = BUFFER - 0x800
    tb.set_args(hbm_bytes=limit)
    rows, cols, bits, group = 130, 300, 4, 64
    probe = read_command(ReadKind.TILES, rows=rows, cols=cols, wfmt=int(wfmt_for(bits)))
    probe["wgroup"] = quant_wgroup(bits, group, cols)
    region = tb.model.quant_beats(probe) * B
    c, want = place_quant(tb, rows, cols, bits, group, limit - region + 64, tag=7)
    tb.ar.clear()
    tb.src_read.send([tb.read_cmd.pack(**c)])
    await tb.run(until=lambda: tb.idle() and len(tb.tiles.items) >= len(want))
    assert tb.errors() == (1, 0), tb.errors()
    assert int(dut.error_tag.value) == 7, "error_tag is not the failing command's tag"
    assert len(tb.tiles.items) == len(want) and all(t == 0 for t in tb.tiles.items)
    assert not any(tb.ar.bursts), f"an out-of-range read reached the memory: {tb.ar.bursts}"
    await tb.clear_errors()
    c, _ = place_quant(tb, rows, cols, bits, group, limit - region, tag=8)
    await run_reads(tb, [c])


def random_stores(tb: DmaTB, n: int) -> list[tuple[dict, int]]:
    """(command, rows it takes) of every kind, all in range."""
    g, rng = tb.g, tb.pyrng
    B, L = g.beat_bytes, g.lanes
    ds = BLOCK // L
    out = []
    for k in range(n):
        kind = rng.choice([StoreKind.VECTOR, StoreKind.ROW, StoreKind.COL, StoreKind.WORD])
        if kind is StoreKind.VECTOR:
            length = rng.randint(0, 3 * g.tile_elems)
            span = -(-length // g.tile_elems) * B
            c = store_command(
                kind, length=length, offset=rng.randrange(0, (BUFFER - span) // 64) * 64
            )
        elif kind in (StoreKind.ROW, StoreKind.COL):
            dense = rng.random() < 0.5
            rows, cols = rng.randint(1, 200), rng.randint(1, 200)
            stride = 0 if dense else rng.randint(ds + 1, 3 * ds)
            n_cb = -(-cols // BLOCK)
            span = ((-(-rows // BLOCK) - 1) * n_cb * (stride or ds) + n_cb * (stride or ds)) * B
            if span >= BUFFER:
                continue
            offset = rng.randrange(0, (BUFFER - span) // 64) * 64
            along, across = (rows, cols) if kind is StoreKind.ROW else (cols, rows)
            c = store_command(
                kind,
                offset=offset,
                index=rng.randrange(along),
                length=rng.randint(0, across),
                cols=cols,
                stride=stride,
            )
        else:
            c = store_command(
                kind, offset=rng.randrange(0, BUFFER // 4) * 4, value=rng.getrandbits(32)
            )
        c["tag"] = k
        rows_taken = 0 if kind is StoreKind.WORD else -(-c["length"] // BLOCK)
        out.append((c, rows_taken))
    return out


async def run_stores(tb: DmaTB, stores, record: StatusRecord | None = None) -> int:
    rng = tb.rng
    for c, n_rows in stores:
        src = rng.integers(0, 1 << 16, n_rows * BLOCK, dtype=np.uint16)
        tb.model.store(c, src, record)
        tb.src_rows.send(_pack16(src[k * BLOCK : (k + 1) * BLOCK]) for k in range(n_rows))
        tb.src_store.send([tb.store_cmd.pack(**c)])
    return await tb.run(until=tb.idle)


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def stores(dut, stalled):
    """STOREV, STROW, STCOL, STW and the status record: afterwards every byte of every channel
    equals the model (so nothing outside the stored elements changed)."""
    tb = await setup(dut, stalled=stalled, seed=21 + stalled)
    stores = random_stores(tb, 30 if stalled else 50)
    tb.aw.clear()
    cycles = await run_stores(tb, stores)
    assert tb.errors() == (0, 0), f"error flags {tb.errors()} after in-range stores"
    got = tb.memory()
    bad = np.argwhere(got != tb.model.data)
    assert bad.size == 0, f"{len(bad)} bytes differ, first (channel, byte) {bad[:5].tolist()}"
    tb.aw.check_rules(tb.g.beat_bytes)
    tb.log.info(f"{len(stores)} stores in {cycles} cycles, {sum(map(len, tb.aw.bursts))} bursts")

    record = StatusRecord(status=0x21, pc=1234, tokens=7, halt_code=3, cycles=(5 << 40) | 99)
    dut.record.value = int.from_bytes(record.pack()[:24], "little")
    await run_stores(tb, [(store_command(StoreKind.STATUS), 0)], record)
    dut.record.value = 0
    assert (tb.memory() == tb.model.data).all(), "the status record is not as StatusRecord packs it"
    assert StatusRecord.unpack(tb.memory()[0, :STATUS_BYTES]) == record


@cocotb.test()
async def read_after_store(dut):
    """A store, then (after write_idle, as SYNC waits) reads of what was stored."""
    tb = await setup(dut, stalled=True, seed=31)
    g = tb.g
    stores = [
        (store_command(StoreKind.VECTOR, offset=0x2000, length=g.tile_elems + 70), 0),
        (store_command(StoreKind.WORD, offset=0x3004, value=0xDEADBEEF), 0),
    ]
    stores[0] = (stores[0][0], -(-stores[0][0]["length"] // BLOCK))
    await run_stores(tb, stores)
    await run_reads(
        tb,
        [
            read_command(ReadKind.ROWS, offset=0x2000, length=g.tile_elems + 70, vbuf_row=3),
            read_command(ReadKind.WORD, offset=0x3004),
        ],
    )
    assert tb.words.items == [0xDEADBEEF]


@cocotb.test()
async def range_errors(dut):
    """Commands past hbm_bytes set HBM_RANGE with their tag, complete with zero data (reads) or
    by taking their rows (stores), touch no memory; the engine then works normally."""
    tb = await setup(dut, stalled=True, seed=41)
    g = tb.g
    B, ds = g.beat_bytes, BLOCK // g.lanes
    limit = BUFFER - 0x800
    tb.set_args(hbm_bytes=limit)
    before = tb.memory()
    # a matrix whose last tile ends 64 bytes past the limit
    rows, cols = 128, 64
    tiles = 2 * ds
    off = limit - tiles * B + 64
    bad_reads = [
        read_command(
            ReadKind.TILES, rows=rows, cols=cols, live_rows=rows, live_cols=cols, offset=off, tag=7
        ),
        read_command(ReadKind.ROWS, length=70, vbuf_row=5, offset=limit, tag=8),
        read_command(ReadKind.WORD, offset=limit, tag=9),
    ]
    tb.ar.clear()
    tb.src_read.send(tb.read_cmd.pack(**c) for c in bad_reads)
    await tb.run(
        until=lambda: (
            tb.idle()
            and len(tb.tiles.items) >= tiles
            and len(tb.rows.items) >= 2
            and len(tb.words.items) >= 1
        )
    )
    assert tb.errors() == (1, 0), tb.errors()
    assert int(dut.error_tag.value) == 7, "error_tag is not the first failing command's tag"
    assert int(dut.error_read.value) == 1, "error_read is low after a read's range error"
    assert all(t == 0 for t in tb.tiles.items) and len(tb.tiles.items) == tiles
    assert len(tb.rows.items) == 2 and tb.words.items == [0]
    assert not any(tb.ar.bursts), f"out-of-range reads reached the memory: {tb.ar.bursts}"

    # the lowest tag is reported, whichever comes first: a later store's (tag 9) does not
    # replace it, an earlier one's (tag 5) does
    for tag, want in ((9, 7), (5, 5)):
        tb.src_rows.send([0])
        tb.src_store.send(
            [tb.store_cmd.pack(**store_command(StoreKind.VECTOR, offset=limit, length=64, tag=tag))]
        )
        await tb.run(until=tb.idle)
        assert int(dut.error_tag.value) == want and int(dut.error_read.value) == (want == 7)
    assert tb.errors() == (1, 0), tb.errors()

    await tb.clear_errors()
    assert tb.errors() == (0, 0)
    bad_stores = [
        (store_command(StoreKind.VECTOR, offset=limit, length=100, tag=20), 2),
        (store_command(StoreKind.ROW, offset=limit - B, index=3, length=64, cols=64, tag=21), 1),
        (
            store_command(
                StoreKind.COL, offset=limit - ds * B + B, index=5, length=64, cols=64, tag=22
            ),
            1,
        ),
        (store_command(StoreKind.WORD, offset=limit, value=1, tag=23), 0),
    ]
    tb.aw.clear()
    for c, n_rows in bad_stores:
        tb.src_rows.send([0] * n_rows)
        tb.src_store.send([tb.store_cmd.pack(**c)])
    await tb.run(until=tb.idle)
    assert tb.errors() == (1, 0) and int(dut.error_tag.value) == 20
    assert int(dut.error_read.value) == 0
    assert not any(tb.aw.bursts), "out-of-range stores reached the memory"
    assert (tb.memory() == before).all(), "out-of-range stores changed memory"

    # hbm_bytes = 0 means no limit; then everything works again
    await tb.clear_errors()
    tb.set_args(hbm_bytes=0)
    await run_reads(tb, random_reads(tb, 6))
    tb.set_args(hbm_bytes=BUFFER)
    await run_stores(tb, random_stores(tb, 6))
    assert (tb.memory() == tb.model.data).all()
    assert tb.errors() == (0, 0)


@cocotb.test()
async def axi_errors(dut):
    """SLVERR on a read and on a write set AXI_ERROR, error_tag the failing command's tag; the
    commands still complete."""
    tb = await setup(dut, stalled=False, seed=51)
    g = tb.g
    bad_ch = 0  # channel 0 also takes the word store
    lo = tb.base[bad_ch] + 0x4000

    async def failing_read(address, length):
        if lo <= address < lo + 0x1000:
            raise ValueError("injected read error")
        return tb.rams[bad_ch].read(address % RAM, length)

    async def failing_write(address, data):
        if lo <= address < lo + 0x1000:
            raise ValueError("injected write error")
        tb.rams[bad_ch].write(address % RAM, data)

    tb.rams[bad_ch].read_if._read = failing_read
    tb.rams[bad_ch].write_if._write = failing_write
    good = read_command(ReadKind.WORD, offset=0x100, tag=10)
    c = read_command(ReadKind.ROWS, offset=0x4000, length=g.tile_elems * 2, vbuf_row=0, tag=11)
    tb.src_read.send([tb.read_cmd.pack(**good), tb.read_cmd.pack(**c)])
    await tb.run(until=lambda: tb.idle() and len(tb.rows.items) >= 2 * g.lanes)
    assert tb.errors() == (0, 1), tb.errors()
    assert int(dut.error_tag.value) == 11, "error_tag is not the failing read's tag"
    await tb.clear_errors()
    assert tb.errors() == (0, 0)
    await run_stores(
        tb,
        [
            (store_command(StoreKind.WORD, offset=0x100, value=4, tag=20), 0),
            (store_command(StoreKind.WORD, offset=0x4010, value=5, tag=21), 0),
        ],
    )
    assert tb.errors() == (0, 1), tb.errors()
    assert int(dut.error_tag.value) == 21, "error_tag is not the failing store's tag"
    await tb.clear_errors()
    await run_stores(tb, [(store_command(StoreKind.WORD, offset=0x100, value=5), 0)])
    assert tb.errors() == (0, 0)

    # The lowest tag of all errors is reported, of either kind: a failing read (30), then a
    # failing store with a lower tag (25), then an out-of-range read with a lower one still (24)
    tb.src_read.send([tb.read_cmd.pack(**{**c, "tag": 30})])
    await tb.run(until=lambda: tb.idle() and len(tb.rows.items) >= 4 * g.lanes)
    assert tb.errors() == (0, 1) and int(dut.error_tag.value) == 30
    assert int(dut.error_read.value) == 1
    await run_stores(tb, [(store_command(StoreKind.WORD, offset=0x4010, value=5, tag=25), 0)])
    assert tb.errors() == (0, 1) and int(dut.error_tag.value) == 25
    assert int(dut.error_read.value) == 0
    tb.set_args(hbm_bytes=0x1000)
    tb.src_read.send([tb.read_cmd.pack(**read_command(ReadKind.WORD, offset=0x2000, tag=24))])
    await tb.run(until=lambda: tb.idle() and len(tb.words.items) >= 2)
    assert tb.errors() == (1, 0), "the reported error's kind is the lowest tag's"
    assert int(dut.error_tag.value) == 24 and int(dut.error_read.value) == 1
    await tb.clear_errors()
    assert tb.errors() == (0, 0)
