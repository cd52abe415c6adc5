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
            else:
                values["wfmt"] = isa.WFmt.FP16
                values["flags"] = values["flags"] & MatFlag.BIAS | MatFlag.LIVE_ROWS
                values["cols"] = rng.randint(1, 64)
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


@pytest.mark.parametrize(
    "change, match",
    [
        ({"flags": 0}, "does not set LIVE_ROWS"),
        ({"flags": MatFlag.BIAS}, "does not set LIVE_ROWS"),
        ({"flags": MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS}, "sets LIVE_COLS"),
        ({"flags": MatFlag.LIVE_COLS}, "does not set LIVE_ROWS"),
        ({"cols": 0}, "cols = 0"),
        ({"cols": 65}, "cols = 65"),
        ({"cols": 128}, "cols = 128"),
        ({"wfmt": isa.WFmt.INT8}, "LIVE_ROWS"),  # the quantized rules say it first
        ({"wfmt": isa.WFmt.INT4}, "LIVE_ROWS"),
    ],
)
def test_forwarding_matvec_rules(change, match):
    """A MATVEC with sreg and no ARGMAX forwards its last live row from the VBUF: it must set
    LIVE_ROWS, not LIVE_COLS, be FP16 and have 1..64 columns; anything else is illegal, from
    make and from decode alike."""
    with pytest.raises(IllegalInstruction, match=match):
        isa.make(Op.MATVEC, **{**FWD, **change})
    if not change.get("wfmt"):  # legal without sreg: the same word with sreg set is not
        word = isa.encode(isa.make(Op.MATVEC, **{**FWD, "sreg": 0, **change}))
        with pytest.raises(IllegalInstruction, match=match):
            isa.decode(word | 14 << field_shift(Op.MATVEC, "sreg"))


def test_forwarding_matvec_legal_forms():
    for cols in (1, 17, 64):
        ins = isa.make(Op.MATVEC, **{**FWD, "cols": cols})
        assert isa.is_forwarding(ins) and isa.decode(isa.encode(ins)) == ins
    ins = isa.make(Op.MATVEC, **{**FWD, "flags": MatFlag.LIVE_ROWS | MatFlag.BIAS})
    assert isa.is_forwarding(ins)
    assert isa.assemble("matvec rows=8 cols=64 flags=LIVE_ROWS lreg=2 sreg=14") == [
        isa.make(Op.MATVEC, rows=8, cols=64, flags=MatFlag.LIVE_ROWS, lreg=2, sreg=14)
    ]
    # with ARGMAX, sreg is the sampling register: no forwarding, none of its rules
    for flags in (MatFlag.ARGMAX, MatFlag.ARGMAX | MatFlag.LIVE_COLS):
        ins = isa.make(Op.MATVEC, rows=50257, cols=768, flags=flags, lreg=2, sreg=11)
        assert not isa.is_forwarding(ins)
    ins = isa.make(Op.MATVEC, rows=64, cols=64, flags=MatFlag.ARGMAX, sreg=3, wfmt=isa.WFmt.INT8)
    assert not isa.is_forwarding(ins)
    assert not isa.is_forwarding(isa.make(Op.MATVEC, **{**FWD, "sreg": 0, "cols": 512}))


def test_every_op_has_semantics_and_a_unit():
    assert set(isa.SEMANTICS) == set(Op) == set(isa.UNITS) == set(FORMATS)


def test_docs_match_the_definition():
    assert DOCS.read_text() == isa.reference_markdown() + "\n", (
        "docs/isa.md is stale: run `python -m tandem.isa > docs/isa.md`"
    )
