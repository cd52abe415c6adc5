# amaranth: UnusedElaboratable=no
"""The controller (rtl/controller.py) on Amaranth's simulator, with Python models of the units.

The models answer the controller's streams: channel 0 serves the program fetch and LDW words
from an ``HBMImage``, stores are applied to it (STW) or recorded, the VPU and MPU take their
commands and stay busy for a few cycles, ARGMAX answers with a chosen index. Control-flow
results (registers through STW, tokens, status, error pc) are compared with
``tandem.golden.isasim`` on
the same image and arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from tandem import isa
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.isa import Op, make
from tandem.layout import PROGRAM_BASE, HBMImage, StatusRecord
from tandem.regmap import SCALAR_ARGS, Status
from tandem.rtl.controller import Controller, instruction_layout
from tandem.rtl.dma import ReadKind, StoreKind

GEOM = geometry("tiny").replace(imem_words=64)
OUT_LINE = 64  # token area for these programs: channel 0, byte 4096


def _image(program, nbytes=1 << 14) -> HBMImage:
    image = HBMImage(GEOM, nbytes)
    code = isa.encode_program(program) if program and isinstance(program[0], isa.Instr) else b""
    raw = code or b"".join(w.to_bytes(16, "little") for w in program)
    image.write_channel(0, PROGRAM_BASE, np.frombuffer(raw, np.uint8))
    return image


def run_controller(
    image: HBMImage,
    args: dict,
    *,
    vpu_cycles=3,
    mpu_cycles=4,
    argmax=7,
    vpu_hang=False,
    store_cycles=0,
    write_cycles=0,
    bad_tags=None,
    max_cycles=20000,
):
    """Run the controller once over ``image``; returns (status dict, log of issued commands).
    The status dict's ``cycles`` holds the cycle of each log entry; a store keeps ``busy.store``
    high for ``store_cycles`` cycles after it is taken (the store feeder reading the VBUF), and
    ``busy.dma_write`` for ``write_cycles`` (its HBM write waiting for the response).
    ``bad_tags`` maps a pc to a delay: a read or store with that tag gets an HBM range error
    that many cycles after it is taken, reported as the DMA does (rtl/dma.py: the lowest tag so
    far, and ``error_read``)."""
    dut = Controller(GEOM)
    log = []
    result = {}
    argv = {n: int(args.get(n, 0)) for n, _ in SCALAR_ARGS}
    if not argv["hbm_bytes"]:
        argv["hbm_bytes"] = image.nbytes

    async def bench(ctx):
        for name, value in argv.items():
            ctx.set(dut.args[name], value)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        fetch_beats = []
        vpu_busy = mpu_busy = store_busy = write_busy = 0
        cycles = result["cycles"] = []
        word_q = []
        argmax_q = []
        errors = []  # (cycle due, tag, is a read)
        err_tag = err_read = None  # the DMA's error_tag and error_read (None: no error)
        for cyc in range(max_cycles):
            for _due, tag, is_read in [e for e in errors if e[0] == cyc]:
                if err_tag is None or tag < err_tag:
                    err_tag, err_read = tag, is_read
            if err_tag is not None:
                ctx.set(dut.dma_error.hbm_range, 1)
                ctx.set(dut.dma_error_tag, err_tag)
                ctx.set(dut.dma_error_read, err_read)
            # fetch
            if ctx.get(dut.fetch_cmd.valid):
                cmd = ctx.get(dut.fetch_cmd.payload)
                off, beats = cmd.offset, cmd.beats
                raw = image.read_channel(0, off, beats * GEOM.beat_bytes)
                fetch_beats = [
                    int.from_bytes(raw[i : i + GEOM.beat_bytes], "little")
                    for i in range(0, len(raw), GEOM.beat_bytes)
                ]
            ctx.set(dut.fetch_cmd.ready, 1)
            ctx.set(dut.fetch_data.valid, bool(fetch_beats))
            if fetch_beats:
                ctx.set(dut.fetch_data.payload, fetch_beats[0])
            # units
            ctx.set(dut.dma_read.ready, 1)
            ctx.set(dut.dma_store.ready, 1)
            ctx.set(dut.vpu.ready, not vpu_busy)
            ctx.set(dut.mpu.ready, not mpu_busy)
            ctx.set(dut.busy.vpu, bool(vpu_busy))
            ctx.set(dut.busy.mpu, bool(mpu_busy))
            ctx.set(dut.busy.store, bool(store_busy))
            ctx.set(dut.busy.dma_write, bool(write_busy))
            ctx.set(dut.dma_word.valid, bool(word_q))
            if word_q:
                ctx.set(dut.dma_word.payload, word_q[0])
            ctx.set(dut.mpu_argmax.valid, bool(argmax_q))
            if argmax_q:
                ctx.set(dut.mpu_argmax.payload, argmax_q[0])
            # sample handshakes before the edge
            took_fetch = ctx.get(dut.fetch_data.valid) and ctx.get(dut.fetch_data.ready)
            rd = ctx.get(dut.dma_read.payload) if ctx.get(dut.dma_read.valid) else None
            st = ctx.get(dut.dma_store.payload) if ctx.get(dut.dma_store.valid) else None
            vp = ctx.get(dut.vpu.payload) if ctx.get(dut.vpu.valid) and not vpu_busy else None
            mp = ctx.get(dut.mpu.payload) if ctx.get(dut.mpu.valid) and not mpu_busy else None
            took_word = bool(word_q) and ctx.get(dut.dma_word.ready)
            took_amax = bool(argmax_q) and ctx.get(dut.mpu_argmax.ready)
            done = ctx.get(dut.done)
            if done:
                result.update(
                    {
                        k: ctx.get(dut.status[k])
                        for k in ("status", "error_pc", "error_code", "tokens")
                    }
                )
                result["record"] = ctx.get(dut.record)
                break
            await ctx.tick()
            if took_fetch:
                fetch_beats.pop(0)
            if took_word:
                word_q.pop(0)
            if took_amax:
                argmax_q.pop(0)
            if vpu_busy and not vpu_hang:
                vpu_busy -= 1
            if mpu_busy:
                mpu_busy -= 1
            if store_busy:
                store_busy -= 1
            if write_busy:
                write_busy -= 1
            n_log = len(log)
            st_cmd = st.cmd if st is not None and st.cmd.kind != StoreKind.STATUS else None
            for cmd, is_read in ((rd, True), (st_cmd, False)):
                if cmd is not None and cmd.tag in (bad_tags or {}):
                    errors.append((cyc + 1 + bad_tags[cmd.tag], cmd.tag, is_read))
            if rd is not None:
                log.append(("read", rd.kind, rd.offset, rd.tag))
                if rd.kind == ReadKind.TILES:
                    log[-1] += (rd.live_rows, rd.live_cols, rd.wfmt, rd.wgroup)
                if rd.kind == ReadKind.WORD:
                    word_q.append(int.from_bytes(image.read_channel(0, rd.offset, 4), "little"))
            if st is not None:
                cmd = st.cmd
                log.append(("store", cmd.kind, cmd.offset, cmd.value, st.src_row))
                store_busy = store_cycles
                write_busy = max(write_busy, write_cycles)
                if cmd.kind == StoreKind.WORD:
                    image.write_channel(
                        0, cmd.offset, np.frombuffer(int(cmd.value).to_bytes(4, "little"), np.uint8)
                    )
                if cmd.kind == StoreKind.STATUS:
                    rec = ctx.get(dut.record)
                    image.write_channel(0, 0, np.frombuffer(StoreRecord(rec).pack(), np.uint8))
            if vp is not None:
                log.append(("vpu", vp.op, vp.dst, vp.a, vp.b, vp.length, vp.b_scalar, vp.imm))
                vpu_busy = vpu_cycles
            if mp is not None:
                c = mp.cmd
                log.append(
                    (
                        *("mpu", c.rows, c.cols, c.live_rows, c.live_cols, mp.src_row, mp.dst_row),
                        *(c.wfmt, c.wgroup),
                    )
                )
                if c.fwd:  # a forwarding product: its row's (column's) index and VBUF row
                    log[-1] += ("fwd-col" if c.fwd_col else "fwd", c.fwd_index, mp.fwd_row)
                mpu_busy = mpu_cycles
                if c.flags.argmax:
                    argmax_q.append(argmax)
            cycles += [cyc] * (len(log) - n_log)
        else:
            raise AssertionError(f"no done in {max_cycles} cycles")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return result, log


def StoreRecord(rec) -> StatusRecord:
    return StatusRecord(rec.status, rec.pc, rec.tokens, rec.halt_code, 0)


def reference(image: HBMImage, args: dict):
    ref = image.data.copy()
    sim_image = HBMImage(GEOM, image.nbytes)
    sim_image.data[:] = ref
    res = IsaSim(GEOM, sim_image).run(args)
    return res, sim_image


def check_against_isasim(program, args, **kw):
    image = _image(program)
    res, ref_image = reference(image, args)
    got, log = run_controller(image, args, **kw)
    assert got["status"] == int(res.status), (got, res)
    assert got["error_pc"] == res.pc, (got, res)
    assert got["tokens"] == res.tokens
    assert got["error_code"] == res.halt_code
    # token area and the status record (cycles aside) as the ISA simulator left them
    np.testing.assert_array_equal(
        image.data[0, 4096 : 4096 + 256], ref_image.data[0, 4096 : 4096 + 256]
    )
    assert StatusRecord.unpack(image.data[0, :64]) == StatusRecord.unpack(ref_image.data[0, :64])
    return got, log, res


def test_layouts_follow_isa():
    for op in Op:
        layout = instruction_layout(op)
        assert layout.size == isa.WORD_BITS
        pos = 8
        for f in isa.FORMATS[op]:
            assert layout[f.name].offset == pos
            pos += f.width


def test_control_flow_and_tokens():
    """A loop over LDARG/ADDI/BLT/BGE/JMP/LDW emitting tokens with STW, then HALT 0."""
    p = [
        make(Op.LDARG, rd=1, arg=2),  # n_new
        make(Op.SETI, rd=2, imm=0),
        make(Op.SETI, rd=3, imm=100),
        make(Op.SETI, rd=5, imm=0xFFFFFFFF),
        # loop (4)
        make(Op.STW, rs=3, line=OUT_LINE, ri=2),
        make(Op.ADDI, rd=3, ra=3, imm=-7),
        make(Op.ADDI, rd=2, ra=2, imm=1),
        make(Op.BLT, ra=2, rb=1, target=4),
        make(Op.LDW, rd=6, line=OUT_LINE, ri=0),  # reads token 0 back
        make(Op.ADDI, rd=6, ra=6, imm=1),
        make(Op.STW, rs=6, line=OUT_LINE, ri=2),
        make(Op.BGE, ra=0, rb=5, target=20),  # 0 >= 0xffffffff unsigned: not taken
        make(Op.JMP, target=14),
        make(Op.HALT, code=3),
        make(Op.ADDI, rd=0, ra=5, imm=5),  # R0 stays 0
        make(Op.STW, rs=0, line=OUT_LINE, ri=1),
        make(Op.HALT, code=0),
    ]
    got, _log, res = check_against_isasim(p, {"n_new": 5})
    assert res.tokens == 7 and got["status"] == 0


def test_halt_code_is_program_error():
    got, _, _ = check_against_isasim([make(Op.SETI, rd=1, imm=1), make(Op.HALT, code=1)], {})
    assert got["status"] == Status.PROGRAM_ERROR and got["error_code"] == 1


def _field_pos(op, name: str) -> int:
    """Bit position of field ``name`` in ``op``'s word (tandem.isa.FORMATS)."""
    pos = 8
    for f in isa.FORMATS[op]:
        if f.name == name:
            return pos
        pos += f.width
    raise KeyError(name)


def _quant_word(wfmt: int, **fields) -> int:
    """A MATVEC word with ``wfmt`` set over an FP16 one (``make`` refuses the illegal ones)."""
    return isa.encode(make(Op.MATVEC, **fields)) | wfmt << _field_pos(Op.MATVEC, "wfmt")


_ILLEGAL_QUANT = {  # tandem.isa's rules of a quantized MATVEC, one word each
    "wfmt3": _quant_word(3, rows=64, cols=64),
    "int8-stride": _quant_word(1, rows=64, cols=64, stride=64),
    "int4-stride": _quant_word(2, rows=64, cols=64, stride=1),
    "int8-live-rows": _quant_word(1, rows=64, cols=64, flags=4, lreg=4),
    "int4-live-cols": _quant_word(2, rows=64, cols=64, flags=8 | 2, lreg=4),
}


def _fwd_word(**fields) -> int:
    """A MATVEC word with ``sreg`` = 6 without ARGMAX (a forwarding product) over a word
    ``make`` accepts (it refuses the illegal ones)."""
    return isa.encode(make(Op.MATVEC, **fields)) | 6 << _field_pos(Op.MATVEC, "sreg")


_ILLEGAL_FWD = {  # tandem.isa's rules of a forwarding MATVEC: FP16, LIVE_ROWS only with 1..64
    # columns, or LIVE_COLS only with 1..64 rows
    "fwd-no-live": _fwd_word(rows=64, cols=64),
    "fwd-both-live": _fwd_word(rows=64, cols=64, flags=4 | 8, lreg=4),
    "fwd-cols-65": _fwd_word(rows=64, cols=65, flags=4, lreg=4),
    "fwd-cols-0": _fwd_word(rows=64, cols=0, flags=4, lreg=4),
    "fwd-col-rows-65": _fwd_word(rows=65, cols=64, flags=8, lreg=4),
    "fwd-col-rows-0": _fwd_word(rows=0, cols=64, flags=8, lreg=4),
    "fwd-int8": _quant_word(1, rows=64, cols=64) | 6 << _field_pos(Op.MATVEC, "sreg"),
}


@pytest.mark.parametrize(
    "bad",
    ["opcode", "reserved", "flag", "align", "ldarg", "fall-off", *_ILLEGAL_QUANT, *_ILLEGAL_FWD],
)
def test_illegal_instruction(bad):
    good = [make(Op.SETI, rd=1, imm=1), make(Op.STW, rs=1, line=OUT_LINE)]
    word = {
        **_ILLEGAL_QUANT,
        **_ILLEGAL_FWD,
        "opcode": 0x7F,
        "reserved": isa.encode(make(Op.SYNC)) | 1 << 100,
        "flag": isa.encode(make(Op.VADD, dst=0, a=0, b=0, len=4)) | 2 << (8 + 64),
        "align": isa.encode(make(Op.VSET, len=4)) | 3 << 8,
        "ldarg": isa.encode(make(Op.LDARG, rd=1)) | 9 << 12,
        "fall-off": isa.encode(make(Op.JMP, target=GEOM.imem_words + 5)),
    }[bad]
    program = [isa.encode(i) for i in good] + [word, isa.encode(make(Op.HALT))]
    got, _, _ = check_against_isasim(program, {})
    assert got["status"] == Status.ILLEGAL_INSTRUCTION
    assert got["error_pc"] == (2 if bad != "fall-off" else GEOM.imem_words + 5)


def test_legal_quantized_matvecs_issue_their_format():
    """INT8 and INT4 MATVECs (dense, no LIVE flag; FP16 around them) issue an MPU command and a
    TILES read that carry the instruction's wfmt and wgroup, with live = allocated; an FP16
    MATVEC with a stride and LIVE_ROWS stays legal and carries 0, 0."""
    p = [
        make(Op.SETI, rd=4, imm=40),
        make(Op.MATVEC, dst=0, src=256, line=20, rows=64, cols=130, wfmt=1, wgroup=0),
        make(Op.MATVEC, dst=128, src=256, line=100, rows=70, cols=300, wfmt=2, wgroup=1),
        make(Op.MATVEC, dst=0, src=512, line=10, rows=64, cols=64, stride=64, flags=4, lreg=4),
        make(
            Op.MATVEC, dst=0, src=256, line=40, rows=64, cols=256, flags=2, rd=7, wfmt=2, wgroup=2
        ),
        make(Op.STW, rs=7, line=OUT_LINE),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, argmax=0)
    assert got["status"] == 0 and got["tokens"] == 1
    assert [e for e in log if e[0] == "read"] == [
        ("read", ReadKind.TILES, 20 * isa.LINE, 1, 64, 130, 1, 0),
        ("read", ReadKind.TILES, 100 * isa.LINE, 2, 70, 300, 2, 1),
        ("read", ReadKind.TILES, 10 * isa.LINE, 3, 40, 64, 0, 0),
        ("read", ReadKind.TILES, 40 * isa.LINE, 4, 64, 256, 2, 2),
    ]
    assert [e for e in log if e[0] == "mpu"] == [
        ("mpu", 64, 130, 64, 130, 4, 0, 1, 0),
        ("mpu", 70, 300, 70, 300, 4, 2, 2, 1),
        ("mpu", 64, 64, 40, 64, 8, 0, 0, 0),
        ("mpu", 64, 256, 64, 256, 4, 0, 2, 2),
    ]


def test_vbuf_range_and_issue_fields():
    n = GEOM.vbuf_elems
    p = [
        make(Op.SETI, rd=4, imm=130),
        make(Op.VSET, dst=64, imm=0x3C00, len=100),
        make(Op.VADD, dst=256, a=64, b=0, len=0, lreg=4, flags=1),
        make(Op.MATVEC, dst=0, src=64, line=10, rows=128, cols=192, flags=2 | 8, lreg=4, rd=7),
        make(Op.STW, rs=7, line=OUT_LINE),
        make(Op.VEXP, dst=n - 64, a=0, len=65),  # past the end
        make(Op.HALT),
    ]
    got, log, _res = check_against_isasim(p, {}, argmax=0)
    assert got["status"] == Status.VBUF_RANGE and got["error_pc"] == 5
    vpu = [e for e in log if e[0] == "vpu"]
    assert vpu[0][2:] == (64, 0, 0, 100, 0, 0x3C00)
    assert vpu[1][2:7] == (256, 64, 0, 130, 1)
    mpu = [e for e in log if e[0] == "mpu"]
    assert mpu == [("mpu", 128, 192, 128, 130, 1, 0, 0, 0)]
    reads = [e for e in log if e[0] == "read"]
    assert reads == [("read", ReadKind.TILES, 640, 3, 128, 130, 0, 0)]


def _prefetch_program(between, second=None):
    """MATVEC (weights at line 10), ``between``, a second MATVEC (line 20, live rows from R4
    unless ``second`` is given), STW of its argmax, HALT."""
    if second is None:
        second = make(Op.MATVEC, dst=0, src=512, line=20, rows=64, cols=64, flags=2 | 4, lreg=4,
                      rd=7)  # fmt: skip
    return [
        make(Op.SETI, rd=4, imm=40),
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        *between,
        second,
        make(Op.STW, rs=7, line=OUT_LINE),
        make(Op.HALT),
    ]


_VECTOR_OPS = [
    make(Op.VADD, dst=512, a=256, b=384, len=64),
    make(Op.VEXP, dst=576, a=512, len=64),
    make(Op.VMUL, dst=576, a=576, b=384, len=64),
]


def _order(log):
    return [
        (e[0], e[3]) if e[0] == "read" else (e[0],) for e in log if e[0] in ("read", "vpu", "mpu")
    ]


def test_lookahead_prefetches_the_next_matvec_weights():
    """While vector ops wait for a running MATVEC, the controller sends the next MATVEC's
    weight read (tag = its pc, its live rows from R4) before the vector ops; the MATVEC itself
    then issues no second read, and its MPU command still follows the vector ops."""
    p = _prefetch_program(_VECTOR_OPS)
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, argmax=0)
    assert got["status"] == 0 and got["tokens"] == 1
    reads = [e for e in log if e[0] == "read"]
    assert reads == [
        ("read", ReadKind.TILES, 10 * isa.LINE, 1, 64, 64, 0, 0),
        ("read", ReadKind.TILES, 20 * isa.LINE, 5, 40, 64, 0, 0),
    ]
    assert _order(log) == [
        ("read", 1),
        ("mpu",),
        ("read", 5),
        ("vpu",),
        ("vpu",),
        ("vpu",),
        ("mpu",),
    ]


def test_lookahead_prefetches_a_quantized_matvec():
    """The look-ahead sends a quantized MATVEC's weight read (wfmt, wgroup with it) before the
    vector ops; its MPU command carries them too."""
    second = make(Op.MATVEC, dst=0, src=512, line=20, rows=130, cols=300, flags=2, rd=7, wfmt=2,
                  wgroup=0)  # fmt: skip
    got, log, _ = check_against_isasim(
        _prefetch_program(_VECTOR_OPS, second), {}, mpu_cycles=60, argmax=0
    )
    assert got["status"] == 0 and got["tokens"] == 1
    assert [e for e in log if e[0] == "read"][1] == (
        *("read", ReadKind.TILES, 20 * isa.LINE, 5, 130, 300, 2, 0),
    )
    assert _order(log) == [("read", 1), ("mpu",), ("read", 5), *[("vpu",)] * 3, ("mpu",)]
    assert [e for e in log if e[0] == "mpu"][1] == ("mpu", 130, 300, 130, 300, 8, 0, 2, 0)


@pytest.mark.parametrize("bad", ["int8-stride", "int8-live-rows", "int4-live-cols", "wfmt3"])
def test_lookahead_skips_an_illegal_quantized_matvec(bad):
    """An illegal MATVEC after the vector ops is not prefetched (its tiles as the DMA would
    read them need not be what the MPU would take): Exec reports ILLEGAL_INSTRUCTION at its pc
    and only the first MATVEC's weights were read."""
    words = [isa.encode(i) for i in _prefetch_program(_VECTOR_OPS)]
    words[5] = _ILLEGAL_QUANT[bad] | isa.encode(make(Op.MATVEC, line=20, src=512, rd=7))
    got, log, _ = check_against_isasim(words, {}, mpu_cycles=60, argmax=0)
    assert got["status"] == Status.ILLEGAL_INSTRUCTION and got["error_pc"] == 5
    assert [e[3] for e in log if e[0] == "read"] == [1]


@pytest.mark.parametrize(
    "between",
    [
        [_VECTOR_OPS[0], make(Op.LOADV, dst=640, len=64, line=30), _VECTOR_OPS[1]],
        [_VECTOR_OPS[0], make(Op.STOREV, src=512, len=64, line=30), _VECTOR_OPS[1]],
        [_VECTOR_OPS[0], make(Op.SETI, rd=5, imm=1), _VECTOR_OPS[1]],
    ],
    ids=["loadv", "storev", "seti"],
)
def test_lookahead_stops_at_anything_but_a_vector_op(between):
    """The scan passes only vector ops: the second MATVEC's read waits until Exec has passed
    the LOADV, store or scalar instruction, which waits for the first vector op (itself
    waiting for the running MATVEC); a scan from the vector op after it may then prefetch."""
    p = _prefetch_program(between)
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, argmax=0)
    assert got["status"] == 0
    order = [(e[0], e[3]) if e[0] == "read" else (e[0],) for e in log]
    first_vpu = order.index(("vpu",))
    second = order.index(("read", 5))
    assert second > first_vpu
    if between[1].op is Op.LOADV:
        assert order.index(("read", 3)) < second
    if between[1].op is Op.STOREV:
        assert order.index(("store",)) < second


def test_lookahead_skips_bad_and_empty_matvecs():
    """A MATVEC whose operands are out of the VBUF is not prefetched (Exec reports VBUF_RANGE
    at its pc, one read in all); one with no live row (R4 = 0) streams nothing."""
    n = GEOM.vbuf_elems
    bad = make(Op.MATVEC, dst=0, src=n - 64, line=20, rows=64, cols=128)
    got, log, _ = check_against_isasim(_prefetch_program(_VECTOR_OPS, bad), {}, mpu_cycles=60)
    assert got["status"] == Status.VBUF_RANGE and got["error_pc"] == 5
    assert [e[3] for e in log if e[0] == "read"] == [1]
    p = _prefetch_program(_VECTOR_OPS)
    p[0] = make(Op.SETI, rd=4, imm=0)
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, argmax=0)
    assert got["status"] == 0
    assert [e[3] for e in log if e[0] == "read"] == [1]
    assert _order(log)[-1] == ("mpu",)


def test_a_stop_sends_the_prefetched_matvec():
    """An error at a vector op after the look-ahead sent the next MATVEC's weights: the status
    is IsaSim's (VBUF_RANGE at the vector op, no WATCHDOG), and the drain sends that MATVEC's
    MPU command (with its ARGMAX) so its tiles are taken, not left for the next run."""
    bad = make(Op.VEXP, dst=128, a=64, len=100)  # dst inside a at another start
    p = _prefetch_program([_VECTOR_OPS[0], bad, _VECTOR_OPS[2]])
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, argmax=0)
    assert got["status"] == Status.VBUF_RANGE and got["error_pc"] == 3
    assert [e[3] for e in log if e[0] == "read"] == [1, 5]
    assert [e[5:7] for e in log if e[0] == "mpu"] == [(0, 4), (8, 0)]


def _when(got, log, entry):
    """The cycle of the first log entry that starts with ``entry``."""
    return next(c for e, c in zip(log, got["cycles"], strict=True) if e[: len(entry)] == entry)


def test_lookahead_queues_matvecs_past_matvecs():
    """The scan goes on past a MATVEC it prefetched: behind a long MATVEC, the reads of the two
    MATVECs after the vector ops go out before the first vector op, in program order, and each
    MATVEC's MPU command still waits for the vector ops before it."""
    p = [
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        make(Op.VADD, dst=512, a=256, b=384, len=64),
        make(Op.MATVEC, dst=640, src=512, line=20, rows=64, cols=64),
        make(Op.VEXP, dst=768, a=640, len=64),
        make(Op.MATVEC, dst=896, src=768, line=30, rows=64, cols=64, flags=2, rd=7),
        make(Op.STW, rs=7, line=OUT_LINE),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=80, argmax=0)
    assert got["status"] == 0 and got["tokens"] == 1
    assert _order(log) == [
        ("read", 0),
        ("mpu",),
        ("read", 2),
        ("read", 4),
        ("vpu",),
        ("mpu",),
        ("vpu",),
        ("mpu",),
    ]
    # both reads while the first MATVEC runs (80 cycles)
    assert _when(got, log, ("read", ReadKind.TILES, 30 * isa.LINE)) < _when(got, log, ("vpu",))


def test_lookahead_stops_after_an_argmax_matvec():
    """A prefetched MATVEC ... ARGMAX ends the scan (its register may change what follows):
    the MATVEC after it is read only once Exec is past it."""
    p = [
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        make(Op.VADD, dst=512, a=256, b=384, len=64),
        make(Op.MATVEC, dst=640, src=512, line=20, rows=64, cols=64, flags=2, rd=7),
        make(Op.VEXP, dst=768, a=640, len=64),
        make(Op.MATVEC, dst=896, src=768, line=30, rows=64, cols=64),
        make(Op.STW, rs=7, line=OUT_LINE),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=80, argmax=0)
    assert got["status"] == 0
    order = _order(log)
    assert order.index(("read", 2)) < order.index(("vpu",))
    assert order.index(("read", 4)) > order.index(("mpu",), order.index(("read", 2)))


def test_a_stop_sends_every_prefetched_matvec():
    """An error at a vector op after the look-ahead sent two MATVECs' weights: both MPU
    commands go out in the drain, in order, so none of their tiles is left behind."""
    p = [
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        make(Op.VADD, dst=512, a=256, b=384, len=64),
        make(Op.VEXP, dst=128, a=64, len=100),  # dst inside a at another start: VBUF_RANGE
        make(Op.MATVEC, dst=640, src=512, line=20, rows=64, cols=64),
        make(Op.MATVEC, dst=768, src=512, line=30, rows=128, cols=64),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=80, argmax=0)
    assert got["status"] == Status.VBUF_RANGE and got["error_pc"] == 2
    assert [e[3] for e in log if e[0] == "read"] == [0, 3, 4]
    assert [e[1] for e in log if e[0] == "mpu"] == [64, 64, 128]


def test_loadv_runs_beside_a_matvec_whose_rows_it_does_not_meet():
    """A LOADV whose rows meet neither the running MATVEC's x nor its results is read while the
    MATVEC runs; one that meets its results, or its x, waits until the MPU is done."""
    for dst, beside in ((640, True), (256, False), (0, False), (320, True)):
        p = [
            make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
            make(Op.LOADV, dst=dst, len=64, line=30),
            make(Op.VADD, dst=512, a=256, b=384, len=64),
            make(Op.HALT),
        ]
        got, log, _ = check_against_isasim(p, {}, mpu_cycles=80)
        assert got["status"] == 0
        mpu = _when(got, log, ("mpu",))
        loadv = _when(got, log, ("read", ReadKind.ROWS))
        assert (loadv < mpu + 80) == beside, (dst, mpu, loadv)


def test_loadv_waits_for_a_pending_matvec():
    """A MATVEC whose MPU command waits (here for the VPU) comes first: a LOADV after it,
    whose rows would arrive behind that MATVEC's tiles, waits until the command is sent."""
    p = [
        make(Op.VSET, dst=0, imm=0x3C00, len=64),
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        make(Op.LOADV, dst=640, len=64, line=30),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=20, vpu_cycles=50)
    assert got["status"] == 0
    assert _when(got, log, ("read", ReadKind.ROWS)) > _when(got, log, ("mpu",))


def test_stores_go_back_to_back():
    """Stores only read the VBUF: a run of them goes out without waiting for the one before
    to finish reading (``busy.store``), and the vector op after them waits until they have."""
    p = [
        make(Op.VSET, dst=0, imm=0x3C00, len=192),
        *(make(Op.STOREV, src=64 * i, len=64, line=30 + i) for i in range(3)),
        make(Op.VADD, dst=0, a=0, b=0, len=64),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, store_cycles=20)
    assert got["status"] == 0
    stores = [c for e, c in zip(log, got["cycles"], strict=True) if e[0] == "store"][:3]
    assert stores[2] - stores[0] < 20, stores
    vpu = [c for e, c in zip(log, got["cycles"], strict=True) if e[0] == "vpu"]
    assert vpu[1] >= stores[2] + 20, (stores, vpu)


def test_a_store_runs_beside_vector_ops_that_write_other_rows():
    """A store waits for the vector ops running only when one of them may write a row it
    reads (``vpu_rows``): the first STOREV (row 0) goes out while the VMUL (row 4) runs, the
    second (row 4) waits until the VPU is done; beside a VDOT of 128 elements, whose one result
    is in row 5, a store of row 6 goes out and one of row 5 waits."""
    p = [
        make(Op.VSET, dst=0, imm=0x3C00, len=192),
        make(Op.SYNC),
        make(Op.VMUL, dst=256, a=0, b=64, len=64),
        make(Op.STOREV, src=0, len=64, line=30),
        make(Op.STOREV, src=256, len=64, line=31),
        make(Op.VDOT, dst=320, a=0, b=64, len=128),
        make(Op.STOREV, src=384, len=64, line=32),
        make(Op.STOREV, src=320, len=1, line=33),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, vpu_cycles=30)
    assert got["status"] == 0
    at = list(zip(log, got["cycles"], strict=True))
    vpu = [c for e, c in at if e[0] == "vpu"]
    stores = [c for e, c in at if e[0] == "store" and e[1] != StoreKind.STATUS]
    assert stores[0] < vpu[1] + 30, (vpu, stores)  # beside the VMUL
    assert stores[1] >= vpu[1] + 30, (vpu, stores)  # the VMUL's row: after it
    assert stores[2] < vpu[2] + 30, (vpu, stores)  # beside the VDOT (row 6 is not its)
    assert stores[3] >= vpu[2] + 30, (vpu, stores)  # the VDOT's result row: after it


# A forwarding product's fields (tandem.isa): R2 live rows or columns, the row or column
# forwarded from R6 past src (LIVE_ROWS) or dst (LIVE_COLS); _behind_a_waiting_vector_op sets both
_FWD_ROW = {"flags": int(isa.MatFlag.LIVE_ROWS), "lreg": 2, "sreg": 6}
_FWD_COL = {"flags": int(isa.MatFlag.LIVE_COLS), "lreg": 2, "sreg": 6}


def _read_and_store_cycles(got, log):
    """The cycle of each read by its tag (pc), and of the first store, from a run's log."""
    at = dict(zip(log, got["cycles"], strict=True))
    reads = {e[3]: c for e, c in at.items() if e[0] == "read"}
    return reads, next(c for e, c in at.items() if e[0] == "store")


def _behind_a_waiting_vector_op(ones: int) -> list:
    """Six words, pcs 0-5: R2 = 5 (live rows or columns), R4 = 4 (the position a store writes),
    R6 = 128 (the forwarding offset), VBUF[0:ones] = 1.0, a long MATVEC and a vector op waiting
    for it, from which the look-ahead scans what follows."""
    return [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=4, imm=4),
        make(Op.SETI, rd=6, imm=128),
        make(Op.VSET, dst=0, imm=0x3C00, len=ones),
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),
        make(Op.VMUL, dst=512, a=256, b=384, len=64),
    ]


def _forwarding_program(second_fwd: bool):
    """A long MATVEC; a vector op waiting for it; a store (K row R4 of the matrix at line 40);
    a forwarding product over that matrix (row R2 - 1 from VBUF[0 + R6]); a second MATVEC
    (forwarding or not) over another matrix; HALT."""
    fwd = _FWD_ROW
    second = fwd if second_fwd else {}
    return [
        *_behind_a_waiting_vector_op(256),
        make(Op.STROW, src=128, len=64, line=40, ri=4, cols=64),
        make(Op.MATVEC, dst=640, src=0, line=40, rows=64, cols=64, **fwd),
        make(Op.MATVEC, dst=704, src=64, line=50, rows=64, cols=64, **second),
        make(Op.HALT),
    ]


@pytest.mark.parametrize("second_fwd", [False, True], ids=["then-plain", "then-fwd"])
def test_forwarding_products_are_read_beside_stores(second_fwd):
    """A forwarding product's read need not wait for stores (tandem.isa): the look-ahead, from
    the vector op waiting for the running MATVEC, passes the store and sends the forwarding
    product's read before it; after a store it prefetches nothing else (a plain MATVEC's read
    waits for the store's write response, ``busy.dma_write``). The MPU command carries the
    forwarded row's index (R2 - 1 = 4) and VBUF row ((0 + R6) / 64 = 2)."""
    got, log, _ = check_against_isasim(
        _forwarding_program(second_fwd), {}, mpu_cycles=60, write_cycles=50
    )
    assert got["status"] == 0
    reads, store = _read_and_store_cycles(got, log)
    assert reads[7] < store, (reads, store)  # prefetched past the store
    mpus = [e for e in log if e[0] == "mpu"]
    assert mpus[1][-3:] == ("fwd", 4, 2)
    if second_fwd:
        assert reads[8] < store
        assert mpus[2][-3:] == ("fwd", 4, 3)
    else:
        assert reads[8] >= store + 50, (reads, store)  # after the write's response
        assert "fwd" not in mpus[2]


def test_forwarded_columns_are_read_beside_stores():
    """The value products (tandem.isa: LIVE_COLS with sreg, the last live column from
    VBUF[dst + R[sreg]]) are read beside the STCOL that writes that column: prefetched by the
    look-ahead past the store, with the column's index (R2 - 1 = 4) and VBUF row
    ((640 + R6) / 64 = 12) in the MPU command; a plain product after them waits for the
    store's response. (The V matrix at line 80 lies clear of the HBM bytes the harness
    compares: it does not apply column stores.)"""
    fwd = _FWD_COL
    p = [
        *_behind_a_waiting_vector_op(1024),
        make(Op.STCOL, src=768, len=64, line=80, ri=4, cols=64),
        make(Op.MATVEC, dst=640, src=0, line=80, rows=64, cols=64, **fwd),
        make(Op.MATVEC, dst=704, src=64, line=80, rows=64, cols=64, **fwd),
        make(Op.MATVEC, dst=896, src=64, line=50, rows=64, cols=64),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, write_cycles=50)
    assert got["status"] == 0
    reads, store = _read_and_store_cycles(got, log)
    assert reads[7] < store and reads[8] < store, (reads, store)  # prefetched past the store
    assert reads[9] >= store + 50, (reads, store)  # after the write's response
    mpus = [e for e in log if e[0] == "mpu"]
    assert mpus[1][-3:] == ("fwd-col", 4, 12)
    assert mpus[2][-3:] == ("fwd-col", 4, 13)
    assert "fwd" not in mpus[3] and "fwd-col" not in mpus[3]


@pytest.mark.parametrize("dst, status", [(3904, 0), (3968, Status.VBUF_RANGE)])
def test_forwarded_column_counts_from_dst(dst, status):
    """A forwarded column is VBUF[dst + R[sreg]] (tiny: 4,096 elements): with R6 = 128 it is
    the buffer's last row (4,032) from dst = 3,904, past the buffer from dst = 3,968 (whose own
    64 rows fit); src (0) plays no part. VBUF_RANGE at the product's pc, with no read."""
    fwd = _FWD_COL
    p = [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=6, imm=128),
        make(Op.MATVEC, dst=dst, src=0, line=40, rows=64, cols=64, **fwd),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {})
    assert got["status"] == status
    if status:
        assert got["error_pc"] == 2
        assert not [e for e in log if e[0] == "read" and e[1] == ReadKind.TILES]
    else:
        assert next(e for e in log if e[0] == "mpu")[-3:] == ("fwd-col", 4, 63)


def test_a_scan_after_queued_forwarding_products_stays_past_the_store():
    """A scan from a vector op (VADD, waiting for MATVEC A) prefetches B, passes VMUL and the
    store, prefetches the forwarding product C and stops at the plain D. Exec then holds the
    VMUL (waiting for B) and a new scan starts after C, the newest queued MATVEC, with the
    store still ahead of Exec: it must still count as past a store, so D's read waits for the
    store's write response (a plain read sent before the store would read stale rows)."""
    fwd = _FWD_ROW
    p = [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=4, imm=4),
        make(Op.SETI, rd=6, imm=128),
        make(Op.VSET, dst=0, imm=0x3C00, len=256),
        make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),  # A
        make(Op.VADD, dst=512, a=256, b=384, len=64),
        make(Op.MATVEC, dst=768, src=0, line=60, rows=64, cols=64),  # B
        make(Op.VMUL, dst=832, a=768, b=384, len=64),
        make(Op.STROW, src=128, len=64, line=40, ri=4, cols=64),
        make(Op.MATVEC, dst=640, src=0, line=40, rows=64, cols=64, **fwd),  # C
        make(Op.MATVEC, dst=704, src=64, line=50, rows=64, cols=64),  # D
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=60, write_cycles=50)
    assert got["status"] == 0
    reads, store = _read_and_store_cycles(got, log)
    assert reads[6] < store and reads[9] < store, (reads, store)  # B and C prefetched
    assert reads[10] >= store + 50, (reads, store)


def test_a_scan_after_exec_passed_the_store_is_not_past_it():
    """The first scan (from the VMUL waiting for A) passes the store, prefetches the forwarding
    products C1 and C2 and stops at the plain D. Exec issues the store and C1 and waits at VMUL2
    (for C1) with C2 still queued: the new scan starts after C2, but the store is behind Exec
    now, in flight or written, so D is prefetched as soon as the store's write is answered,
    while VMUL2 still waits (not when Exec reaches D)."""
    fwd = _FWD_ROW
    p = [
        *_behind_a_waiting_vector_op(256),
        make(Op.STROW, src=128, len=64, line=40, ri=4, cols=64),
        make(Op.MATVEC, dst=640, src=0, line=40, rows=64, cols=64, **fwd),  # C1
        make(Op.VMUL, dst=960, a=640, b=384, len=64),  # VMUL2
        make(Op.MATVEC, dst=704, src=64, line=40, rows=64, cols=64, **fwd),  # C2
        make(Op.MATVEC, dst=896, src=64, line=50, rows=64, cols=64),  # D
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=150, write_cycles=50)
    assert got["status"] == 0
    reads, store = _read_and_store_cycles(got, log)
    at = dict(zip(log, got["cycles"], strict=True))
    vmul2 = next(c for e, c in at.items() if e[0] == "vpu" and e[2] == 960)
    assert reads[7] < store and reads[9] < store, (reads, store)  # C1, C2 past the store
    assert store + 50 <= reads[10] < vmul2, (reads, store, vmul2)


@pytest.mark.parametrize("read_delay", [1, 30])
def test_a_store_error_comes_before_a_prefetched_reads(read_delay):
    """The K row's store (pc 6) and the forwarding product over it (pc 7) are both past
    ``hbm_bytes``; the product's read goes out before the store (the look-ahead passes it) and
    its error may come first (delay 1) or after the store's (30): the run stops with the
    store's pc either way, as in the ISA simulator."""
    got, log, _res = check_against_isasim(
        _forwarding_program(False),
        {"hbm_bytes": 2688},
        mpu_cycles=60,
        write_cycles=50,
        bad_tags={6: 5, 7: read_delay},
    )
    assert got["status"] == Status.HBM_RANGE and got["error_pc"] == 6
    reads, store = _read_and_store_cycles(got, log)
    assert reads[7] < store, (reads, store)  # the read did go first


def test_a_prefetched_reads_error_waits_for_exec():
    """MATVEC B's read (pc 7) is prefetched while the VMUL waits for A, and fails at once; the
    run goes on to the VADD at pc 6, whose VBUF operand is out of range, and stops there with
    VBUF_RANGE (the ISA simulator's first error). Without a bad VADD it stops at B's pc."""
    for dst, status, pc in ((4096, Status.VBUF_RANGE, 6), (0, Status.HBM_RANGE, 7)):
        p = [
            make(Op.VSET, dst=0, imm=0x3C00, len=256),
            make(Op.SETI, rd=1, imm=0),
            make(Op.SETI, rd=1, imm=0),
            make(Op.SETI, rd=1, imm=0),
            make(Op.MATVEC, dst=256, src=0, line=10, rows=64, cols=64),  # A
            make(Op.VMUL, dst=512, a=256, b=384, len=64),
            make(Op.VADD, dst=dst, a=0, b=0, len=64),
            make(Op.MATVEC, dst=640, src=0, line=50, rows=64, cols=64),  # B
            make(Op.HALT),
        ]
        got, log, _ = check_against_isasim(
            p, {"hbm_bytes": 2816}, mpu_cycles=60, bad_tags={7: 1}
        )
        assert (got["status"], got["error_pc"]) == (status, pc)
        at = dict(zip(log, got["cycles"], strict=True))
        reads = {e[3]: c for e, c in at.items() if e[0] == "read"}
        vmul = next(c for e, c in at.items() if e[0] == "vpu" and e[2] == 512)
        assert reads[7] + 10 < vmul, (reads, vmul)  # B's error came long before


def test_forwarding_product_without_lookahead_ignores_writes():
    """Exec itself sends a forwarding product's read while a write is outstanding (no vector
    op before it, so no look-ahead); a plain MATVEC waits for the response."""
    fwd = _FWD_ROW
    p = [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=4, imm=4),
        make(Op.SETI, rd=6, imm=128),
        make(Op.STROW, src=128, len=64, line=40, ri=4, cols=64),
        make(Op.MATVEC, dst=640, src=0, line=40, rows=64, cols=64, **fwd),
        make(Op.MATVEC, dst=704, src=64, line=50, rows=64, cols=64),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {}, mpu_cycles=4, write_cycles=50)
    assert got["status"] == 0
    reads, store = _read_and_store_cycles(got, log)
    assert reads[4] < store + 10 and reads[5] >= store + 50, (reads, store)
    # the store (pc 3) and the product (pc 4) both past hbm_bytes: the product's error comes
    # first (its read goes without waiting), the store's 30 cycles later, after Exec stopped;
    # the run reports the store, as the ISA simulator does
    got, log, _ = check_against_isasim(
        p, {"hbm_bytes": 2688}, mpu_cycles=4, write_cycles=50, bad_tags={3: 30, 4: 1}
    )
    assert (got["status"], got["error_pc"]) == (Status.HBM_RANGE, 3)


@pytest.mark.parametrize(
    "r6, status",
    [
        (96, Status.VBUF_RANGE),
        (4096, Status.VBUF_RANGE),
        (4032, 0),
        (1 << 16, Status.VBUF_RANGE),
        ((1 << 31) + 128, Status.VBUF_RANGE),
    ],
    ids=["unaligned", "past-end", "last-row", "2^16", "2^31+128"],
)
def test_forwarded_row_out_of_range(r6, status):
    """The forwarded row must be a VBUF row inside the buffer (tiny: 4,096 elements):
    VBUF_RANGE at the product's pc, as the ISA simulator says, and no read for it; the last
    row is fine."""
    fwd = _FWD_ROW
    p = [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=6, imm=r6),
        make(Op.MATVEC, dst=640, src=0, line=40, rows=64, cols=64, **fwd),
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {})
    assert got["status"] == status
    if status:
        assert got["error_pc"] == 2
        assert not [e for e in log if e[0] == "read" and e[1] == ReadKind.TILES]


@pytest.mark.parametrize("src, status", [(3968, 0), (4032, Status.VBUF_RANGE)])
def test_forwarded_row_counts_from_src(src, status):
    """The forwarded row is VBUF[src + R[sreg]]: with R6 = 64 it is the buffer's last row
    (4,032) from src = 3,968, past the buffer from src = 4,032 (whose own 64 columns fit)."""
    fwd = _FWD_ROW
    p = [
        make(Op.SETI, rd=2, imm=5),
        make(Op.SETI, rd=6, imm=64),
        make(Op.MATVEC, dst=640, src=src, line=40, rows=64, cols=64, **fwd),
        make(Op.HALT),
    ]
    got, _, _ = check_against_isasim(p, {})
    assert got["status"] == status


@pytest.mark.parametrize(
    "instr, bad",
    [
        (make(Op.VADD, dst=64, a=64, b=192, len=100), False),  # in place on a
        (make(Op.VMUL, dst=128, a=64, b=128, len=64), False),  # in place on b
        (make(Op.VEXP, dst=192, a=64, len=128), False),  # disjoint, touching
        (make(Op.VEXP, dst=128, a=64, len=100), True),  # dst inside a, other start
        (make(Op.VGELU, dst=64, a=128, len=65), True),  # a inside dst
        (make(Op.VSUB, dst=192, a=0, b=128, len=100), True),  # partial on b
        (make(Op.VSUB, dst=192, a=0, b=128, len=100, flags=1), False),  # b scalar
        (make(Op.VDOT, dst=64, a=0, b=128, len=100), False),  # reduction: reads all first
        (make(Op.VEXP, dst=128, a=64, len=0, lreg=4), False),  # zero length
    ],
    ids=lambda v: str(v) if isinstance(v, bool) else str(v).split()[0],
)
def test_partial_dst_overlap_is_a_vbuf_range_error(instr, bad):
    """tandem.isa: an element-wise op's dst either equals a vector operand or is disjoint."""
    p = [make(Op.SETI, rd=4, imm=0), make(Op.VSET, dst=0, imm=0x3C00, len=256), instr]
    got, log, _ = check_against_isasim([*p, make(Op.HALT)], {})
    if bad:
        assert got["status"] == Status.VBUF_RANGE and got["error_pc"] == 2
        assert len([e for e in log if e[0] == "vpu"]) == 1  # not issued
    else:
        assert got["status"] == 0
        assert len([e for e in log if e[0] == "vpu"]) == 2


def test_watchdog_on_a_hung_unit():
    p = [make(Op.VSET, dst=0, len=64), make(Op.SYNC), make(Op.HALT)]
    image = _image(p)
    got, _ = run_controller(image, {"watchdog": 200}, vpu_hang=True, max_cycles=2000)
    assert got["status"] & Status.WATCHDOG and got["error_pc"] == 1


def test_program_past_hbm_bytes():
    p = [make(Op.HALT)]
    got, _, res = check_against_isasim(p, {"hbm_bytes": 512})
    assert got["status"] == Status.HBM_RANGE and res.status == Status.HBM_RANGE


def test_register_operands_right_after_their_write():
    """The decode stage reads a length register (``lreg``) when it decodes the next word; a
    register written in that cycle (SETI, ADDI, an LDW's word, an ARGMAX) must not leave the
    old value in the decoded length: every length is the one written just before. Also a
    MATVEC reached by a jump straight after another MATVEC gets its own live rows."""
    p = [
        make(Op.SETI, rd=4, imm=70),
        make(Op.VEXP, dst=0, a=128, len=0, lreg=4),  # 70, written the cycle before
        make(Op.ADDI, rd=4, ra=4, imm=10),
        make(Op.VEXP, dst=0, a=128, len=0, lreg=4),  # 80
        make(Op.LDARG, rd=4, arg=2),  # n_new = 90
        make(Op.MATVEC, dst=256, src=0, line=10, rows=128, cols=64, flags=4, lreg=4),  # 90 rows
        make(Op.JMP, target=8),
        make(Op.HALT, code=5),
        make(Op.MATVEC, dst=512, src=0, line=20, rows=128, cols=64, flags=4, lreg=5),  # 0 rows
        make(Op.SETI, rd=6, imm=66),
        make(Op.STW, rs=6, line=OUT_LINE),
        make(Op.LDW, rd=4, line=OUT_LINE),  # 66, from HBM
        make(Op.VEXP, dst=0, a=128, len=0, lreg=4),  # 66
        make(Op.MATVEC, dst=0, src=512, line=30, rows=64, cols=64, flags=2 | 4, lreg=4, rd=4),
        make(Op.VEXP, dst=512, a=128, len=0, lreg=4),  # the argmax (7)
        make(Op.HALT),
    ]
    got, log, _ = check_against_isasim(p, {"n_new": 90}, argmax=7, mpu_cycles=20)
    assert got["status"] == 0
    assert [e[5] for e in log if e[0] == "vpu"] == [70, 80, 66, 7]
    assert [e[3] for e in log if e[0] == "mpu"] == [90, 0, 64]
    assert [(e[3], e[4]) for e in log if e[0] == "read" and e[1] == ReadKind.TILES] == [
        (5, 90),
        (13, 64),
    ]
