"""ISA simulator: runs a decode-core program over an HBM image, instruction by instruction.

Every instruction does exactly what ``tandem.isa.SEMANTICS`` says, with all arithmetic from
``tandem.numerics`` and every address from ``tandem.layout``, so a compiled program run here equals
``tandem.sim.faithful`` bit for bit; it is the fast device backend and the reference for the RTL.

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
0; ``LDARG`` of an argument number past ``tandem.regmap.SCALAR_ARGS`` is an illegal instruction.

Speed: a static weight matrix (one the program never writes) is gathered from the image and
aligned into a ``numerics.PreparedMatrix`` once and cached; any write overlapping it (by the
program or by the host through :meth:`IsaSim.invalidate`) drops the cached copy. Matrices read
with ``LIVE_ROWS`` / ``LIVE_COLS`` (the KV cache) are gathered with ``layout.tiled_address`` on
every use, live part only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem import isa
from tandem import numerics as nm
from tandem.geometry import CoreGeometry
from tandem.isa import LINE, WORD_BYTES, IllegalInstruction, MatFlag, Op, Unit, VecFlag
from tandem.layout import (
    PROGRAM_BASE,
    HBMImage,
    StatusRecord,
    dense_stride,
    tiled_address,
    unpack_tiled,
    vector_address,
)
from tandem.regmap import SCALAR_ARGS, Status

DEFAULT_MAX_STEPS = 1 << 26
"""Instructions a run may execute before it stops with WATCHDOG (a full gpt2 context is ~2.3M)."""

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

    def __init__(self, geom: CoreGeometry, image: HBMImage, *, max_steps: int = DEFAULT_MAX_STEPS):
        if image.geom.channels != geom.channels:
            raise ValueError(
                f"image has {image.geom.channels} channels, geometry {geom.name!r} {geom.channels}"
            )
        self.geom = geom
        self.image = image
        self.max_steps = max_steps
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
            if ins.op is Op.MATVEC and not ins["flags"] & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS):
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
        entry = (self._dispatch[ins.op], dict(ins.fields), ins.unit, ins.op)
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
        self._argv = self._args(args)
        self._limit = self._argv[[n for n, _ in SCALAR_ARGS].index("hbm_bytes")]
        self._on_token = on_token
        self.regs = [0] * isa.N_REGS
        self.tokens = 0
        self.hbm_read = 0
        self.hbm_written = 0
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
                handler, f, unit, op = entry
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

    def _MATVEC(self, f):
        flags, rows, cols = f["flags"], f["rows"], f["cols"]
        live = flags & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS)
        n_rows = self.regs[f["lreg"]] if flags & MatFlag.LIVE_ROWS else rows
        n_cols = self.regs[f["lreg"]] if flags & MatFlag.LIVE_COLS else cols
        base = f["line"] * LINE
        stride = f["stride"] or dense_stride(self.geom)
        x = self.vbuf[self._vb(f["src"], n_cols, "MATVEC src")]
        self._hbm(base, base + self._tiled_extent(n_rows, n_cols, cols, stride), "MATVEC")
        if n_cols == 0:  # no live column: one all-zero block
            mat = nm.PreparedMatrix(np.zeros((n_rows, nm.BLOCK), np.uint16))
            x = np.zeros(nm.BLOCK, np.uint16)
        elif not live:
            mat = self._static_matrix(base, rows, cols, stride)
        else:
            ch, half = self._tiled_addresses(rows, cols, n_rows, n_cols, stride)
            mat = nm.PreparedMatrix(self.u16[ch, base // 2 + half])
        self.hbm_read += self._tiles_bytes(n_rows, n_cols)
        bias = None
        if flags & MatFlag.BIAS:
            bias = self.vbuf[self._vb(f["dst"], n_rows, "MATVEC bias")].copy()
        if n_rows == 0:
            if flags & MatFlag.ARGMAX:
                self._set(f["rd"], 0)
            return
        acc, lam, nonfinite = nm.matvec(mat, x, bias)
        if flags & MatFlag.ARGMAX:
            self.last_argmax = (acc, lam)
            self._set(f["rd"], nm.argmax(acc))
            return
        dst = self._vb(f["dst"], n_rows, "MATVEC dst")
        out = nm.acc_to_fp16(acc, lam)
        self.vbuf[dst] = np.where(nonfinite, np.uint16(nm.CANONICAL_NAN), out)

    # VPU -------------------------------------------------------------------------------------

    def _binary(self, f, fn, name: str):
        n = self._len(f)
        a = self.vbuf[self._vb(f["a"], n, name + " a")]
        if f["flags"] & VecFlag.B_SCALAR:
            b = self.vbuf[self._vb(f["b"], 1, name + " b")][0]
        else:
            b = self.vbuf[self._vb(f["b"], n, name + " b")]
        self.vbuf[self._vb(f["dst"], n, name + " dst")] = fn(a, b)

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
        self.vbuf[self._vb(f["dst"], n, name + " dst")] = nm.lookup(table, a)

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
