"""HBM layout: the address functions and the packers are two formulations that must agree."""

import itertools

import numpy as np
import pytest

from tandem import layout as L
from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.geometry import GEOMETRIES, CoreGeometry, geometry
from tandem.numerics import BLOCK

GEOMS = [geometry("tiny"), geometry("small"), geometry("u55c")]


def scatter_by_address(geom, shape, addr_fn, nbytes):
    """Build channel bytes element by element from an address function (the naive model)."""
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 1 << 16, size=shape).astype(np.uint16)
    out = np.zeros((geom.channels, nbytes), np.uint8)
    idx = np.indices(shape).reshape(len(shape), -1)
    ch, off = addr_fn(*idx)
    v = vals.reshape(-1)
    out[ch, off] = (v & 0xFF).astype(np.uint8)
    out[ch, off + 1] = (v >> 8).astype(np.uint8)
    return vals, out


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: g.name)
@pytest.mark.parametrize("rows,cols", [(1, 1), (64, 64), (70, 130), (3, 200)])
def test_tiled_pack_matches_addresses(geom, rows, cols):
    nbytes = L.tiled_bytes(geom, rows, cols)
    vals, want = scatter_by_address(
        geom, (rows, cols), lambda r, c: L.tiled_address(geom, 0, cols, 0, r, c), nbytes
    )
    got = L.pack_tiled(geom, vals)
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.array_equal(L.unpack_tiled(geom, got, rows, cols), vals)


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: g.name)
@pytest.mark.parametrize("n", [1, 64, 1000, 2049])
def test_vector_pack_matches_addresses(geom, n):
    nbytes = L.vector_bytes(geom, n)
    vals, want = scatter_by_address(geom, (n,), lambda i: L.vector_address(geom, 0, i), nbytes)
    assert np.array_equal(L.pack_vector(geom, vals), want)
    assert np.array_equal(L.unpack_vector(geom, want, n), vals)


def test_rows_pack_is_rows_of_vectors():
    geom = geometry("small")
    rng = np.random.default_rng(1)
    m = rng.integers(0, 1 << 16, size=(5, 300)).astype(np.uint16)
    packed = L.pack_rows(geom, m).reshape(geom.channels, 5, -1)
    for r in range(5):
        assert np.array_equal(L.unpack_vector(geom, packed[:, r], 300), m[r])


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: g.name)
def test_kv_prefix_matches_head_regions(geom):
    cfg = preset("test-odd")
    lay = L.HBMLayout(cfg, geom)
    rng = np.random.default_rng(2)
    t_len = 45
    k = rng.integers(1, 1 << 16, size=(cfg.n_head, t_len, BLOCK)).astype(np.uint16)
    v = rng.integers(1, 1 << 16, size=(cfg.n_head, t_len, BLOCK)).astype(np.uint16)
    kb, vb = L.pack_kv_prefix(geom, k, v)
    assert kb.shape[1] == L.kv_prefix_bytes(geom, cfg.n_head, t_len)
    img = L.HBMImage(geom, lay.channel_bytes)
    img.write_striped(lay["h.1.k"].base, kb)
    img.write_striped(lay["h.1.v"].base, vb)
    for h in range(cfg.n_head):
        kr = lay.kv_head(1, h, "k")
        pos, j = np.meshgrid(np.arange(t_len), np.arange(BLOCK), indexing="ij")
        ch, off = L.tiled_address(geom, kr.base, kr.cols, kr.stride, pos, j)
        got = img.data[ch, off].astype(np.uint16) | (img.data[ch, off + 1].astype(np.uint16) << 8)
        assert np.array_equal(got, k[h])
        vr = lay.kv_head(1, h, "v")
        ch, off = L.tiled_address(geom, vr.base, vr.cols, vr.stride, j, pos)  # V^T[d, t]
        got = img.data[ch, off].astype(np.uint16) | (img.data[ch, off + 1].astype(np.uint16) << 8)
        assert np.array_equal(got, v[h])
    # Nothing was written outside the prefix of the two regions.
    used = np.zeros(lay.channel_bytes, bool)
    for name in ("h.1.k", "h.1.v"):
        used[lay[name].base : lay[name].base + kb.shape[1]] = True
    assert not img.data[:, ~used].any()


def test_regions_are_disjoint_and_aligned():
    lay = L.HBMLayout(preset("gpt2"), geometry("u55c"))
    spans = sorted((r.base, r.end, r.name) for r in lay.regions.values())
    for (_, end, a), (base, _, b) in itertools.pairwise(spans):
        assert end <= base, (a, b)
    assert all(r.base % L.LINE == 0 for r in lay.regions.values())
    # gpt2 streams ~124M binary16 weights (+ the row-major embedding copies)
    assert 240e6 < lay.weight_bytes() < 420e6


def test_mpu_tensors_pad_heads():
    cfg = preset("test-odd")  # head_dim 32: padded to 64
    w = random_weights(cfg, seed=3)
    t = L.mpu_tensors(cfg, w)
    qkv = t["h.0.attn.c_attn.weight"]
    assert qkv.shape == (3 * cfg.n_head * BLOCK, cfg.n_embd)
    hd = cfg.head_dim
    conv = w["h.0.attn.c_attn.weight"].astype(np.float16).view(np.uint16)
    # k of head 2, dim 5: Conv1D column n_embd + 2*hd + 5 -> row P + 2*64 + 5
    p_width = cfg.n_head * BLOCK
    assert np.array_equal(qkv[p_width + 2 * BLOCK + 5], conv[:, cfg.n_embd + 2 * hd + 5])
    assert not qkv[p_width + 2 * BLOCK + hd : p_width + 3 * BLOCK].any()
    proj = t["h.0.attn.c_proj.weight"]
    assert proj.shape == (cfg.n_embd, p_width)
    assert not proj[:, hd:BLOCK].any()


def test_limits_name_the_broken_limit():
    with pytest.raises(L.LayoutError, match="pseudo-channel"):
        L.HBMLayout(preset("gpt2-xl"), geometry("tiny"))
    with pytest.raises(L.LayoutError, match="head_dim"):
        L.HBMLayout(preset("test-tiny").replace(n_embd=128, n_head=1), geometry("tiny"))


def test_build_image_round_trip():
    cfg, geom = preset("test-tiny"), geometry("tiny")
    lay = L.HBMLayout(cfg, geom)
    t = L.mpu_tensors(cfg, random_weights(cfg, seed=1))
    img = L.build_image(lay, t)
    r = lay["h.1.mlp.c_fc.weight"]
    back = L.unpack_tiled(geom, img.read_striped(r.base, r.nbytes), r.rows, r.cols)
    assert np.array_equal(back, t["h.1.mlp.c_fc.weight"])
    r = lay["wte"]
    row7 = img.read_striped(r.base + 7 * r.row_bytes, r.row_bytes)
    assert np.array_equal(L.unpack_vector(geom, row7, cfg.n_embd), t["wte"][7])


def test_geometry_validation():
    assert GEOMETRIES["u55c"].macs_per_cycle == 1024
    with pytest.raises(ValueError, match="power of two"):
        CoreGeometry(name="x", channels=3, port_bits=512, lanes=2)
    with pytest.raises(ValueError, match="must be equal"):
        CoreGeometry(name="x", channels=4, port_bits=512, lanes=4)
    with pytest.raises(ValueError, match="tree"):
        CoreGeometry(name="x", channels=4, port_bits=512, lanes=4, tree=32)
    ok = {"name": "x", "channels": 4, "port_bits": 512, "lanes": 2}
    with pytest.raises(ValueError, match="table_lanes must be a power of two"):
        CoreGeometry(**ok, table_lanes=24)
    with pytest.raises(ValueError, match="table_lanes must be at most 64"):
        CoreGeometry(**ok, table_lanes=128)
    with pytest.raises(ValueError, match="vpu_lanes must be at most 64"):
        CoreGeometry(**ok, vpu_lanes=128)
