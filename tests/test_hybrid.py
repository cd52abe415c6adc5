"""Hybrid generate: GPU prefill (on the CPU) + KV handoff + decode on the model backend equals
the hardware-faithful model's greedy tokens; bad requests and a device time-out fail cleanly."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from tandem.checkpoint import lively_weights, random_weights
from tandem.config import preset
from tandem.golden.faithful import FaithfulModel
from tandem.golden.isasim import IsaSim
from tandem.host.cli import main
from tandem.host.hybrid import HybridSession
from tandem.host.runtime import DecodeTimeout
from tandem.layout import kv_prefix_bytes


@pytest.fixture(scope="module", params=["test-tiny", "test-odd"])
def hybrid(request):
    cfg = preset(request.param)
    weights = lively_weights(cfg, seed=5)
    with HybridSession(cfg, weights, "small", "model", "cpu") as hs:
        yield cfg, weights, FaithfulModel(cfg, weights), hs


@pytest.mark.parametrize("L,n_new", [(1, 6), (4, 5), (13, 3), (7, 1)])
def test_hybrid_tokens_equal_faithful(hybrid, L, n_new):
    cfg, _, fm, hs = hybrid
    ids = np.random.default_rng(L).integers(0, cfg.n_vocab, L).tolist()
    res = hs.generate(ids, n_new)
    want = fm.generate(ids, n_new)
    assert res.tokens == want
    assert n_new < 3 or len(set(want)) > 1  # lively weights: a KV bug changes the tokens
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


def test_hybrid_rejects_a_model_that_does_not_fit_the_geometry():
    # 768 wide needs 12,352 VBUF elements; the small core has 8,192
    cfg = dataclasses.replace(preset("test-tiny"), n_embd=768, n_head=12, n_layer=1, name="wide")
    weights = random_weights(cfg, seed=0)
    with pytest.raises(ValueError, match=r"wide does not fit the small core geometry: .*8192"):
        HybridSession(cfg, weights, "small", "model", "cpu")


@pytest.fixture
def held_device(monkeypatch):
    """Every ISA-simulator run waits until the test sets the returned event: a device that does
    not finish in time. Everything else (ModelDevice's worker thread and wait, the session, the
    hybrid pipeline) is the real code."""
    gate = threading.Event()
    run = IsaSim.run

    def held(self, *args, **kw):
        gate.wait()
        return run(self, *args, **kw)

    monkeypatch.setattr(IsaSim, "run", held)
    yield gate
    gate.set()  # let any run still held finish


def test_hybrid_device_timeout_is_clean_and_retryable(held_device):
    cfg = preset("test-tiny")
    weights = lively_weights(cfg, seed=5)
    ids = [3, 1, 4, 1, 5]
    want = FaithfulModel(cfg, weights).generate(ids, 4)
    with HybridSession(cfg, weights, "small", "model", "cpu") as hs:
        with pytest.raises(DecodeTimeout) as err:
            hs.generate(ids, 4, timeout=0.05)
        msg = str(err.value)
        assert isinstance(err.value, TimeoutError)
        assert "model device did not finish decoding within the time-out of 0.05 s" in msg
        assert "3 positions from position 5" in msg and "retry with a longer time-out" in msg
        assert err.value.tokens == want[:1]  # the GPU prefill's token is handed back
        assert hs.session.running
        # a retry while that run is still going fails the same way, before writing anything
        with pytest.raises(DecodeTimeout, match="earlier request's run, which had timed out"):
            hs.generate(ids, 4, timeout=0.05)
        held_device.set()
        res = hs.generate(ids, 4, timeout=60)  # waits for the abandoned run, then reruns
        assert res.tokens == want
        assert not hs.session.running


def test_cli_reports_a_device_timeout(held_device, capsys):
    argv = ["generate", "--preset", "test-tiny", "--prompt-ids", "3,1,4", "--max-new-tokens"]
    argv += ["3", "--geometry", "small", "--no-progress", "--placement", "hybrid"]
    argv += ["--prefill-device", "cpu", "--timeout", "0.05"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "error: the model device did not finish decoding within the time-out of 0.05 s" in err
    assert "rerun with a larger --timeout" in err
