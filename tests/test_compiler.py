"""The compiler: program structure, VBUF plan, image contents and the limits it checks."""

import itertools

import numpy as np
import pytest

from tandem import isa
from tandem import layout as L
from tandem.checkpoint import random_weights
from tandem.compiler import (
    R_KOFF,
    R_POS,
    R_T,
    R_VOFF,
    compile_model,
    fits,
    head_groups,
    program,
    vbuf_plan,
)
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
    # one group of all three heads: 64-element score segments (n_ctx = 48) and scalar rows
    assert [list(g) for g in head_groups(odd.cfg, odd.vbuf_map)] == [[0, 1, 2]]
    assert odd.vbuf_map["s"].length == 3 * 64 and odd.vbuf_map["sc"].length == 3 * 64


@pytest.mark.parametrize(
    "name, groups",
    [
        ("gpt2", [12]),
        ("gpt2-medium", [8, 8]),
        ("gpt2-large", [7, 7, 6]),
        ("gpt2-xl", [3] * 7 + [2, 2]),
    ],
)
def test_heads_are_grouped_as_the_vbuf_allows(name, groups):
    """The fewest groups that fit the u55c VBUF, as equal as may be."""
    cfg, geom = preset(name), geometry("u55c")
    plan = vbuf_plan(cfg, geom)
    assert [len(g) for g in head_groups(cfg, plan)] == groups
    assert max(s.end for s in plan.values()) <= geom.vbuf_elems
    if name == "gpt2":  # half the VBUF: one head's scores fit
        half = vbuf_plan(cfg, geom.replace(vbuf_elems=16384))
        assert [len(g) for g in head_groups(cfg, half)] == [1] * 12


def ops_between(program, start, stop):
    return [i.op for i in program[start:stop]]


def test_attention_is_the_normative_sequence(odd):
    """Per layer: c_attn (and beside it the MLP biases' loads), the q scaling, one K store for
    every head, the V store of each head, then per group the score products, the softmax op by op
    over the heads, the output products and the normalisations (tandem.compiler)."""
    prog = odd.program
    H = odd.cfg.n_head
    P = H * BLOCK  # the odd model's heads are padded to 64
    strows = [pc for pc, i in enumerate(prog) if i.op is Op.STROW]
    assert len(strows) == odd.cfg.n_layer
    soft = [o for o in (Op.VMAX, Op.VSUB, Op.VEXP, Op.VDOT, Op.VRECIP) for _ in range(H)]
    for layer, pc in enumerate(strows):
        assert ops_between(prog, pc - 1, pc + H + 1 + 8 * H) == (
            [Op.VMUL, Op.STROW] + [Op.STCOL] * H + [Op.MATVEC] * H + soft
            + [Op.MATVEC] * H + [Op.VMUL] * H
        )  # fmt: skip
        c_attn = pc - 2 if layer == 0 else pc - 4  # after layer 0, the LOADVs of hm and mo
        assert ops_between(prog, c_attn, pc - 1) == [Op.MATVEC] + [Op.LOADV] * (pc - 2 - c_attn)
        assert prog[c_attn]["line"] == odd.layout[f"h.{layer}.attn.c_attn.weight"].line
    pc = strows[0]
    # the K store: row pos of the layer's K region as one dense [n_ctx, P] matrix, every head's
    # 64 columns in its block (where each head's score product reads them)
    st = prog[pc]
    k0 = odd.layout.kv_head(0, 0, "k")
    assert (st["src"], st["len"], st["cols"], st["stride"], st["line"] * isa.LINE) == (
        odd.vbuf_map["qkv"].addr + P, P, P, 0, k0.base
    )  # fmt: skip
    for h in range(H):
        kh = odd.layout.kv_head(0, h, "k")
        for r, c in ((0, 0), (5, 63), (odd.cfg.n_ctx - 1, 17)):
            want = L.tiled_address(odd.geom, kh.base, kh.cols, kh.stride, r, c)
            got = L.tiled_address(odd.geom, k0.base, P, 0, r, h * BLOCK + c)
            assert tuple(map(int, got)) == tuple(map(int, want)), (h, r, c)
    q_scale = prog[pc - 1]
    assert (q_scale["dst"], q_scale["a"], q_scale["len"]) == (
        odd.vbuf_map["qkv"].addr,
        odd.vbuf_map["qkv"].addr,
        H * BLOCK,
    )
    k_mv, v_mv = prog[pc + H + 1], prog[pc + H + 1 + 6 * H]
    assert k_mv["flags"] == MatFlag.LIVE_ROWS and k_mv["rows"] == odd.cfg.n_ctx
    assert v_mv["flags"] == MatFlag.LIVE_COLS and v_mv["cols"] == odd.cfg.n_ctx
    assert k_mv["lreg"] == v_mv["lreg"] != 0
    # the score product forwards row T-1 of K, the value product column T-1 of V^T
    assert k_mv["sreg"] == R_KOFF and v_mv["sreg"] == R_VOFF
    assert v_mv["src"] == k_mv["dst"] == odd.vbuf_map["s"].addr
    assert v_mv["dst"] == odd.vbuf_map["att"].addr
    k = odd.layout.kv_head(0, 0, "k")
    assert k_mv["line"] * isa.LINE == k.base and k_mv["stride"] == k.stride
    # the LM head: argmax into a register, then the token goes out with STW
    lm = [i for i in prog if i.op is Op.MATVEC and i["flags"] & MatFlag.ARGMAX]
    assert len(lm) == 1 and lm[0]["rows"] == odd.cfg.n_vocab
    assert sum(i.op is Op.STW for i in prog) == 1


def check_forwarded_rows(cfg, geom, prog):
    """Every layer's every head's score product forwards, as its row T-1 = pos, the K row of
    that head that the layer's STROW stores: VBUF[src + R_KOFF] is the STROW's src + h*64, and
    nothing writes it between the store and the product."""
    layout, vb = L.HBMLayout(cfg, geom), vbuf_plan(cfg, geom)
    P = cfg.n_head * BLOCK
    writes = [i for i in prog if i.get("rd", 0) == R_KOFF]
    assert [(i.op, i["imm"]) for i in writes] == [(Op.SETI, P)]  # set once, in the prologue
    assert prog.index(writes[0]) < loop_start(prog)
    koff = writes[0]["imm"]
    # T = pos + 1: the live rows end on the row the STROW (row R_POS) writes
    assert isa.make(Op.ADDI, rd=R_T, ra=R_POS, imm=1) in prog
    strows = [pc for pc, i in enumerate(prog) if i.op is Op.STROW]
    scores = [
        (pc, i)
        for pc, i in enumerate(prog)
        if i.op is Op.MATVEC and i["flags"] & MatFlag.LIVE_ROWS and not i["flags"] & MatFlag.ARGMAX
    ]
    assert len(strows) == cfg.n_layer and len(scores) == cfg.n_layer * cfg.n_head
    kbase = {
        layout.kv_head(layer, h, "k").line: (layer, h)
        for layer in range(cfg.n_layer)
        for h in range(cfg.n_head)
    }
    seen = set()
    for pc, mv in scores:
        layer, h = kbase[mv["line"]]
        seen.add((layer, h))
        st_pc = strows[layer]
        st = prog[st_pc]
        assert st_pc < pc and (layer + 1 == cfg.n_layer or pc < strows[layer + 1])
        assert st["line"] == layout.kv_head(layer, 0, "k").line and st["ri"] == R_POS
        assert (mv["sreg"], mv["lreg"], mv["cols"]) == (R_KOFF, R_T, BLOCK)
        assert isa.is_forwarding(mv)
        assert mv["src"] == vb["qkv"].addr + h * BLOCK  # q_h
        row = mv["src"] + koff
        assert row == st["src"] + h * BLOCK == vb["qkv"].addr + P + h * BLOCK  # k_h
        assert st["src"] <= row and row + BLOCK <= st["src"] + st["len"]
        check_unwritten(cfg, prog[st_pc + 1 : pc], row)  # k_h: between store and product
    assert len(seen) == cfg.n_layer * cfg.n_head


def check_unwritten(cfg, instrs, addr):
    """None of ``instrs`` writes VBUF[addr : addr + 64]."""
    for i in instrs:
        dst = i.get("dst", -1)
        n = i.get("rows") if i.op is Op.MATVEC else i.get("len")
        if i.op in (Op.MATVEC, Op.LOADV, Op.VSET) or i.unit is isa.Unit.VPU:
            n = n or cfg.n_ctx  # a register length: at most a score vector
            assert dst + n <= addr or dst >= addr + BLOCK, i


def check_forwarded_columns(cfg, geom, prog):
    """Every layer's every head's value product forwards, as its column T-1 = pos, the V column
    that head's STCOL stores: VBUF[dst + R_VOFF] (dst = att_h) is the STCOL's src, v_h = qkv +
    2P + h*64, and nothing writes it between the store and the product. R_VOFF is set once, in
    the prologue, to the plan's distance from att to v (3P: att lies just before qkv)."""
    layout, vb = L.HBMLayout(cfg, geom), vbuf_plan(cfg, geom)
    P = cfg.n_head * BLOCK
    writes = [i for i in prog if i.get("rd", 0) == R_VOFF]
    voff = vb["qkv"].addr + 2 * P - vb["att"].addr
    assert voff == 3 * P and vb["att"].end == vb["qkv"].addr
    assert [(i.op, i["imm"]) for i in writes] == [(Op.SETI, voff)]
    assert prog.index(writes[0]) < loop_start(prog)
    assert isa.make(Op.ADDI, rd=R_T, ra=R_POS, imm=1) in prog  # T - 1 = pos: the STCOL's column
    values = [
        (pc, i)
        for pc, i in enumerate(prog)
        if i.op is Op.MATVEC and i["flags"] & MatFlag.LIVE_COLS and not i["flags"] & MatFlag.ARGMAX
    ]
    assert len(values) == cfg.n_layer * cfg.n_head
    vhead = {
        layout.kv_head(layer, h, "v").line: (layer, h)
        for layer in range(cfg.n_layer)
        for h in range(cfg.n_head)
    }
    stcols = {i["line"]: pc for pc, i in enumerate(prog) if i.op is Op.STCOL}
    assert set(stcols) == set(vhead)  # one store per head and layer
    seen = set()
    for pc, mv in values:
        layer, h = vhead[mv["line"]]
        seen.add((layer, h))
        st_pc = stcols[mv["line"]]
        st = prog[st_pc]
        assert st_pc < pc and st["ri"] == R_POS and st["len"] == mv["rows"] == BLOCK
        assert (st["cols"], st["stride"]) == (mv["cols"], mv["stride"])  # the same matrix
        assert (mv["sreg"], mv["lreg"]) == (R_VOFF, R_T) and isa.is_forwarding(mv)
        assert mv["dst"] == vb["att"].addr + h * BLOCK  # att_h
        col = mv["dst"] + voff
        assert col == st["src"] == vb["qkv"].addr + 2 * P + h * BLOCK  # v_h
        check_unwritten(cfg, prog[st_pc + 1 : pc], col)  # v_h: between store and product
    assert len(seen) == cfg.n_layer * cfg.n_head


def loop_start(prog):
    """The pc of the position loop (its first instruction: pos >= n_ctx -> HALT)."""
    return next(pc for pc, i in enumerate(prog) if i.op is Op.BGE and i["ra"] == R_POS)


def test_score_products_forward_the_stored_k_row(odd):
    check_forwarded_rows(odd.cfg, odd.geom, odd.program)


def test_value_products_forward_the_stored_v_column(odd):
    check_forwarded_columns(odd.cfg, odd.geom, odd.program)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium"])  # one group of heads, and two
def test_score_products_forward_the_stored_k_row_at_gpt2_shapes(name):
    cfg, geom = preset(name), geometry("u55c")
    check_forwarded_rows(cfg, geom, program(cfg, geom))


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium"])
def test_value_products_forward_the_stored_v_column_at_gpt2_shapes(name):
    cfg, geom = preset(name), geometry("u55c")
    check_forwarded_columns(cfg, geom, program(cfg, geom))


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


def test_layer_vectors_load_beside_the_products(odd):
    """Every vector a position reads is loaded once per position: the embeddings and layer 0's
    at the top, a layer's MLP biases right after its c_attn, the next layer's LayerNorm
    parameters and attention biases (after the last layer ln_f) right after c_fc; each load's
    rows meet neither operand of the MATVEC before it (what lets the core run them beside)."""
    prog, lay, vb = odd.program, odd.layout, odd.vbuf_map
    loop = odd.labels["loop"]
    loads = [(pc, i) for pc, i in enumerate(prog) if i.op is Op.LOADV and pc > loop]
    region = {r.line: n for n, r in lay.regions.items()}
    names = [region[i["line"]] for _, i in loads]
    want = [n for n in lay.regions if lay[n].kind is L.Kind.VECTOR] + ["wte", "wpe"]
    assert sorted(names) == sorted(want)
    rows = {n: range(v.addr // BLOCK, -(-v.end // BLOCK)) for n, v in vb.items()}
    for pc, i in loads[2 + 8 :]:  # after the embeddings and layer 0's
        before = prog[pc - 1]
        k = pc - 1
        while before.op is Op.LOADV:
            k -= 1
            before = prog[k]
        assert before.op is Op.MATVEC, (pc, before)
        name = region[before["line"]]
        assert name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")), name
        dst = range(i["dst"] // BLOCK, -(-(i["dst"] + i["len"]) // BLOCK))
        src_rows = range(before["src"] // BLOCK, -(-(before["src"] + before["cols"]) // BLOCK))
        out_rows = range(before["dst"] // BLOCK, -(-(before["dst"] + before["rows"]) // BLOCK))
        assert not set(dst) & (set(src_rows) | set(out_rows)), (pc, name, region[i["line"]])
        assert set(dst) <= set(rows[next(n for n, r in rows.items() if dst[0] in r)])


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
