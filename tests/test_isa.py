"""The ISA definition: binary and text round trips, illegal encodings, the generated reference."""

import random
from pathlib import Path

import pytest

from tandem import isa
from tandem.isa import FORMATS, IllegalInstruction, MatFlag, Op, VecFlag

DOCS = Path(__file__).resolve().parent.parent / "docs" / "isa.md"


def flag_mask(flags) -> int:
    m = 0
    for f in flags:
        m |= int(f)
    return m


def random_instr(rng: random.Random, op: Op) -> isa.Instr:
    values = {}
    for f in FORMATS[op]:
        if f.flags is not None:
            v = rng.randrange(1 << f.width) & flag_mask(f.flags)
        elif f.name in isa.VBUF_FIELDS:
            v = rng.randrange((f.hi + 1) // isa.VBUF_ALIGN) * isa.VBUF_ALIGN
        else:
            v = rng.choice([f.lo, f.hi, rng.randint(f.lo, f.hi)])
        values[f.name] = v
    if op is Op.MATVEC:  # a legal weight format; a quantized MATVEC is dense and whole
        values["wfmt"] = rng.choice(list(isa.WFmt))
        if values["wfmt"]:
            values["stride"] = 0
            values["flags"] &= ~(isa.MatFlag.LIVE_ROWS | isa.MatFlag.LIVE_COLS)
        if isa.is_forwarding(values):  # sreg without ARGMAX: a legal forwarding product
            if rng.random() < 0.5:
                values["sreg"] = 0
            else:  # a forwarded row (LIVE_ROWS, 1..64 columns) or column (LIVE_COLS, rows)
                values["wfmt"] = isa.WFmt.FP16
                live, count = rng.choice([(MatFlag.LIVE_ROWS, "cols"), (MatFlag.LIVE_COLS, "rows")])
                values["flags"] = values["flags"] & MatFlag.BIAS | live
                values[count] = rng.randint(1, 64)
    return isa.make(op, **values)


def encoded_width(op: Op) -> int:
    return 8 + sum(f.width for f in FORMATS[op])


def test_every_format_fits_a_word():
    for op in Op:
        assert encoded_width(op) <= isa.WORD_BITS, op


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_binary_round_trip(op):
    rng = random.Random(int(op))
    for _ in range(50):
        ins = random_instr(rng, op)
        word = isa.encode(ins)
        assert 0 <= word < 1 << isa.WORD_BITS
        assert word & 0xFF == int(op)
        assert isa.decode(word) == ins


def test_program_round_trips_through_bytes_and_text():
    rng = random.Random(7)
    ops = list(Op)
    program = [random_instr(rng, rng.choice(ops)) for _ in range(400)]
    # branch targets inside the program, so that the disassembler labels them
    program = [
        isa.make(i.op, **{**dict(i.fields), "target": rng.randrange(len(program))})
        if "target" in dict(i.fields)
        else i
        for i in program
    ]
    raw = isa.encode_program(program)
    assert len(raw) == isa.WORD_BYTES * len(program)
    assert isa.decode_program(raw) == program
    text = isa.disassemble(program)
    assert isa.assemble(text) == program


def test_assembler_syntax():
    program = isa.assemble(
        """
        # comments and blank lines are ignored
        start:
            seti rd=1 imm=0x10
            matvec dst=64 src=128 line=5 rows=3 cols=70 flags=BIAS|LIVE_COLS lreg=2
            vadd dst=0 a=64 b=128 len=4 flags=B_SCALAR
            bge ra=1 rb=0 target=start   # back to the label
            halt code=2
        """
    )
    assert program[0] == isa.make(Op.SETI, rd=1, imm=16)
    assert program[1]["flags"] == MatFlag.BIAS | MatFlag.LIVE_COLS
    assert program[2]["flags"] == VecFlag.B_SCALAR
    assert program[3]["target"] == 0
    assert program[4] == isa.make(Op.HALT, code=2)


@pytest.mark.parametrize("opcode", [0x00, 0x0B, 0x14, 0x21, 0x3A, 0xFF])
def test_unknown_opcode_is_illegal(opcode):
    with pytest.raises(IllegalInstruction, match="unknown opcode"):
        isa.decode(opcode)


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_reserved_bits_are_illegal(op):
    width = encoded_width(op)
    if width == isa.WORD_BITS:
        pytest.skip("no reserved bits")
    base = isa.encode(isa.make(op))
    for bit in (width, isa.WORD_BITS - 1):
        with pytest.raises(IllegalInstruction, match="reserved bits"):
            isa.decode(base | (1 << bit))


def field_shift(op: Op, name: str) -> int:
    pos = 8
    for f in FORMATS[op]:
        if f.name == name:
            return pos
        pos += f.width
    raise KeyError(name)


def test_reserved_flag_bits_are_illegal():
    word = isa.encode(isa.make(Op.VADD)) | (0b10 << field_shift(Op.VADD, "flags"))
    with pytest.raises(IllegalInstruction, match="reserved flag"):
        isa.decode(word)
    with pytest.raises(IllegalInstruction, match="reserved flag"):
        isa.make(Op.VMUL, flags=4)


def test_unaligned_vbuf_operand_is_illegal():
    word = isa.encode(isa.make(Op.VEXP)) | (3 << field_shift(Op.VEXP, "dst"))
    with pytest.raises(IllegalInstruction, match="multiple of 64"):
        isa.decode(word)
    with pytest.raises(IllegalInstruction, match="multiple of 64"):
        isa.make(Op.MATVEC, src=32)


@pytest.mark.parametrize(
    "op,field,value",
    [
        (Op.SETI, "rd", 16),
        (Op.SETI, "imm", 1 << 32),
        (Op.SETI, "imm", -1),
        (Op.ADDI, "imm", 1 << 31),
        (Op.ADDI, "imm", -(1 << 31) - 1),
        (Op.LOADV, "line", 1 << 24),
        (Op.MATVEC, "stride", 1 << 12),
        (Op.HALT, "code", 256),
        (Op.BLT, "target", 1 << 16),
    ],
)
def test_out_of_range_fields_are_illegal(op, field, value):
    with pytest.raises(IllegalInstruction, match="does not fit"):
        isa.make(op, **{field: value})


def test_other_illegal_inputs():
    with pytest.raises(IllegalInstruction, match="no field"):
        isa.make(Op.HALT, rd=1)
    with pytest.raises(IllegalInstruction, match="128-bit"):
        isa.decode(1 << 128)
    with pytest.raises(IllegalInstruction, match="whole 16-byte words"):
        isa.decode_program(bytes(17))
    with pytest.raises(IllegalInstruction, match="at instruction 1"):
        isa.decode_program(isa.encode_program([isa.make(Op.SYNC)]) + bytes(16))
    with pytest.raises(IllegalInstruction, match="line 1: unknown instruction"):
        isa.assemble("frobnicate rd=1")
    with pytest.raises(IllegalInstruction, match="line 2"):
        isa.assemble("halt\nseti rd=1 bogus=2")
    with pytest.raises(IllegalInstruction, match="defined twice"):
        isa.assemble("a:\na:\nhalt")


FWD = {"flags": MatFlag.LIVE_ROWS, "lreg": 2, "sreg": 14, "rows": 1024, "cols": 64}
FWD_COL = {"flags": MatFlag.LIVE_COLS, "lreg": 2, "sreg": 15, "rows": 64, "cols": 1024}


@pytest.mark.parametrize(
    "base, change, match",
    [
        (FWD, {"flags": 0}, "sets neither LIVE_ROWS nor LIVE_COLS"),
        (FWD, {"flags": MatFlag.BIAS}, "sets neither LIVE_ROWS nor LIVE_COLS"),
        (FWD, {"flags": MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS}, "sets both LIVE_ROWS and"),
        (FWD, {"flags": MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS | MatFlag.BIAS}, "sets both"),
        (FWD, {"cols": 0}, "LIVE_ROWS has cols = 0"),
        (FWD, {"cols": 65}, "LIVE_ROWS has cols = 65"),
        (FWD, {"cols": 128}, "LIVE_ROWS has cols = 128"),
        (FWD, {"wfmt": isa.WFmt.INT8}, "wfmt = INT8: it must be FP16"),
        (FWD, {"wfmt": isa.WFmt.INT4}, "wfmt = INT4: it must be FP16"),
        (FWD, {"wfmt": isa.WFmt.INT8, "flags": 0}, "wfmt = INT8: it must be FP16"),
        # the forwarded column: rows, not cols, is the one 64-element block
        (FWD_COL, {"rows": 0}, "LIVE_COLS has rows = 0"),
        (FWD_COL, {"rows": 65}, "LIVE_COLS has rows = 65"),
        (FWD_COL, {"rows": 1024, "cols": 64}, "LIVE_COLS has rows = 1024"),
        (FWD_COL, {"flags": MatFlag.LIVE_COLS | MatFlag.LIVE_ROWS}, "sets both LIVE_ROWS and"),
        (FWD_COL, {"wfmt": isa.WFmt.INT8}, "wfmt = INT8: it must be FP16"),
        (FWD_COL, {"wfmt": isa.WFmt.INT4}, "wfmt = INT4: it must be FP16"),
    ],
)
def test_forwarding_matvec_rules(base, change, match):
    """A MATVEC with sreg and no ARGMAX forwards its last live row (LIVE_ROWS) or column
    (LIVE_COLS) from the VBUF: it must set exactly one of them, be FP16 and have 1..64 columns
    (a row) or rows (a column); anything else is illegal, from make and from decode alike."""
    sreg = base["sreg"]
    with pytest.raises(IllegalInstruction, match=match):
        isa.make(Op.MATVEC, **{**base, **change})
    legal = {**base, "sreg": 0, **change}
    if legal.get("wfmt"):  # a quantized one is dense and whole without sreg: drop LIVE_*
        legal["flags"] &= ~(MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS)
    # legal without sreg: the same word with sreg set is not
    word = isa.encode(isa.make(Op.MATVEC, **legal))
    with pytest.raises(IllegalInstruction, match=match):
        isa.decode(word | sreg << field_shift(Op.MATVEC, "sreg"))
    text = isa.disassemble([isa.make(Op.MATVEC, **legal)]).strip() + f" sreg={sreg}"
    if not legal.get("wfmt"):  # the assembler says it too
        with pytest.raises(IllegalInstruction, match="line 1: .*" + match):
            isa.assemble(text)


def test_forwarding_matvec_legal_forms():
    for cols in (1, 17, 64):
        ins = isa.make(Op.MATVEC, **{**FWD, "cols": cols})
        assert isa.is_forwarding(ins) and isa.decode(isa.encode(ins)) == ins
    ins = isa.make(Op.MATVEC, **{**FWD, "flags": MatFlag.LIVE_ROWS | MatFlag.BIAS})
    assert isa.is_forwarding(ins)
    assert isa.assemble("matvec rows=8 cols=64 flags=LIVE_ROWS lreg=2 sreg=14") == [
        isa.make(Op.MATVEC, rows=8, cols=64, flags=MatFlag.LIVE_ROWS, lreg=2, sreg=14)
    ]
    # a forwarded column: LIVE_COLS, 1..64 rows, any number of columns
    for rows in (1, 33, 64):
        for cols in (1, 64, 1024, 50257):
            ins = isa.make(Op.MATVEC, **{**FWD_COL, "rows": rows, "cols": cols})
            assert isa.is_forwarding(ins) and isa.decode(isa.encode(ins)) == ins
            assert isa.assemble(isa.disassemble([ins])) == [ins]
    ins = isa.make(Op.MATVEC, **{**FWD_COL, "flags": MatFlag.LIVE_COLS | MatFlag.BIAS})
    assert isa.is_forwarding(ins) and isa.decode(isa.encode(ins)) == ins
    assert isa.assemble("matvec rows=64 cols=1024 flags=LIVE_COLS lreg=2 sreg=15") == [
        isa.make(Op.MATVEC, rows=64, cols=1024, flags=MatFlag.LIVE_COLS, lreg=2, sreg=15)
    ]
    # with ARGMAX, sreg is the sampling register: no forwarding, none of its rules
    for flags in (MatFlag.ARGMAX, MatFlag.ARGMAX | MatFlag.LIVE_COLS):
        ins = isa.make(Op.MATVEC, rows=50257, cols=768, flags=flags, lreg=2, sreg=11)
        assert not isa.is_forwarding(ins)
    ins = isa.make(Op.MATVEC, rows=64, cols=64, flags=MatFlag.ARGMAX, sreg=3, wfmt=isa.WFmt.INT8)
    assert not isa.is_forwarding(ins)
    assert not isa.is_forwarding(isa.make(Op.MATVEC, **{**FWD, "sreg": 0, "cols": 512}))
    assert not isa.is_forwarding(isa.make(Op.MATVEC, **{**FWD_COL, "sreg": 0, "rows": 512}))
    # a reserved weight format says so whether or not the product forwards
    with pytest.raises(IllegalInstruction, match="wfmt = 3 is reserved"):
        isa.decode(isa.encode(isa.make(Op.MATVEC, **FWD)) | 3 << field_shift(Op.MATVEC, "wfmt"))


def test_every_op_has_semantics_and_a_unit():
    assert set(isa.SEMANTICS) == set(Op) == set(isa.UNITS) == set(FORMATS)


def test_docs_match_the_definition():
    assert DOCS.read_text() == isa.reference_markdown() + "\n", (
        "docs/isa.md is stale: run `python -m tandem.isa > docs/isa.md`"
    )
