"""Torch decode (``--placement gpu``) equals the hardware-faithful model's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.gpu.decode import generate
from tandem.gpu.prefill import PreparedModel
from tandem.sim.faithful import FaithfulModel


@pytest.mark.parametrize("name", ["test-tiny", "test-odd"])
@pytest.mark.parametrize("L,n_new", [(1, 5), (13, 4), (60, 5)])
def test_torch_decode_equals_faithful(name, L, n_new):
    cfg = preset(name)
    if L + n_new - 1 > cfg.n_ctx:
        pytest.skip("over the context")
    weights = random_weights(cfg, seed=7)
    ids = np.random.default_rng(L).integers(0, cfg.n_vocab, L).tolist()
    res = generate(cfg, PreparedModel(cfg, weights, "cpu"), ids, n_new)
    assert res.tokens == FaithfulModel(cfg, weights).generate(ids, n_new)
