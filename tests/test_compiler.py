"""The compiler: program structure, VBUF plan, image contents and the limits it checks."""

import itertools

import numpy as np
import pytest

from tandem import isa
from tandem import layout as L
from tandem.checkpoint import random_weights
from tandem.compiler import compile_model, fits, vbuf_plan
from tandem.config import preset
from tandem.geometry import geometry
from tandem.isa import MatFlag, Op
from tandem.numerics import BLOCK


@pytest.fixture(scope="module")
def odd():
    cfg = preset("test-odd")
    return compile_model(cfg, random_weights(cfg, seed=2), geometry("small"))


def test_program_is_stored_in_the_image(odd):
    region = odd.layout["program"]
    assert region.base == L.PROGRAM_BASE
    raw = isa.encode_program(odd.program)
    assert odd.image.read_channel(0, region.base, len(raw)) == raw
    assert not odd.image.data[0, region.base + len(raw) : region.end].any()  # erased: illegal
    assert len(odd.program) <= odd.geom.imem_words
    assert isa.assemble(odd.assembly()) == odd.program


def test_weights_are_placed_by_the_layout(odd):
    cfg = odd.cfg
    tensors = L.mpu_tensors(cfg, random_weights(cfg, seed=2))
    r = odd.layout["h.2.attn.c_attn.weight"]
    got = L.unpack_tiled(odd.geom, odd.image.read_striped(r.base, r.nbytes), r.rows, r.cols)
    assert np.array_equal(got, tensors["h.2.attn.c_attn.weight"])
    for name in ("h.0.k", "h.2.v"):  # KV regions start empty
        r = odd.layout[name]
        assert not odd.image.read_striped(r.base, r.nbytes).any()


def test_vbuf_plan_is_aligned_and_disjoint(odd):
    slots = sorted(odd.vbuf_map.values(), key=lambda s: s.addr)
    assert all(s.addr % isa.VBUF_ALIGN == 0 for s in slots)
    for a, b in itertools.pairwise(slots):
        assert a.end <= b.addr
    assert slots[-1].end <= odd.geom.vbuf_elems
    assert odd.vbuf_map["att"].length == odd.cfg.n_head * BLOCK
    assert odd.vbuf_map["s"].length == odd.cfg.n_ctx


def ops_between(program, start, stop):
    return [i.op for i in program[start:stop]]


def test_attention_head_is_the_normative_sequence(odd):
    prog = odd.program
    strows = [pc for pc, i in enumerate(prog) if i.op is Op.STROW]
    assert len(strows) == odd.cfg.n_layer * odd.cfg.n_head
    pc = strows[0]
    assert ops_between(prog, pc, pc + 11) == [
        Op.STROW, Op.STCOL, Op.VMUL, Op.MATVEC, Op.VMAX, Op.VSUB, Op.VEXP, Op.VDOT,
        Op.VRECIP, Op.MATVEC, Op.VMUL,
    ]  # fmt: skip
    k_mv, v_mv = prog[pc + 3], prog[pc + 9]
    assert k_mv["flags"] == MatFlag.LIVE_ROWS and k_mv["rows"] == odd.cfg.n_ctx
    assert v_mv["flags"] == MatFlag.LIVE_COLS and v_mv["cols"] == odd.cfg.n_ctx
    assert k_mv["lreg"] == v_mv["lreg"] != 0
    k = odd.layout.kv_head(0, 0, "k")
    assert k_mv["line"] * isa.LINE == k.base and k_mv["stride"] == k.stride
    # the LM head: argmax into a register, then the token goes out with STW
    lm = [i for i in prog if i.op is Op.MATVEC and i["flags"] & MatFlag.ARGMAX]
    assert len(lm) == 1 and lm[0]["rows"] == odd.cfg.n_vocab
    assert sum(i.op is Op.STW for i in prog) == 1


def test_one_matvec_per_weight_matrix_per_layer(odd):
    lines = {
        i["line"]
        for i in odd.program
        if i.op is Op.MATVEC and not i["flags"] & (MatFlag.LIVE_ROWS | MatFlag.LIVE_COLS)
    }
    tiled = {
        r.line
        for n, r in odd.layout.regions.items()
        if r.kind is L.Kind.TILED and not n.endswith((".k", ".v"))
    }
    assert lines == tiled


def test_token_and_status_helpers(odd):
    img = L.HBMImage(odd.geom, odd.layout.channel_bytes)
    odd.write_prompt(img, [5, 0, 96])
    assert L.unpack_tokens(img.read_channel(0, odd.layout["prompt"].base, 12)) == [5, 0, 96]
    img.write_channel(0, odd.layout["output"].base, L.pack_tokens([7, 8]))
    assert odd.read_output(img, 2) == [7, 8]
    rec = L.StatusRecord(status=0x11, pc=1234, tokens=3, halt_code=1, cycles=1 << 40)
    img.write_channel(0, 0, rec.pack())
    assert odd.read_status(img) == rec
    with pytest.raises(ValueError, match="do not fit the prompt area"):
        odd.write_prompt(img, [1] * (odd.cfg.n_ctx + 2))


def test_limits_name_the_geometry_field():
    cfg = preset("test-tiny")
    w = random_weights(cfg)
    with pytest.raises(L.LayoutError, match="vbuf_elems = 256"):
        compile_model(cfg, w, geometry("tiny").replace(vbuf_elems=256))
    with pytest.raises(L.LayoutError, match="imem_words = 64"):
        compile_model(cfg, w, geometry("tiny").replace(imem_words=64))
    assert "vbuf_elems" in fits(preset("gpt2"), geometry("small"))
    assert fits(preset("gpt2"), geometry("u55c")) is None
    assert fits(preset("embedded"), geometry("tiny")) is None
    # gpt2 on u55c: a few thousand instructions, VBUF well within 32K elements
    plan = vbuf_plan(preset("gpt2"), geometry("u55c"))
    assert max(s.end for s in plan.values()) <= geometry("u55c").vbuf_elems
