"""Hybrid generate: GPU prefill (on the CPU) + KV handoff + decode on the model backend equals
the hardware-faithful model's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.host.hybrid import HybridSession
from tandem.layout import kv_prefix_bytes
from tandem.sim.faithful import FaithfulModel


@pytest.fixture(scope="module", params=["test-tiny", "test-odd"])
def hybrid(request):
    cfg = preset(request.param)
    weights = random_weights(cfg, seed=5)
    with HybridSession(cfg, weights, "small", "model", "cpu") as hs:
        yield cfg, weights, FaithfulModel(cfg, weights), hs


@pytest.mark.parametrize("L,n_new", [(1, 6), (4, 5), (13, 3), (7, 1)])
def test_hybrid_tokens_equal_faithful(hybrid, L, n_new):
    cfg, _, fm, hs = hybrid
    ids = np.random.default_rng(L).integers(0, cfg.n_vocab, L).tolist()
    res = hs.generate(ids, n_new)
    assert res.tokens == fm.generate(ids, n_new)
    g = hs.geom
    assert res.kv_bytes == 2 * cfg.n_layer * g.channels * kv_prefix_bytes(g, cfg.n_head, L)
    assert len(res.transfer.layers) == cfg.n_layer


def test_hybrid_fills_the_context(hybrid):
    cfg, _, fm, hs = hybrid
    ids = np.random.default_rng(0).integers(0, cfg.n_vocab, cfg.n_ctx - 2).tolist()
    assert hs.generate(ids, 3).tokens == fm.generate(ids, 3)


def test_hybrid_rejects_bad_input(hybrid):
    cfg, weights, _, hs = hybrid
    with pytest.raises(ValueError, match="at least one token"):
        hs.generate([], 3)
    with pytest.raises(ValueError, match="exceeds the context"):
        hs.generate([0] * cfg.n_ctx, 3)
    with pytest.raises(ValueError, match="out of range"):
        hs.generate([cfg.n_vocab], 3)
    other = preset("test-odd" if cfg.name == "test-tiny" else "test-tiny")
    with pytest.raises(ValueError, match=r"shape|missing|unexpected"):
        HybridSession(other, weights, "small", "model", "cpu")
    assert hs.generate([1, 2], 0).tokens == []
