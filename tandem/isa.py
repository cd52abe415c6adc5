"""The decode core's instruction set: the one definition of opcodes, fields and encoding.

Every instruction is a 128-bit little-endian word. Bits [7:0] hold the opcode; the fields of its
format follow from bit 8 upward, in the order listed in :data:`FORMATS`, each as an unsigned
integer of its width (``ADDI``'s immediate is two's complement). Bits above the last field are
reserved and must be zero. An unknown opcode, a non-zero reserved bit or a reserved flag bit is an
illegal instruction (:class:`IllegalInstruction`); the core reports it in its status register.

Architectural state: 16 scalar registers of 32 bits (``R0`` reads as 0, writes to it are
dropped), the vector buffer (VBUF, binary16 elements), and the HBM pseudo-channels. HBM addresses
in instructions are per-channel offsets in 64-byte lines (:data:`LINE`); the layout module says
what lives where. VBUF operand addresses (fields ``dst``, ``src``, ``a``, ``b``) are element
addresses that must be multiples of 64 (one VBUF row, :data:`VBUF_ALIGN`); anything else is an
illegal instruction. Semantics are sequential: each instruction sees the effects of every earlier
one. The hardware overlaps units behind a scoreboard without changing that (a forwarding
``MATVEC``, below, adds a rule the program must keep).

An element-wise vector instruction (``VADD``, ``VSUB``, ``VMUL``, ``VEXP``, ``VRECIP``,
``VRSQRT``, ``VGELU``) may write in place (``dst`` equal to ``a``, or to a vector ``b``) or to a
range disjoint from its vector operands; a ``dst`` range that partly overlaps a vector operand
starting elsewhere is an operand error (``Status.VBUF_RANGE``), because the vector unit streams
rows and would read some after writing them. Lengths come from registers, so this is checked when
the instruction executes, like the buffer bound.

``MATVEC`` reads FP16 weights or, by its ``wfmt`` field, weight-only quantized INT8/INT4 weights
(issue 17): the quantized tiled form of tandem.layout, with the scale beats that carry each tile
run's binary16 scales and zero points in groups of ``wgroup`` columns, and the product of
tandem.numerics.matvec_quant. A quantized ``MATVEC`` streams a dense matrix whole: ``stride`` must
be 0 and neither ``LIVE_ROWS`` nor ``LIVE_COLS`` may be set; that, and ``wfmt = 3``, is an illegal
instruction. The RTL core computes all three formats on one matrix unit (docs/rtl.md).

A ``MATVEC`` without ``ARGMAX`` whose ``sreg`` field is non-zero is a *forwarding* product: one
row or one column of its matrix comes from the VBUF instead of from HBM. It sets exactly one of
``LIVE_ROWS`` and ``LIVE_COLS``, and ``n`` is its live row count ``min(R[lreg], rows)`` or its
live column count ``min(R[lreg], cols)``:

* ``LIVE_ROWS``, a forwarded row: row ``n - 1`` of the matrix (columns ``0..cols-1``) is
  ``VBUF[src + R[sreg] + c]``; it must have ``1 <= cols <= 64`` (one 64-column block). It is the
  attention's score product reading the K row just computed (and stored with ``STROW``).
* ``LIVE_COLS``, a forwarded column: column ``n - 1`` of the matrix (rows ``0..rows-1``) is
  ``VBUF[dst + R[sreg] + r]``, counted from ``dst``, not ``src``, so that one offset serves every
  head; it must have ``1 <= rows <= 64`` (one 64-row block). It is the attention's value product
  reading the V column just computed (and stored with ``STCOL``).

Every other row or column comes from HBM as before, and with ``n = 0`` nothing is forwarded.
(With ``ARGMAX``, ``sreg`` keeps its sampling meaning.) A forwarding ``MATVEC`` must have ``wfmt``
FP16; one that sets both or neither of ``LIVE_ROWS`` and ``LIVE_COLS``, has a quantized ``wfmt``,
or has ``cols`` (a forwarded row) or ``rows`` (a forwarded column) outside ``1..64`` is an
illegal instruction. When it executes with ``n >= 1``, ``R[sreg]`` must be a multiple of 64
(:data:`VBUF_ALIGN`) and ``VBUF[base + R[sreg] : base + R[sreg] + 64]``, with ``base`` = ``src``
for a row and ``dst`` for a column, must lie inside the VBUF; otherwise it is an operand error
(``Status.VBUF_RANGE``). With ``n = 0`` nothing is checked. HBM ordering: a forwarding product's
HBM read of the matrix does not wait for earlier stores (every other read does), so a program
must have no store in flight into the product's live part other than into the forwarded row or
column, whose HBM copy the product does not use; a program that breaks this rule may read stale
rows or columns. One that keeps it has sequential semantics, the forwarded row or column
replacing row or column ``n - 1`` of the matrix (what the ISA simulator, which runs in order,
does). The core still reads every live tile from HBM, the forwarded row's or column's included.
Errors stay in program order: if an earlier store and the product's read both fail
(``HBM_RANGE``, ``AXI_ERROR``), the status names the store.

The assembler text format is one instruction per line, ``op field=value ...`` (fields left out are
zero), with ``label:`` lines, branch targets given as labels or numbers, flags as ``A|B`` and
comments after ``#``. :func:`disassemble` writes the same format, so text round-trips.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

WORD_BITS = 128
WORD_BYTES = WORD_BITS // 8
LINE = 64
"""Bytes per HBM line, the unit of HBM addresses in instructions."""
N_REGS = 16
VBUF_ALIGN = 64
"""VBUF operands start on a 64-element row (the numeric block), so every unit reads whole rows."""
VBUF_FIELDS = ("dst", "src", "a", "b")


class IllegalInstruction(ValueError):
    """An instruction word or text that does not encode a legal instruction."""


class Op(enum.IntEnum):
    """Opcodes. Zero is deliberately illegal, so that running into erased memory stops the core."""

    HALT = 0x01
    SYNC = 0x02
    SETI = 0x03
    ADDI = 0x04
    LDARG = 0x05
    BLT = 0x06
    BGE = 0x07
    JMP = 0x08
    LDW = 0x09
    STW = 0x0A
    LOADV = 0x10
    STOREV = 0x11
    STROW = 0x12
    STCOL = 0x13
    MATVEC = 0x20
    VADD = 0x30
    VSUB = 0x31
    VMUL = 0x32
    VMAX = 0x33
    VDOT = 0x34
    VEXP = 0x35
    VRECIP = 0x36
    VRSQRT = 0x37
    VGELU = 0x38
    VSET = 0x39


class Unit(enum.Enum):
    """Which part of the core executes an instruction."""

    CONTROL = "control"
    DMA = "dma"
    MPU = "mpu"
    VPU = "vpu"


class MatFlag(enum.IntFlag):
    """``MATVEC`` flags (meanings in :data:`FLAG_DOCS`)."""

    BIAS = 1
    ARGMAX = 2
    LIVE_ROWS = 4
    LIVE_COLS = 8


class WFmt(enum.IntEnum):
    """``MATVEC``'s weight format (field ``wfmt``): how the tiled matrix at ``line`` is stored
    (tandem.layout: the FP16 tiled form, or the quantized one with its scale beats). The value 3
    is reserved: an illegal instruction."""

    FP16 = 0
    INT8 = 1
    INT4 = 2


WFMT_BITS = {WFmt.FP16: 16, WFmt.INT8: 8, WFmt.INT4: 4}
"""Bits per stored weight of each :class:`WFmt`."""

WGROUPS = (64, 128, 256, None)
"""``MATVEC``'s ``wgroup`` field: the columns sharing one scale and zero point of a quantized
matrix, by code: 64, 128, 256, or (3, None) the whole row or any larger multiple of the tile's
columns (one scale-beat entry per tile: tandem.layout). Ignored with ``wfmt = FP16``."""


class VecFlag(enum.IntFlag):
    """Flags of the binary vector ops."""

    B_SCALAR = 1


FLAG_DOCS = {  # keyed by name: IntFlag members of different classes compare equal as ints
    "BIAS": "start each row's accumulator from VBUF[dst + row] (the bias put there first)",
    "ARGMAX": "write the lowest index of the largest accumulator to R[rd], not VBUF (or, when "
    "R[sreg] has a temperature, the token sampled from the top-K binary16 logits; "
    "tandem.sampling)",
    "LIVE_ROWS": "compute only the first R[lreg] rows; later rows are not written",
    "LIVE_COLS": "use only the first R[lreg] columns; later weights and inputs count as +0",
    "B_SCALAR": "operand b is the single element VBUF[b], broadcast over the length",
}


@dataclass(frozen=True)
class Field:
    name: str
    width: int
    doc: str
    signed: bool = False
    flags: type[enum.IntFlag] | None = None

    @property
    def lo(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1


def _f(name, width, doc, **kw) -> Field:
    return Field(name, width, doc, **kw)


# Shared field shapes
_VADDR = 16  # VBUF element address
_LEN = 16
_REG = 4
_LINEF = 24  # HBM line address within a channel (1 GiB)
_COUNT = 16
_STRIDE = 12

_LREG = _f("lreg", _REG, "if non-zero, the length is R[lreg] instead of len")

FORMATS: dict[Op, tuple[Field, ...]] = {
    Op.HALT: (_f("code", 8, "0: finished; non-zero: program-detected error, reported in status"),),
    Op.SYNC: (),
    Op.SETI: (_f("rd", _REG, "destination register"), _f("imm", 32, "value")),
    Op.ADDI: (
        _f("rd", _REG, "destination register"),
        _f("ra", _REG, "source register"),
        _f("imm", 32, "signed addend", signed=True),
    ),
    Op.LDARG: (
        _f("rd", _REG, "destination register"),
        _f("arg", 4, "index into tandem.regmap.SCALAR_ARGS"),
    ),
    Op.BLT: (
        _f("ra", _REG, "left operand"),
        _f("rb", _REG, "right operand"),
        _f("target", 16, "instruction index"),
    ),
    Op.BGE: (
        _f("ra", _REG, "left operand"),
        _f("rb", _REG, "right operand"),
        _f("target", 16, "instruction index"),
    ),
    Op.JMP: (_f("target", 16, "instruction index"),),
    Op.LDW: (
        _f("rd", _REG, "destination register"),
        _f("line", _LINEF, "channel-0 line"),
        _f("ri", _REG, "index register: byte address = line*64 + R[ri]*4"),
    ),
    Op.STW: (
        _f("rs", _REG, "source register"),
        _f("line", _LINEF, "channel-0 line"),
        _f("ri", _REG, "index register: byte address = line*64 + R[ri]*4"),
    ),
    Op.LOADV: (
        _f("dst", _VADDR, "VBUF destination"),
        _f("len", _LEN, "elements"),
        _f("line", _LINEF, "striped vector base line"),
        _f("ri", _REG, "index register"),
        _f("stride", 16, "lines added per unit of R[ri] (row lookup)"),
    ),
    Op.STOREV: (
        _f("src", _VADDR, "VBUF source"),
        _f("len", _LEN, "elements"),
        _f("line", _LINEF, "striped vector base line"),
        _f("ri", _REG, "index register"),
        _f("stride", 16, "lines added per unit of R[ri]"),
    ),
    Op.STROW: (
        _f("src", _VADDR, "VBUF source"),
        _f("len", _LEN, "elements (columns written)"),
        _f("line", _LINEF, "tiled matrix base line"),
        _f("ri", _REG, "row index register"),
        _f("cols", _COUNT, "allocated columns of the matrix"),
        _f("stride", _STRIDE, "tiles between 64x64 blocks; 0: dense (64/lanes)"),
    ),
    Op.STCOL: (
        _f("src", _VADDR, "VBUF source"),
        _f("len", _LEN, "elements (rows written)"),
        _f("line", _LINEF, "tiled matrix base line"),
        _f("ri", _REG, "column index register"),
        _f("cols", _COUNT, "allocated columns of the matrix"),
        _f("stride", _STRIDE, "tiles between 64x64 blocks; 0: dense (64/lanes)"),
    ),
    Op.MATVEC: (
        _f("dst", _VADDR, "VBUF result (and bias, with BIAS); with ARGMAX unused"),
        _f("src", _VADDR, "VBUF input vector"),
        _f("line", _LINEF, "tiled matrix base line"),
        _f("rows", _COUNT, "allocated rows"),
        _f("cols", _COUNT, "allocated columns"),
        _f("stride", _STRIDE, "tiles between 64x64 blocks; 0: dense (64/lanes)"),
        _f("flags", 4, "MatFlag", flags=MatFlag),
        _LREG,
        _f("rd", _REG, "ARGMAX destination register"),
        _f(
            "sreg",
            _REG,
            "with ARGMAX: sampling word R[sreg], seed R[sreg+1], position R[sreg+2]; without "
            "ARGMAX, if non-zero: a forwarding product, with LIVE_ROWS live row n-1 = "
            "VBUF[src + R[sreg] :], with LIVE_COLS live column n-1 = VBUF[dst + R[sreg] :], "
            "R[sreg] a multiple of 64 (module docstring)",
        ),
        _f("wfmt", 2, "weight format (WFmt): 0 FP16, 1 INT8, 2 INT4; 3 is illegal"),
        _f("wgroup", 2, "quantized group (WGROUPS): 0 = 64, 1 = 128, 2 = 256, 3 = whole row"),
    ),
}

_VBIN = (
    _f("dst", _VADDR, "VBUF destination"),
    _f("a", _VADDR, "VBUF operand a"),
    _f("b", _VADDR, "VBUF operand b"),
    _f("len", _LEN, "elements"),
    _f("flags", 4, "VecFlag", flags=VecFlag),
    _LREG,
)
_VUN = (
    _f("dst", _VADDR, "VBUF destination"),
    _f("a", _VADDR, "VBUF operand"),
    _f("len", _LEN, "elements"),
    _LREG,
)
for _op in (Op.VADD, Op.VSUB, Op.VMUL, Op.VDOT):
    FORMATS[_op] = _VBIN
for _op in (Op.VMAX, Op.VEXP, Op.VRECIP, Op.VRSQRT, Op.VGELU):
    FORMATS[_op] = _VUN
FORMATS[Op.VSET] = (
    _f("dst", _VADDR, "VBUF destination"),
    _f("imm", 16, "binary16 bit pattern"),
    _f("len", _LEN, "elements"),
    _LREG,
)

_CONTROL_OPS = (Op.HALT, Op.SYNC, Op.SETI, Op.ADDI, Op.LDARG, Op.BLT, Op.BGE, Op.JMP)
_DMA_OPS = (Op.LDW, Op.STW, Op.LOADV, Op.STOREV, Op.STROW, Op.STCOL)
_VPU_OPS = (
    Op.VADD,
    Op.VSUB,
    Op.VMUL,
    Op.VMAX,
    Op.VDOT,
    Op.VEXP,
    Op.VRECIP,
    Op.VRSQRT,
    Op.VGELU,
    Op.VSET,
)
UNITS: dict[Op, Unit] = {
    **dict.fromkeys(_CONTROL_OPS, Unit.CONTROL),
    **dict.fromkeys(_DMA_OPS, Unit.DMA),
    Op.MATVEC: Unit.MPU,
    **dict.fromkeys(_VPU_OPS, Unit.VPU),
}

SEMANTICS: dict[Op, str] = {
    Op.HALT: "Stop. Status reports `code` (0 = success).",
    Op.SYNC: "Wait until every unit is idle and every HBM write has completed.",
    Op.SETI: "R[rd] = imm.",
    Op.ADDI: "R[rd] = R[ra] + imm (32-bit wrap).",
    Op.LDARG: "R[rd] = scalar kernel argument number `arg` (tandem.regmap.SCALAR_ARGS).",
    Op.BLT: "If R[ra] < R[rb] (unsigned), continue at `target`.",
    Op.BGE: "If R[ra] >= R[rb] (unsigned), continue at `target`.",
    Op.JMP: "Continue at `target`.",
    Op.LDW: "R[rd] = 32-bit word at channel 0, byte line*64 + R[ri]*4.",
    Op.STW: "32-bit word at channel 0, byte line*64 + R[ri]*4 = R[rs].",
    Op.LOADV: "VBUF[dst:dst+len] = striped HBM vector at line + R[ri]*stride.",
    Op.STOREV: "Striped HBM vector at line + R[ri]*stride = VBUF[src:src+len].",
    Op.STROW: "Row R[ri], columns 0..len-1, of the tiled matrix at `line` = VBUF[src:src+len].",
    Op.STCOL: "Column R[ri], rows 0..len-1, of the tiled matrix at `line` = VBUF[src:src+len].",
    Op.MATVEC: (
        "VBUF[dst+r] = binary16(sum_c W[r, c] * VBUF[src+c] (+ bias)) for each live row r, under "
        "the block-floating-point contract of tandem.numerics.matvec; with ARGMAX, R[rd] = the "
        "lowest row index of the largest accumulator; if R[sreg]'s temperature T_q (bits 15:0) is "
        "non-zero, R[rd] = the Gumbel-max sample among the K (bits 22:16) largest binary16 "
        "logits, keyed by seed R[sreg+1] and position R[sreg+2] (register numbers mod 16; "
        "tandem.sampling, docs/numerics.md). sreg = 0 reads R0 = 0: greedy. With wfmt INT8 or "
        "INT4 the matrix is quantized (tandem.layout's quantized tiled form, groups of wgroup) and "
        "the product is tandem.numerics.matvec_quant's. Without ARGMAX, a non-zero sreg makes "
        "a forwarding product, which sets exactly one of LIVE_ROWS and LIVE_COLS and has wfmt "
        "FP16 (else illegal). With LIVE_ROWS and n = min(R[lreg], rows) live rows, row n-1 of "
        "W (columns 0..cols-1) is VBUF[src+R[sreg]+c] instead of the HBM row, and 1 <= cols <= "
        "64; with LIVE_COLS and n = min(R[lreg], cols) live columns, column n-1 of W (rows "
        "0..rows-1) is VBUF[dst+R[sreg]+r] instead of the HBM column, and 1 <= rows <= 64 (else "
        "illegal); nothing is forwarded if n = 0. R[sreg] not a multiple of 64, or "
        "VBUF[base+R[sreg] : base+R[sreg]+64] past the VBUF (base = src for a row, dst for a "
        "column), is VBUF_RANGE (checked when n >= 1). Its HBM read of W does not wait for "
        "earlier stores: no store may be in flight into its live part but into the forwarded "
        "row or column."
    ),
    Op.VADD: "VBUF[dst+i] = VBUF[a+i] + b_i (binary16, nearest even).",
    Op.VSUB: "VBUF[dst+i] = VBUF[a+i] - b_i.",
    Op.VMUL: "VBUF[dst+i] = VBUF[a+i] * b_i.",
    Op.VMAX: "VBUF[dst] = max_i VBUF[a+i] (NaN if any is NaN).",
    Op.VDOT: "VBUF[dst] = binary16(sum_i VBUF[a+i] * b_i) under the matvec contract (a: weights).",
    Op.VEXP: "VBUF[dst+i] = exp(VBUF[a+i]) by table.",
    Op.VRECIP: "VBUF[dst+i] = 1 / VBUF[a+i] by table.",
    Op.VRSQRT: "VBUF[dst+i] = 1 / sqrt(VBUF[a+i]) by table.",
    Op.VGELU: "VBUF[dst+i] = gelu(VBUF[a+i]) by table (GPT-2's tanh form).",
    Op.VSET: "VBUF[dst+i] = imm for i < len.",
}


@dataclass(frozen=True)
class Instr:
    """One decoded instruction: an opcode and its field values (missing fields are zero)."""

    op: Op
    fields: tuple[tuple[str, int], ...] = ()

    @classmethod
    def make(cls, op: Op, **values: int) -> Instr:
        fmt = FORMATS[op]
        names = {f.name for f in fmt}
        unknown = set(values) - names
        if unknown:
            raise IllegalInstruction(
                f"{op.name} has no field(s) {sorted(unknown)}; its fields are {sorted(names)}"
            )
        items = []
        for f in fmt:
            v = int(values.get(f.name, 0))
            if not f.lo <= v <= f.hi:
                raise IllegalInstruction(
                    f"{op.name}.{f.name} = {v} does not fit {f.width} bits "
                    f"({'signed' if f.signed else 'unsigned'})"
                )
            if f.flags is not None and v & ~_flag_mask(f.flags):
                raise IllegalInstruction(f"{op.name}.{f.name} = {v:#x} sets reserved flag bits")
            if f.name in VBUF_FIELDS and v % VBUF_ALIGN:
                raise IllegalInstruction(
                    f"{op.name}.{f.name} = {v} is not a multiple of {VBUF_ALIGN} (a VBUF row)"
                )
            items.append((f.name, v))
        if op is Op.MATVEC:
            # the forwarding rules first: a quantized forwarding product is told it must be FP16
            _check_forwarding_matvec(dict(items))
            _check_quantized_matvec(dict(items))
        return cls(Op(op), tuple(items))

    def __getitem__(self, name: str) -> int:
        for k, v in self.fields:
            if k == name:
                return v
        raise KeyError(f"{self.op.name} has no field {name!r}")

    def get(self, name: str, default: int = 0) -> int:
        for k, v in self.fields:
            if k == name:
                return v
        return default

    @property
    def unit(self) -> Unit:
        return UNITS[self.op]

    def __str__(self) -> str:
        return disassemble_one(self)


def _check_quantized_matvec(f: dict[str, int]) -> None:
    """The rules of a quantized ``MATVEC`` (module docstring)."""
    if f["wfmt"] not in {int(w) for w in WFmt}:
        formats = ", ".join(f"{int(w)} {w.name}" for w in WFmt)
        raise IllegalInstruction(f"MATVEC.wfmt = {f['wfmt']} is reserved (formats: {formats})")
    if f["wfmt"] == WFmt.FP16:
        return
    if f["stride"]:
        raise IllegalInstruction(
            f"MATVEC.stride = {f['stride']} with wfmt = {WFmt(f['wfmt']).name}: a quantized "
            "matrix is dense (stride 0)"
        )
    if f["flags"] & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS):
        raise IllegalInstruction(
            f"MATVEC with wfmt = {WFmt(f['wfmt']).name} sets LIVE_ROWS or LIVE_COLS: a quantized "
            "matrix is read whole"
        )


def is_forwarding(f) -> bool:
    """Whether a ``MATVEC``'s fields (an :class:`Instr` or a field dict) make it a forwarding
    product (module docstring): ``sreg`` non-zero without ``ARGMAX``."""
    return bool(f["sreg"]) and not f["flags"] & MatFlag.ARGMAX


def _check_forwarding_matvec(f: dict[str, int]) -> None:
    """The static rules of a forwarding ``MATVEC`` (module docstring)."""
    if not is_forwarding(f):
        return
    what = f"MATVEC with sreg = {f['sreg']} and no ARGMAX (a forwarding product)"
    if f["wfmt"] not in {int(w) for w in WFmt}:
        return  # reserved: _check_quantized_matvec says so
    if f["wfmt"] != WFmt.FP16:
        raise IllegalInstruction(f"{what} has wfmt = {WFmt(f['wfmt']).name}: it must be FP16")
    live = f["flags"] & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS)
    if live == MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS:
        raise IllegalInstruction(
            f"{what} sets both LIVE_ROWS and LIVE_COLS: it forwards either its last live row "
            "(LIVE_ROWS) or its last live column (LIVE_COLS)"
        )
    if not live:
        raise IllegalInstruction(
            f"{what} sets neither LIVE_ROWS nor LIVE_COLS: it forwards either its last live row "
            "(LIVE_ROWS) or its last live column (LIVE_COLS)"
        )
    if live == MatFlag.LIVE_ROWS and not 1 <= f["cols"] <= VBUF_ALIGN:
        raise IllegalInstruction(
            f"{what} with LIVE_ROWS has cols = {f['cols']}: it forwards a row of one 64-column "
            "block (1 <= cols <= 64)"
        )
    if live == MatFlag.LIVE_COLS and not 1 <= f["rows"] <= VBUF_ALIGN:
        raise IllegalInstruction(
            f"{what} with LIVE_COLS has rows = {f['rows']}: it forwards a column of one 64-row "
            "block (1 <= rows <= 64)"
        )


def _flag_mask(flags: type[enum.IntFlag]) -> int:
    m = 0
    for f in flags:
        m |= int(f)
    return m


def make(op: Op, **values: int) -> Instr:
    """Shorthand for :meth:`Instr.make`."""
    return Instr.make(op, **values)


# ----------------------------------------------------------------------------------------------
# binary encoding


def encode(instr: Instr) -> int:
    word = int(instr.op)
    pos = 8
    for f in FORMATS[instr.op]:
        v = instr.get(f.name)
        word |= (v & ((1 << f.width) - 1)) << pos
        pos += f.width
    return word


def decode(word: int, pc: int | None = None) -> Instr:
    """Decode one 128-bit word; raise :class:`IllegalInstruction` for anything not legal."""
    where = f" at instruction {pc}" if pc is not None else ""
    if not 0 <= word < (1 << WORD_BITS):
        raise IllegalInstruction(f"word {word:#x}{where} is not a 128-bit value")
    code = word & 0xFF
    try:
        op = Op(code)
    except ValueError:
        raise IllegalInstruction(f"unknown opcode {code:#04x}{where}") from None
    pos = 8
    values = {}
    for f in FORMATS[op]:
        v = (word >> pos) & ((1 << f.width) - 1)
        if f.signed and v >> (f.width - 1):
            v -= 1 << f.width
        if f.flags is not None and v & ~_flag_mask(f.flags):
            raise IllegalInstruction(f"{op.name}{where}: reserved flag bits set in {v:#x}")
        values[f.name] = v
        pos += f.width
    if word >> pos:
        raise IllegalInstruction(f"{op.name}{where}: reserved bits above bit {pos} are set")
    return Instr.make(op, **values)


def encode_program(program: list[Instr]) -> bytes:
    return b"".join(encode(i).to_bytes(WORD_BYTES, "little") for i in program)


def decode_program(data: bytes) -> list[Instr]:
    if len(data) % WORD_BYTES:
        raise IllegalInstruction(f"program of {len(data)} bytes is not whole 16-byte words")
    return [
        decode(int.from_bytes(data[i : i + WORD_BYTES], "little"), pc=i // WORD_BYTES)
        for i in range(0, len(data), WORD_BYTES)
    ]


# ----------------------------------------------------------------------------------------------
# text


def disassemble_one(instr: Instr, labels: dict[int, str] | None = None) -> str:
    parts = [instr.op.name.lower()]
    for f in FORMATS[instr.op]:
        v = instr.get(f.name)
        if v == 0 and f.name != "target":
            continue
        if f.flags is not None:
            text = "|".join(m.name for m in f.flags if v & m)
        elif f.name == "target" and labels and v in labels:
            text = labels[v]
        else:
            text = str(v)
        parts.append(f"{f.name}={text}")
    return " ".join(parts)


def disassemble(program: list[Instr]) -> str:
    """Program text with a label at every branch target; :func:`assemble` reads it back."""
    targets = sorted({i["target"] for i in program if "target" in dict(i.fields)})
    labels = {t: f"L{t}" for t in targets}
    lines = []
    for pc, instr in enumerate(program):
        if pc in labels:
            lines.append(f"{labels[pc]}:")
        lines.append("    " + disassemble_one(instr, labels))
    return "\n".join(lines) + "\n"


_LABEL = re.compile(r"^([A-Za-z_][\w.]*):$")


def assemble(text: str) -> list[Instr]:
    """Assemble program text (see the module docstring); errors name the line."""
    lines = []
    labels: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LABEL.match(line)
        if m:
            if m.group(1) in labels:
                raise IllegalInstruction(f"line {lineno}: label {m.group(1)!r} defined twice")
            labels[m.group(1)] = len(lines)
            continue
        lines.append((lineno, line))
    program = []
    for lineno, line in lines:
        name, *args = line.split()
        try:
            op = Op[name.upper()]
        except KeyError:
            raise IllegalInstruction(f"line {lineno}: unknown instruction {name!r}") from None
        fmt = {f.name: f for f in FORMATS[op]}
        values = {}
        for arg in args:
            key, sep, val = arg.partition("=")
            if not sep or key not in fmt:
                raise IllegalInstruction(
                    f"line {lineno}: {arg!r} is not one of {op.name}'s fields {sorted(fmt)}"
                )
            f = fmt[key]
            try:
                if f.flags is not None:
                    values[key] = sum(int(f.flags[p]) for p in val.split("|")) if val else 0
                elif key == "target" and val in labels:
                    values[key] = labels[val]
                else:
                    values[key] = int(val, 0)
            except (KeyError, ValueError):
                raise IllegalInstruction(f"line {lineno}: bad value {val!r} for {key}") from None
        try:
            program.append(Instr.make(op, **values))
        except IllegalInstruction as e:
            raise IllegalInstruction(f"line {lineno}: {e}") from None
    return program


# ----------------------------------------------------------------------------------------------
# documentation


def reference_markdown() -> str:
    """docs/isa.md, generated from the definitions above (a test keeps the file in step)."""
    out = [
        "# Tandem ISA",
        "",
        "Generated from `tandem/isa.py` by `python -m tandem.isa > docs/isa.md`; do not edit.",
        "",
        __doc__.strip(),
        "",
        f"Words are {WORD_BITS} bits; HBM line = {LINE} bytes; {N_REGS} registers.",
        "",
        "## Flags",
        "",
    ]
    for flags in (MatFlag, VecFlag):
        out.append(f"`{flags.__name__}`:")
        out.append("")
        for m in flags:
            out.append(f"- `{m.name}` = {int(m)}: {FLAG_DOCS[m.name]}")
        out.append("")
    out += ["## Instructions", ""]
    for op in Op:
        out.append(f"### `{op.name}` (opcode {int(op):#04x}, {UNITS[op].value})")
        out.append("")
        out.append(SEMANTICS[op])
        out.append("")
        if FORMATS[op]:
            out.append("| bits | field | width | meaning |")
            out.append("|---|---|---|---|")
            pos = 8
            for f in FORMATS[op]:
                rng = f"{pos + f.width - 1}:{pos}"
                out.append(f"| {rng} | `{f.name}` | {f.width} | {f.doc} |")
                pos += f.width
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
