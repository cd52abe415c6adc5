"""The on-device KV reshape equals tandem.layout.pack_kv_prefix, and round-trips exactly."""

from __future__ import annotations

import numpy as np
import pytest

from tandem import layout as L
from tandem.geometry import GEOMETRIES
from tandem.gpu import contract as c
from tandem.gpu.reshape import reshape_kv, unreshape_kv


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("n_head,T", [(1, 1), (2, 5), (3, 64), (16, 65), (4, 200)])
def test_reshape_matches_layout(geom, n_head, T):
    g = GEOMETRIES[geom]
    rng = np.random.default_rng(T * n_head)
    k = rng.integers(0, 1 << 16, (n_head, T, 64), dtype=np.uint32).astype(np.uint16)
    v = rng.integers(0, 1 << 16, (n_head, T, 64), dtype=np.uint32).astype(np.uint16)
    kb, vb = reshape_kv(g, c.bits_from_numpy(k), c.bits_from_numpy(v))
    want_k, want_v = L.pack_kv_prefix(g, k, v)
    assert kb.shape == (g.channels, L.kv_prefix_bytes(g, n_head, T))
    np.testing.assert_array_equal(kb.numpy(), want_k)
    np.testing.assert_array_equal(vb.numpy(), want_v)
    k2, v2 = unreshape_kv(g, kb, vb, n_head, T)
    np.testing.assert_array_equal(c.bits_to_numpy(k2), k)
    np.testing.assert_array_equal(c.bits_to_numpy(v2), v)


def test_reshape_rejects_bad_shapes():
    g = GEOMETRIES["tiny"]
    k = c.bits_from_numpy(np.zeros((2, 3, 32), np.uint16))
    with pytest.raises(ValueError, match="n_head, T, 64"):
        reshape_kv(g, k, k)


def test_reshape_takes_strided_views():
    """K and V as the prefill slices them out of its [T, 3P] QKV output (not contiguous)."""
    g = GEOMETRIES["u55c"]
    n_head, T = 3, 130
    rng = np.random.default_rng(1)
    qkv = rng.integers(0, 1 << 16, (T, 3 * n_head * 64), dtype=np.uint32).astype(np.uint16)
    t = c.bits_from_numpy(qkv)
    P = n_head * 64
    k, v = (t[:, j * P : (j + 1) * P].reshape(T, n_head, 64).transpose(0, 1) for j in (1, 2))
    assert not k.is_contiguous()
    kb, vb = reshape_kv(g, k, v)
    want_k, want_v = L.pack_kv_prefix(g, c.bits_to_numpy(k), c.bits_to_numpy(v))
    np.testing.assert_array_equal(kb.numpy(), want_k)
    np.testing.assert_array_equal(vb.numpy(), want_v)
