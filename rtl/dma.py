"""DMA: one AXI4 manager per HBM pseudo-channel, and the engine that runs the ISA's memory
operations over all of them.

Everything but the control area is striped (:mod:`tandem.layout`): a tensor occupies the same
byte range in every channel, so one command drives every channel with the same per-channel
offsets, and each channel adds its own kernel pointer. :class:`ChannelDMA` turns runs of beats
into AXI4 bursts for one channel; :class:`DMAEngine` plans the runs of each ISA operation,
merges the channels' read data into MPU weight tiles or VBUF rows, scatters stores into beats
with byte strobes, and checks every access against the ``hbm_bytes`` argument first.
"""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from types import SimpleNamespace

from amaranth import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from tandem import regmap
from tandem.checks import check_int
from tandem.geometry import CoreGeometry
from tandem.layout import STATUS_BYTES
from tandem.numerics import BLOCK

from .axi import FOUR_KB, AXI4Signature, Burst, Resp, burst_limit
from .component import GeometryComponent
from .quant import log2_exact as _log2
from .quant import quant_table
from .shell import args_layout
from .vbuf import Row, row_addr_bits

__all__ = [
    "ChannelDMA",
    "ChannelRun",
    "DMAEngine",
    "DMAErrors",
    "ReadCommand",
    "ReadKind",
    "StatusRecordLayout",
    "StoreCommand",
    "StoreKind",
    "row_write_layout",
    "write_beat_layout",
]

ROW = Row
"""One VBUF row (64 binary16 values, element 0 in the low bits): rtl/vbuf.py's ``Row``."""

_RUN_BEATS = 26  # a dense 65535 x 65535 matrix is 2**25 tiles on the smallest-lane geometry

READ_FIFO_BEATS = 512
"""Each channel's read FIFO, in beats. A channel keeps its link busy only while the beats it
has requested and not yet delivered fit: about ``latency x rate`` in flight, plus what it runs
ahead of the slowest channel while that one refreshes (the merge takes a beat of every channel
at once), plus one burst of granularity (a burst is requested only when all its beats fit).
Under the calibrated HBM model (sim/hbm_model.py) at 250 cycles of read latency that is about
(250 + 25 + 88) x 0.88 + 64 = 383 beats; 256 (the depth before) covered about 190 cycles
without refresh. 32 channels x 512 beats x 512 bits is 256 RAMB36-equivalents in SLR0."""


class ChannelRun(data.Struct):
    """A run of consecutive beats in one channel: ``offset`` bytes past the channel's kernel
    pointer (low bits below the beat size are ignored), ``beats`` full-width beats (0: nothing).
    ``tag``: the command's tag (:class:`ReadCommand`), kept with every burst of the run so an
    error response can name the instruction (:attr:`ChannelDMA.error_tag`)."""

    offset: unsigned(32)
    beats: unsigned(_RUN_BEATS)
    tag: unsigned(16)


def write_beat_layout(port_bits: int) -> data.StructLayout:
    """A write beat: ``data`` and its byte strobes ``strb`` (bit ``k`` writes byte ``k``)."""
    return data.StructLayout({"data": port_bits, "strb": port_bits // 8})


def row_write_layout(geom: CoreGeometry) -> data.StructLayout:
    """What a VBUF write port takes (rtl/vbuf.py ``WritePortSignature``): the row ``addr``,
    ``data`` and the element ``mask``."""
    return data.StructLayout(
        {"addr": row_addr_bits(geom.vbuf_elems // BLOCK), "data": ROW, "mask": BLOCK}
    )


class ReadKind(enum.Enum, shape=2):
    """Where a read command's data goes."""

    TILES = 0  # MATVEC weights: one tile (a beat of every channel) per transfer on ``tiles``
    ROWS = 1  # LOADV: a striped vector, one VBUF row per transfer on ``rows``
    WORD = 2  # LDW: one 32-bit word of channel 0 on ``word``


class ReadCommand(data.Struct):
    """One read, with the instruction's register operands already resolved by the controller.

    ``offset`` is a byte offset inside every channel's buffer: the matrix base ``line * 64``
    (TILES), the vector base ``(line + R[ri] * stride) * 64`` (ROWS), or the word's byte address
    ``line * 64 + R[ri] * 4`` (WORD, channel 0 only).

    TILES takes the MATVEC fields as :class:`tandem.rtl.mpu.MatvecCommand` does: ``rows``,
    ``cols`` allocated, ``live_rows``, ``live_cols`` (the DMA streams ``min(live, allocated)`` of
    each, whole 64-row groups and 64-column blocks, in the MPU's order) and the tiled
    ``stride`` (0: dense). With ``wfmt`` INT8 or INT4 (:class:`tandem.isa.WFmt`; ``wgroup`` a
    :data:`tandem.isa.WGROUPS` code) the matrix is quantized (tandem.layout's quantized tiled
    form) and TILES streams its whole region, scale beats included: ``live_*`` and ``stride``
    are ignored (a quantized MATVEC is dense and whole). ``wfmt`` 0, and the reserved 3, read
    FP16 tiles; ROWS and WORD ignore both fields. ROWS takes ``length`` in elements and the
    first VBUF row ``vbuf_row`` (``dst // 64``). ``tag`` comes back on
    :attr:`DMAEngine.error_tag` if the command is out of range or one of its bursts gets an
    error response (the controller passes the instruction's pc).
    """

    kind: ReadKind
    offset: unsigned(32)
    rows: unsigned(16)
    cols: unsigned(16)
    live_rows: unsigned(16)
    live_cols: unsigned(16)
    stride: unsigned(12)
    length: unsigned(16)
    vbuf_row: unsigned(16)
    tag: unsigned(16)
    wfmt: unsigned(2)
    wgroup: unsigned(2)


def quant_read_table() -> dict[tuple[int, int], tuple[int, int]]:
    """``{(wfmt, wgroup): (log2 span, log2 K)}`` for every quantized format and group code: a
    quantized tile's columns and the tiles after each scale beat, the constants of a quantized
    TILES read (:func:`rtl.quant.quant_table`, the MPU's too)."""
    return {key: (q.span_log2, q.run_log2) for key, q in quant_table().items()}


class StoreKind(enum.Enum, shape=3):
    """What a store command writes."""

    VECTOR = 0  # STOREV: a striped vector
    ROW = 1  # STROW: elements 0..length-1 of row ``index`` of a tiled matrix
    COL = 2  # STCOL: elements 0..length-1 of column ``index`` of a tiled matrix
    WORD = 3  # STW: the 32-bit ``value`` at channel 0, byte ``offset``
    STATUS = 4  # the status record (``record``) at channel 0, offset 0


class StoreCommand(data.Struct):
    """One store, register operands resolved. ``offset`` is the vector base
    ``(line + R[ri] * stride) * 64`` (VECTOR), the matrix base ``line * 64`` (ROW, COL) or the
    byte address ``line * 64 + R[ri] * 4`` (WORD); ``index`` is ``R[ri]`` for ROW and COL,
    ``cols`` and ``stride`` are the instruction's fields (stride 0: dense). VECTOR, ROW and COL
    take ``ceil(length / 64)`` rows from :attr:`DMAEngine.store_data`. ``tag`` as in
    :class:`ReadCommand`."""

    kind: StoreKind
    offset: unsigned(32)
    length: unsigned(16)
    index: unsigned(32)
    cols: unsigned(16)
    stride: unsigned(12)
    value: unsigned(32)
    tag: unsigned(16)


class StatusRecordLayout(data.Struct):
    """The fields of :class:`tandem.layout.StatusRecord`, in its byte order (``<IIIIQ``)."""

    status: unsigned(32)
    pc: unsigned(32)
    tokens: unsigned(32)
    halt_code: unsigned(32)
    cycles: unsigned(64)


class DMAErrors(data.Struct):
    """Sticky error flags, as :class:`tandem.regmap.Status` bits name them."""

    hbm_range: 1
    axi_error: 1


def _check_geometry(geom) -> CoreGeometry:
    if not isinstance(geom, CoreGeometry):
        raise TypeError(f"geom must be a tandem.geometry.CoreGeometry, not {geom!r}")
    if geom.beat_bytes > 64:
        raise ValueError(f"a beat of {geom.beat_bytes} bytes is wider than a 64-byte HBM line")
    return geom


def _check_channel(
    geom, *, fifo_beats, max_reads, max_writes, write_fifo_beats, cmd_depth=4
) -> None:
    """Validate :class:`ChannelDMA`'s parameters (also for :class:`DMAEngine`, up front)."""
    check_int("fifo_beats", fifo_beats, 2 * burst_limit(geom.beat_bytes))
    if fifo_beats & (fifo_beats - 1):
        raise ValueError(f"fifo_beats must be a power of two, not {fifo_beats}")
    check_int("max_reads", max_reads, 1, 1024)
    check_int("max_writes", max_writes, 1, 1024)
    check_int("write_fifo_beats", write_fifo_beats, 2)
    check_int("cmd_depth", cmd_depth, 2)


class _Bursts:
    """Splits runs into AXI4 INCR bursts: at most ``max_beats`` beats, never across 4 KiB.

    ``cmd`` is a ``ChannelRun`` FIFO read side (``r_rdy``, ``r_en``, ``r_data``). While
    ``valid``, the next burst is ``addr`` / ``beats``; pulse ``take`` to consume it. ``active`` is
    high while a run has bursts left.

    ``beats`` is a register, computed in the cycle after ``addr`` and ``remaining`` change (a
    burst taken, a run loaded), so the 4 KiB distance and the two minimums are not in series
    with the address adder or the caller's credit check: ``valid`` falls for that one cycle.
    A run's first burst is valid 2 cycles after the run is taken from ``cmd``, the next one 2
    cycles after a take (one burst per 2 cycles; a burst is up to ``max_beats`` beats long).
    """

    def __init__(self, m: Module, cmd, base, *, beat_bytes: int, max_beats: int, name: str):
        lb = _log2(beat_bytes)
        self.addr = Signal(64, name=f"{name}_addr")
        self.remaining = Signal(_RUN_BEATS, name=f"{name}_remaining")
        self.active = Signal(name=f"{name}_active")
        self.take = Signal(name=f"{name}_take")
        self.tag = Signal(16, name=f"{name}_tag")  # the run's tag
        self.beats = Signal(range(max_beats + 1), name=f"{name}_beats")
        fresh = Signal(name=f"{name}_fresh")  # `beats` is this addr's and remaining's
        self.valid = Signal(name=f"{name}_valid")
        m.d.comb += self.valid.eq(self.active & fresh)
        to_4k = Signal(range(FOUR_KB // beat_bytes + 1), name=f"{name}_to_4k")
        m.d.comb += to_4k.eq((FOUR_KB >> lb) - self.addr[lb:12])
        cap = Signal.like(self.beats, name=f"{name}_cap")
        m.d.comb += cap.eq(Mux(to_4k < max_beats, to_4k, max_beats))
        m.d.sync += self.beats.eq(Mux(self.remaining < cap, self.remaining, cap))
        run = ChannelRun(cmd.r_data)
        last = Signal(name=f"{name}_last")
        load = Signal(name=f"{name}_load")
        m.d.comb += [
            last.eq(self.take & (self.remaining == self.beats)),
            cmd.r_en.eq(~self.active | last),
            load.eq(cmd.r_en & cmd.r_rdy),
        ]
        m.d.sync += fresh.eq(~self.take & ~load)
        with m.If(self.take):
            m.d.sync += [
                self.addr.eq(self.addr + (self.beats << lb)),
                self.remaining.eq(self.remaining - self.beats),
            ]
            with m.If(last):
                m.d.sync += self.active.eq(0)
        with m.If(load):
            full = base + run.offset
            m.d.sync += [
                self.addr.eq(Cat(Const(0, lb), full[lb:64])),
                self.remaining.eq(run.beats),
                self.active.eq(run.beats != 0),
                self.tag.eq(run.tag),
            ]


class ChannelDMA(GeometryComponent):
    """The AXI4 manager of one HBM pseudo-channel.

    Reads: each ``rd_cmd`` run becomes INCR bursts of full-width beats (at most
    :attr:`max_burst` beats, split exactly at every 4 KiB boundary) at ``base + offset``. A burst
    is issued only when the read FIFO has room for all of its beats besides every beat already
    requested (so ``rready`` never falls and the channel never blocks the AXI fabric), and while
    fewer than ``max_reads`` bursts are outstanding. Data leaves in order on ``rd_data``.

    Writes: each ``wr_cmd`` run becomes bursts the same way; its beats are taken from
    ``wr_data`` (through a ``write_fifo_beats`` FIFO) and sent on W after their burst's address
    was accepted, with ``wlast`` on each burst's last beat. At most ``max_writes`` bursts wait for
    their response; ``bready`` is always high.

    Any response other than OKAY (SLVERR, DECERR) sets the sticky ``axi_error`` until ``clear``;
    the transfer still completes, so nothing waits forever. ``error_tag`` is then the lowest
    ``tag`` of the runs whose bursts got such a response since ``clear`` (each outstanding
    burst's tag waits in a FIFO beside it: ``max_reads`` and ``max_writes`` entries of 16 bits);
    tags are pcs, and the lowest is the first in program order (:class:`DMAEngine`).

    Parameters
    ----------
    geom : CoreGeometry
        ``port_bits`` sets the data width.
    fifo_beats : int
        Read FIFO depth in beats (a power of two, at least two bursts). Sustained reads need it
        to cover the read latency in beats, the refresh gaps of the other channels and one
        burst: :data:`READ_FIFO_BEATS`.
    max_reads, max_writes : int
        Outstanding read / write bursts.
    write_fifo_beats : int
        Write data FIFO depth.
    cmd_depth : int
        Depth of each run FIFO.

    Members
    -------
    axi : Out(AXI4Signature(addr_width=64, data_width=port_bits))
    base : In(64)
        The channel's kernel pointer (beat aligned; XRT buffers are 4 KiB aligned).
    rd_cmd, wr_cmd : In(stream.Signature(ChannelRun))
    rd_data : Out(stream.Signature(port_bits))
    wr_data : In(stream.Signature(write_beat_layout(port_bits)))
    clear : In(1)
    axi_error : Out(1)
    error_tag : Out(16)
        The lowest tag of the error responses' runs (valid with ``axi_error``).
    error_read : Out(1)
        That run is a read.
    error_new : Out(1)
        ``axi_error``, ``error_tag`` or ``error_read`` may have changed this cycle.
    rd_idle : Out(1)
        No read run waiting, no burst outstanding, no beat left in the read FIFO.
    wr_idle : Out(1)
        Every write run issued and every burst acknowledged: the writes are visible to reads.

    Timing
    ------
    A run is taken 1 cycle after it enters ``rd_cmd``'s FIFO (2 cycles after the transfer);
    its first AR is valid 2 cycles later (the burst length is a register, computed from the
    address in the cycle after it changes), then one burst every 2 cycles while credits last.
    Read data is on ``rd_data`` 2 cycles after its R beat (FIFO write and output register).
    Reads sustain one beat per cycle when ``fifo_beats`` covers latency + a burst. Writes issue
    one AW every 2 cycles and one W beat per cycle.
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        fifo_beats: int = READ_FIFO_BEATS,
        max_reads: int = 64,
        max_writes: int = 16,
        write_fifo_beats: int = 16,
        cmd_depth: int = 4,
    ):
        _check_geometry(geom)
        self._max_burst = burst_limit(geom.beat_bytes)
        _check_channel(
            geom,
            fifo_beats=fifo_beats,
            max_reads=max_reads,
            max_writes=max_writes,
            write_fifo_beats=write_fifo_beats,
            cmd_depth=cmd_depth,
        )
        self._fifo_beats = fifo_beats
        self._max_reads = max_reads
        self._max_writes = max_writes
        self._write_fifo_beats = write_fifo_beats
        self._cmd_depth = cmd_depth
        super().__init__(
            geom,
            {
                "axi": Out(AXI4Signature(addr_width=64, data_width=geom.port_bits)),
                "base": In(64),
                "rd_cmd": In(stream.Signature(ChannelRun)),
                "rd_data": Out(stream.Signature(geom.port_bits)),
                "wr_cmd": In(stream.Signature(ChannelRun)),
                "wr_data": In(stream.Signature(write_beat_layout(geom.port_bits))),
                "clear": In(1),
                "axi_error": Out(1),
                "error_tag": Out(16),
                "error_read": Out(1),
                "error_new": Out(1),
                "rd_idle": Out(1),
                "wr_idle": Out(1),
            },
        )

    @property
    def max_burst(self) -> int:
        """Longest burst: 256 beats or 4 KiB, whichever is fewer."""
        return self._max_burst

    @property
    def fifo_beats(self) -> int:
        return self._fifo_beats

    @property
    def max_reads(self) -> int:
        return self._max_reads

    @property
    def max_writes(self) -> int:
        return self._max_writes

    def elaborate(self, platform):
        m = Module()
        axi = self.axi
        bb = self._geom.beat_bytes
        size = _log2(bb)
        m.d.comb += [
            axi.arsize.eq(size),
            axi.awsize.eq(size),
            axi.arburst.eq(Burst.INCR),
            axi.awburst.eq(Burst.INCR),
            axi.arid.eq(0),
            axi.awid.eq(0),
        ]
        error = Signal()
        m.d.comb += self.axi_error.eq(error)

        # ---- reads ----------------------------------------------------------------------------
        m.submodules.rd_cmds = rd_cmds = fifo.SyncFIFOBuffered(
            width=ChannelRun.as_shape().size, depth=self._cmd_depth
        )
        m.d.comb += [
            rd_cmds.w_data.eq(self.rd_cmd.payload),
            rd_cmds.w_en.eq(self.rd_cmd.valid),
            self.rd_cmd.ready.eq(rd_cmds.w_rdy),
        ]
        rb = _Bursts(m, rd_cmds, self.base, beat_bytes=bb, max_beats=self._max_burst, name="ar")
        m.submodules.rd_fifo = rd_fifo = fifo.SyncFIFOBuffered(
            width=self._geom.port_bits, depth=self._fifo_beats
        )
        reserved = Signal(range(self._fifo_beats + 1))  # beats requested and not yet popped
        reads_out = Signal(range(self._max_reads + 1))
        credit = Signal()
        m.d.comb += [
            credit.eq(reserved + rb.beats <= self._fifo_beats),
            axi.arvalid.eq(rb.valid & credit & (reads_out != self._max_reads)),
            axi.araddr.eq(rb.addr),
            axi.arlen.eq(rb.beats - 1),
            rb.take.eq(axi.arvalid & axi.arready),
        ]
        popped = self.rd_data.valid & self.rd_data.ready
        r_beat = axi.rvalid & axi.rready
        m.d.comb += [
            axi.rready.eq(rd_fifo.w_rdy),  # always high: every beat has a reserved place
            rd_fifo.w_data.eq(axi.rdata),
            rd_fifo.w_en.eq(axi.rvalid),
            self.rd_data.payload.eq(rd_fifo.r_data),
            self.rd_data.valid.eq(rd_fifo.r_rdy),
            rd_fifo.r_en.eq(self.rd_data.ready),
        ]
        m.d.sync += reserved.eq(reserved + Mux(rb.take, rb.beats, 0) - popped)
        # the tag of every outstanding burst, in order (R bursts come back in order: one ID)
        m.submodules.rd_tags = rd_tags = fifo.SyncFIFO(width=16, depth=self._max_reads)
        m.d.comb += [
            rd_tags.w_data.eq(rb.tag),
            rd_tags.w_en.eq(rb.take),
            rd_tags.r_en.eq(r_beat & axi.rlast),
        ]
        m.d.sync += reads_out.eq(reads_out + rb.take - (r_beat & axi.rlast))
        # levels, not r_rdy: a buffered FIFO holds a new item a cycle before r_rdy shows it
        m.d.comb += self.rd_idle.eq(
            (rd_cmds.level == 0) & ~rb.active & (reads_out == 0) & (rd_fifo.level == 0)
        )

        # ---- writes ---------------------------------------------------------------------------
        m.submodules.wr_cmds = wr_cmds = fifo.SyncFIFOBuffered(
            width=ChannelRun.as_shape().size, depth=self._cmd_depth
        )
        m.d.comb += [
            wr_cmds.w_data.eq(self.wr_cmd.payload),
            wr_cmds.w_en.eq(self.wr_cmd.valid),
            self.wr_cmd.ready.eq(wr_cmds.w_rdy),
        ]
        wb = _Bursts(m, wr_cmds, self.base, beat_bytes=bb, max_beats=self._max_burst, name="aw")
        beat_layout = write_beat_layout(self._geom.port_bits)
        m.submodules.wr_fifo = wr_fifo = fifo.SyncFIFOBuffered(
            width=beat_layout.size, depth=self._write_fifo_beats
        )
        m.submodules.wr_lens = wr_lens = fifo.SyncFIFOBuffered(
            width=len(wb.beats), depth=self._max_writes
        )
        writes_out = Signal(range(self._max_writes + 1))
        m.d.comb += [
            wr_fifo.w_data.eq(self.wr_data.payload),
            wr_fifo.w_en.eq(self.wr_data.valid),
            self.wr_data.ready.eq(wr_fifo.w_rdy),
            axi.awvalid.eq(wb.valid & wr_lens.w_rdy & (writes_out != self._max_writes)),
            axi.awaddr.eq(wb.addr),
            axi.awlen.eq(wb.beats - 1),
            wb.take.eq(axi.awvalid & axi.awready),
            wr_lens.w_data.eq(wb.beats),
            wr_lens.w_en.eq(wb.take),
        ]
        w_count = Signal.like(wb.beats)
        beat = data.View(beat_layout, wr_fifo.r_data)
        w_last = Signal()
        w_go = axi.wvalid & axi.wready
        m.d.comb += [
            w_last.eq(w_count + 1 == wr_lens.r_data),
            axi.wvalid.eq(wr_lens.r_rdy & wr_fifo.r_rdy),
            axi.wdata.eq(beat.data),
            axi.wstrb.eq(beat.strb),
            axi.wlast.eq(w_last),
            wr_fifo.r_en.eq(w_go),
            wr_lens.r_en.eq(w_go & w_last),
            axi.bready.eq(1),
        ]
        with m.If(w_go):
            m.d.sync += w_count.eq(Mux(w_last, 0, w_count + 1))
        b_done = axi.bvalid & axi.bready
        m.submodules.wr_tags = wr_tags = fifo.SyncFIFO(width=16, depth=self._max_writes)
        m.d.comb += [
            wr_tags.w_data.eq(wb.tag),
            wr_tags.w_en.eq(wb.take),
            wr_tags.r_en.eq(b_done),
        ]
        m.d.sync += writes_out.eq(writes_out + wb.take - b_done)
        m.d.comb += self.wr_idle.eq((wr_cmds.level == 0) & ~wb.active & (writes_out == 0))

        r_err = r_beat & (axi.rresp != Resp.OKAY)
        b_err = b_done & (axi.bresp != Resp.OKAY)
        # the lower tag of this cycle's responses (a read's and a write's may come together)
        pick_w = b_err & (~r_err | (wr_tags.r_data < rd_tags.r_data))
        new_tag = Mux(pick_w, wr_tags.r_data, rd_tags.r_data)
        m.d.sync += self.error_new.eq(r_err | b_err)
        with m.If(self.clear):
            m.d.sync += error.eq(0)
        with m.Elif(r_err | b_err):
            m.d.sync += error.eq(1)
            with m.If(~error | (new_tag < self.error_tag)):
                m.d.sync += [self.error_tag.eq(new_tag), self.error_read.eq(~pick_w)]
        return m


class _Broadcast:
    """Hands one item to a set of streams, each of which takes it in its own time.

    The producer offers ``payload`` with ``mask`` (which targets get it) and ``valid``; the item
    is accepted (``valid & ready``) once the previous one has been taken by all of its targets
    (possibly in this same cycle) and is then held in a register, so the producer may move on at
    once: one item per cycle while every target is ready. With ``per_target``, ``payload`` is an
    ``ArrayLayout`` and target ``i`` gets element ``i``; otherwise all get the same payload.
    """

    def __init__(self, m: Module, targets, shape, *, name: str, per_target: bool = False):
        n = len(targets)
        self.payload = Signal(shape, name=f"{name}_payload")
        self.mask = Signal(n, name=f"{name}_mask")
        self.valid = Signal(name=f"{name}_valid")
        self.ready = Signal(name=f"{name}_ready")
        self.idle = Signal(name=f"{name}_idle")
        pending = Signal(n, name=f"{name}_pending")
        held = Signal(shape, name=f"{name}_held")
        taken = Cat(*(t.valid & t.ready for t in targets))
        rest = pending & ~taken
        m.d.comb += [self.ready.eq(rest == 0), self.idle.eq(pending == 0)]
        with m.If(self.valid & self.ready):
            m.d.sync += [pending.eq(self.mask), held.eq(self.payload)]
        with m.Else():
            m.d.sync += pending.eq(rest)
        for i, t in enumerate(targets):
            m.d.comb += [t.valid.eq(pending[i]), t.payload.eq(held[i] if per_target else held)]


class _ReadEntry(data.Struct):
    """What the merge stage needs to know of one read command, in command order."""

    kind: ReadKind
    dummy: 1  # out of range: deliver zeros, read nothing
    total: unsigned(_RUN_BEATS)  # tiles, or stripes (ROWS), or 1 (WORD)
    length: unsigned(16)
    vbuf_row: unsigned(16)
    word: unsigned(4)  # the 32-bit word within the beat (WORD)


def _ceil_blocks(v):
    return (v + BLOCK - 1) >> 6


class DMAEngine(GeometryComponent):
    """All HBM channels' DMA: the ISA's memory operations over one :class:`ChannelDMA` each.

    **Reads** (:attr:`read`: the planner takes one :class:`ReadCommand` at a time, and up to
    ``queue_depth`` planned commands wait for the merge stage, which delivers them in order):

    * ``TILES`` streams the live part of a tiled matrix in the MPU's order (row group, column
      block, row block): ``n_groups * n_cb * 64/lanes`` transfers on :attr:`tiles`, each the
      concatenation of one beat of every channel, channel 0 in the low bits -- exactly the
      MPU's ``weights`` payload. Each channel reads runs of consecutive tiles: the live part of
      each row group of a dense matrix (one run for the whole matrix when every column is live),
      or ``64/lanes`` tiles every ``stride`` tiles for the head-interleaved KV matrices.
      A quantized matrix (``wfmt`` INT8 or INT4) streams its whole region, in order: ``n + ceil(n
      / K)`` transfers, its ``n = ceil(rows / 64) * ceil(cols / span) * 64/lanes`` tiles and the
      scale beat before every ``K`` of them (``span``, ``K``: :func:`quant_read_table`), one run
      per channel from ``offset``; nothing when ``rows`` or ``cols`` is 0.
    * ``ROWS`` reads the ``ceil(length / (lanes*64))`` stripes of a striped vector and sends its
      ``ceil(length / 64)`` rows on :attr:`rows` for VBUF rows ``vbuf_row``, ``vbuf_row + 1``,
      ... (the last row's ``mask`` ends at the vector's length).
    * ``WORD`` reads the beat holding a 32-bit word of channel 0 and sends the word on
      :attr:`word`.

    **Stores** (:attr:`store`, with the VBUF rows on :attr:`store_data`):

    * ``VECTOR`` writes the stripes, with element strobes ending at ``length``.
    * ``ROW`` writes the row into the ``64/beat_elems`` channels of its lane: one single-beat
      burst per 64-column block.
    * ``COL`` writes one burst of up to ``64/lanes`` beats per 64-row group into the ``lanes``
      channels that hold the column, each beat with one 2-byte strobe per lane.
    * ``WORD`` writes one 4-byte strobe in channel 0.
    * ``STATUS`` writes the 64-byte status record (:class:`tandem.layout.StatusRecord` bytes from
      :attr:`record`) at channel 0, offset 0.

    **Range.** Before anything is issued, the end of the command's last beat (of the word, for
    ``WORD``) is compared with the ``hbm_bytes`` argument (0: no limit, as in the ISA
    simulator). Past it, the command completes without touching memory -- reads deliver the
    expected number of all-zero tiles, rows or words, stores consume their rows -- and
    ``error.hbm_range`` is set. A response other than OKAY sets ``error.axi_error``.
    ``error_tag`` is the lowest ``tag`` among the commands of every error since ``clear``, of
    either kind (for an AXI error, the command whose burst got the response: every channel run
    and burst carries its command's tag), ``error`` says that error's kind (one flag, both low
    when there is none) and ``error_read`` whether that command is a read. Tags are pcs, so
    within one straight run of the program the lowest is the first in program order: reads and
    stores are range checked by separate planners, and a read's error response may come back
    before an earlier store's, but the report does not depend on which comes first. An error
    shows in the outputs 2 cycles after the range check (AXI: after the response, 2 plus
    log2(channels)); the idle outputs stay low until it has. STATUS is never range checked: the
    core always writes its record.

    **Ordering.** Reads complete in order, and so do stores, but a read is not ordered after
    an earlier store: before reading what was stored, wait for :attr:`write_idle` (every write
    acknowledged by the memory), as ``SYNC`` does.

    Parameters
    ----------
    geom : CoreGeometry
    fifo_beats, max_reads, max_writes, write_fifo_beats
        Passed to every :class:`ChannelDMA`.
    queue_depth : int
        Read commands planned ahead of the merge stage.
    cmd_depth : int
        Passed to every :class:`ChannelDMA` (its run FIFOs). The core sets it and
        ``queue_depth`` to the controller's ``MAX_PENDING`` (8), so that every pending
        MATVEC's weight read is with the channels at once: at 4, more MATVECs pending changed
        nothing (issue 17).

    Members
    -------
    m_axi_hbm<ch> : Out(AXI4Signature(64, port_bits)), one per channel
        Named after the pointer arguments' ports in :func:`tandem.regmap.arguments`.
    args : In(args_layout(channels))
        The kernel arguments (rtl/shell.py): the ``hbm<ch>`` pointers and ``hbm_bytes``.
    clear : In(1)
        Clear the error flags (at the start of a run).
    read : In(stream.Signature(ReadCommand))
    tiles : Out(stream.Signature(ArrayLayout(ArrayLayout(unsigned(16), 64), lanes)))
    rows : Out(stream.Signature(row_write_layout(geom)))
    word : Out(stream.Signature(unsigned(32)))
    store : In(stream.Signature(StoreCommand))
    store_data : In(stream.Signature(ArrayLayout(unsigned(16), 64)))
    record : In(StatusRecordLayout)
        Sampled when a ``STATUS`` command is accepted.
    error : Out(DMAErrors)
    error_tag : Out(16)
    error_read : Out(1)
        ``error_tag``'s command is a read.
    read_idle : Out(1)
        No read command anywhere in the engine and nothing left to deliver.
    write_idle : Out(1)
        No store in the engine and every write acknowledged.

    Timing
    ------
    A read command is accepted when the read planner is idle; planning takes 5 cycles
    (:attr:`PLAN_CYCLES`; 6 for a quantized TILES read, which adds its scale beats in a cycle
    of its own), then the runs go to the channels at one per cycle. The merge stage spends one
    cycle per command picking it up, then moves one tile per cycle (``tiles``), one
    row per cycle (``rows``; a stripe of ``lanes`` rows is loaded as the previous stripe's last
    row leaves) or one word. Sustained, ``tiles`` moves one tile per cycle whenever every
    channel's memory delivers a beat per cycle. Stores are planned in 6 cycles; then VECTOR
    takes a row per cycle and writes a stripe every ``lanes`` rows, ROW writes one beat per row
    and cycle, COL ``64/lanes`` beats per row.
    """

    PLAN_CYCLES = 5
    """Cycles from accepting a read command to offering its first run to the channels."""

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        fifo_beats: int = READ_FIFO_BEATS,
        max_reads: int = 64,
        max_writes: int = 16,
        write_fifo_beats: int = 16,
        queue_depth: int = 4,
        cmd_depth: int = 4,
    ):
        _check_geometry(geom)
        self._queue_depth = check_int("queue_depth", queue_depth, 2)
        self._channel_args = {
            "fifo_beats": fifo_beats,
            "max_reads": max_reads,
            "max_writes": max_writes,
            "write_fifo_beats": write_fifo_beats,
            "cmd_depth": cmd_depth,
        }
        _check_channel(geom, **self._channel_args)
        pointers = [a for a in regmap.arguments(geom.channels) if a.kind == "pointer"]
        self._ports = [a.port for a in pointers]
        self._pointers = [a.name for a in pointers]
        members = {
            port: Out(AXI4Signature(addr_width=64, data_width=geom.port_bits))
            for port in self._ports
        }
        members.update(
            {
                "args": In(args_layout(geom.channels)),
                "clear": In(1),
                "read": In(stream.Signature(ReadCommand)),
                "tiles": Out(stream.Signature(data.ArrayLayout(ROW, geom.lanes))),
                "rows": Out(stream.Signature(row_write_layout(geom))),
                "word": Out(stream.Signature(32)),
                "store": In(stream.Signature(StoreCommand)),
                "store_data": In(stream.Signature(ROW)),
                "record": In(StatusRecordLayout),
                "error": Out(DMAErrors),
                "error_tag": Out(16),
                "error_read": Out(1),
                "read_idle": Out(1),
                "write_idle": Out(1),
            }
        )
        super().__init__(geom, members)

    @property
    def ports(self) -> list[str]:
        """The AXI4 member names, channel 0 first."""
        return list(self._ports)

    def axi(self, channel: int):
        """The AXI4 interface of ``channel``."""
        return getattr(self, self._ports[channel])

    def elaborate(self, platform):
        m = Module()
        g = self._geom
        chans = []
        for ch in range(g.channels):
            dma = ChannelDMA(g, **self._channel_args)
            m.submodules[f"ch{ch}"] = dma
            wiring.connect(m, wiring.flipped(self.axi(ch)), dma.axi)
            m.d.comb += [
                dma.base.eq(getattr(self.args, self._pointers[ch])),
                dma.clear.eq(self.clear),
            ]
            chans.append(dma)

        limit = Signal(33)  # hbm_bytes; 0 means no limit
        m.d.comb += limit.eq(Mux(self.args.hbm_bytes == 0, 1 << 32, self.args.hbm_bytes))

        read_idle, read_bad, read_tag = self._reads(m, chans, limit)
        write_idle, store_bad, store_tag = self._stores(m, chans, limit)
        self._errors(m, chans, read_bad, read_tag, store_bad, store_tag, read_idle, write_idle)
        return m

    def _errors(self, m, chans, read_bad, read_tag, store_bad, store_tag, read_idle, write_idle):
        """The reported error: the lowest tag of every error since ``clear``, and its kind.

        Range errors come from the two planners (``*_bad`` in the cycle of the check) and are
        kept in a register; each channel keeps the lowest tag of its AXI error responses, and a
        registered tree of pairwise minima (one level per cycle) brings the channels' to one.
        A last register takes the lower of the two. Tags are pcs, so within one straight run
        of the program the lowest is the first in program order. The idle outputs wait until
        an error has gone through (``settle``), so a controller that waits for them sees it."""
        Item = data.StructLayout({"valid": 1, "tag": 16, "read": 1, "axi": 1})

        def lower(a, b):
            """b if it is the lower error (valid and a lower tag, or a not valid), else a."""
            return Item(Mux(b.valid & (~a.valid | (b.tag < a.tag)), b, a))

        def reg(value, name):
            r = Signal(Item, name=name)
            m.d.sync += r.eq(Mux(self.clear, 0, value))
            return r

        items = []
        for i, c in enumerate(chans):
            it = Signal(Item, name=f"axi_err{i}")
            m.d.comb += [
                it.valid.eq(c.axi_error),
                it.tag.eq(c.error_tag),
                it.read.eq(c.error_read),
                it.axi.eq(1),
            ]
            items.append(it)
        level = 0
        while len(items) > 1:
            pairs = [items[i : i + 2] for i in range(0, len(items), 2)]
            items = [
                reg(lower(*p) if len(p) == 2 else p[0], f"axi_min{level}_{k}")
                for k, p in enumerate(pairs)
            ]
            level += 1
        axi = items[0]

        bad_read, bad_store = Signal(Item), Signal(Item)  # this cycle's range errors
        m.d.comb += [
            bad_read.valid.eq(read_bad),
            bad_read.tag.eq(read_tag),
            bad_read.read.eq(1),
            bad_store.valid.eq(store_bad),
            bad_store.tag.eq(store_tag),
        ]
        rng = Signal(Item, name="range_err")
        m.d.sync += rng.eq(Mux(self.clear, 0, lower(rng, lower(bad_read, bad_store))))
        fin = reg(lower(rng, axi), "error_min")
        m.d.comb += [
            self.error.hbm_range.eq(fin.valid & ~fin.axi),
            self.error.axi_error.eq(fin.valid & fin.axi),
            self.error_tag.eq(fin.tag),
            self.error_read.eq(fin.valid & fin.read),
        ]
        settle = Signal(range(level + 3))
        new = Cat(*(c.error_new for c in chans), read_bad, store_bad).any()
        m.d.sync += settle.eq(Mux(new, level + 2, Mux(settle == 0, 0, settle - 1)))
        settled = ~new & (settle == 0)
        m.d.comb += [
            self.read_idle.eq(read_idle & settled),
            self.write_idle.eq(write_idle & settled),
        ]

    # ---- reads --------------------------------------------------------------------------------

    def _reads(self, m, chans, limit):
        """The read planner: command -> range check -> runs to the channels."""
        g = self._geom
        C, B = g.channels, g.beat_bytes
        T, DS = g.tile_elems, BLOCK // g.lanes
        lB, lT, lDS = _log2(B), _log2(T), _log2(DS)

        rc = Signal(ReadCommand)
        m.submodules.read_queue = queue = fifo.SyncFIFOBuffered(
            width=_ReadEntry.as_shape().size, depth=self._queue_depth
        )
        runs = _Broadcast(m, [c.rd_cmd for c in chans], ChannelRun, name="rd_runs")

        n_g = Signal(11)  # live row groups
        n_cbl = Signal(11)  # live column blocks (quantized: tile columns, ceil(cols / span))
        n_cb = Signal(11)  # allocated column blocks
        st = Signal(12)
        start = Signal(32)  # the offset, beat aligned
        word_end = Signal(34)
        # the pattern: p_groups groups of p_runs runs of p_run beats
        p_run = Signal(_RUN_BEATS)
        p_runs = Signal(11)
        p_groups = Signal(11)
        p_run_step = Signal(32)  # bytes
        p_group_step = Signal(40)
        p_total = Signal(_RUN_BEATS)
        p_end = Signal(56)  # end of the access, bytes
        i_run = Signal(11)
        i_group = Signal(11)
        run_addr = Signal(40)
        group_addr = Signal(40)
        bad = Signal()
        # a quantized TILES read (wfmt INT8/INT4): the whole region, scale beats included
        qtable = quant_read_table()
        quant = Signal()  # of rc, combinational
        is_quant = Signal()  # registered in Shape
        m.d.comb += quant.eq(
            (rc.kind == ReadKind.TILES)
            & Cat(*(rc.wfmt == w for w in sorted({w for w, _ in qtable}))).any()
        )
        l_ks = sorted({lk for _, lk in qtable.values()})
        l_k = Signal(range(len(l_ks)))  # index into l_ks: log2 K of the command

        entry = _ReadEntry(queue.w_data)
        m.d.comb += [
            entry.kind.eq(rc.kind),
            entry.dummy.eq(bad),
            entry.total.eq(p_total),
            entry.length.eq(rc.length),
            entry.vbuf_row.eq(rc.vbuf_row),
            entry.word.eq(rc.offset[2:lB]),
            runs.payload.offset.eq(run_addr),
            runs.payload.beats.eq(p_run),
            runs.payload.tag.eq(rc.tag),
            runs.mask.eq(Mux(rc.kind == ReadKind.WORD, 1, (1 << C) - 1)),
        ]
        checked = Signal()  # the range check happens at this edge

        with m.FSM(name="read_plan") as fsm:
            with m.State("Idle"):
                m.d.comb += self.read.ready.eq(1)
                with m.If(self.read.valid):
                    m.d.sync += rc.eq(self.read.payload)
                    m.next = "Shape"
            with m.State("Shape"):
                eff_rows = Mux((rc.live_rows < rc.rows) & ~quant, rc.live_rows, rc.rows)
                eff_cols = Mux(rc.live_cols < rc.cols, rc.live_cols, rc.cols)
                cbl = Signal(11)
                m.d.comb += cbl.eq(_ceil_blocks(eff_cols))
                with m.If(rc.kind == ReadKind.TILES), m.Switch(rc.wfmt):
                    for w in sorted({w for w, _ in qtable}):
                        l_span = qtable[w, 0][0]
                        with m.Case(w):  # a quantized tile's columns
                            m.d.comb += cbl.eq((rc.cols + (1 << l_span) - 1) >> l_span)
                with m.Switch(Cat(rc.wgroup, rc.wfmt)):
                    for (w, wg), (_, lk) in qtable.items():
                        with m.Case(wg | w << 2):
                            m.d.sync += l_k.eq(l_ks.index(lk))
                m.d.sync += [
                    is_quant.eq(quant),
                    n_g.eq(_ceil_blocks(eff_rows)),
                    n_cbl.eq(cbl),
                    n_cb.eq(_ceil_blocks(rc.cols)),
                    st.eq(Mux(rc.stride == 0, DS, rc.stride)),
                    start.eq(Cat(Const(0, lB), rc.offset[lB:])),
                    word_end.eq(rc.offset + 4),
                ]
                m.next = "Pattern"
            with m.State("Pattern"):

                def pattern(groups, runs, run, total, run_step, group_step):
                    return [
                        p_groups.eq(groups),
                        p_runs.eq(runs),
                        p_run.eq(run),
                        p_total.eq(total),
                        p_run_step.eq(run_step),
                        p_group_step.eq(group_step),
                    ]

                tiles = (n_g * n_cbl) << lDS
                stripes = (rc.length + T - 1) >> lT
                with m.Switch(rc.kind):
                    with m.Case(ReadKind.TILES):
                        with m.If(st == DS):  # a row group's live tiles are consecutive
                            m.d.sync += pattern(n_g, 1, n_cbl << lDS, tiles, 0, n_cb << (lDS + lB))
                        with m.Else():  # 64/lanes tiles every `stride` tiles
                            m.d.sync += pattern(n_g, n_cbl, DS, tiles, st << lB, (n_cb * st) << lB)
                    with m.Case(ReadKind.ROWS):
                        m.d.sync += pattern(1, 1, stripes, stripes, 0, 0)
                    with m.Default():  # WORD
                        m.d.sync += pattern(1, 1, 1, 1, 0, 0)
                with m.If(is_quant):
                    m.next = "Scales"
                with m.Else():
                    m.next = "Extent"
            with m.State("Scales"):
                # a quantized matrix: p_total = n tiles; with a scale beat before every K of
                # them, the region is n + ceil(n / K) consecutive beats, one run per channel
                scales = Signal(_RUN_BEATS)
                with m.Switch(l_k):
                    for i, lk in enumerate(l_ks):
                        with m.Case(i):
                            m.d.comb += scales.eq((p_total + (1 << lk) - 1) >> lk)
                m.d.sync += pattern(1, 1, p_total + scales, p_total + scales, 0, 0)
                m.next = "Extent"
            with m.State("Extent"):
                with m.If(p_total == 0):
                    m.d.sync += p_end.eq(start)
                with m.Else():
                    m.d.sync += p_end.eq(
                        start
                        + (p_groups - 1) * p_group_step
                        + (p_runs - 1) * p_run_step
                        + (p_run << lB)
                    )
                with m.If((p_runs == 1) & ((p_run << lB) == p_group_step)):
                    m.d.sync += [p_run.eq(p_total), p_groups.eq(1)]  # one contiguous run
                m.next = "Check"
            with m.State("Check"):
                m.d.comb += bad.eq(Mux(rc.kind == ReadKind.WORD, word_end > limit, p_end > limit))
                m.d.sync += [i_run.eq(0), i_group.eq(0), run_addr.eq(start), group_addr.eq(start)]
                with m.If(queue.w_rdy | (p_total == 0)):
                    m.d.comb += [checked.eq(1), queue.w_en.eq(p_total != 0)]
                    with m.If(bad | (p_total == 0)):
                        m.next = "Idle"
                    with m.Else():
                        m.next = "Issue"
            with m.State("Issue"):
                m.d.comb += runs.valid.eq(1)
                with m.If(runs.ready):
                    with m.If(i_run + 1 != p_runs):
                        m.d.sync += [i_run.eq(i_run + 1), run_addr.eq(run_addr + p_run_step)]
                    with m.Elif(i_group + 1 != p_groups):
                        m.d.sync += [
                            i_run.eq(0),
                            i_group.eq(i_group + 1),
                            group_addr.eq(group_addr + p_group_step),
                            run_addr.eq(group_addr + p_group_step),
                        ]
                    with m.Else():
                        m.next = "Idle"

        merge_idle = self._merge(m, chans, queue)
        channels_idle = Cat(*(c.rd_idle for c in chans)).all()
        idle = Signal()
        m.d.comb += idle.eq(
            fsm.ongoing("Idle") & ~self.read.valid & runs.idle & merge_idle & channels_idle
        )
        return idle, checked & bad, rc.tag

    def _merge(self, m, chans, queue):
        """Delivers the channels' read data in command order; returns its idle flag."""
        g = self._geom
        L, B = g.lanes, g.beat_bytes
        row_bits = BLOCK * 16
        head = _ReadEntry(queue.r_data)
        count = Signal(_RUN_BEATS)  # transfers left in the command
        rows_left = Signal(11)  # ROWS: rows left in the command
        row_addr = Signal.like(self.rows.payload.addr)
        stripe = Signal(L * row_bits)  # ROWS: the loaded stripe, next row in the low bits
        stripe_rows = Signal(range(L + 1))
        stripes_left = Signal(_RUN_BEATS)
        tail = Signal(6)  # elements of the last row, 0 meaning 64

        all_valid = Cat(*(c.rd_data.valid for c in chans)).all()
        beats = Cat(*(c.rd_data.payload for c in chans))
        pop_all = Signal()
        pop_first = Signal()
        for ch, c in enumerate(chans):
            m.d.comb += c.rd_data.ready.eq(pop_all | (pop_first if ch == 0 else 0))

        with m.FSM(name="merge") as fsm:
            with m.State("Head"), m.If(queue.r_rdy):
                m.d.sync += [
                    count.eq(head.total),
                    stripes_left.eq(head.total),
                    rows_left.eq(_ceil_blocks(head.length)),
                    row_addr.eq(head.vbuf_row),
                    tail.eq(head.length[:6]),
                    stripe_rows.eq(0),
                ]
                with m.Switch(head.kind):
                    with m.Case(ReadKind.TILES):
                        m.next = "Tiles"
                    with m.Case(ReadKind.ROWS):
                        m.next = "Rows"
                    with m.Default():
                        m.next = "Word"
            with m.State("Tiles"):
                m.d.comb += [
                    self.tiles.valid.eq(head.dummy | all_valid),
                    self.tiles.payload.eq(Mux(head.dummy, 0, beats)),
                    pop_all.eq(self.tiles.ready & all_valid & ~head.dummy),
                ]
                with m.If(self.tiles.valid & self.tiles.ready):
                    m.d.sync += count.eq(count - 1)
                    with m.If(count == 1):
                        m.d.comb += queue.r_en.eq(1)
                        m.next = "Head"
            with m.State("Rows"):
                taken = self.rows.valid & self.rows.ready
                last_row = rows_left == 1
                m.d.comb += [
                    self.rows.valid.eq(stripe_rows != 0),
                    self.rows.payload.addr.eq(row_addr),
                    self.rows.payload.data.eq(stripe[:row_bits]),
                    self.rows.payload.mask.eq(
                        Mux(last_row & (tail != 0), (Const(1, BLOCK + 1) << tail) - 1, -1)
                    ),
                ]
                need = (stripe_rows == 0) | ((stripe_rows == 1) & taken)
                load = need & (stripes_left != 0) & (head.dummy | all_valid)
                after = rows_left - taken  # rows left once this cycle's row is gone
                m.d.comb += pop_all.eq(load & ~head.dummy)
                with m.If(load):
                    m.d.sync += [
                        stripe.eq(Mux(head.dummy, 0, beats)),
                        stripe_rows.eq(Mux(after < L, after, L)),
                        stripes_left.eq(stripes_left - 1),
                    ]
                with m.Elif(taken):
                    m.d.sync += [stripe.eq(stripe >> row_bits), stripe_rows.eq(stripe_rows - 1)]
                with m.If(taken):
                    m.d.sync += [rows_left.eq(rows_left - 1), row_addr.eq(row_addr + 1)]
                    with m.If(last_row):
                        m.d.comb += queue.r_en.eq(1)
                        m.next = "Head"
            with m.State("Word"):
                words = data.ArrayLayout(32, B // 4)(chans[0].rd_data.payload)
                first_valid = chans[0].rd_data.valid
                m.d.comb += [
                    self.word.valid.eq(head.dummy | first_valid),
                    self.word.payload.eq(Mux(head.dummy, 0, words[head.word[: _log2(B // 4)]])),
                    pop_first.eq(self.word.ready & first_valid & ~head.dummy),
                ]
                with m.If(self.word.valid & self.word.ready):
                    m.d.comb += queue.r_en.eq(1)
                    m.next = "Head"
        return fsm.ongoing("Head") & (queue.level == 0)

    # ---- stores -------------------------------------------------------------------------------

    def _stores(self, m, chans, limit):
        """The store planner: command -> range check -> runs and strobed beats."""
        g = self._geom
        C, L, P = g.channels, g.lanes, g.port_bits
        E, T, DS = g.beat_elems, g.tile_elems, BLOCK // g.lanes
        cpl = g.channels_per_lane

        s = SimpleNamespace()  # the planner's registers and the streams its states drive
        s.sc = Signal(StoreCommand)
        s.record = Signal(StatusRecordLayout)
        s.runs = _Broadcast(m, [c.wr_cmd for c in chans], ChannelRun, name="wr_runs")
        m.d.comb += s.runs.payload.tag.eq(s.sc.tag)
        s.beats = _Broadcast(
            m,
            [c.wr_data for c in chans],
            data.ArrayLayout(write_beat_layout(P), C),
            name="wr_beats",
            per_target=True,
        )
        # A beat of every channel, as one tile: data and element enables (2-byte strobes).
        s.wdata = Signal(T * 16)
        s.wen = Signal(T)
        for ch in range(C):
            m.d.comb += [
                s.beats.payload[ch].data.eq(s.wdata[ch * P : (ch + 1) * P]),
                s.beats.payload[ch].strb.eq(
                    Cat(*(s.wen[ch * E + e].replicate(2) for e in range(E)))
                ),
            ]

        s.n_rows = Signal(11)  # VBUF rows the command takes
        s.n_cb = Signal(11)
        s.st = Signal(12)
        s.stripes = Signal(11)
        s.lane = Signal(range(L))
        s.rb0 = Signal(range(DS))
        s.col = Signal(6)
        s.tail = Signal(6)  # elements in the last row, 0 meaning 64
        s.major = Signal(26)  # row group (ROW) or column block (COL) of the index
        s.a1 = Signal(48)
        s.a2 = Signal(24)
        s.first = Signal(64)  # byte offset of the first run
        s.step = Signal(48)  # bytes between runs
        s.end = Signal(64)
        s.last_beats = Signal(range(DS + 1))  # COL: beats of the last group's burst
        s.addr = Signal(40)
        s.rows_left = Signal(11)
        s.k = Signal(range(max(L, DS, STATUS_BYTES // g.beat_bytes) + 1))
        s.vrows = Array(Signal(ROW, name=f"vrow{i}") for i in range(L))
        s.colrow = Signal(BLOCK * 16)
        s.bad = Signal()
        s.checked = Signal()

        s.full = (1 << C) - 1
        s.lane_channels = Signal(C)  # ROW: the channels of the row's lane
        s.col_channels = Signal(C)  # COL: in every lane, the channel holding column `col`
        m.d.comb += [
            s.lane_channels.eq(((1 << cpl) - 1) << (s.lane * cpl)),
            s.col_channels.eq(
                sum(1 << (ln * cpl) for ln in range(L)) << (s.col >> _log2(E))
                if cpl > 1
                else s.full
            ),
        ]

        with m.FSM(name="store_plan") as fsm:
            self._store_plan_states(m, s, limit)
            self._store_vector_states(m, s)
            self._store_row_col_states(m, s)
            self._store_word_status_states(m, s)

        channels_idle = Cat(*(c.wr_idle for c in chans)).all()
        idle = Signal()
        m.d.comb += idle.eq(
            fsm.ongoing("Idle") & ~self.store.valid & s.runs.idle & s.beats.idle & channels_idle
        )
        return idle, s.checked & s.bad, s.sc.tag

    def _store_plan_states(self, m, s, limit):
        """Idle, then the plan (Shape, Multiply, Place, Extent: 5 cycles), the range Check, and
        Drain (out of range: take the rows, write nothing)."""
        g = self._geom
        B, DS = g.beat_bytes, BLOCK // g.lanes
        lB, lL, lT = _log2(B), _log2(g.lanes), _log2(g.tile_elems)
        sc = s.sc
        kind = sc.kind
        with m.State("Idle"):
            m.d.comb += self.store.ready.eq(1)
            with m.If(self.store.valid):
                m.d.sync += [sc.eq(self.store.payload), s.record.eq(self.record)]
                m.next = "Shape"
        with m.State("Shape"):
            m.d.sync += [
                s.n_rows.eq(
                    Mux(
                        (sc.kind == StoreKind.WORD) | (sc.kind == StoreKind.STATUS),
                        0,
                        _ceil_blocks(sc.length),
                    )
                ),
                s.n_cb.eq(_ceil_blocks(sc.cols)),
                s.st.eq(Mux(sc.stride == 0, DS, sc.stride)),
                s.stripes.eq((sc.length + g.tile_elems - 1) >> lT),
                s.lane.eq(sc.index[:lL]),
                s.rb0.eq(sc.index[lL:6]),
                s.col.eq(sc.index[:6]),
                s.tail.eq(sc.length[:6]),
                s.major.eq(sc.index[6:]),
                s.last_beats.eq(((sc.length - 1)[:6] >> lL) + 1),
            ]
            m.next = "Multiply"
        with m.State("Multiply"):
            with m.If(kind == StoreKind.ROW):
                m.d.sync += s.a1.eq(s.major * s.n_cb)
            with m.Else():
                m.d.sync += [s.a1.eq(s.major * s.st), s.a2.eq(s.n_cb * s.st)]
            m.next = "Place"
        with m.State("Place"):
            aligned = Cat(Const(0, lB), sc.offset[lB:])
            with m.Switch(kind):
                with m.Case(StoreKind.ROW):
                    m.d.sync += [
                        s.first.eq(sc.offset + ((s.a1 * s.st + s.rb0) << lB)),
                        s.step.eq(s.st << lB),
                    ]
                with m.Case(StoreKind.COL):
                    m.d.sync += [s.first.eq(sc.offset + (s.a1 << lB)), s.step.eq(s.a2 << lB)]
                with m.Case(StoreKind.STATUS):
                    m.d.sync += [s.first.eq(0), s.step.eq(0)]
                with m.Default():
                    m.d.sync += [s.first.eq(aligned), s.step.eq(0)]
            m.next = "Extent"
        with m.State("Extent"):
            span = Signal(64)
            with m.Switch(kind):
                with m.Case(StoreKind.ROW):
                    m.d.comb += span.eq((s.n_rows - 1) * s.step + B)
                with m.Case(StoreKind.COL):
                    m.d.comb += span.eq((s.n_rows - 1) * s.step + (s.last_beats << lB))
                with m.Case(StoreKind.VECTOR):
                    m.d.comb += span.eq(s.stripes << lB)
            m.d.sync += [
                s.end.eq(Mux(kind == StoreKind.WORD, sc.offset + 4, s.first + span)),
                s.addr.eq(s.first),
                s.rows_left.eq(s.n_rows),
                s.k.eq(0),
            ]
            m.next = "Check"
        with m.State("Check"):
            takes_rows = (
                (kind == StoreKind.VECTOR) | (kind == StoreKind.ROW) | (kind == StoreKind.COL)
            )
            empty = takes_rows & (s.n_rows == 0)
            # an empty ROW/COL touches nothing (as in the ISA simulator); an empty VECTOR
            # is still checked at its offset
            unchecked = (kind == StoreKind.STATUS) | (empty & (kind != StoreKind.VECTOR))
            m.d.comb += [s.checked.eq(1), s.bad.eq(~unchecked & (s.end > limit))]
            with m.If(s.bad & ~empty & takes_rows):
                m.next = "Drain"
            with m.Elif(s.bad | empty):
                m.next = "Idle"
            with m.Else(), m.Switch(kind):
                with m.Case(StoreKind.VECTOR):
                    m.next = "Vector-Run"
                with m.Case(StoreKind.ROW):
                    m.next = "Row"
                with m.Case(StoreKind.COL):
                    m.next = "Col-Run"
                with m.Case(StoreKind.WORD):
                    m.next = "Word"
                with m.Default():
                    m.next = "Status-Run"

        with m.State("Drain"):  # out of range: take the rows, write nothing
            m.d.comb += self.store_data.ready.eq(1)
            with m.If(self.store_data.valid):
                m.d.sync += s.rows_left.eq(s.rows_left - 1)
                with m.If(s.rows_left == 1):
                    m.next = "Idle"

    def _store_vector_states(self, m, s):
        """VECTOR: one run of ``stripes`` beats in every channel; each beat is ``lanes`` rows."""
        L, T = self._geom.lanes, self._geom.tile_elems
        runs, beats, k, rows_left = s.runs, s.beats, s.k, s.rows_left
        with m.State("Vector-Run"):
            m.d.comb += [
                runs.valid.eq(1),
                runs.mask.eq(s.full),
                runs.payload.offset.eq(s.addr),
                runs.payload.beats.eq(s.stripes),
            ]
            with m.If(runs.ready):
                m.next = "Vector-Gather"
        with m.State("Vector-Gather"):
            m.d.comb += self.store_data.ready.eq(1)
            with m.If(self.store_data.valid):
                m.d.sync += [
                    s.vrows[k].eq(self.store_data.payload),
                    k.eq(k + 1),
                    rows_left.eq(rows_left - 1),
                ]
                with m.If((k == L - 1) | (rows_left == 1)):
                    m.next = "Vector-Beat"
        with m.State("Vector-Beat"):
            tile_tail = Signal(_log2(T))
            m.d.comb += tile_tail.eq(s.sc.length[: _log2(T)])
            count = Mux((rows_left == 0) & (tile_tail != 0), tile_tail, T)
            m.d.comb += [
                beats.valid.eq(1),
                beats.mask.eq(s.full),
                s.wdata.eq(Cat(*s.vrows)),
                # elements 0..count-1: one comparison per bit, no T-bit carry chain
                s.wen.eq(Cat(*(count > e for e in range(T)))),
            ]
            with m.If(beats.ready):
                m.d.sync += k.eq(0)
                with m.If(rows_left == 0):
                    m.next = "Idle"
                with m.Else():
                    m.next = "Vector-Gather"

    def _store_row_col_states(self, m, s):
        """ROW: per 64-column block, one beat into the channels of the row's lane. COL: per
        64-row group, a burst of 64/lanes beats into one channel of every lane."""
        L, DS = self._geom.lanes, BLOCK // self._geom.lanes
        runs, beats, k, rows_left, tail = s.runs, s.beats, s.k, s.rows_left, s.tail
        with m.State("Row"):
            go = self.store_data.valid & runs.ready & beats.ready
            last = rows_left == 1
            emask = Mux(last & (tail != 0), (Const(1, BLOCK + 1) << tail) - 1, -1)
            m.d.comb += [
                self.store_data.ready.eq(runs.ready & beats.ready),
                runs.valid.eq(go),
                beats.valid.eq(go),
                runs.mask.eq(s.lane_channels),
                beats.mask.eq(s.lane_channels),
                runs.payload.offset.eq(s.addr),
                runs.payload.beats.eq(1),
                s.wdata.eq(self.store_data.payload.as_value().replicate(L)),
                s.wen.eq(Cat(*(Mux(s.lane == ln, emask[:BLOCK], 0) for ln in range(L)))),
            ]
            with m.If(go):
                m.d.sync += [s.addr.eq(s.addr + s.step), rows_left.eq(rows_left - 1)]
                with m.If(last):
                    m.next = "Idle"

        with m.State("Col-Run"):
            go = self.store_data.valid & runs.ready
            m.d.comb += [
                self.store_data.ready.eq(runs.ready),
                runs.valid.eq(go),
                runs.mask.eq(s.col_channels),
                runs.payload.offset.eq(s.addr),
                runs.payload.beats.eq(Mux(rows_left == 1, s.last_beats, DS)),
            ]
            with m.If(go):
                m.d.sync += [s.colrow.eq(self.store_data.payload), k.eq(0)]
                m.next = "Col-Beat"
        with m.State("Col-Beat"):
            group_rows = Mux((rows_left == 1) & (tail != 0), tail, BLOCK)
            at_col = Signal(BLOCK)
            m.d.comb += at_col.eq(1 << s.col)
            elems = [s.colrow[16 * ln : 16 * ln + 16] for ln in range(L)]
            lL = _log2(L)
            m.d.comb += [
                beats.valid.eq(1),
                beats.mask.eq(s.col_channels),
                s.wdata.eq(Cat(*(e.replicate(BLOCK) for e in elems))),
                s.wen.eq(Cat(*(Mux((k << lL) + ln < group_rows, at_col, 0) for ln in range(L)))),
            ]
            n_beats = Mux(rows_left == 1, s.last_beats, DS)
            with m.If(beats.ready):
                m.d.sync += [k.eq(k + 1), s.colrow.eq(s.colrow >> (16 * L))]
                with m.If(k + 1 == n_beats):
                    m.d.sync += [s.addr.eq(s.addr + s.step), rows_left.eq(rows_left - 1)]
                    m.next = "Col-Run"
                    with m.If(rows_left == 1):
                        m.next = "Idle"

    def _store_word_status_states(self, m, s):
        """WORD: one 4-byte strobe in channel 0. STATUS: the record's bytes, zero padded, at
        channel 0 offset 0."""
        g = self._geom
        P, B, E, T = g.port_bits, g.beat_bytes, g.beat_elems, g.tile_elems
        runs, beats, k = s.runs, s.beats, s.k
        with m.State("Word"):
            go = runs.ready & beats.ready
            m.d.comb += [
                runs.valid.eq(go),
                beats.valid.eq(go),
                runs.mask.eq(1),
                beats.mask.eq(1),
                runs.payload.offset.eq(s.addr),
                runs.payload.beats.eq(1),
                s.wdata.eq(s.sc.value.replicate(T // 2)),
                s.wen.eq(Const(3, E) << Cat(Const(0, 1), s.sc.offset[2 : _log2(B)])),
            ]
            with m.If(go):
                m.next = "Idle"

        n_status = STATUS_BYTES // B
        with m.State("Status-Run"):
            m.d.comb += [
                runs.valid.eq(1),
                runs.mask.eq(1),
                runs.payload.offset.eq(0),
                runs.payload.beats.eq(n_status),
            ]
            with m.If(runs.ready):
                m.next = "Status-Beat"
        with m.State("Status-Beat"):
            record = s.record
            padded = Cat(record.as_value(), Const(0, STATUS_BYTES * 8 - len(record.as_value())))
            chunks = Array(padded[i * P : (i + 1) * P] for i in range(n_status))
            m.d.comb += [
                beats.valid.eq(1),
                beats.mask.eq(1),
                s.wdata.eq(chunks[k]),
                s.wen.eq((1 << E) - 1),
            ]
            with m.If(beats.ready):
                m.d.sync += k.eq(k + 1)
                with m.If(k == n_status - 1):
                    m.next = "Idle"
