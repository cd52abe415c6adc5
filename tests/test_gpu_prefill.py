"""GPU prefill (on the CPU here) equals the hardware-faithful model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.golden.faithful import FaithfulModel, FaithfulWeights
from tandem.gpu.prefill import PreparedModel, prefill


@pytest.fixture(scope="module", params=["test-tiny", "test-odd"])
def model(request):
    cfg = preset(request.param)
    weights = random_weights(cfg, seed=3)
    fw = FaithfulWeights.from_float(cfg, weights)
    return cfg, weights, FaithfulModel(cfg, fw), PreparedModel(cfg, weights, "cpu")


def _check(cfg, fm, pm, ids):
    cache = fm.new_cache()
    ref = fm.prefill(ids, cache)
    got = prefill(cfg, pm, ids)
    T = len(ids)
    assert got.first_token == ref.token
    assert got.k.shape == (cfg.n_layer, cfg.n_head, T, 64)
    assert got.v.shape == (cfg.n_layer, cfg.n_head, 64, T)  # V transposed, as the core's cache
    for layer in range(cfg.n_layer):
        k, vt = got.kv_numpy(layer)
        np.testing.assert_array_equal(k, cache.k[layer, :, :T], err_msg=f"K layer {layer}")
        np.testing.assert_array_equal(vt, cache.vt[layer, :, :, :T], err_msg=f"V^T layer {layer}")


@pytest.mark.parametrize("T", [1, 2, 5, 17])
def test_prefill_equals_faithful(model, T):
    cfg, _, fm, pm = model
    ids = np.random.default_rng(T).integers(0, cfg.n_vocab, T).tolist()
    _check(cfg, fm, pm, ids)


def test_prefill_full_context(model):
    cfg, _, fm, pm = model
    ids = np.random.default_rng(99).integers(0, cfg.n_vocab, cfg.n_ctx).tolist()
    _check(cfg, fm, pm, ids)


def test_prefill_from_faithful_weights(model):
    cfg, _, fm, _ = model
    pm = PreparedModel(cfg, fm.weights, "cpu")
    _check(cfg, fm, pm, [1, 2, 3])


def test_prefill_layer_callback(model):
    cfg, _, _, pm = model
    seen = []

    def on_layer(i, k, vt):
        seen.append((i, k.clone(), vt.clone()))

    res = prefill(cfg, pm, [4, 5, 6], on_layer=on_layer)
    assert [i for i, _, _ in seen] == list(range(cfg.n_layer))
    for i, k, vt in seen:
        assert torch.equal(k, res.k[i]) and torch.equal(vt, res.v[i])
        assert vt.shape == (cfg.n_head, 64, 3)


def test_qkv_equals_the_whole_c_attn_product(model):
    """q, k and V^T from the split product equal slices of the one [T, 3P] product, including
    non-finite inputs."""
    from tandem.gpu import contract as c
    from tandem.gpu.prefill import qkv

    cfg, _, _, pm = model
    H, P, T = cfg.n_head, cfg.n_head * 64, 70
    rng = np.random.default_rng(5)
    y = rng.integers(0, 1 << 16, (T, cfg.n_embd), dtype=np.uint32).astype(np.uint16)
    y[rng.random(y.shape) < 0.8] = 0x3C00  # mostly finite rows, some inf/NaN left in
    y = c.bits_from_numpy(y)
    for lw in pm.layers:
        whole = c.matmul_fp16(lw.c_attn, y, lw.c_attn_b)  # [T, 3P]
        q, k, vt = qkv(lw, y, H)
        want = [whole[:, j * P : (j + 1) * P].reshape(T, H, 64).transpose(0, 1) for j in range(3)]
        assert torch.equal(q, want[0]) and torch.equal(k, want[1])
        assert torch.equal(vt, want[2].transpose(1, 2))
        assert c.is_nan(whole).any()


def test_prefill_rejects_bad_input(model):
    cfg, weights, _, pm = model
    with pytest.raises(ValueError, match="at least one token"):
        prefill(cfg, pm, [])
    with pytest.raises(ValueError, match="exceeds the context"):
        prefill(cfg, pm, [0] * (cfg.n_ctx + 1))
    with pytest.raises(ValueError, match="out of range"):
        prefill(cfg, pm, [cfg.n_vocab])
    other = preset("test-odd" if cfg.name == "test-tiny" else "test-tiny")
    with pytest.raises(ValueError, match=r"shape|missing|unexpected"):
        PreparedModel(other, weights, "cpu")
    with pytest.raises(ValueError, match="prepared model"):
        prefill(other, pm, [0])


def test_prefill_several_blocks():
    """Prompts over 64 positions: V^T blocks before the query's own use their full alignment."""
    from tandem.config import GPT2Config

    cfg = GPT2Config(n_vocab=50, n_ctx=160, n_embd=64, n_head=2, n_layer=1, name="test-long")
    weights = random_weights(cfg, seed=7)
    fm = FaithfulModel(cfg, weights)
    pm = PreparedModel(cfg, fm.weights, "cpu")
    for T in (65, 130):
        _check(cfg, fm, pm, np.random.default_rng(T).integers(0, cfg.n_vocab, T).tolist())
