"""GPU prefill (on the CPU here) equals the hardware-faithful model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.gpu.prefill import PreparedModel, prefill
from tandem.sim.faithful import FaithfulModel, FaithfulWeights


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
    for layer in range(cfg.n_layer):
        k, v = got.kv_numpy(layer)
        np.testing.assert_array_equal(k, cache.k[layer, :, :T], err_msg=f"K layer {layer}")
        np.testing.assert_array_equal(
            v, cache.vt[layer, :, :, :T].transpose(0, 2, 1), err_msg=f"V layer {layer}"
        )


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
    res = prefill(cfg, pm, [4, 5, 6], on_layer=lambda i, k, v: seen.append((i, k.clone())))
    assert [i for i, _ in seen] == list(range(cfg.n_layer))
    for i, k in seen:
        assert (k == res.k[i]).all()


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
