"""The quantized tiled form of the HBM layout (tandem.layout, issue 17) and the MATVEC fields
that name it (tandem.isa).

The packer is checked against an independent decoder written here from the layout's docstring,
element by element (beat rows across the channels, runs of one scale beat and K tiles, lane-major
tiles, low bits first), not from the packing code."""

from __future__ import annotations

import numpy as np
import pytest

from tandem import isa
from tandem.config import preset
from tandem.geometry import geometry
from tandem.isa import IllegalInstruction, MatFlag, Op, WFmt
from tandem.layout import (
    HBMLayout,
    LayoutError,
    build_image,
    core_tensors,
    pack_quant_tiled,
    per_block,
    quant_address,
    quant_scale_offset,
    quant_stream_bytes,
    quant_tile_offset,
    quant_tiled_bytes,
    quant_wgroup,
    scale_entries,
    scale_run,
    unpack_quant_tiled,
)
from tandem.qweights import PER_CHANNEL, QuantizedMatrix, quantize_weights
from tandem.seeds import seed

# From the docstring: (bits, group size or None for the whole row) -> (K, entries per tile)
DOC_RUNS = {
    (8, 64): (16, 2),
    (8, 128): (32, 1),
    (8, 256): (32, 1),
    (8, None): (32, 1),
    (4, 64): (8, 4),
    (4, 128): (16, 2),
    (4, 256): (32, 1),
    (4, None): (32, 1),
}


def random_matrix(rng, rows, cols, bits, group) -> QuantizedMatrix:
    group = cols if group == PER_CHANNEL else group
    n_groups = -(-cols // group)
    return QuantizedMatrix(
        q=rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8),
        scale=rng.integers(0, 1 << 16, (rows, n_groups), dtype=np.uint16),
        zero=rng.integers(0, 1 << bits, (rows, n_groups), dtype=np.uint8),
        bits=bits,
        group=group,
    )


def doc_decode(geom, data, rows, cols, bits, group_size):
    """Decode a quantized tiled region by the docstring, one weight and one entry at a time:
    (q [rows_p, cols_p], per-block scale and zero [rows_p, cols_p / 64]) over the padded shape."""
    K, e = DOC_RUNS[(bits, group_size)]
    k = 16 // bits
    span = 64 * k
    lanes, stride = geom.lanes, 64 // geom.lanes
    n_cb = -(-cols // span)
    rows_p, cols_p = -(-rows // 64) * 64, n_cb * span

    def beat_row(b):  # the beat across the channels: channel 0's bytes first
        lo = b * geom.beat_bytes
        return np.concatenate([data[ch, lo : lo + geom.beat_bytes] for ch in range(geom.channels)])

    def field(lane_bytes, bit, width):
        value = 0
        for i in range(width):
            byte, shift = divmod(bit + i, 8)
            value |= ((int(lane_bytes[byte]) >> shift) & 1) << i
        return value

    q = np.full((rows_p, cols_p), -1)
    scale = np.full((rows_p, cols_p // 64), -1)
    zero = np.full((rows_p, cols_p // 64), -1)
    n_tiles = rows_p // 64 * n_cb * stride
    for t in range(n_tiles):
        run, i_run = divmod(t, K)
        tile = beat_row(run * (K + 1) + 1 + i_run)
        sbeat = beat_row(run * (K + 1))
        g, rem = divmod(t, n_cb * stride)
        cb, rb = divmod(rem, stride)
        for lane in range(lanes):
            r = g * 64 + rb * lanes + lane
            lb = tile[lane * 128 : (lane + 1) * 128]
            sb = sbeat[lane * 128 : (lane + 1) * 128]
            for j in range(span):
                q[r, cb * span + j] = field(lb, j * bits, bits)
            for blk in range(k):
                entry = i_run * e + blk // (k // e)
                scale[r, cb * k + blk] = field(sb, 16 * entry, 16)
                zero[r, cb * k + blk] = field(sb, 8 * 2 * K * e + entry * bits, bits)
    return q, scale, zero


CASES = [  # geometry, rows, cols, bits, group
    ("tiny", 97, 96, 8, PER_CHANNEL),
    ("tiny", 130, 200, 8, 64),
    ("tiny", 64, 256, 8, 128),
    ("tiny", 70, 192, 4, PER_CHANNEL),
    ("tiny", 100, 320, 4, 64),
    ("tiny", 65, 384, 4, 128),
    ("small", 97, 512, 4, 256),
    ("small", 64, 1024, 4, 512),
    ("u55c", 40, 200, 4, 64),
    ("u55c", 33, 640, 8, 128),
]


@pytest.mark.parametrize("gname, rows, cols, bits, group", CASES)
def test_pack_matches_the_documented_form(gname, rows, cols, bits, group):
    geom = geometry(gname)
    rng = np.random.default_rng(seed(rows * cols + bits))
    m = random_matrix(rng, rows, cols, bits, group)
    data = pack_quant_tiled(geom, m)
    wgroup = quant_wgroup(bits, m.group, cols)
    size = isa.WGROUPS[wgroup]
    span = 64 * 16 // bits
    size = None if size is None or size >= span else size  # one entry per tile either way
    assert DOC_RUNS[(bits, size)] == (scale_run(bits, wgroup), scale_entries(bits, wgroup))
    q, s, z = doc_decode(geom, data, rows, cols, bits, size)
    pb = per_block(m)
    nb = pb.scale.shape[1]
    assert np.array_equal(q[:rows, :cols], m.q)
    assert np.array_equal(s[:rows, :nb], pb.scale)
    assert np.array_equal(z[:rows, :nb], pb.zero)
    # padding: columns past cols hold their entry's zero point (d = 0), or 0 past the last
    # group; padding rows are all zero
    for c in range(cols, q.shape[1]):
        blk = c // 64
        want = z[:rows, blk]
        assert np.array_equal(q[:rows, c], want), c
        if blk >= nb and size is not None:  # an entry past the row's last group
            assert not s[:rows, blk].any() and not z[:rows, blk].any()
    assert not q[rows:].any() and not s[rows:].any() and not z[rows:].any()
    # the round trip through the layout's own decoder
    u = unpack_quant_tiled(geom, data, rows, cols, bits, wgroup)
    assert (u.group, u.bits) == (64, bits)
    for name in ("q", "scale", "zero"):
        assert np.array_equal(getattr(u, name), getattr(pb, name)), name
    # byte count: tiles plus one scale beat per run of K, in whole lines
    K = scale_run(bits, wgroup)
    n = -(-rows // 64) * (64 // geom.lanes) * -(-cols // span)
    assert data.shape == (geom.channels, quant_tiled_bytes(geom, rows, cols, bits, wgroup))
    assert data.shape[1] == -(-(n + -(-n // K)) * geom.beat_bytes // 64) * 64
    assert quant_stream_bytes(geom, rows, cols, bits, wgroup) == (
        n * geom.beat_bytes * geom.channels,
        -(-n // K) * geom.beat_bytes * geom.channels,
    )
    # element addresses
    r = rng.integers(0, rows, 200)
    c = rng.integers(0, cols, 200)
    ch, off, shift = quant_address(geom, 0, cols, bits, wgroup, r, c)
    assert np.array_equal((data[ch, off] >> shift) & ((1 << bits) - 1), m.q[r, c])


def test_runs_and_offsets():
    """K * e = 32 entries per lane in every case; tile t is beat t + t // K + 1."""
    for bits in (8, 4):
        for wgroup in range(4):
            k, e = scale_run(bits, wgroup), scale_entries(bits, wgroup)
            assert k * e == 32 and k * e * (16 + bits) <= 1024 < 2 * k * e * (16 + bits)
    g = geometry("tiny")
    t = np.arange(40)
    assert np.array_equal(quant_tile_offset(g, 4, 0, t) // 64, t + t // 8 + 1)
    assert np.array_equal(quant_scale_offset(g, 4, 0, t) // 64, t // 8 * 9)


@pytest.mark.parametrize(
    "bits, group, cols, code",
    [(8, 64, 512, 0), (8, 128, 512, 1), (8, 256, 512, 2), (8, 384, 768, 3), (8, 96, 96, 3),
     (4, 64, 512, 0), (4, 128, 512, 1), (4, 256, 512, 2), (4, 512, 1024, 3), (4, 192, 192, 3)],
)  # fmt: skip
def test_wgroup_codes(bits, group, cols, code):
    assert quant_wgroup(bits, group, cols) == code


@pytest.mark.parametrize(
    "bits, group, cols, msg",
    [
        (4, 192, 384, "groups of 192 columns do not map onto INT4 tiles of 256 columns"),
        (8, 192, 384, "groups of 192 columns do not map onto INT8 tiles of 128 columns"),
        (4, 320, 640, "groups of 320 columns do not map onto INT4 tiles of 256"),
        (6, 64, 128, "quantized weights are 8 or 4 bits, not 6"),
    ],
)
def test_unmappable_groups_are_refused(bits, group, cols, msg):
    with pytest.raises(LayoutError, match=msg):
        quant_wgroup(bits, group, cols)


def test_compiler_tensors_name_an_unmappable_group():
    cfg = preset("test-odd")  # n_embd 96, 4 * n_embd 384
    w = quantize_weights(_float(cfg), cfg, bits=4, group=192, lm_head=False)
    with pytest.raises(LayoutError, match=r"h.0.mlp.c_proj.weight: groups of 192 columns"):
        core_tensors(cfg, w)


def _float(cfg):
    from tandem.checkpoint import random_weights

    return random_weights(cfg, seed=3)


def test_layout_places_quantized_regions():
    cfg, g = preset("test-tiny"), geometry("tiny")
    w = quantize_weights(_float(cfg), cfg, bits=4, group=64)
    tensors, formats = core_tensors(cfg, w)
    assert formats["lm_head"] == (WFmt.INT4, 3)  # 64 columns: one group per row
    assert formats["h.1.mlp.c_proj.weight"] == (WFmt.INT4, 0)
    fp16 = HBMLayout(cfg, g)
    q = HBMLayout(cfg, g, formats=formats)
    r = q["h.0.mlp.c_fc.weight"]  # [256, 64]: 128 tiles of 2 x 256 (one block and padding)
    assert (r.wfmt, r.wgroup) == (WFmt.INT4, 3)
    assert r.nbytes == quant_tiled_bytes(g, 256, 64, 4, 3) == (128 + 4) * 64
    assert fp16["h.0.mlp.c_fc.weight"].nbytes == 4 * 32 * 64
    assert q["wte"] == fp16["wte"]
    img = build_image(q, tensors)
    got = unpack_quant_tiled(g, img.data[:, r.base :], 256, 64, 4, 3)
    assert np.array_equal(got.q, tensors["h.0.mlp.c_fc.weight"].q)
    with pytest.raises(LayoutError, match=r"no quantizable matrix region 'wpe'"):
        HBMLayout(cfg, g, formats={"wpe": (WFmt.INT8, 3)})
    wrong = dict(formats, lm_head=(WFmt.INT8, 3))
    with pytest.raises(LayoutError, match=r"lm_head: \(wfmt, wgroup\) \(<WFmt.INT4: 2>, 3\)"):
        build_image(HBMLayout(cfg, g, formats=wrong), tensors)


def test_matvec_weight_format_fields():
    pos = 8 + sum(f.width for f in isa.FORMATS[Op.MATVEC][:-2])
    assert pos == 124  # the four bits MATVEC had left
    ins = isa.make(Op.MATVEC, rows=64, cols=64, wfmt=WFmt.INT4, wgroup=1)
    word = isa.encode(ins)
    assert word >> 124 == 2 | 1 << 2
    assert isa.decode(word) == ins
    assert isa.assemble(isa.disassemble([ins])) == [ins]
    with pytest.raises(IllegalInstruction, match=r"MATVEC.wfmt = 3 is reserved"):
        isa.decode(isa.encode(isa.make(Op.MATVEC)) | 3 << 124)
    with pytest.raises(IllegalInstruction, match=r"stride = 4 with wfmt = INT8: a quantized"):
        isa.make(Op.MATVEC, wfmt=1, stride=4)
    for live in (MatFlag.LIVE_ROWS, MatFlag.LIVE_COLS):
        with pytest.raises(IllegalInstruction, match=r"sets LIVE_ROWS or LIVE_COLS"):
            isa.make(Op.MATVEC, wfmt=2, flags=live, lreg=3)
    # FP16 keeps every use
    isa.make(Op.MATVEC, stride=4, flags=MatFlag.LIVE_ROWS, lreg=3, wgroup=2)
