"""ISA simulator: runs a decode-core program over an HBM image, instruction by instruction.

Every instruction does exactly what ``tandem.isa.SEMANTICS`` says, with all arithmetic from
``tandem.numerics`` and every address from ``tandem.layout``, so a compiled program run here equals
``tandem.golden.faithful`` bit for bit; it is the fast device backend and the reference for the RTL.

What the core does around the instructions, as modelled here:

* At start the core fetches ``imem_words`` instruction words from channel 0 at
  ``layout.PROGRAM_BASE`` into its instruction memory; later HBM writes do not change the running
  program. A word is decoded when it is first executed: an illegal word (or a ``pc`` past the
  instruction memory) stops the run with ``Status.ILLEGAL_INSTRUCTION`` at that ``pc``.
* An HBM access past the ``hbm_bytes`` argument stops the run with ``Status.HBM_RANGE``; one
  inside ``hbm_bytes`` but past the buffer actually there stops it with ``Status.AXI_ERROR`` (the
  memory would answer DECERR). A VBUF operand past ``vbuf_elems`` gives ``Status.VBUF_RANGE``.
* ``HALT code`` with ``code != 0`` gives ``Status.PROGRAM_ERROR``.
* The simulator has no clock, so the ``watchdog`` argument does not apply; instead a run stops
  with ``Status.WATCHDOG`` after ``max_steps`` instructions.
* The TOKENS count is the number of ``STW`` instructions executed (compiled programs use ``STW``
  only to emit output tokens).
* When it stops, the core writes the :class:`tandem.layout.StatusRecord` at channel 0, offset 0
  (``cycles`` = 0 here).

Cases the ISA leaves open, decided here (the RTL must agree): an operand of length 0 acts like one
all-zero 64-element block, so ``VDOT`` gives +0 and ``MATVEC`` with no live columns gives the bias
(or +0); ``VMAX`` of length 0 gives -Inf, the identity of max; ``ARGMAX`` over no live rows gives
0, sampling or not (``sreg`` = 0 reads R0 = 0: greedy); ``LDARG`` of an argument number past
``tandem.regmap.SCALAR_ARGS`` is an illegal instruction.

Quantized ``MATVEC`` (``wfmt`` INT8/INT4): the matrix's tiles and scale beats are read through
``layout.unpack_quant_tiled`` and computed with ``numerics.matvec_quant``; HBM bytes count every
tile and scale beat. One with no rows or no columns streams nothing and acts as an FP16 one.

Speed: a static weight matrix (one the program never writes) is gathered from the image and
aligned into a ``numerics.PreparedMatrix`` once and cached; any write overlapping it (by the
program or by the host through :meth:`IsaSim.invalidate`) drops the cached copy. Matrices read
with ``LIVE_ROWS`` / ``LIVE_COLS`` (the KV cache) are gathered with ``layout.tiled_address`` on
every use, live part only; a forwarding ``MATVEC`` (``sreg`` without ``ARGMAX``: tandem.isa)
then has its last live row (``LIVE_ROWS``) or column (``LIVE_COLS``) replaced by the VBUF vector
it names. The simulator runs in order, so the rule that a forwarding product's HBM read does not
wait for earlier stores changes nothing here. A group of attention heads in the compiler's
normative form is executed as one batched computation over the heads (see :func:`_head_groups`),
bit for bit what the instructions give one by one; ``batch_heads=False`` turns that off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from tandem import isa, sampling
from tandem import numerics as nm
from tandem.geometry import CoreGeometry
from tandem.isa import (
    LINE,
    WFMT_BITS,
    WORD_BYTES,
    IllegalInstruction,
    MatFlag,
    Op,
    Unit,
    VecFlag,
    WFmt,
)
from tandem.layout import (
    PROGRAM_BASE,
    HBMImage,
    StatusRecord,
    dense_stride,
    quant_tiles,
    scale_run,
    tiled_address,
    unpack_quant_tiled,
    unpack_tiled,
    vector_address,
)
from tandem.regmap import SCALAR_ARGS, Status

DEFAULT_MAX_STEPS = 1 << 26
"""Instructions a run may execute before it stops with WATCHDOG (a full gpt2 context is ~2.3M)."""

BLOCK = nm.BLOCK
_MASK32 = 0xFFFFFFFF
_GRID_LIMIT = 1 << 22  # cache address grids of matrices up to this many elements


class _Stop(Exception):
    """Ends a run: an error (status bits) or a HALT."""

    def __init__(self, status: Status, message: str = "", halt_code: int = 0, done=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.halt_code = halt_code
        self.done = done  # the instruction completed (HALT), so it counts as executed


@dataclass
class SimResult:
    """How a run ended and what it did.

    ``status`` is zero after ``HALT 0``; ``pc`` is the instruction index of the error or of the
    final HALT; ``tokens`` the ``STW`` count; ``unit_counts`` / ``op_counts`` the instructions
    executed per unit / opcode; HBM bytes count whole beats for vector loads, every tile a MATVEC
    streams, and the bytes written by stores.
    """

    status: Status
    pc: int
    halt_code: int
    tokens: int
    steps: int
    message: str = ""
    unit_counts: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    hbm_read: int = 0
    hbm_written: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0

    def record(self) -> StatusRecord:
        return StatusRecord(int(self.status), self.pc, self.tokens, self.halt_code, 0)


class IsaSim:
    """Executes the program in an HBM image.

    Parameters
    ----------
    geom : CoreGeometry
    image : HBMImage
        The device memory; the simulator reads and writes it in place.
    max_steps : int
        Instruction budget of one run (stands in for the watchdog).
    batch_heads : bool
        Run groups of attention heads batched (same results, much faster).
    blas_threads : int or None
        BLAS threads during a run (None: leave BLAS alone). The MPU products are
        [rows, 64] x [64, 2] per block; a second OpenBLAS thread mostly spins on them (measured on
        2 cores: twice the CPU time and half the speed), so the default is 1.

    Attributes
    ----------
    regs : list[int]
        The 16 scalar registers after the last run.
    vbuf : np.ndarray
        uint16 [geom.vbuf_elems], the vector buffer (kept between runs, like the hardware's).
    last_argmax : tuple[np.ndarray, int] | None
        Accumulators and LSB exponent of the last ``MATVEC ... ARGMAX`` (the logits are
        ``acc * 2.0**lam``), for tests; the hardware does not expose them.
    """

    def __init__(
        self,
        geom: CoreGeometry,
        image: HBMImage,
        *,
        max_steps: int = DEFAULT_MAX_STEPS,
        batch_heads: bool = True,
        blas_threads: int | None = 1,
    ):
        if image.geom.channels != geom.channels:
            raise ValueError(
                f"image has {image.geom.channels} channels, geometry {geom.name!r} {geom.channels}"
            )
        self.geom = geom
        self.image = image
        self.max_steps = max_steps
        self.batch_heads = batch_heads
        self.blas_threads = blas_threads
        self.batched_groups = 0  # head groups run batched in the last run (for tests)
        self.u16 = image.data.view(np.uint16)  # [channels, nbytes / 2]
        self.regs = [0] * isa.N_REGS
        self.vbuf = np.zeros(geom.vbuf_elems, np.uint16)
        self.last_argmax: tuple[np.ndarray, int] | None = None
        self._static: dict[tuple, tuple[nm.PreparedMatrix, int, int]] = {}
        self._static_span = (0, 0)
        self._grids: dict[tuple, tuple[np.ndarray, np.ndarray] | None] = {}
        self._vec_addr: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._imem = b""
        self._decoded: list = []
        self._dispatch: dict[Op, Callable] = {op: getattr(self, "_" + op.name) for op in Op}

    # memory helpers ------------------------------------------------------------------------

    def invalidate(self, lo: int, hi: int) -> None:
        """Bytes [lo, hi) of some channel changed: drop cached matrices that overlap them."""
        s_lo, s_hi = self._static_span
        if hi <= s_lo or lo >= s_hi:
            return
        for key in [k for k, (_, a, b) in self._static.items() if lo < b and a < hi]:
            del self._static[key]
        self._update_span()

    def _update_span(self) -> None:
        spans = [(a, b) for _, a, b in self._static.values()]
        self._static_span = (
            (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0, 0)
        )

    def _hbm(self, lo: int, hi: int, what: str) -> None:
        if hi > self._limit:
            raise _Stop(
                Status.HBM_RANGE,
                f"{what} touches bytes [{lo:#x}, {hi:#x}) past hbm_bytes = {self._limit:#x}",
            )
        if hi > self.image.nbytes:
            raise _Stop(
                Status.AXI_ERROR,
                f"{what} touches bytes [{lo:#x}, {hi:#x}) past the {self.image.nbytes:#x}-byte "
                "buffer (DECERR)",
            )

    def _vb(self, addr: int, n: int, what: str) -> slice:
        if addr + n > self.geom.vbuf_elems:
            raise _Stop(
                Status.VBUF_RANGE,
                f"{what} VBUF[{addr}:{addr + n}] is past vbuf_elems = {self.geom.vbuf_elems}",
            )
        return slice(addr, addr + n)

    def _len(self, f) -> int:
        return self.regs[f["lreg"]] if f["lreg"] else f["len"]

    def _vector_addresses(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(channel, half-word offset from the base) of elements 0..n-1 of a striped vector."""
        got = self._vec_addr.get(n)
        if got is None:
            ch, off = vector_address(self.geom, 0, np.arange(n))
            got = self._vec_addr[n] = (ch, off // 2)
        return got

    def _vector_extent(self, n: int) -> int:
        per = self.geom.beat_elems * self.geom.channels
        return -(-n // per) * self.geom.beat_bytes

    def _tiled_addresses(self, rows, cols, n_rows, n_cols, stride):
        """(channel, half-word offset from the base) of a tiled matrix's [0:n_rows, 0:n_cols]."""
        key = (rows, cols, stride)
        if key not in self._grids:
            grid = None
            if rows * cols <= _GRID_LIMIT:
                r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
                ch, off = tiled_address(self.geom, 0, cols, stride, r, c)
                grid = (ch, off // 2)
            self._grids[key] = grid
        grid = self._grids[key]
        if grid is not None and n_rows <= rows and n_cols <= cols:
            return grid[0][:n_rows, :n_cols], grid[1][:n_rows, :n_cols]
        r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        ch, off = tiled_address(self.geom, 0, cols, stride, r, c)
        return ch, off // 2

    def _tiled_extent(self, n_rows: int, n_cols: int, cols: int, stride: int) -> int:
        """Bytes from the base to the end of the last tile holding [0:n_rows, 0:n_cols]."""
        if n_rows == 0 or n_cols == 0:
            return 0
        g = self.geom
        if stride >= dense_stride(g):  # tile index grows with row group, column block, row block
            n_cb = -(-cols // nm.BLOCK)
            grp, rin = divmod(n_rows - 1, nm.BLOCK)
            last = (grp * n_cb + (n_cols - 1) // nm.BLOCK) * stride + rin // g.lanes
            return (last + 1) * g.beat_bytes
        _, off = self._tiled_addresses(n_rows, cols, n_rows, n_cols, stride)
        return int(off.max()) * 2 + 2

    def _tiles_bytes(self, n_rows: int, n_cols: int) -> int:
        g = self.geom
        return -(-n_rows // g.lanes) * -(-n_cols // nm.BLOCK) * g.channels * g.beat_bytes

    def _static_matrix(self, base: int, rows: int, cols: int, stride: int) -> nm.PreparedMatrix:
        key = (base, rows, cols, stride)
        got = self._static.get(key)
        if got is not None:
            return got[0]
        g = self.geom
        end = base + self._tiled_extent(rows, cols, cols, stride)
        full = -(-rows // nm.BLOCK) * -(-cols // nm.BLOCK) * dense_stride(g) * g.beat_bytes
        if stride == dense_stride(g) and base + full <= self.image.nbytes:
            bits = unpack_tiled(g, self.image.data[:, base : base + full], rows, cols)
        else:
            ch, half = self._tiled_addresses(rows, cols, rows, cols, stride)
            bits = self.u16[ch, base // 2 + half]
        mat = nm.PreparedMatrix(bits)
        self._static[key] = (mat, base, end)
        self._update_span()
        return mat

    def stored_program(self) -> list[isa.Instr]:
        """The instructions in the image's program region, up to the first illegal word."""
        data = self.image.data[0, PROGRAM_BASE : PROGRAM_BASE + self.geom.imem_words * WORD_BYTES]
        program = []
        for pc in range(len(data) // WORD_BYTES):
            word = int.from_bytes(data[pc * WORD_BYTES : (pc + 1) * WORD_BYTES].tobytes(), "little")
            try:
                program.append(isa.decode(word, pc=pc))
            except IllegalInstruction:
                break
        return program

    def prepare(self, program: Sequence[isa.Instr] | None = None) -> int:
        """Do the one-time work before a run: build the function tables and align every static
        matrix ``program`` (default: :meth:`stored_program`) reads.

        Returns the number of matrices prepared. Matrices outside the image are skipped; the run
        reports them.
        """
        for name in ("exp", "recip", "rsqrt", "gelu"):
            nm.table(name)
        if program is None:
            program = self.stored_program()
        n = 0
        for ins in program:
            if ins.op is Op.MATVEC and ins["wfmt"] and ins["rows"] and ins["cols"]:
                f = dict(ins.fields)
                base, end = self._quant_extent(f)
                if end <= self.image.nbytes:
                    self._quant_matrix(f, base, end)
                    n += 1
            elif ins.op is Op.MATVEC and not ins["flags"] & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS):
                stride = ins["stride"] or dense_stride(self.geom)
                base = ins["line"] * LINE
                end = base + self._tiled_extent(ins["rows"], ins["cols"], ins["cols"], stride)
                if end <= self.image.nbytes:
                    self._static_matrix(base, ins["rows"], ins["cols"], stride)
                    n += 1
        return n

    # running -------------------------------------------------------------------------------

    def _args(self, args) -> list[int]:
        names = [n for n, _ in SCALAR_ARGS]
        if isinstance(args, Mapping):
            unknown = set(args) - set(names)
            if unknown:
                raise ValueError(f"unknown scalar arguments {sorted(unknown)}; known: {names}")
            values = [int(args.get(n, 0)) for n in names]
        else:
            values = [int(v) for v in args] + [0] * (len(names) - len(args))
        if not values[names.index("hbm_bytes")]:
            values[names.index("hbm_bytes")] = self.image.nbytes
        return [v & _MASK32 for v in values]

    def _fetch(self) -> None:
        n = self.geom.imem_words * WORD_BYTES
        self._hbm(PROGRAM_BASE, PROGRAM_BASE + n, "instruction fetch")
        imem = self.image.data[0, PROGRAM_BASE : PROGRAM_BASE + n].tobytes()
        if imem != self._imem:
            self._imem = imem
            self._decoded = [None] * self.geom.imem_words
            pc = 0
            try:  # decode up to the first illegal word now; anything after it on first use
                while pc < self.geom.imem_words:
                    self._decode(pc)
                    pc += 1
            except _Stop:
                pass
            if self.batch_heads:
                for group in _head_groups(self._decoded[:pc], self.geom):
                    self._decoded[group.start] = (*self._decoded[group.start][:4], group)

    def _decode(self, pc: int):
        if not 0 <= pc < self.geom.imem_words:
            raise _Stop(
                Status.ILLEGAL_INSTRUCTION,
                f"pc {pc} is outside the instruction memory of {self.geom.imem_words} words",
            )
        word = int.from_bytes(self._imem[pc * WORD_BYTES : (pc + 1) * WORD_BYTES], "little")
        try:
            ins = isa.decode(word, pc=pc)
        except IllegalInstruction as err:
            raise _Stop(Status.ILLEGAL_INSTRUCTION, str(err)) from None
        if ins.op is Op.LDARG and ins["arg"] >= len(SCALAR_ARGS):
            raise _Stop(
                Status.ILLEGAL_INSTRUCTION,
                f"LDARG at {pc}: argument {ins['arg']} does not exist "
                f"({len(SCALAR_ARGS)} scalar arguments)",
            )
        entry = (self._dispatch[ins.op], dict(ins.fields), ins.unit, ins.op, None)
        self._decoded[pc] = entry
        return entry

    def run(
        self,
        args: Mapping[str, int] | Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> SimResult:
        """Run from pc 0 until HALT or an error; writes the status record and returns the result.

        ``args`` are the scalar kernel arguments by name (or in ``SCALAR_ARGS`` order); missing
        ones are 0, and ``hbm_bytes`` 0 means the whole image. ``on_token(i, token)`` is called
        for every ``STW`` (the ``i``-th token of the run).
        """
        if self.blas_threads is None:
            return self._run(args, on_token)
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            return self._run(args, on_token)

    def _run(self, args, on_token) -> SimResult:
        self._argv = self._args(args)
        self._limit = self._argv[[n for n, _ in SCALAR_ARGS].index("hbm_bytes")]
        self._on_token = on_token
        self.regs = [0] * isa.N_REGS
        self.tokens = 0
        self.hbm_read = 0
        self.hbm_written = 0
        self.batched_groups = 0
        units: Counter = Counter()
        ops: Counter = Counter()
        pc = steps = 0
        status, halt_code, message = Status(0), 0, ""
        try:
            self._fetch()
            decoded = self._decoded
            while True:
                if steps >= self.max_steps:
                    raise _Stop(Status.WATCHDOG, f"{steps} instructions without HALT")
                entry = decoded[pc] if 0 <= pc < len(decoded) else None
                if entry is None:
                    entry = self._decode(pc)
                handler, f, unit, op, group = entry
                if group is not None and steps + group.n_instr <= self.max_steps:
                    nxt = self._run_heads(group)
                    if nxt is not None:
                        for (u, o), n in group.counts.items():
                            units[u] += n
                            ops[o] += n
                        steps += group.n_instr
                        pc = nxt
                        continue
                nxt = handler(f)
                units[unit] += 1
                ops[op] += 1
                steps += 1
                pc = pc + 1 if nxt is None else nxt
        except _Stop as stop:
            status, halt_code, message = stop.status, stop.halt_code, stop.message
            if stop.done:
                units[unit] += 1
                ops[op] += 1
                steps += 1
            if status == 0 and not message:
                message = "HALT 0"
        result = SimResult(
            status=status,
            pc=pc,
            halt_code=halt_code,
            tokens=self.tokens,
            steps=steps,
            message=message,
            unit_counts={u.value: units.get(u, 0) for u in Unit},
            op_counts={op.name: n for op, n in ops.items()},
            hbm_read=self.hbm_read,
            hbm_written=self.hbm_written,
        )
        self.image.write_channel(0, 0, np.frombuffer(result.record().pack(), np.uint8))
        return result

    def _set(self, rd: int, value: int) -> None:
        if rd:
            self.regs[rd] = value & _MASK32

    # control ---------------------------------------------------------------------------------

    def _HALT(self, f):
        code = f["code"]
        status = Status.PROGRAM_ERROR if code else Status(0)
        raise _Stop(status, f"HALT {code}", halt_code=code, done=True)

    def _SYNC(self, f):
        return None  # execution is sequential already

    def _SETI(self, f):
        self._set(f["rd"], f["imm"])

    def _ADDI(self, f):
        self._set(f["rd"], self.regs[f["ra"]] + f["imm"])

    def _LDARG(self, f):
        self._set(f["rd"], self._argv[f["arg"]])

    def _BLT(self, f):
        return f["target"] if self.regs[f["ra"]] < self.regs[f["rb"]] else None

    def _BGE(self, f):
        return f["target"] if self.regs[f["ra"]] >= self.regs[f["rb"]] else None

    def _JMP(self, f):
        return f["target"]

    # DMA -------------------------------------------------------------------------------------

    def _word_address(self, f, what: str) -> int:
        addr = f["line"] * LINE + self.regs[f["ri"]] * 4
        self._hbm(addr, addr + 4, what)
        return addr

    def _LDW(self, f):
        addr = self._word_address(f, "LDW")
        self._set(f["rd"], int.from_bytes(self.image.data[0, addr : addr + 4].tobytes(), "little"))
        self.hbm_read += 4

    def _STW(self, f):
        addr = self._word_address(f, "STW")
        value = self.regs[f["rs"]]
        self.image.data[0, addr : addr + 4] = np.frombuffer(value.to_bytes(4, "little"), np.uint8)
        self.invalidate(addr, addr + 4)
        self.hbm_written += 4
        self.tokens += 1
        if self._on_token is not None:
            self._on_token(self.tokens - 1, value)

    def _vector_hbm(self, f, n: int, what: str):
        base = (f["line"] + self.regs[f["ri"]] * f["stride"]) * LINE
        end = base + self._vector_extent(n)
        self._hbm(base, end, what)
        ch, half = self._vector_addresses(n)
        return base, end, ch, base // 2 + half

    def _LOADV(self, f):
        n = f["len"]
        dst = self._vb(f["dst"], n, "LOADV dst")
        base, end, ch, idx = self._vector_hbm(f, n, "LOADV")
        self.vbuf[dst] = self.u16[ch, idx]
        self.hbm_read += (end - base) * self.geom.channels

    def _STOREV(self, f):
        n = f["len"]
        src = self._vb(f["src"], n, "STOREV src")
        base, end, ch, idx = self._vector_hbm(f, n, "STOREV")
        self.u16[ch, idx] = self.vbuf[src]
        self.invalidate(base, end)
        self.hbm_written += 2 * n

    def _store_tiled(self, f, r, c, n: int, what: str):
        src = self._vb(f["src"], n, what + " src")
        if n == 0:
            return
        base = f["line"] * LINE
        stride = f["stride"] or dense_stride(self.geom)
        ch, off = tiled_address(self.geom, base, f["cols"], stride, r, c)
        lo, hi = int(off.min()), int(off.max()) + 2
        self._hbm(lo, hi, what)
        self.u16[ch, off // 2] = self.vbuf[src]
        self.invalidate(lo, hi)
        self.hbm_written += 2 * n

    def _STROW(self, f):
        n = f["len"]
        self._store_tiled(f, self.regs[f["ri"]], np.arange(n), n, "STROW")

    def _STCOL(self, f):
        n = f["len"]
        self._store_tiled(f, np.arange(n), self.regs[f["ri"]], n, "STCOL")

    # MPU -------------------------------------------------------------------------------------

    def _quant_extent(self, f) -> tuple[int, int]:
        """[base, end): the bytes a quantized MATVEC streams from each channel (its tiles and
        scale beats, tandem.layout's quantized tiled form)."""
        base, bits = f["line"] * LINE, WFMT_BITS[WFmt(f["wfmt"])]
        n = quant_tiles(self.geom, f["rows"], f["cols"], bits)
        return base, base + (n + -(-n // scale_run(bits, f["wgroup"]))) * self.geom.beat_bytes

    def _quant_matrix(self, f, base: int, end: int) -> nm.PreparedQuantMatrix:
        """A quantized MATVEC's matrix, read through ``layout.unpack_quant_tiled`` and cached as
        a static matrix."""
        rows, cols, wfmt, wgroup = f["rows"], f["cols"], f["wfmt"], f["wgroup"]
        key = (base, rows, cols, wfmt, wgroup)
        got = self._static.get(key)
        if got is None:
            data = self.image.data[:, base:end]
            m = unpack_quant_tiled(self.geom, data, rows, cols, WFMT_BITS[WFmt(wfmt)], wgroup)
            got = self._static[key] = (nm.PreparedQuantMatrix(m), base, end)
            self._update_span()
        return got[0]

    def _forwarded(self, f, n_rows: int, n_cols: int) -> tuple[int, int, np.ndarray] | None:
        """A forwarding MATVEC's (axis, index, VBUF vector) (tandem.isa): axis 0, a row of
        ``cols`` elements from VBUF[src + R[sreg]] (LIVE_ROWS), or axis 1, a column of ``rows``
        elements from VBUF[dst + R[sreg]] (LIVE_COLS); None when the MATVEC does not forward or
        has no live row or column."""
        if not isa.is_forwarding(f):
            return None
        column = bool(f["flags"] & MatFlag.LIVE_COLS)
        axis, n, length, base = (
            (1, min(n_cols, f["cols"]), f["rows"], f["dst"])
            if column
            else (0, min(n_rows, f["rows"]), f["cols"], f["src"])
        )
        if n == 0:
            return None
        what = "column" if column else "row"
        off = self.regs[f["sreg"]]
        if off % isa.VBUF_ALIGN:
            raise _Stop(
                Status.VBUF_RANGE,
                f"MATVEC forwarded {what} offset R[{f['sreg']}] = {off} is not a multiple of "
                f"{isa.VBUF_ALIGN}",
            )
        vec = self.vbuf[self._vb(base + off, BLOCK, f"MATVEC forwarded {what}")]
        return axis, n - 1, vec[:length].copy()

    def _MATVEC(self, f):
        if f["wfmt"]:
            return self._matvec_quant(f)
        flags, rows, cols = f["flags"], f["rows"], f["cols"]
        live = flags & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS)
        n_rows = self.regs[f["lreg"]] if flags & MatFlag.LIVE_ROWS else rows
        n_cols = self.regs[f["lreg"]] if flags & MatFlag.LIVE_COLS else cols
        base = f["line"] * LINE
        stride = f["stride"] or dense_stride(self.geom)
        x = self.vbuf[self._vb(f["src"], n_cols, "MATVEC src")]
        # forwarding: LIVE_ROWS, 1 <= cols = n_cols <= 64, or LIVE_COLS, 1 <= rows = n_rows <= 64
        fwd = self._forwarded(f, n_rows, n_cols)
        self._hbm(base, base + self._tiled_extent(n_rows, n_cols, cols, stride), "MATVEC")
        if n_cols == 0:  # no live column: one all-zero block
            mat = nm.PreparedMatrix(np.zeros((n_rows, nm.BLOCK), np.uint16))
            x = np.zeros(nm.BLOCK, np.uint16)
        elif not live:
            mat = self._static_matrix(base, rows, cols, stride)
        else:
            ch, half = self._tiled_addresses(rows, cols, n_rows, n_cols, stride)
            bits = self.u16[ch, base // 2 + half]  # a copy (fancy indexing)
            if fwd is not None:
                axis, i, vec = fwd
                if axis:
                    bits[:, i] = vec
                else:
                    bits[i] = vec
            mat = nm.PreparedMatrix(bits)
        self.hbm_read += self._tiles_bytes(n_rows, n_cols)
        bias = None
        if flags & MatFlag.BIAS:
            bias = self.vbuf[self._vb(f["dst"], n_rows, "MATVEC bias")].copy()
        if n_rows == 0:
            if flags & MatFlag.ARGMAX:
                self._set(f["rd"], 0)
            return
        self._matvec_out(f, nm.matvec(mat, x, bias), n_rows)

    def _matvec_quant(self, f):
        """A quantized MATVEC (``wfmt`` INT8/INT4): dense, every row and column (tandem.isa)."""
        rows, cols, flags = f["rows"], f["cols"], f["flags"]
        x = self.vbuf[self._vb(f["src"], cols, "MATVEC src")]
        if rows == 0 or cols == 0:  # an empty matrix: no tile streams, as with FP16
            self._hbm(f["line"] * LINE, f["line"] * LINE, "MATVEC")
            mat = nm.PreparedMatrix(np.zeros((rows, nm.BLOCK), np.uint16))
            x = np.zeros(nm.BLOCK, np.uint16)
        else:
            base, end = self._quant_extent(f)
            self._hbm(base, end, "MATVEC")
            mat = self._quant_matrix(f, base, end)
            self.hbm_read += (end - base) * self.geom.channels
        bias = None
        if flags & MatFlag.BIAS:
            bias = self.vbuf[self._vb(f["dst"], rows, "MATVEC bias")].copy()
        if rows == 0:
            if flags & MatFlag.ARGMAX:
                self._set(f["rd"], 0)
            return
        self._matvec_out(f, nm.matvec_any(mat, x, bias), rows)

    def _matvec_out(self, f, result, n_rows: int) -> None:
        """A MATVEC's result to VBUF[dst:], or with ARGMAX the chosen row to R[rd]."""
        acc, lam, nonfinite = result
        if f["flags"] & MatFlag.ARGMAX:
            self.last_argmax = (acc, lam)
            sreg = f["sreg"]
            word, seed, pos = (self.regs[(sreg + j) % isa.N_REGS] for j in range(3))
            self._set(f["rd"], sampling.choose_word(acc, lam, nonfinite, word, seed, pos))
            return
        dst = self._vb(f["dst"], n_rows, "MATVEC dst")
        out = nm.acc_to_fp16(acc, lam)
        self.vbuf[dst] = np.where(nonfinite, np.uint16(nm.CANONICAL_NAN), out)

    # VPU -------------------------------------------------------------------------------------

    @staticmethod
    def _no_partial_overlap(f, n: int, operand: str, name: str) -> None:
        """An element-wise op's ``dst`` equals a vector operand or is disjoint from it
        (tandem.isa: a partial overlap is ``VBUF_RANGE``)."""
        d, s = f["dst"], f[operand]
        if n and d != s and d < s + n and s < d + n:
            raise _Stop(
                Status.VBUF_RANGE,
                f"{name} dst VBUF[{d}:{d + n}] partly overlaps {operand} VBUF[{s}:{s + n}]",
            )

    def _binary(self, f, fn, name: str):
        n = self._len(f)
        a = self.vbuf[self._vb(f["a"], n, name + " a")]
        if f["flags"] & VecFlag.B_SCALAR:
            b = self.vbuf[self._vb(f["b"], 1, name + " b")][0]
        else:
            b = self.vbuf[self._vb(f["b"], n, name + " b")]
            self._no_partial_overlap(f, n, "b", name)
        dst = self._vb(f["dst"], n, name + " dst")
        self._no_partial_overlap(f, n, "a", name)
        self.vbuf[dst] = fn(a, b)

    def _VADD(self, f):
        self._binary(f, nm.fp16_add, "VADD")

    def _VSUB(self, f):
        self._binary(f, nm.fp16_sub, "VSUB")

    def _VMUL(self, f):
        self._binary(f, nm.fp16_mul, "VMUL")

    def _VDOT(self, f):
        n = self._len(f)
        a = self.vbuf[self._vb(f["a"], n, "VDOT a")]
        if f["flags"] & VecFlag.B_SCALAR:
            b = np.full(n, self.vbuf[self._vb(f["b"], 1, "VDOT b")][0], np.uint16)
        else:
            b = self.vbuf[self._vb(f["b"], n, "VDOT b")]
        dst = self._vb(f["dst"], 1, "VDOT dst")
        self.vbuf[dst] = nm.dot_fp16(a, b) if n else np.uint16(0)

    def _VMAX(self, f):
        n = self._len(f)
        a = self.vbuf[self._vb(f["a"], n, "VMAX a")]
        dst = self._vb(f["dst"], 1, "VMAX dst")
        self.vbuf[dst] = nm.fp16_max(a) if n else np.uint16(nm.NEG_INF)

    def _unary(self, f, table: str, name: str):
        n = self._len(f)
        a = self.vbuf[self._vb(f["a"], n, name + " a")]
        dst = self._vb(f["dst"], n, name + " dst")
        self._no_partial_overlap(f, n, "a", name)
        self.vbuf[dst] = nm.lookup(table, a)

    def _VEXP(self, f):
        self._unary(f, "exp", "VEXP")

    def _VRECIP(self, f):
        self._unary(f, "recip", "VRECIP")

    def _VRSQRT(self, f):
        self._unary(f, "rsqrt", "VRSQRT")

    def _VGELU(self, f):
        self._unary(f, "gelu", "VGELU")

    def _VSET(self, f):
        n = self._len(f)
        self.vbuf[self._vb(f["dst"], n, "VSET dst")] = f["imm"]

    # attention heads, batched -----------------------------------------------------------------

    def _run_heads(self, g: _HeadGroup) -> int | None:
        """Run an attention head group (see :func:`_head_groups`) as one batched computation.

        Returns the pc after the group, or None (nothing done) when this run's operands would
        overlap or leave range: then the instructions run one by one and report any error at
        its own pc.
        """
        T = self.regs[g.r_len]
        if not 0 < T <= min(g.k_rows, g.v_cols):
            return None
        k_end = int(g.k_base.max()) + self._tiled_extent(g.k_rows, BLOCK, BLOCK, g.k_stride)
        v_end = int(g.v_base.max()) + self._tiled_extent(BLOCK, g.v_cols, g.v_cols, g.v_stride)
        if max(k_end, v_end) > min(self._limit, self.image.nbytes):
            return None
        spans = [(a, a + BLOCK, True) for a in g.q] + [(g.one, g.one + 1, True)]
        if g.fwd_reg:  # forwarding score products: row T-1 of each K_h from VBUF[q_h + off]
            off = self.regs[g.fwd_reg]
            if off % isa.VBUF_ALIGN:
                return None
            spans += [(a + off, a + off + BLOCK, True) for a in g.q]
        if g.v_fwd_reg:  # forwarding value products: column T-1 of V^T_h from VBUF[att_h + v_off]
            v_off = self.regs[g.v_fwd_reg]
            if v_off % isa.VBUF_ALIGN:
                return None
            spans += [(a + v_off, a + v_off + BLOCK, True) for a in g.att]
        spans += [(a, a + T, False) for a in g.s] + [(a, a + 1, False) for a in g.sc]
        spans += [(a, a + BLOCK, False) for a in g.att]
        if not _disjoint(spans, self.geom.vbuf_elems):
            return None
        vbuf, u16, H = self.vbuf, self.u16, len(g.att)
        lane = np.arange(BLOCK)
        kch, khalf = self._tiled_addresses(g.k_rows, BLOCK, g.k_rows, BLOCK, g.k_stride)
        vch, vhalf = self._tiled_addresses(BLOCK, g.v_cols, BLOCK, g.v_cols, g.v_stride)
        # s = K_h[:T] q_h
        q = vbuf[g.q[:, None] + lane]  # [H, 64]
        kbits = u16[kch[None, :T], g.k_base[:, None, None] // 2 + khalf[None, :T]]  # [H, T, 64]
        if g.fwd_reg:
            kbits[:, T - 1] = vbuf[(g.q + off)[:, None] + lane]
        kq, ke, knf = nm.bfp_blocks(kbits)  # one block per row
        kq = kq[:, None].astype(np.float32)  # [H, 1 block, T rows, 64]
        s = _round(*_matvec_batch(kq, ke[:, None, :, 0], knf[..., 0], q))  # [H, T]
        # softmax numerators and their sum
        m = _max_rows(s)  # [H]
        e = nm.lookup("exp", nm.fp16_sub(s, m[:, None]))  # [H, T]
        eq, ee, enf = nm.bfp_blocks(nm.pad_to_block(e))  # e is VDOT's weight side
        nb = ee.shape[1]
        ones = np.broadcast_to(vbuf[g.one], (H, T))
        eq = eq.reshape(H, nb, 1, BLOCK).astype(np.float32)
        z = _round(*_matvec_batch(eq, ee[:, :, None], enf.any(axis=1)[:, None], ones))[:, 0]
        r = nm.lookup("recip", z)  # [H]
        # att_h = (V^T_h[:, :T] e) * r
        vbits = u16[vch[None, :, :T], g.v_base[:, None, None] // 2 + vhalf[None, :, :T]]
        if g.v_fwd_reg:
            vbits[:, :, T - 1] = vbuf[(g.att + v_off)[:, None] + lane]
        vq, ve, vnf = nm.bfp_blocks(nm.pad_to_block(vbits))  # [H, 64, nb*64], [H, 64, nb]
        vq = vq.reshape(H, BLOCK, nb, BLOCK).transpose(0, 2, 1, 3).astype(np.float32)
        o = _round(*_matvec_batch(vq, ve.transpose(0, 2, 1), vnf.any(axis=2), e))  # [H, 64]
        vbuf[g.s[:, None] + np.arange(T)] = e
        vbuf[g.sc] = r
        vbuf[g.att[:, None] + lane] = nm.fp16_mul(o, r[:, None])
        self.hbm_read += H * (self._tiles_bytes(T, BLOCK) + self._tiles_bytes(BLOCK, T))
        self.batched_groups += 1
        return g.start + g.n_instr


# ----------------------------------------------------------------------------------------------
# batched attention heads
#
# The compiler emits the attention of a group of heads as the normative sequence below (see
# tandem.compiler): the group's score products, then the group's softmax op by op over the heads,
# then the group's output products, then each head's normalisation. The heads are independent:
# each has its own scores, scalar row and slice of the attention output. Run one by one, a head's
# small operations cost NumPy call overhead, not arithmetic, so the simulator runs a group as one
# batched computation with the same numerics primitives (bfp_blocks, block_shift, shift_floor,
# acc_to_fp16, the tables), bit for bit what the instructions give in sequence (tests compare both
# ways). The group must match exactly; anything else runs one instruction at a time. The score
# products may forward row T-1 of K_h from VBUF[q_h + R[sreg]] (tandem.isa), all with the same
# sreg, and the value products column T-1 of V^T_h from VBUF[att_h + R[sreg]], all with the same
# sreg (the two sregs may differ); a group whose score products, or whose value products, differ
# in that runs one instruction at a time.
#
#   MATVEC s_i, q_h, K_h, LIVE_ROWS T (sreg: all or none)  for each head
#   VMAX sc_i, s_i                                       for each head
#   VSUB s_i, s_i, sc_i[s]                               for each head
#   VEXP s_i, s_i                                        for each head
#   VDOT sc_i, s_i, one[s]                               for each head
#   VRECIP sc_i, sc_i (len 1)                            for each head
#   MATVEC att_h, s_i, V^T_h, LIVE_COLS T (sreg: all or none)  for each head
#   VMUL att_h, att_h, sc_i[s] (len 64)                  for each head

_SOFTMAX_OPS = (Op.VMAX, Op.VSUB, Op.VEXP, Op.VDOT, Op.VRECIP)


@dataclass
class _HeadGroup:
    start: int
    n_instr: int
    counts: dict  # (unit, op) -> instructions
    r_len: int  # register with T, the live length
    fwd_reg: int  # the score products' sreg: non-zero, row T-1 of K_h is VBUF[q_h + R[fwd_reg]]
    v_fwd_reg: int  # the value products' sreg: column T-1 of V^T_h is VBUF[att_h + R[v_fwd_reg]]
    k_rows: int
    k_stride: int
    v_cols: int
    v_stride: int
    k_base: np.ndarray  # [H] byte base of each head's K
    v_base: np.ndarray
    q: np.ndarray  # [H] VBUF of each head's (scaled) query, scores, scalar row, output
    s: np.ndarray
    sc: np.ndarray
    att: np.ndarray
    one: int


def _head_group(decoded: list, pc: int) -> _HeadGroup | None:
    """The head group starting at ``pc`` if the instructions there have the normative form."""

    def op_at(i):
        e = decoded[i] if i < len(decoded) else None
        return e[3] if e is not None else None

    n = 0
    while op_at(pc + n) is Op.MATVEC and decoded[pc + n][1]["flags"] == MatFlag.LIVE_ROWS:
        n += 1
    want = [Op.MATVEC] * n + [op for op in _SOFTMAX_OPS for _ in range(n)]
    want += [Op.MATVEC] * n + [Op.VMUL] * n
    if n == 0 or [op_at(pc + i) for i in range(len(want))] != want:
        return None
    f = [decoded[pc + i][1] for i in range(len(want))]
    ks, soft, vs, outs = f[:n], f[n : 6 * n], f[6 * n : 7 * n], f[7 * n :]
    k0, v0 = ks[0], vs[0]
    t, B, fwd_reg, v_fwd_reg = k0["lreg"], VecFlag.B_SCALAR, k0["sreg"], v0["sreg"]
    one = soft[3 * n]["b"]
    for i in range(n):
        k, v, o = ks[i], vs[i], outs[i]
        vmax, vsub, vexp, vdot, vrecip = soft[i::n]
        s, sc, att = k["dst"], vmax["dst"], v["dst"]
        if not (
            t != 0
            and (k["lreg"], k["rows"], k["cols"], k["stride"], k["sreg"])
            == (t, k0["rows"], BLOCK, k0["stride"], fwd_reg)
            and k["stride"] > 0
            and (v["flags"], v["lreg"], v["src"], v["rows"], v["sreg"])
            == (MatFlag.LIVE_COLS, t, s, BLOCK, v_fwd_reg)
            and (v["cols"], v["stride"]) == (v0["cols"], v0["stride"])
            and v["stride"] > 0
            and (vmax["a"], vmax["lreg"]) == (s, t)
            and (vsub["dst"], vsub["a"], vsub["b"], vsub["flags"], vsub["lreg"]) == (s, s, sc, B, t)
            and (vexp["dst"], vexp["a"], vexp["lreg"]) == (s, s, t)
            and (vdot["dst"], vdot["a"], vdot["b"], vdot["flags"], vdot["lreg"])
            == (sc, s, one, B, t)
            and (vrecip["dst"], vrecip["a"], vrecip["len"], vrecip["lreg"]) == (sc, sc, 1, 0)
            and (o["dst"], o["a"], o["b"], o["len"], o["flags"], o["lreg"])
            == (att, att, sc, BLOCK, B, 0)
        ):
            return None
    return _HeadGroup(
        start=pc,
        n_instr=len(want),
        counts=dict(Counter((e[2], e[3]) for e in decoded[pc : pc + len(want)])),
        r_len=t,
        fwd_reg=fwd_reg,
        v_fwd_reg=v_fwd_reg,
        k_rows=k0["rows"],
        k_stride=k0["stride"],
        v_cols=v0["cols"],
        v_stride=v0["stride"],
        k_base=np.array([k["line"] * LINE for k in ks], np.int64),
        v_base=np.array([v["line"] * LINE for v in vs], np.int64),
        q=np.array([k["src"] for k in ks], np.int64),
        s=np.array([k["dst"] for k in ks], np.int64),
        sc=np.array([soft[i]["dst"] for i in range(n)], np.int64),
        att=np.array([v["dst"] for v in vs], np.int64),
        one=one,
    )


def _head_groups(decoded: list, geom: CoreGeometry) -> list[_HeadGroup]:
    """The head groups of the normative form in a decoded program."""
    groups, pc = [], 0
    while pc < len(decoded):
        g = _head_group(decoded, pc)
        if g is None:
            pc += 1
        else:
            groups.append(g)
            pc += g.n_instr
    return groups


def _disjoint(spans, limit: int) -> bool:
    """Whether VBUF ranges (start, end, read_only) fit ``limit`` and overlap only where both are
    read-only."""
    spans = sorted(spans)
    end_written = end_read = 0
    for lo, hi, read_only in spans:
        if hi > limit or lo < end_written or (not read_only and lo < end_read):
            return False
        if read_only:
            end_read = max(end_read, hi)
        else:
            end_written = max(end_written, hi)
    return True


def _matvec_batch(wq, we, wnf, x_bits):
    """``numerics.matvec`` of ``H`` matrices with ``H`` input vectors, composed of the same
    primitives: ``wq``, ``we``, ``wnf`` as in ``PreparedMatrix`` with a leading head axis
    (q float32 [H, nb, rows, 64], block_exp [H, nb, rows], non-finite rows [H, rows]); ``x_bits``
    [H, cols]. Returns (acc [H, rows], lam [H], nonfinite [H, rows])."""
    H, nb = wq.shape[:2]
    xq, xe, xnf = nm.bfp_blocks(nm.pad_to_block(x_bits))  # [H, nb*64], [H, nb], [H, nb]
    mag, sgn = np.abs(xq), np.sign(xq)
    xs = np.stack([sgn * (mag >> 5), sgn * (mag & 31)], axis=-1)  # q = 32*hi + lo, exact
    xs = xs.astype(np.float32).reshape(H, nb, BLOCK, 2)
    sums = np.matmul(wq, xs)  # [H, nb, rows, 2]
    s = 32 * sums[..., 0].astype(np.int64) + sums[..., 1].astype(np.int64)
    xe_max = xe.max(axis=1)  # [H]
    acc = nm.shift_floor(s, nm.block_shift(we, xe[:, :, None], xe_max[:, None, None])).sum(axis=1)
    return acc, nm.acc_lsb_exponent(xe_max), wnf | xnf.any(axis=1)[:, None]


def _round(acc, lam, nonfinite) -> np.ndarray:
    """``matvec_fp16``'s rounding for [H, rows] accumulators with per-head ``lam``."""
    out = nm.acc_to_fp16(acc, lam[:, None])
    return np.where(nonfinite, np.uint16(nm.CANONICAL_NAN), out).astype(np.uint16)


def _max_rows(bits: np.ndarray) -> np.ndarray:
    """``numerics.fp16_max`` of every row of [H, T]."""
    nan = (((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0)).any(axis=1)
    top = np.take_along_axis(bits, np.argmax(nm.order_key(bits), axis=1)[:, None], axis=1)
    return np.where(nan, np.uint16(nm.CANONICAL_NAN), top[:, 0]).astype(np.uint16)
