"""The on-device KV reshape equals tandem.layout.pack_kv_prefix, and round-trips exactly.

The reshape takes the prefill's orientation: K [n_head, T, 64] and V transposed, V^T
[n_head, 64, T]; the layout function takes V [n_head, T, 64]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem import layout as L
from tandem.geometry import GEOMETRIES
from tandem.gpu import contract as c
from tandem.gpu.reshape import reshape_kv, unreshape_kv
from tandem.seeds import seed


def _bits(rng, shape):
    return rng.integers(0, 1 << 16, shape, dtype=np.uint32).astype(np.uint16)


def _check(g, k, vt):
    """reshape_kv(k, vt) equals pack_kv_prefix(k, V), and unreshape_kv gives k, vt back."""
    kn, vtn = c.bits_to_numpy(k), c.bits_to_numpy(vt)
    n_head, T, _ = kn.shape
    kb, vb = reshape_kv(g, k, vt)
    want_k, want_v = L.pack_kv_prefix(g, kn, vtn.transpose(0, 2, 1))
    assert kb.shape == vb.shape == (g.channels, L.kv_prefix_bytes(g, n_head, T))
    np.testing.assert_array_equal(kb.numpy(), want_k)
    np.testing.assert_array_equal(vb.numpy(), want_v)
    k2, vt2 = unreshape_kv(g, kb, vb, n_head, T)
    np.testing.assert_array_equal(c.bits_to_numpy(k2), kn)
    np.testing.assert_array_equal(c.bits_to_numpy(vt2), vtn)
    assert vt2.shape == (n_head, 64, T)


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize(
    "n_head,T", [(1, 1), (2, 5), (2, 33), (3, 64), (16, 65), (4, 96), (4, 200), (2, 256)]
)
def test_reshape_matches_layout(geom, n_head, T):
    rng = np.random.default_rng(seed(T * n_head))
    k, vt = _bits(rng, (n_head, T, 64)), _bits(rng, (n_head, 64, T))
    _check(GEOMETRIES[geom], c.bits_from_numpy(k), c.bits_from_numpy(vt))


def test_reshape_rejects_bad_shapes():
    g = GEOMETRIES["tiny"]
    k = c.bits_from_numpy(np.zeros((2, 3, 32), np.uint16))
    with pytest.raises(ValueError, match="n_head, T, 64"):
        reshape_kv(g, k, k)
    k = c.bits_from_numpy(np.zeros((2, 3, 64), np.uint16))
    with pytest.raises(ValueError, match="V\\^T"):
        reshape_kv(g, k, k)  # V not transposed
    with pytest.raises(ValueError, match="T >= 1"):
        reshape_kv(g, k[:, :0], k[:, :, :0])


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("T", [5, 64, 130])
def test_reshape_takes_strided_views(geom, T):
    """K as the prefill slices it out of a [T, 3P] product, V^T as rows of a wider buffer and
    as a transposed view (its positions not unit-stride): all read in place or copied first,
    with the same bytes."""
    g = GEOMETRIES[geom]
    n_head, P = 3, 3 * 64
    rng = np.random.default_rng(seed(T))
    t = c.bits_from_numpy(_bits(rng, (T, 3 * P)))
    k = t[:, P : 2 * P].reshape(T, n_head, 64).transpose(0, 1)
    assert not k.is_contiguous()
    wide = c.bits_from_numpy(_bits(rng, (n_head, 64, T + 37)))
    vt = wide[:, :, 5 : T + 5]
    assert not vt.is_contiguous() and vt.stride(2) == 1
    _check(g, k, vt)
    _check(g, k, t[:, 2 * P :].reshape(T, n_head, 64).permute(1, 2, 0))  # V^T, stride(2) != 1


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("T", [1, 33, 64, 70, 96, 128])
@pytest.mark.parametrize("order", ["kv", "vk", "kv-gap", "kv-odd", "kv-room"])
def test_reshape_of_k_and_vt_in_one_storage(geom, T, order):
    """K and V^T in one buffer, as the prefill allocates them: one gather serves both regions
    (K first or V^T first, a gap between them, offsets not whole beats, room after V^T or
    none), the values at or past T of a partly filled last group masked off after, and the V^T
    runs that straddle T and would end past the buffer copied in. Same bytes."""
    from tandem.gpu import reshape as R

    g = GEOMETRIES[geom]
    n_head = 3
    n = n_head * T * 64
    rng = np.random.default_rng(seed(T))
    gap = {"kv-gap": 2 * g.beat_elems, "kv-odd": 3}.get(order, 0)
    room = g.beat_elems if order == "kv-room" else 0
    buf = c.bits_from_numpy(_bits(rng, (7 + 2 * n + gap + room,)))
    a, b = buf[7 : 7 + n], buf[7 + n + gap : 7 + 2 * n + gap]
    if order == "vk":
        a, b = b, a
    k, vt = a.view(n_head, T, 64), b.view(n_head, 64, T)
    assert R._joint(k, vt) is not None
    _check(g, k, vt)


def test_reshape_of_the_prefills_kv():
    """The prefill's cache, reshaped, is what the layout makes of the golden model's cache."""
    from tandem.checkpoint import random_weights
    from tandem.config import GPT2Config
    from tandem.golden.faithful import FaithfulModel
    from tandem.gpu import reshape as R
    from tandem.gpu.prefill import PreparedModel, prefill

    cfg = GPT2Config(n_vocab=50, n_ctx=130, n_embd=96, n_head=3, n_layer=2, name="test-kv")
    weights = random_weights(cfg, seed=2)
    fm = FaithfulModel(cfg, weights)
    pm = PreparedModel(cfg, fm.weights, "cpu")
    g = GEOMETRIES["small"]
    for T in (39, 128):  # one gather for both regions (tandem.gpu.reshape._joint)
        ids = [(7 * i) % cfg.n_vocab for i in range(T)]
        cache = fm.new_cache()
        fm.prefill(ids, cache)
        res = prefill(cfg, pm, ids)
        for layer in range(cfg.n_layer):
            assert R._joint(res.k[layer], res.v[layer]) is not None
            kb, vb = reshape_kv(g, res.k[layer], res.v[layer])
            want = L.pack_kv_prefix(
                g, cache.k[layer, :, :T], cache.vt[layer, :, :, :T].transpose(0, 2, 1)
            )
            assert torch.equal(kb, torch.from_numpy(want[0]))
            assert torch.equal(vb, torch.from_numpy(want[1]))
