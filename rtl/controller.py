"""The controller: instruction fetch, decode, scalar execution, and issue to DMA, MPU and VPU."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from types import SimpleNamespace

from amaranth import Array, Cat, Module, Mux, ResetInserter, Signal, signed, unsigned
from amaranth.lib import data, fifo, memory, stream
from amaranth.lib.wiring import In, Out

from tandem import isa, regmap
from tandem.geometry import CoreGeometry, check_geometry
from tandem.layout import PROGRAM_BASE
from tandem.numerics import BLOCK

from .component import GeometryComponent
from .dma import ChannelRun, DMAErrors, ReadCommand, ReadKind, StoreCommand, StoreKind
from .mpu import MatvecCommand
from .shell import args_layout, status_layout
from .vpu import VectorCommand, VectorOp

__all__ = ["Controller", "MpuIssue", "StoreIssue", "UnitBusy", "instruction_layout"]

_ROW_SHIFT = BLOCK.bit_length() - 1
"""log2 of a VBUF row: an element address ``>> _ROW_SHIFT`` is its row, and its low
``_ROW_SHIFT`` bits are zero when it is row aligned (``tandem.isa.VBUF_ALIGN``)."""
_SPANS = ("w_lo", "w_hi", "r_lo", "r_hi")  # VBUF rows written and read (rtl: _predecode)
_SPAN_BITS = 18 - _ROW_SHIFT  # (a 16-bit address + a 16-bit length + 63) >> 6
PF_QUEUE = 16
"""MATVECs whose weight reads the look-ahead may send before Exec reaches them
(:meth:`Controller._lookahead`), beyond the :data:`MAX_PENDING` ones Exec sent."""
DEFAULT_WATCHDOG = 1 << 24
MAX_PENDING = 16
"""MATVECs whose weight read is with the DMA and whose MPU command has not gone to the core's
MPU feeder yet: short products (attention heads) keep this many HBM reads in flight."""
Status = regmap.Status
_VPU_OPS = tuple(op for op, u in isa.UNITS.items() if u is isa.Unit.VPU)


def instruction_layout(op: isa.Op) -> data.StructLayout:
    """The 128-bit word of ``op`` as a layout built from :data:`tandem.isa.FORMATS`: ``opcode``
    (8 bits), the fields in order, and ``reserved`` (the bits above the last field)."""
    fields = {"opcode": unsigned(8)}
    pos = 8
    for f in isa.FORMATS[op]:
        fields[f.name] = signed(f.width) if f.signed else unsigned(f.width)
        pos += f.width
    fields["reserved"] = unsigned(isa.WORD_BITS - pos)
    return data.StructLayout(fields)


def _flag_mask(op: isa.Op) -> int:
    for f in isa.FORMATS[op]:
        if f.flags is not None:
            return sum(int(m) for m in f.flags)
    return 0


class MpuIssue(data.Struct):
    """A MATVEC for the MPU side of the core: the MPU's command plus the VBUF rows of its input
    ``src``, its result/bias ``dst`` (element address / 64)."""

    cmd: MatvecCommand
    src_row: unsigned(16)
    dst_row: unsigned(16)
    fwd_row: unsigned(16)  # a forwarding product's row (src, dst for a column, + R[sreg]) / 64


class StoreIssue(data.Struct):
    """A store for the DMA side of the core: the DMA's command plus, for VECTOR, ROW and COL,
    the first VBUF row its data comes from (``src / 64``)."""

    cmd: StoreCommand
    src_row: unsigned(16)


class UnitBusy(data.Struct):
    """What the core tells the controller about its units (1 = work in progress).

    ``dma_read``: a read (TILES, ROWS or WORD) is queued or its data is not yet delivered;
    ``loadv``: rows of a LOADV are still to arrive in the VBUF; ``store``: a store is still
    reading the VBUF; ``dma_write``: an HBM write has not had its response; ``mpu``: the MPU or
    its VBUF feeder is working; ``vpu``: the VPU is working."""

    dma_read: 1
    loadv: 1
    store: 1
    dma_write: 1
    mpu: 1
    vpu: 1


class Controller(GeometryComponent):
    """Fetches the program into instruction memory, then decodes and executes it.

    On :attr:`start` the controller reads ``imem_words`` instructions from channel 0 at
    :data:`tandem.layout.PROGRAM_BASE` (:attr:`fetch_cmd` / :attr:`fetch_data`, whole beats of
    the channel's port) into its instruction memory, then runs from pc 0. Decoding uses one
    ``data.StructLayout`` per format, built from :data:`tandem.isa.FORMATS`; an unknown opcode,
    non-zero reserved bits or reserved flags, a misaligned VBUF operand, an ``LDARG`` past
    :data:`tandem.regmap.SCALAR_ARGS`, a ``MATVEC`` weight format tandem.isa refuses (``wfmt``
    3; INT8 or INT4 with ``stride != 0`` or with ``LIVE_ROWS``/``LIVE_COLS``) or a pc outside
    the instruction memory is ``ILLEGAL_INSTRUCTION`` at that pc. Control instructions execute
    in the controller; the others are issued with their register operands and lengths
    resolved:

    * ``LDW``, ``LOADV``, ``MATVEC`` weights: :attr:`dma_read` (``tag`` = pc);
      ``STW``, ``STOREV``, ``STROW``, ``STCOL``: :attr:`dma_store`;
    * ``MATVEC``: :attr:`mpu` (the MPU command with the VBUF rows of x and the result);
      its ``wfmt`` and ``wgroup`` go into both the MPU command and the ``TILES`` read (a
      quantized matrix streams its whole region, scale beats included: rtl/dma.py);
    * vector ops: :attr:`vpu`.

    Scoreboard (conservative, correct first): a VBUF user (vector op, LOADV, a store, the MPU's
    x read) starts only when no other unit is using the VBUF, except that vector ops follow each
    other without waiting (the vector unit keeps them in order and overlaps independent ones
    itself, never letting a read overtake an earlier command's write to the same rows, so the
    core may queue them and the controller runs ahead to the next ``MATVEC``, whose weight
    read then overlaps the vector work), and so do LOADV instructions
    (the DMA delivers their rows in order, so their HBM read latencies overlap) and stores
    (they only read the VBUF, in order, so their write latencies overlap). A LOADV may also run
    beside MATVECs already sent to the MPU when its rows meet none of theirs, x or results
    (the MPU's result rows go first through the VBUF's write port, rtl/feeders.py
    ``VbufWriteArbiter``; the LOADV's rows arrive behind their tiles), so the compiler hides a
    layer's vector loads behind its products (tandem/compiler.py). A DMA read
    waits for every outstanding HBM write (a program may read what it just stored). A
    ``MATVEC`` sends its weight read to the DMA as soon as the DMA takes it, so the weights
    stream into the MPU's input while the VPU still computes; its MPU command follows, in
    order, when no vector op, LOADV or store uses the VBUF (a running MATVEC does not stop it:
    the core's MPU feeder overlaps consecutive MATVECs and checks their VBUF rows,
    rtl/core.py). :data:`MAX_PENDING` MATVECs may wait so at once: the later ones' weights queue
    behind the first one's, which hides the HBM read latency of short products (attention
    heads). Weight prefetch (:meth:`_lookahead`): while a vector op waits (for a MATVEC to
    finish, or for LOADV rows), a second instruction-memory port looks past the vector ops
    after it and sends the next ``MATVEC``'s weight read at once, so those weights stream
    into the DMA's read FIFOs while the MPU and the VPU still work on what comes before (up
    to :data:`PF_QUEUE` more MATVECs' weights in flight beyond the :data:`MAX_PENDING`).
    ``LDW`` and ``MATVEC ... ARGMAX`` wait for their result register. ``SYNC`` and ``HALT``
    wait for every unit and every write.

    Errors: VBUF operands past ``vbuf_elems`` (``VBUF_RANGE``) are checked at issue; the DMA
    reports ``HBM_RANGE`` and ``AXI_ERROR`` with the pc of the failing instruction
    (:attr:`dma_error`, :attr:`dma_error_tag`: the lowest pc of all errors; a prefetched read's
    error stops the run only when Exec reaches its MATVEC, :attr:`dma_error_read`); the
    watchdog fires after ``watchdog`` cycles
    (0: 2**24) without an instruction issued (``WATCHDOG``). On any stop the controller
    stops issuing, waits for the units to drain (bounded by the watchdog; MATVECs whose weights
    were read but whose MPU commands were not sent are sent then, so no tile is left for the next
    run), writes the status
    record with a ``STATUS`` store, waits for the write response and pulses :attr:`done`. The
    store's acceptance and its write response get a fresh watchdog period: if they do not
    come, ``WATCHDOG`` is added to the status registers (not to a record already sampled), a
    store the DMA never took is dropped, and :attr:`done` pulses anyway.
    ``TOKENS`` counts the ``STW`` instructions issued, as ``tandem.golden.isasim`` does.

    Timing: one cycle per instruction when the target unit accepts at once (Exec runs from the
    instruction register ``ir``; the word after it is already read, and is decoded into
    ``ir`` in the cycle the current one issues), three after a branch or jump (read, decode,
    execute); fetch takes ``imem_words`` cycles after the data arrives.

    The code: :meth:`_registers`, :meth:`_decode`, :meth:`_scoreboard` (when each VBUF user may
    issue), :meth:`_mpu_queue` (the pending MATVECs), :meth:`_stops`, the FSM's states
    (:meth:`_fetch_states`, :meth:`_run_states` with :meth:`_exec`, :meth:`_stop_states`) and
    :meth:`_results`.

    Members
    -------
    start : In(1)
    args : In(args_layout(channels))
    done : Out(1)
        One-cycle pulse after the status record is written.
    status : Out(status_layout(channels))
        The status registers (valid from ``done`` until the next ``start``).
    fetch_cmd : Out(stream.Signature(ChannelRun))
    fetch_data : In(stream.Signature(port_bits))
    dma_read : Out(stream.Signature(ReadCommand))
    dma_word : In(stream.Signature(32))
    dma_store : Out(stream.Signature(StoreIssue))
    record : Out(StatusRecordLayout fields)
        The record a ``STATUS`` store writes.
    dma_error : In(DMAErrors), dma_error_tag : In(16), dma_error_read : In(1)
    mpu : Out(stream.Signature(MpuIssue))
    mpu_argmax : In(stream.Signature(16))
    vpu : Out(stream.Signature(VectorCommand))
    busy : In(UnitBusy)

    ``exec_pc`` (a plain signal, not a port) is the pc of the instruction in Exec, for
    performance monitors (``DecodeCore(perf=True)``).
    """

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        if geom.imem_words > 1 << 16:
            raise ValueError(
                f"imem_words must be at most 65536 (16-bit targets), not {geom.imem_words}"
            )
        if (geom.beat_bytes % isa.WORD_BYTES) or (PROGRAM_BASE % geom.beat_bytes):
            raise ValueError(
                f"a {geom.beat_bytes}-byte beat must hold whole instructions and PROGRAM_BASE "
                f"({PROGRAM_BASE}) must be beat-aligned"
            )
        from .dma import StatusRecordLayout

        self.exec_pc = Signal(16)
        super().__init__(
            geom,
            {
                "start": In(1),
                "args": In(args_layout(geom.channels)),
                "done": Out(1),
                "status": Out(status_layout(geom.channels)),
                "fetch_cmd": Out(stream.Signature(ChannelRun)),
                "fetch_data": In(stream.Signature(geom.port_bits)),
                "dma_read": Out(stream.Signature(ReadCommand)),
                "dma_word": In(stream.Signature(32)),
                "dma_store": Out(stream.Signature(StoreIssue)),
                "record": Out(StatusRecordLayout),
                "dma_error": In(DMAErrors),
                "dma_error_tag": In(16),
                "dma_error_read": In(1),
                "mpu": Out(stream.Signature(MpuIssue)),
                "mpu_argmax": In(stream.Signature(16)),
                "vpu": Out(stream.Signature(VectorCommand)),
                "busy": In(UnitBusy),
            },
        )

    def elaborate(self, platform):
        m = Module()
        c = SimpleNamespace()  # the registers, signals and helpers the pieces below share
        c.queues_clear = Signal()  # a run starts: the MATVEC queues are emptied (_queue)
        self._registers(m, c)
        self._decode(m, c)
        self._scoreboard(m, c)
        self._mpu_queue(m, c)
        self._stops(m, c)
        self._lookahead(m, c)
        # the operands of a MATVEC in Exec, registered a cycle after its decode (outside the FSM:
        # computed every cycle, valid once ir and dec have held still for a cycle in Exec)
        c.mv = self._matvec_operands(
            m,
            c.views[isa.Op.MATVEC],
            c.dec,
            c,
            "mv",
            invalidate=c.dec_changed | ~c.in_exec,
        )
        with m.FSM(name="ctrl"):
            self._fetch_states(m, c)
            self._run_states(m, c)
            self._stop_states(m, c)
        self._results(m, c)
        return m

    def _registers(self, m, c):
        """The instruction memory, the architectural registers and the status outputs."""
        g = self._geom
        m.submodules.imem = imem = memory.Memory(shape=isa.WORD_BITS, depth=g.imem_words, init=[])
        c.imem = imem
        c.wr = imem.write_port()
        c.rd = imem.read_port(domain="sync")
        m.d.comb += c.rd.en.eq(0)  # a read port's enable defaults to 1: hold data while executing

        c.regs = Array(Signal(32, name=f"r{i}") for i in range(isa.N_REGS))
        c.pc = Signal(16)
        m.d.comb += self.exec_pc.eq(c.pc)
        c.tokens = Signal(32)
        c.cycles = Signal(64)
        c.running = Signal()
        c.status = Signal(8)
        c.err_pc = Signal(32)
        c.halt_code = Signal(32)
        c.watchdog = Signal(32)
        c.wd_limit = Signal(32)
        c.argv = Array(self.args[name] for name, _ in regmap.SCALAR_ARGS)

        m.d.comb += [
            self.status["status"].eq(c.status),
            self.status["error_pc"].eq(c.err_pc),
            self.status["error_code"].eq(c.halt_code),
            self.status["tokens"].eq(c.tokens),
            self.status["cycles_lo"].eq(c.cycles[:32]),
            self.status["cycles_hi"].eq(c.cycles[32:]),
            self.record.status.eq(c.status),
            self.record.pc.eq(c.err_pc),
            self.record.tokens.eq(c.tokens),
            self.record.halt_code.eq(c.halt_code),
            self.record.cycles.eq(c.cycles),
        ]
        with m.If(c.running):
            m.d.sync += c.cycles.eq(c.cycles + 1)

    def _decode(self, m, c):
        """Decode, a pipeline stage of its own. :meth:`_predecode` computes from a word
        everything that does not depend on a register (``known``, ``legal``, each VBUF operand's
        room and distances), and Exec reads it from registers: the instruction register ``ir``
        and its decode ``c.dec`` (:meth:`load_ir`, when Exec takes the next word), so Exec starts
        from registers, not from the block RAM's output, and its range checks are one
        comparison of a length with a registered bound. One view per format of ``ir``, and the
        operand helpers."""
        c.reg_write = Signal()  # a register is written this cycle (set where it is)
        pre = self._predecode(m, c, c.rd.data, "rd")
        c.ir = Signal(isa.WORD_BITS)
        c.dec = self._decode_register(pre, "dec")
        c.views = {op: data.View(instruction_layout(op), c.ir) for op in isa.Op}
        c.known, c.legal = c.dec.known, c.dec.legal
        # `dec.n`, `dec.live` and `dec.fwd_off` read the register file when the word is
        # decoded; a register written in that cycle or later makes them stale, and Exec reads
        # them again (one cycle) before it issues a vector op or a MATVEC (_exec; the flag is
        # set in _results)
        c.dec_stale = Signal()
        c.dec_changed = Signal()  # ir or dec is loaded this cycle
        fresh = self._register_operands(m, c, c.ir, "ir")

        def load_ir():
            """The read port's word (and its decode) into the instruction register."""
            m.d.sync += [c.ir.eq(c.rd.data), c.dec_stale.eq(0)]
            m.d.comb += c.dec_changed.eq(1)
            c.dec.load(m)

        def refresh():
            """Read ``dec.n``, ``dec.live`` and ``dec.fwd_off`` again, from ``ir`` and the
            registers now."""
            m.d.sync += [c.dec.n.eq(fresh.n), c.dec.live.eq(fresh.live), c.dec_stale.eq(0)]
            m.d.sync += c.dec.fwd_off.eq(fresh.fwd_off)
            m.d.comb += c.dec_changed.eq(1)

        c.load_ir, c.refresh = load_ir, refresh

        def reg(index):
            return c.regs[index]

        def over(dec, field, n):
            """VBUF operand ``field`` of a decoded word, [addr, addr + n), past the buffer:
            ``n > vbuf_elems - addr`` (the room registered at decode; negative: always)."""
            room = dec.room[field]
            return room[-1] | (n > room[:-1])

        def partial(dec, field, n):
            """[dst, dst + n) and [field, field + n) overlap at different starts (tandem.isa):
            ``dst != field`` and ``n > |dst - field|`` (both registered at decode)."""
            return ~dec.same[field] & (n > dec.dist[field])

        c.reg, c.over, c.partial = reg, over, partial

    def _register_operands(self, m, c, word, name):
        """A word's register-length operands (combinational): ``n`` = ``R[lreg]`` if ``lreg``
        else ``len`` (a vector op's length), ``live`` = ``R[lreg]`` (a MATVEC's live rows or
        columns), ``fwd_off`` = ``R[sreg]`` (a forwarding MATVEC's row offset, tandem.isa: its
        low 16 bits, and bit 16 set if any higher bit is, so past any VBUF);
        ``lreg``, ``sreg`` and ``len`` are 0 in formats without them (``R[0]`` is 0)."""
        opcode = word[:8]
        lreg = Signal(4, name=f"{name}_lreg")
        sreg = Signal(4, name=f"{name}_sreg")
        n_field = Signal(16, name=f"{name}_len")
        with m.Switch(opcode):
            for op in isa.Op:
                names = {f.name for f in isa.FORMATS[op]}
                if "lreg" in names:
                    with m.Case(int(op)):
                        v = data.View(instruction_layout(op), word)
                        m.d.comb += lreg.eq(v.lreg)
                        if "len" in names:
                            m.d.comb += n_field.eq(v.len)
                        if "sreg" in names:
                            m.d.comb += sreg.eq(v.sreg)
        o = SimpleNamespace(
            n=Signal(32, name=f"{name}_n"),
            live=Signal(32, name=f"{name}_live"),
            fwd_off=Signal(17, name=f"{name}_fwd_off"),
        )
        sval = c.regs[sreg]
        m.d.comb += [
            o.live.eq(c.regs[lreg]),
            o.fwd_off.eq(Cat(sval[:16], sval[16:].any())),
            o.n.eq(Mux(lreg != 0, c.regs[lreg], n_field)),
        ]
        return o

    def _predecode(self, m, c, word, name):
        """Everything Exec needs from a word, registered at decode (combinational here):
        ``known``, ``legal``, ``room[f]`` = ``vbuf_elems - f`` (signed) for each VBUF field
        ``f`` of the word's format, for ``a`` and ``b``: ``same[f]`` (``dst == f``) and
        ``dist[f]`` = ``|dst - f|``; ``n`` and ``live`` (:meth:`_register_operands`, from the
        registers as they are now) and ``uses_len`` (a vector op or MATVEC: it uses them)."""
        g = self._geom
        opcode = word[:8]
        p = SimpleNamespace(known=Signal(name=f"{name}_known"), legal=Signal(name=f"{name}_legal"))
        ops = self._register_operands(m, c, word, name)
        p.n, p.live, p.fwd_off = ops.n, ops.live, ops.fwd_off
        p.uses_len = Signal(name=f"{name}_uses_len")
        m.d.comb += p.uses_len.eq(
            Cat(*(opcode == int(op) for op in (*_VPU_OPS, isa.Op.MATVEC))).any()
        )
        addr = {f: Signal(16, name=f"{name}_{f}") for f in isa.VBUF_FIELDS}
        m.d.comb += p.known.eq(Cat(*(opcode == int(op) for op in isa.Op)).any())
        with m.Switch(opcode):
            for op in isa.Op:
                with m.Case(int(op)):
                    v = data.View(instruction_layout(op), word)
                    ok = v.reserved == 0
                    mask = _flag_mask(op)
                    if mask:
                        ok &= (v.flags & (0xF & ~mask)) == 0
                    for f in isa.FORMATS[op]:
                        if f.name in isa.VBUF_FIELDS:
                            ok &= v[f.name][:_ROW_SHIFT] == 0
                            m.d.comb += addr[f.name].eq(v[f.name])
                    if op is isa.Op.LDARG:
                        ok &= v.arg < len(regmap.SCALAR_ARGS)
                    if op is isa.Op.MATVEC:
                        ok &= self._matvec_format_legal(v)
                    m.d.comb += p.legal.eq(ok)
        # the VBUF rows a LOADV writes and a MATVEC reads (x) and writes (results, bias):
        # [lo, hi) in rows, from the immediates (the allocated rows and columns)
        p.span = {k: Signal(_SPAN_BITS, name=f"{name}_span_{k}") for k in _SPANS}

        def span(lo, hi, first, n):
            m.d.comb += [
                p.span[lo].eq(first[_ROW_SHIFT:]),
                p.span[hi].eq((first + n + (1 << _ROW_SHIFT) - 1)[_ROW_SHIFT:]),
            ]

        with m.Switch(opcode):
            with m.Case(int(isa.Op.LOADV)):
                v = data.View(instruction_layout(isa.Op.LOADV), word)
                span("w_lo", "w_hi", v.dst, v.len)
            with m.Case(int(isa.Op.MATVEC)):
                v = data.View(instruction_layout(isa.Op.MATVEC), word)
                span("w_lo", "w_hi", v.dst, v.rows)
                span("r_lo", "r_hi", v.src, v.cols)
            for op in (isa.Op.STOREV, isa.Op.STROW, isa.Op.STCOL):  # the rows a store reads
                with m.Case(int(op)):
                    v = data.View(instruction_layout(op), word)
                    span("r_lo", "r_hi", v.src, v.len)
        p.room = {}
        for f in isa.VBUF_FIELDS:
            p.room[f] = Signal(signed(18), name=f"{name}_room_{f}")
            m.d.comb += p.room[f].eq(g.vbuf_elems - addr[f])
        p.same, p.dist = {}, {}
        for f in ("a", "b"):
            p.same[f] = Signal(name=f"{name}_same_{f}")
            p.dist[f] = Signal(16, name=f"{name}_dist_{f}")
            m.d.comb += [
                p.same[f].eq(addr["dst"] == addr[f]),
                p.dist[f].eq(
                    Mux(addr["dst"] > addr[f], addr["dst"] - addr[f], addr[f] - addr["dst"])
                ),
            ]
        return p

    @staticmethod
    def _matvec_format_legal(v):
        """A ``MATVEC`` word's weight format is legal (tandem.isa ``_check_quantized_matvec``):
        ``wfmt`` is a :class:`tandem.isa.WFmt`, and a quantized one (INT8, INT4) has ``stride`` 0
        and neither ``LIVE_ROWS`` nor ``LIVE_COLS``."""
        known = Cat(*(v.wfmt == int(w) for w in isa.WFmt)).any()
        quant = v.wfmt != int(isa.WFmt.FP16)
        live = int(isa.MatFlag.LIVE_ROWS | isa.MatFlag.LIVE_COLS)
        legal = known & (~quant | ((v.stride == 0) & ((v.flags & live) == 0)))
        # a forwarding product (sreg without ARGMAX), FP16: LIVE_ROWS only with 1..64 columns
        # (a forwarded row) or LIVE_COLS only with 1..64 rows (a forwarded column)
        fwd = ~v.flags[1] & (v.sreg != 0)
        fwd_row = (v.flags[2:4] == 0b01) & (v.cols != 0) & (v.cols <= BLOCK)
        fwd_col = (v.flags[2:4] == 0b10) & (v.rows != 0) & (v.rows <= BLOCK)
        return legal & (~fwd | (~quant & (fwd_row | fwd_col)))

    @staticmethod
    def _decode_register(pre, name):
        """Registers of the same shape as :meth:`_predecode`'s signals; ``load(m)`` copies them."""
        r = SimpleNamespace(
            known=Signal(name=f"{name}_known"),
            legal=Signal(name=f"{name}_legal"),
            n=Signal(32, name=f"{name}_n"),
            live=Signal(32, name=f"{name}_live"),
            fwd_off=Signal(17, name=f"{name}_fwd_off"),
            uses_len=Signal(name=f"{name}_uses_len"),
            room={f: Signal(signed(18), name=f"{name}_room_{f}") for f in pre.room},
            same={f: Signal(name=f"{name}_same_{f}") for f in pre.same},
            dist={f: Signal(16, name=f"{name}_dist_{f}") for f in pre.dist},
            span={k: Signal(_SPAN_BITS, name=f"{name}_span_{k}") for k in pre.span},
        )

        def load(m):
            m.d.sync += [r.known.eq(pre.known), r.legal.eq(pre.legal), r.uses_len.eq(pre.uses_len)]
            m.d.sync += [r.n.eq(pre.n), r.live.eq(pre.live), r.fwd_off.eq(pre.fwd_off)]
            m.d.sync += [r.room[f].eq(pre.room[f]) for f in pre.room]
            m.d.sync += [r.same[f].eq(pre.same[f]) for f in pre.same]
            m.d.sync += [r.dist[f].eq(pre.dist[f]) for f in pre.dist]
            m.d.sync += [r.span[k].eq(pre.span[k]) for k in pre.span]

        r.load = load
        return r

    def _scoreboard(self, m, c):
        """When each kind of VBUF user may issue (see the class docstring)."""
        busy = self.busy
        c.vbuf_quiet = Signal()
        # MATVECs whose weight read has gone to the DMA and whose MPU command waits for the VBUF
        # (in order, at most MAX_PENDING: the later ones' weights stream behind the first one's)
        c.n_pending = Signal(range(MAX_PENDING + 1))
        c.mpu_pending = Signal()
        m.d.comb += c.mpu_pending.eq(c.n_pending != 0)
        c.loadv_queued = Signal()  # a LOADV not yet taken by the DMA (busy.loadv counts after)
        m.d.comb += c.loadv_queued.eq(
            self.dma_read.valid & (self.dma_read.payload.kind == ReadKind.ROWS)
        )
        # A VBUF user is quiet when it has nothing waiting to issue, queued or running.
        c.mpu_quiet = ~busy.mpu & ~c.mpu_pending & ~self.mpu.valid
        c.store_quiet = ~busy.store & ~self.dma_store.valid
        c.vpu_quiet = ~busy.vpu & ~self.vpu.valid
        loadv_quiet = ~busy.loadv & ~c.loadv_queued
        # Vector ops need only the other VBUF users quiet (and the command register free): the
        # vector unit keeps their order and their reads after earlier writes (its overlap
        # rules), so they may queue.
        c.vpu_may_issue = Signal()
        m.d.comb += c.vpu_may_issue.eq(c.mpu_quiet & loadv_quiet & c.store_quiet & ~self.vpu.valid)
        m.d.comb += c.vbuf_quiet.eq(c.vpu_may_issue & ~busy.vpu)
        # Stores only read the VBUF, and the store path takes them in order (the store feeder
        # reads one after the other), so a store waits for the VBUF's writers only: a run of
        # stores goes out back to back, their HBM write latencies overlapping. Vector ops
        # running (or queued) need not be done when they write none of the store's rows (the
        # rows every vector op issued since the VPU was last quiet may write: ``vpu_rows``), so
        # the attention's K/V stores go out while the q scaling runs.
        empty = (1 << _SPAN_BITS) - 1, 0  # lo at its largest
        c.vpu_rows = [Signal(_SPAN_BITS, name=f"vpu_rows_{k}", init=v) for k, v in
                      zip(("lo", "hi"), empty, strict=True)]  # fmt: skip
        c.vpu_issue = Signal()  # a vector op issues this cycle (set in Exec) ...
        c.vpu_issue_rows = [Signal(_SPAN_BITS, name=f"vpu_issue_{k}") for k in ("lo", "hi")]
        # ... and may write rows [lo, hi): registered, then joined to the box the next cycle
        # (two short paths; a store waits in that cycle, `joining`). The VPU is not quiet
        # then (the op is in its command register), so the join keeps the box.
        joining = Signal()
        new = [Signal(_SPAN_BITS, name=f"vpu_new_{k}") for k in ("lo", "hi")]
        m.d.sync += joining.eq(c.vpu_issue)
        with m.If(c.vpu_issue):
            m.d.sync += [new[0].eq(c.vpu_issue_rows[0]), new[1].eq(c.vpu_issue_rows[1])]
        old = c.vpu_rows
        with m.If(joining):
            m.d.sync += [
                old[0].eq(Mux(new[0] < old[0], new[0], old[0])),
                old[1].eq(Mux(new[1] > old[1], new[1], old[1])),
            ]
        with m.Elif(c.vpu_quiet):
            m.d.sync += [old[0].eq(empty[0]), old[1].eq(empty[1])]
        vpu_apart = (c.dec.span["r_hi"] <= old[0]) | (c.dec.span["r_lo"] >= old[1])
        c.store_may_issue = Signal()
        m.d.comb += c.store_may_issue.eq(
            c.mpu_quiet
            & loadv_quiet
            & (c.vpu_quiet | (vpu_apart & ~joining))
            & ~self.dma_store.valid
        )
        # LOADVs follow each other without waiting: the DMA delivers their rows in order through
        # the one VBUF write port, so a LOADV needs only the other VBUF users quiet, or the MPU
        # busy with other rows (_loadv_may_issue).
        c.all_idle = Signal()
        m.d.comb += c.all_idle.eq(
            c.vbuf_quiet & ~busy.dma_read & ~busy.dma_write & ~self.dma_read.valid
        )
        c.write_quiet = Signal()
        m.d.comb += c.write_quiet.eq(~busy.dma_write & ~self.dma_store.valid)

        # Stream outputs are registers: set on issue, cleared on the handshake.
        for s in (self.dma_read, self.dma_store, self.mpu, self.vpu, self.fetch_cmd):
            with m.If(s.ready):
                m.d.sync += s.valid.eq(0)

    @staticmethod
    def _queue(m, c, name, layout, depth):
        """A first-in first-out queue of ``depth`` entries of ``layout`` in distributed RAM
        (``amaranth.lib.fifo.SyncFIFO``: its head read asynchronously, so an entry pushed in
        one cycle is the head in the next, as a shift register's would be; a few LUTs per
        entry bit instead of a register and a multiplexer). The caller keeps the count and
        pushes (``w_en``, ``w_data``) and pops (``r_en``) only within it; ``c.queues_clear``
        (a run's start) empties it. Returns the FIFO and its head as a ``layout`` view."""
        q = fifo.SyncFIFO(width=data.Layout.cast(layout).size, depth=depth)
        m.submodules[name] = ResetInserter(c.queues_clear)(q)
        return q, data.View(layout, q.r_data)

    def _mpu_queue(self, m, c):
        """MATVECs waiting for the VBUF after their weight read went to the DMA, oldest first
        (:meth:`_queue`, ``n_pending`` of them)."""
        busy, n_pending = self.busy, c.n_pending
        queue, head = self._queue(m, c, "pending", MpuIssue, MAX_PENDING)
        c.push = Signal()  # a MATVEC issues this cycle (set in Exec)
        c.push_cmd = Signal(MpuIssue)
        # The next MATVEC may go to the core's MPU feeder while the previous one still runs:
        # the feeder takes it once the previous one's x is loaded, and holds it back while its
        # x or bias rows overlap result rows still to be written.
        send = Signal()
        m.d.comb += send.eq(
            c.mpu_pending & ~self.mpu.valid & c.vpu_quiet & ~busy.loadv & c.store_quiet
        )
        with m.If(send):
            m.d.sync += [self.mpu.payload.eq(head), self.mpu.valid.eq(1)]
        m.d.comb += [
            queue.r_en.eq(send),
            queue.w_en.eq(c.push),
            queue.w_data.eq(c.push_cmd.as_value()),
        ]
        m.d.sync += n_pending.eq(n_pending + c.push - send)

        # The VBUF rows of the MATVECs issued since the MPU was last quiet, the x rows read and
        # the result (and bias) rows written, each as one interval [lo, hi): a LOADV may run
        # beside them if it meets neither (Exec, LOADV).
        empty = {"w_lo": -1, "r_lo": -1, "w_hi": 0, "r_hi": 0}
        empty = {k: v % (1 << _SPAN_BITS) for k, v in empty.items()}  # lo at its largest
        c.mpu_rows = {k: Signal(_SPAN_BITS, name=f"mpu_rows_{k}", init=empty[k]) for k in _SPANS}
        # ... and whether one of them forwards a row (src + R[sreg], outside those intervals):
        # no LOADV runs beside it
        c.mpu_fwd = Signal()
        with m.If(c.push):
            m.d.sync += c.mpu_fwd.eq(c.push_cmd.cmd.fwd | (c.mpu_fwd & ~c.mpu_quiet))
        with m.Elif(c.mpu_quiet):
            m.d.sync += c.mpu_fwd.eq(0)
        with m.If(c.push):
            for k in _SPANS:
                new, old = c.dec.span[k], c.mpu_rows[k]
                keep = Mux(new < old, new, old) if k.endswith("lo") else Mux(new > old, new, old)
                m.d.sync += old.eq(Mux(c.mpu_quiet, new, keep))
        with m.Elif(c.mpu_quiet):
            m.d.sync += [c.mpu_rows[k].eq(empty[k]) for k in _SPANS]

    def _stops(self, m, c):
        """Stop handling: DMA errors, the watchdog, and ``finish``/``stop`` (record a stop and
        go to Drain); also the registers of the fetch and of results still on their way."""
        g = self._geom
        c.stop_now = Signal()  # set in the Exec state when an error or HALT is found
        c.stop_status = Signal(8)
        c.stop_pc = Signal(16)
        c.issued = Signal()  # an instruction retired this cycle (watchdog progress)
        c.sequential = Signal()  # ... and the next one is at pc + 1

        c.dma_err = Signal()
        m.d.comb += c.dma_err.eq(self.dma_error.hbm_range | self.dma_error.axi_error)
        # The DMA reports the error of the lowest tag (pc) so far. A prefetched read's error
        # waits until Exec reaches its MATVEC (dma_stop: the error stops the run now): the ISA
        # names the first failing instruction in program order, and Exec may still issue
        # earlier ones that fail (a vector op, a store the look-ahead passed). The tag is then
        # a queued pc: Exec issues its own reads at its pc, before the oldest queued one. A
        # stop for a DMA error follows the DMA's report through the drain (stop_follow): an
        # earlier store's error may come after a later read's.
        c.dma_queued = Signal()  # the error is a queued MATVEC's read's
        c.dma_stop = Signal()
        c.stop_follow = Signal()
        c.dma_err_bits = Signal(8)
        m.d.comb += c.dma_err_bits.eq(
            Mux(self.dma_error.hbm_range, Status.HBM_RANGE, 0)
            | Mux(self.dma_error.axi_error, Status.AXI_ERROR, 0)
        )
        c.wd_fire = Signal()
        m.d.comb += c.wd_fire.eq(c.watchdog >= c.wd_limit)
        with m.If(c.running):
            m.d.sync += c.watchdog.eq(Mux(c.issued, 0, c.watchdog + 1))

        c.fetch_count = Signal(range(g.imem_words + 1))
        c.beat = Signal(g.port_bits)
        c.sub = Signal(range(g.beat_bytes // isa.WORD_BYTES + 1))
        c.word_pending = Signal()  # LDW waiting for its word
        c.word_rd = Signal(4)
        c.argmax_pending = Signal()
        c.argmax_rd = Signal(4)
        m.d.comb += [self.dma_word.ready.eq(1), self.mpu_argmax.ready.eq(1)]
        c.waiting = Signal()  # a register result still on its way
        m.d.comb += c.waiting.eq(c.word_pending | c.argmax_pending)

        def finish(bits, at_pc, code=0):
            """Stop at the end of this Exec cycle (the FSM goes to Drain)."""
            m.d.sync += [c.stop_status.eq(bits), c.stop_pc.eq(at_pc), c.halt_code.eq(code)]
            m.d.comb += c.stop_now.eq(1)

        def stop(bits, at_pc):
            """Go to Drain now, recording why and where."""
            m.d.sync += [c.stop_status.eq(bits), c.stop_pc.eq(at_pc)]
            m.d.sync += c.watchdog.eq(0)
            m.next = "Drain"

        def stop_dma():
            """Go to Drain for a DMA error, and follow the DMA's report there."""
            stop(c.dma_err_bits, self.dma_error_tag)
            m.d.sync += c.stop_follow.eq(1)

        c.finish, c.stop, c.stop_dma = finish, stop, stop_dma

    def _lookahead(self, m, c):
        """Weight prefetch. While a vector op waits in Exec (for a MATVEC to finish, or LOADV
        rows), a second read port of the instruction memory scans the words after it, one per
        cycle, through vector ops, MATVECs and the stores ``STROW`` and ``STCOL``. At each
        ``MATVEC`` it sends that MATVEC's weight read to the DMA as soon as the DMA slot is free
        and every HBM write is answered (a forwarding product's, tandem.isa, without waiting for
        writes), and queues its pc and MPU command (up to :data:`PF_QUEUE`: ``pf_n``, oldest
        ``pf_pc``); Exec then issues the oldest without a read. Past a store Exec has not issued
        only forwarding products are prefetched (the scan ends at any other MATVEC); once Exec
        has issued it, a plain product's read waits for its write's answer (``write_quiet``) as
        Exec's own does. The scan ends at any other instruction (it may write a register,
        branch, read or write HBM), after a MATVEC with ARGMAX (its register may change what
        follows), with the queue full, or at the end of the memory; it starts again, after the
        newest queued MATVEC, when Exec retires an instruction that is not a vector op.

        Why it is safe: the words between Exec and a prefetched MATVEC are vector ops,
        MATVECs without ARGMAX and stores, which change no register, read no HBM but weights (in
        program order) and do not branch, so Exec reaches that MATVEC with the operands the scan
        resolved, and the DMA gets its reads in program order (the weights of every earlier
        MATVEC were sent before). A read sent before a store it passed is a forwarding
        product's, which by the ISA's rule meets no store in flight but into the row it takes
        from the VBUF. A prefetched read's HBM error stops the run only when Exec reaches its
        MATVEC (:meth:`_stops`), so an earlier instruction's error (such a store's) is the one
        reported, as in the ISA simulator. The prefetched tiles wait in the
        DMA's read FIFOs until the MPU takes them, after the vector ops. A MATVEC with a VBUF
        operand out of range, with no live row or column, or that is an illegal instruction (a
        reserved weight format or bit: the DMA and the MPU could disagree on its tiles) is not
        prefetched (Exec reports or skips it as before). A register result on its way (LDW,
        ARGMAX) stops the prefetch.
        """
        g = self._geom
        Op = isa.Op
        la = c.imem.read_port(domain="sync")
        c.in_exec = Signal()  # the FSM is in Exec (set there)
        # the prefetched MATVECs, oldest first: pc and MPU command (for a stop before Exec
        # reaches them); Exec (or the drain) pops the oldest, the scan pushes
        pf_entry = data.StructLayout({"pc": 16, "cmd": MpuIssue})
        pf_queue, pf_head = self._queue(m, c, "prefetched", pf_entry, PF_QUEUE)
        c.pf_n = Signal(range(PF_QUEUE + 1))
        c.pf_valid = Signal()
        m.d.comb += c.pf_valid.eq(c.pf_n != 0)
        c.pf_pc, c.pf_cmd = pf_head.pc, pf_head.cmd
        tag = self.dma_error_tag
        m.d.comb += [
            c.dma_queued.eq(self.dma_error_read & c.pf_valid & (c.pf_pc <= tag)),
            c.dma_stop.eq(c.dma_err & ~(c.dma_queued & (c.pc < tag))),
        ]
        c.pf_pop = Signal()  # the oldest leaves (set by Exec and the drain)
        pf_push = Signal()
        pf_new_pc = Signal(16)
        pf_new_cmd = Signal(MpuIssue)
        pf_last = Signal(16)  # the newest one's pc: a new scan starts after it
        pf_last_argmax = Signal()  # ... and it is an ARGMAX (its register stops the scan)
        m.d.comb += [
            pf_queue.r_en.eq(c.pf_pop),
            pf_queue.w_en.eq(pf_push),
            pf_queue.w_data.eq(Cat(pf_new_pc, pf_new_cmd.as_value())),
        ]
        with m.If(pf_push):
            m.d.sync += pf_last.eq(pf_new_pc)
        m.d.sync += c.pf_n.eq(c.pf_n + pf_push - c.pf_pop)

        def is_vector(opcode):
            return Cat(*(opcode == int(op) for op in _VPU_OPS)).any()

        exec_vec = Signal()  # Exec holds a vector op: it uses no DMA stream this cycle
        m.d.comb += exec_vec.eq(c.in_exec & is_vector(c.ir[:8]) & c.known & c.legal)
        on = Signal()  # scanning
        done = Signal()  # this run of vector ops is scanned
        reading = Signal()  # la.data holds the word at `at` this cycle
        have = Signal()  # `word` (a register) holds the word at `at`, decoded in `dec`
        at = Signal(16)
        nxt = Signal(16)
        # the read word and its decode are registered before they are looked at (a block RAM
        # output is not a good start for the operand arithmetic): two cycles per word
        word = Signal(isa.WORD_BITS, name="la_word")
        dec = self._decode_register(self._predecode(m, c, la.data, "la_rd"), "la_dec")
        m.d.sync += [reading.eq(0), have.eq(0)]
        with m.If(reading):
            m.d.sync += [word.eq(la.data), have.eq(1)]
            dec.load(m)
        la_view = data.View(instruction_layout(Op.MATVEC), word)
        o = self._matvec_operands(m, la_view, dec, c, "la", invalidate=reading)
        start = Signal()
        more = Signal()
        go_on = Signal()  # a MATVEC prefetched this cycle, and the scan goes on past it
        # a scan starts after the newest prefetched MATVEC (the words up to it are vector ops
        # and MATVECs already prefetched), else after Exec
        first = Mux(c.pf_valid, pf_last + 1, c.pc + 1)
        room = (c.pf_n < PF_QUEUE) & ~(c.pf_valid & pf_last_argmax)
        # a store (STROW, STCOL: it reads the VBUF and writes HBM, nothing else) is passed, but
        # after one only forwarding products are prefetched: no other read may overtake a store
        is_store = (word[:8] == int(Op.STROW)) | (word[:8] == int(Op.STCOL))
        past_store = Signal()
        m.d.comb += [
            start.eq(exec_vec & ~on & ~done & room & (first < g.imem_words)),
            more.eq(on & have & (is_vector(word[:8]) | is_store) & (nxt < g.imem_words)),
        ]
        # ... and a scan that starts after queued MATVECs some of which lie past a store starts
        # past a store too while Exec has not issued that store (pf_store: a queued one was
        # prefetched past a store, cleared when the queue empties; store_pc: the newest store a
        # scan passed). Once Exec is past it, the store is in flight or written, and a read
        # waits for its answer as Exec's own does (``write_quiet``)
        pf_store = Signal()
        store_pc = Signal(16)
        left = c.pf_n - c.pf_pop  # queued MATVECs after this cycle's pop, before its push
        with m.If(pf_push):
            m.d.sync += pf_store.eq(past_store | (pf_store & (left != 0)))
        with m.Elif(left == 0):
            m.d.sync += pf_store.eq(0)
        with m.If(start):
            m.d.sync += past_store.eq(c.pf_valid & pf_store & (c.pc <= store_pc))
        with m.Elif(more & is_store):
            m.d.sync += [past_store.eq(1), store_pc.eq(at)]
        addr = Mux(start, first, nxt)
        m.d.comb += [la.addr.eq(addr), la.en.eq(start | more | go_on)]
        with m.If(start | more | go_on):
            m.d.sync += [at.eq(addr), nxt.eq(addr + 1), reading.eq(1)]
        with m.If(start):
            m.d.sync += on.eq(1)

        def end():
            m.d.sync += [on.eq(0), done.eq(1)]

        argmax = la_view.flags[1]
        with m.If(on & have):
            with m.If(word[:8] == int(Op.MATVEC)):
                with m.If(~o.checked):
                    m.d.sync += have.eq(1)  # its operands are registered next cycle
                with m.Elif(o.bad | o.nothing | ~dec.legal | (past_store & ~o.fwd)):
                    end()
                with m.Elif(
                    exec_vec
                    & ~self.dma_read.valid
                    & (c.write_quiet | o.fwd)
                    & ~c.waiting
                    & ~c.dma_err
                    & (c.pf_n < PF_QUEUE)
                ):
                    o.issue_weights(at)
                    m.d.comb += [pf_push.eq(1), pf_new_pc.eq(at), pf_new_cmd.eq(o.cmd)]
                    m.d.sync += pf_last_argmax.eq(argmax)
                    # on past it, unless its result register may change what follows or the
                    # queue is full after it
                    with m.If(argmax | (c.pf_n + 1 - c.pf_pop >= PF_QUEUE)):
                        end()
                    with m.Elif(nxt < g.imem_words):
                        m.d.comb += go_on.eq(1)
                    with m.Else():
                        end()
                with m.Else():
                    m.d.sync += have.eq(1)  # keep the word until the DMA slot is free
            with m.Elif(~more):
                end()
        # a new region of the program: scan again at the next vector op that waits
        # (and after a register write: the registered operands may be stale)
        with m.If(~c.in_exec | (c.issued & ~exec_vec) | c.reg_write):
            m.d.sync += [on.eq(0), done.eq(0), have.eq(0), reading.eq(0)]

    def _fetch_states(self, m, c):
        """Idle (wait for ``start``), Fetch-Check and Fetch: the program into the instruction
        memory, one word per cycle."""
        g = self._geom
        words_per_beat = g.beat_bytes // isa.WORD_BYTES
        with m.State("Idle"), m.If(self.start):
            m.d.comb += c.queues_clear.eq(1)  # the queues are emptied (their counts below)
            m.d.sync += [
                c.running.eq(1),
                c.cycles.eq(0),
                c.tokens.eq(0),
                c.status.eq(0),
                c.err_pc.eq(0),
                c.halt_code.eq(0),
                c.pc.eq(0),
                c.watchdog.eq(0),
                c.wd_limit.eq(
                    Mux(self.args["watchdog"] == 0, DEFAULT_WATCHDOG, self.args["watchdog"])
                ),
                c.fetch_count.eq(0),
                c.word_pending.eq(0),
                c.argmax_pending.eq(0),
                c.n_pending.eq(0),
                c.pf_n.eq(0),
                c.stop_status.eq(0),
                c.stop_pc.eq(0),
                c.stop_follow.eq(0),
            ]
            m.d.sync += [r.eq(0) for r in c.regs]
            m.next = "Fetch-Check"
        with m.State("Fetch-Check"):
            end = PROGRAM_BASE + g.imem_words * isa.WORD_BYTES
            with m.If(self.args["hbm_bytes"].as_unsigned() < end):
                c.stop(Status.HBM_RANGE, 0)
            with m.Else():
                m.d.sync += [
                    self.fetch_cmd.valid.eq(1),
                    self.fetch_cmd.payload.offset.eq(PROGRAM_BASE),
                    self.fetch_cmd.payload.beats.eq(g.imem_words // words_per_beat),
                    c.sub.eq(0),
                ]
                m.next = "Fetch"
        with m.State("Fetch"):
            # take a beat, write its words one per cycle
            m.d.comb += self.fetch_data.ready.eq(c.sub == 0)
            with m.If(self.fetch_data.valid & (c.sub == 0)):
                m.d.sync += [c.beat.eq(self.fetch_data.payload), c.sub.eq(words_per_beat)]
            with m.If(c.sub != 0):
                m.d.comb += [
                    c.wr.en.eq(1),
                    c.wr.addr.eq(c.fetch_count),
                    c.wr.data.eq(c.beat[: isa.WORD_BITS]),
                ]
                m.d.sync += [
                    c.beat.eq(c.beat >> isa.WORD_BITS),
                    c.sub.eq(c.sub - 1),
                    c.fetch_count.eq(c.fetch_count + 1),
                    c.watchdog.eq(0),
                ]
                with m.If(c.fetch_count == g.imem_words - 1):
                    m.next = "Read"
            with m.If(c.dma_err):
                c.stop(c.dma_err_bits, 0)
            with m.Elif(c.wd_fire):
                c.stop(Status.WATCHDOG, 0)

    def _run_states(self, m, c):
        """Read (an instruction word after a jump), Decode (the word into ``ir``, and the next
        one read) and Exec (:meth:`_exec`, from ``ir``): a three-stage pipeline. While Exec
        holds the word at ``pc``, the read port holds the word at ``pc + 1``; when an
        instruction issues and the next is ``pc + 1``, that word goes into ``ir`` and the port
        reads ``pc + 2``, so sequential code still issues one instruction per cycle. The read
        port's address comes from ``pc`` alone, never from the decode."""
        g = self._geom
        rd, pc = c.rd, c.pc
        with m.State("Read"):
            m.d.comb += [rd.addr.eq(pc), rd.en.eq(1)]
            with m.If(c.dma_stop):
                c.stop_dma()
            with m.Elif(pc >= g.imem_words):
                c.stop(Status.ILLEGAL_INSTRUCTION, pc)
            with m.Else():
                m.next = "Decode"
        with m.State("Decode"):
            c.load_ir()
            m.d.comb += [rd.addr.eq(pc + 1), rd.en.eq(1)]
            with m.If(c.dma_stop):
                c.stop_dma()
            with m.Else():
                m.next = "Exec"
        with m.State("Exec"):
            m.d.comb += [c.in_exec.eq(1), rd.addr.eq(pc + 2)]
            self._exec(m, c)
            with m.If(c.dma_stop):
                c.stop_dma()
            with m.Elif(c.stop_now):
                m.d.sync += c.watchdog.eq(0)
                m.next = "Drain"
            with m.Elif(c.wd_fire):
                c.stop(Status.WATCHDOG, pc)
            with m.Elif(c.issued & c.sequential & (pc + 1 < g.imem_words)):
                # the next instruction is pc + 1, whose word the port holds: decode it into
                # ir, read pc + 2, and execute it next cycle
                c.load_ir()
                m.d.comb += rd.en.eq(1)
            with m.Elif(c.issued):
                m.next = "Read"

    def _stop_states(self, m, c):
        """Drain, then the status record: Status, Status-Sent, Status-Wait, and ``done``."""
        with m.State("Drain"):
            # Let issued work finish (bounded by the watchdog) so the status record is the
            # last write and no unit is left mid-command for the next run.
            # MATVECs whose weight reads went out but whose MPU commands did not: send them, so
            # the MPU takes their tiles and none is left for the next run's first MATVEC (their
            # results land in the VBUF, which a stopped program leaves undefined). Their tiles
            # always come: after HBM_RANGE the DMA delivers all-zero tiles, after an AXI error
            # the beats with the error response.
            with m.If(c.pf_valid & (c.n_pending < MAX_PENDING)):
                m.d.comb += [c.push.eq(1), c.push_cmd.eq(c.pf_cmd), c.pf_pop.eq(1)]
            with m.If(c.dma_err & ((c.stop_status == 0) | c.stop_follow)):
                m.d.sync += [c.stop_status.eq(c.dma_err_bits), c.stop_pc.eq(self.dma_error_tag)]
            with m.If((c.all_idle & ~c.pf_valid & ~c.waiting) | c.wd_fire):
                m.d.sync += [
                    c.status.eq(c.stop_status | Mux(c.wd_fire & ~c.all_idle, Status.WATCHDOG, 0)),
                    c.err_pc.eq(c.stop_pc),
                    c.watchdog.eq(0),  # the record's write gets a watchdog period of its own
                ]
                m.next = "Status"

        def give_up():
            """The record's store or its write response did not come within the watchdog:
            report WATCHDOG (the registers only) and finish without it."""
            m.d.sync += [
                c.status.eq(c.status | Status.WATCHDOG),
                c.running.eq(0),
                self.dma_store.valid.eq(0),  # a store the DMA never took is dropped
            ]
            m.d.comb += self.done.eq(1)
            m.next = "Idle"

        with m.State("Status"):
            with m.If(~self.dma_store.valid):
                m.d.sync += [
                    self.dma_store.valid.eq(1),
                    self.dma_store.payload.eq(0),
                    self.dma_store.payload.cmd.kind.eq(StoreKind.STATUS),
                    self.dma_store.payload.cmd.tag.eq(c.err_pc),
                ]
                m.next = "Status-Sent"
            with m.Elif(c.wd_fire):
                give_up()
        with m.State("Status-Sent"):
            m.next = "Status-Wait"  # one cycle for the DMA to show the write as busy
        with m.State("Status-Wait"):
            with m.If(~self.dma_store.valid & ~self.busy.dma_write):
                m.d.sync += c.running.eq(0)
                m.d.comb += self.done.eq(1)
                m.next = "Idle"
            with m.Elif(c.wd_fire):
                give_up()

    def _results(self, m, c):
        """Results coming back to registers: an LDW's word, a MATVEC's argmax."""
        with m.If(self.dma_word.valid & c.word_pending):
            m.d.sync += c.word_pending.eq(0)
            with m.If(c.word_rd != 0):
                m.d.sync += c.regs[c.word_rd].eq(self.dma_word.payload)
                m.d.comb += c.reg_write.eq(1)
        with m.If(self.mpu_argmax.valid & c.argmax_pending):
            m.d.sync += c.argmax_pending.eq(0)
            with m.If(c.argmax_rd != 0):
                m.d.sync += c.regs[c.argmax_rd].eq(self.mpu_argmax.payload)
                m.d.comb += c.reg_write.eq(1)
        # last, so it wins over load_ir and refresh: a register written this cycle makes the
        # decoded register operands stale (_decode)
        with m.If(c.reg_write):
            m.d.sync += c.dec_stale.eq(1)

    # ---- Exec -----------------------------------------------------------------------------

    def _issue_read(self, m, c, kind, tag=None, **fields):
        """Put a command on :attr:`dma_read` (``tag``: the pc of its instruction, by default the
        current one; fields not named are 0)."""
        p = self.dma_read.payload
        m.d.sync += [self.dma_read.valid.eq(1), p.eq(0), p.kind.eq(kind)]
        m.d.sync += [getattr(p, name).eq(value) for name, value in fields.items()]
        m.d.sync += p.tag.eq(c.pc if tag is None else tag)

    def _issue_store(self, m, c, kind, src=None, **fields):
        """Put a command on :attr:`dma_store` (``tag`` = pc; ``src`` the VBUF element address
        its rows come from; fields not named are 0)."""
        p = self.dma_store.payload.cmd
        m.d.sync += [self.dma_store.valid.eq(1), self.dma_store.payload.eq(0)]
        if src is not None:
            m.d.sync += self.dma_store.payload.src_row.eq(src >> _ROW_SHIFT)
        m.d.sync += p.kind.eq(kind)
        m.d.sync += [getattr(p, name).eq(value) for name, value in fields.items()]
        m.d.sync += p.tag.eq(c.pc)

    def _exec(self, m, c):
        """Execute the instruction at ``pc`` (``c``: the signals and helpers of elaborate)."""
        views, pc, reg, over, finish = c.views, c.pc, c.reg, c.over, c.finish
        Op = isa.Op
        opcode = views[Op.HALT].opcode
        nxt = Signal(16)
        m.d.comb += nxt.eq(pc + 1)
        # A register result still on its way blocks every instruction (simple and exact).
        waiting = c.waiting
        mv = c.mv

        def retire(target=None):
            m.d.comb += c.issued.eq(1)
            m.d.sync += pc.eq(nxt if target is None else target)
            if target is None:
                m.d.comb += c.sequential.eq(1)

        def set_reg(rd, value):
            with m.If(rd != 0):
                m.d.sync += c.regs[rd].eq(value)
                m.d.comb += c.reg_write.eq(1)

        with m.If(~c.known | ~c.legal):
            finish(Status.ILLEGAL_INSTRUCTION, pc)
        with m.Elif(waiting):
            pass
        with m.Elif(c.dec_stale & c.dec.uses_len):
            c.refresh()
        with m.Else(), m.Switch(opcode):
            with m.Case(Op.HALT):
                v = views[Op.HALT]
                with m.If(c.all_idle):
                    finish(Mux(v.code != 0, Status.PROGRAM_ERROR, 0), pc, v.code)
            with m.Case(Op.SYNC), m.If(c.all_idle):
                retire()
            with m.Case(Op.SETI):
                v = views[Op.SETI]
                set_reg(v.rd, v.imm)
                retire()
            with m.Case(Op.ADDI):
                v = views[Op.ADDI]
                set_reg(v.rd, (reg(v.ra) + v.imm.as_unsigned())[:32])
                retire()
            with m.Case(Op.LDARG):
                v = views[Op.LDARG]
                set_reg(v.rd, c.argv[v.arg])
                retire()
            with m.Case(Op.BLT):
                v = views[Op.BLT]
                retire(Mux(reg(v.ra) < reg(v.rb), v.target, nxt))
            with m.Case(Op.BGE):
                v = views[Op.BGE]
                retire(Mux(reg(v.ra) >= reg(v.rb), v.target, nxt))
            with m.Case(Op.JMP):
                retire(views[Op.JMP].target)
            with m.Case(Op.LDW):
                v = views[Op.LDW]
                with m.If(~self.dma_read.valid & c.write_quiet):
                    self._issue_read(m, c, ReadKind.WORD, offset=v.line * isa.LINE + reg(v.ri) * 4)
                    m.d.sync += [c.word_pending.eq(1), c.word_rd.eq(v.rd)]
                    retire()
            with m.Case(Op.STW):
                v = views[Op.STW]
                with m.If(~self.dma_store.valid):
                    self._issue_store(
                        m,
                        c,
                        StoreKind.WORD,
                        offset=v.line * isa.LINE + reg(v.ri) * 4,
                        value=reg(v.rs),
                    )
                    m.d.sync += c.tokens.eq(c.tokens + 1)
                    retire()
            with m.Case(Op.LOADV):
                v = views[Op.LOADV]
                with m.If(over(c.dec, "dst", v.len)):
                    finish(Status.VBUF_RANGE, pc)
                with m.Elif(~self.dma_read.valid & c.write_quiet & self._loadv_may_issue(c)):
                    self._issue_read(
                        m,
                        c,
                        ReadKind.ROWS,
                        offset=(v.line + reg(v.ri) * v.stride) * isa.LINE,
                        length=v.len,
                        vbuf_row=v.dst >> _ROW_SHIFT,
                    )
                    retire()
            with m.Case(Op.STOREV):
                v = views[Op.STOREV]
                with m.If(over(c.dec, "src", v.len)):
                    finish(Status.VBUF_RANGE, pc)
                with m.Elif(c.store_may_issue):
                    self._issue_store(
                        m,
                        c,
                        StoreKind.VECTOR,
                        src=v.src,
                        offset=(v.line + reg(v.ri) * v.stride) * isa.LINE,
                        length=v.len,
                    )
                    retire()
            for op, kind in ((Op.STROW, StoreKind.ROW), (Op.STCOL, StoreKind.COL)):
                with m.Case(op):
                    v = views[op]
                    with m.If(over(c.dec, "src", v.len)):
                        finish(Status.VBUF_RANGE, pc)
                    with m.Elif(v.len == 0):
                        retire()
                    with m.Elif(c.store_may_issue):
                        self._issue_store(
                            m,
                            c,
                            kind,
                            src=v.src,
                            offset=v.line * isa.LINE,
                            length=v.len,
                            index=reg(v.ri),
                            cols=v.cols,
                            stride=v.stride,
                        )
                        retire()
            with m.Case(Op.MATVEC):
                self._matvec(m, views[Op.MATVEC], mv, c, retire)
            with m.Case(*_VPU_OPS):
                self._vector(m, c, opcode, retire)

    def _loadv_may_issue(self, c):
        """The LOADV in Exec may issue as far as the VBUF goes: no store or vector op uses it,
        and the MPU is quiet or runs only MATVECs already sent to it whose rows the LOADV's
        meet neither as x nor as results (its rows arrive behind their tiles, in the DMA's
        order; MPU commands issued later wait for it)."""
        lo, hi, box = c.dec.span["w_lo"], c.dec.span["w_hi"], c.mpu_rows

        def apart(k):
            return (hi <= box[f"{k}_lo"]) | (lo >= box[f"{k}_hi"])

        beside = (
            ~c.mpu_pending & ~self.mpu.valid & ~c.pf_valid & ~c.mpu_fwd & apart("r") & apart("w")
        )
        return (c.mpu_quiet | beside) & c.store_quiet & c.vpu_quiet

    def _matvec_operands(self, m, v, dec, c, name, invalidate):
        """A ``MATVEC`` view's resolved operands (``name`` prefixes the signals), one cycle
        after its decode: ``bad`` (a VBUF operand out of range), ``nothing`` (no live row or
        column: no weights to stream) and the live rows and columns are computed from ``dec``
        (the word's registered decode, :meth:`_predecode`) into registers, valid (``checked``)
        in the cycle after one with ``invalidate`` low; the MPU command ``cmd`` and
        :meth:`issue_weights` (its ``TILES`` read) use them. Built twice, outside any
        condition: for the word in Exec and for the look-ahead's word (:meth:`_lookahead`)."""
        reg, over = c.reg, c.over
        flags = v.flags
        live = dec.live  # R[lreg], read at decode
        n_rows = Signal(33, name=f"{name}_n_rows")
        n_cols = Signal(33, name=f"{name}_n_cols")
        m.d.comb += [
            n_rows.eq(Mux(flags[2], live, v.rows)),
            n_cols.eq(Mux(flags[3], live, v.cols)),
        ]
        argmax = flags[1]
        o = SimpleNamespace(
            bad=Signal(name=f"{name}_bad"),
            nothing=Signal(name=f"{name}_nothing"),
            checked=Signal(name=f"{name}_checked"),
            # a forwarding product (tandem.isa: sreg without ARGMAX) with a live row and
            # column: its row R[lreg] - 1 comes from VBUF[src + R[sreg]] (LIVE_ROWS), or its
            # column R[lreg] - 1 from VBUF[dst + R[sreg]] (LIVE_COLS), so its read need not
            # wait for stores
            fwd=Signal(name=f"{name}_fwd"),
        )
        fwd = ~argmax & (v.sreg != 0)
        col = flags[3]  # a forwarded column (legal forwarding words set one LIVE flag)
        # (src or dst + R[sreg]) / 64, R[sreg] at decode
        fwd_row = Signal(16, name=f"{name}_fwd_row")
        clamp_r = Signal(16, name=f"{name}_clamp_r")
        clamp_c = Signal(16, name=f"{name}_clamp_c")
        live_r = Mux(n_rows < v.rows, n_rows, v.rows)
        live_c = Mux(n_cols < v.cols, n_cols, v.cols)
        m.d.sync += [
            clamp_r.eq(live_r),
            clamp_c.eq(live_c),
            o.bad.eq(
                over(dec, "src", n_cols)
                | (flags[0] & over(dec, "dst", n_rows))
                | (~argmax & (n_rows != 0) & over(dec, "dst", n_rows))
            ),
            o.nothing.eq((live_r == 0) | (live_c == 0)),
            o.checked.eq(~invalidate),
            o.fwd.eq(fwd & (live_r != 0) & (live_c != 0)),
            fwd_row.eq((Mux(col, v.dst, v.src) + dec.fwd_off)[_ROW_SHIFT:]),
        ]
        # the forwarded row must be a VBUF row inside the buffer (checked with a live row and
        # column): src and dst are row aligned (else illegal), so R[sreg] must be, and
        # R[sreg] + 64 must not pass the room after src (dst for a column; registered at
        # decode), which keeps the path short
        off = dec.fwd_off
        room_over = Mux(col, over(dec, "dst", off + BLOCK), over(dec, "src", off + BLOCK))
        with m.If(
            fwd
            & (n_rows != 0)
            & (v.rows != 0)
            & (n_cols != 0)
            & (v.cols != 0)
            & ((off[:_ROW_SHIFT] != 0) | room_over)
        ):
            m.d.sync += o.bad.eq(1)
        o.cmd = Signal(MpuIssue, name=f"{name}_cmd")
        m.d.comb += [
            o.cmd.cmd.rows.eq(v.rows),
            o.cmd.cmd.cols.eq(v.cols),
            o.cmd.cmd.live_rows.eq(clamp_r),
            o.cmd.cmd.live_cols.eq(clamp_c),
            o.cmd.cmd.flags.eq(flags),
            o.cmd.cmd.wfmt.eq(v.wfmt),
            o.cmd.cmd.wgroup.eq(v.wgroup),
            # ARGMAX's sampling registers R[sreg], R[sreg+1], R[sreg+2] (mod 16; tandem.isa)
            o.cmd.cmd.sampling.word.eq(reg(v.sreg)),
            o.cmd.cmd.sampling.seed.eq(reg((v.sreg + 1)[:4])),
            o.cmd.cmd.sampling.pos.eq(reg((v.sreg + 2)[:4])),
            o.cmd.src_row.eq(v.src >> _ROW_SHIFT),
            o.cmd.dst_row.eq(v.dst >> _ROW_SHIFT),
            o.cmd.cmd.fwd.eq(o.fwd),
            o.cmd.cmd.fwd_col.eq(col),
            o.cmd.cmd.fwd_index.eq(Mux(col, clamp_c, clamp_r) - 1),
            o.cmd.fwd_row.eq(fwd_row),
        ]

        def issue_weights(tag):
            self._issue_read(
                m,
                c,
                ReadKind.TILES,
                tag=tag,
                offset=v.line * isa.LINE,
                rows=v.rows,
                cols=v.cols,
                live_rows=clamp_r,
                live_cols=clamp_c,
                stride=v.stride,
                wfmt=v.wfmt,
                wgroup=v.wgroup,
            )

        o.issue_weights = issue_weights
        return o

    def _matvec(self, m, v, o, c, retire):
        """Exec of a ``MATVEC`` (``o``: its operands, :meth:`_matvec_operands`; it waits a
        cycle for them after its decode)."""
        pc = c.pc
        # the look-ahead already sent this MATVEC's weight read (never with `bad` or `nothing`)
        prefetched = c.pf_valid & (c.pf_pc == pc)
        with m.If(~o.checked):
            pass
        with m.Elif(o.bad):
            c.finish(Status.VBUF_RANGE, pc)
        with m.Elif(
            (c.n_pending < MAX_PENDING)
            & ~self.mpu.valid
            & (prefetched | (~self.dma_read.valid & (c.write_quiet | o.fwd)))
        ):
            with m.If(prefetched):
                m.d.comb += c.pf_pop.eq(1)
            with m.Elif(~o.nothing):
                o.issue_weights(pc)
            m.d.comb += [c.push.eq(1), c.push_cmd.eq(o.cmd)]
            with m.If(v.flags[1]):
                m.d.sync += [c.argmax_pending.eq(1), c.argmax_rd.eq(v.rd)]
            retire()

    def _vector(self, m, c, opcode, retire):
        Op = isa.Op
        pc = c.pc
        for op in _VPU_OPS:
            with m.If(opcode == int(op)):
                v = c.views[op]
                n = c.dec.n  # R[lreg] if lreg else len, read at decode
                dec = c.dec
                bad = c.over(dec, "dst", 1 if op in (Op.VMAX, Op.VDOT) else n)
                elementwise = op not in (Op.VMAX, Op.VDOT, Op.VSET)
                if op is not Op.VSET:
                    bad |= c.over(dec, "a", n)
                if elementwise:
                    bad |= c.partial(dec, "a", n)
                if op in (Op.VADD, Op.VSUB, Op.VMUL, Op.VDOT):
                    bad |= c.over(dec, "b", Mux(v.flags[0], 1, n))
                if op in (Op.VADD, Op.VSUB, Op.VMUL):
                    bad |= ~v.flags[0] & c.partial(dec, "b", n)
                with m.If(bad):
                    c.finish(Status.VBUF_RANGE, pc)
                with m.Elif(c.vpu_may_issue):
                    p = self.vpu.payload
                    # the rows it may write, for the stores that may run beside it
                    wn = 1 if op in (Op.VMAX, Op.VDOT) else n[:18]
                    m.d.comb += [
                        c.vpu_issue.eq(1),
                        c.vpu_issue_rows[0].eq(v.dst[_ROW_SHIFT:]),
                        c.vpu_issue_rows[1].eq((v.dst + wn + BLOCK - 1)[_ROW_SHIFT:]),
                    ]
                    m.d.sync += [
                        self.vpu.valid.eq(1),
                        p.eq(0),
                        p.op.eq(VectorOp(int(op))),
                        p.dst.eq(v.dst),
                        p.length.eq(n),
                    ]
                    if op is not Op.VSET:
                        m.d.sync += p.a.eq(v.a)
                    else:
                        m.d.sync += p.imm.eq(v.imm)
                    if op in (Op.VADD, Op.VSUB, Op.VMUL, Op.VDOT):
                        m.d.sync += [p.b.eq(v.b), p.b_scalar.eq(v.flags[0])]
                    retire()
