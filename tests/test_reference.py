"""The float reference against Hugging Face transformers, and its KV-cache decode against itself.

Tolerance against HF (both float32): max |ours - hf| / max |hf| <= 1e-4 on the logits.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tandem.checkpoint import load_checkpoint, random_weights
from tandem.config import preset
from tandem.golden import reference as ref

HF_REL_TOL = 1e-4


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, printed for every comparison as in llm.c's check_tensor."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.mark.parametrize("name", ["odd", "tiny"])
def test_forward_matches_hf(hf_gpt2, name):
    model, directory = hf_gpt2(name)
    cfg, weights = load_checkpoint(directory)
    ids = np.random.default_rng(0).integers(0, cfg.n_vocab, cfg.n_ctx)  # the whole context
    ours, theirs = ref.forward(weights, cfg, ids), hf_logits(model, ids)
    assert ours.shape == theirs.shape == (cfg.n_ctx, cfg.n_vocab)
    err = rel_err(ours, theirs)
    print(f"forward {name}: rel err {err:.2e}")
    assert err <= HF_REL_TOL


def test_pytorch_bin_matches_hf(hf_gpt2, tmp_path):
    # transformers 5 writes only safetensors; a .bin is its state dict through torch.save,
    # which is what older save_pretrained wrote (with the tied lm_head.weight included).
    model, directory = hf_gpt2("odd")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg, weights = load_checkpoint(tmp_path)
    ids = np.random.default_rng(1).integers(0, cfg.n_vocab, 17)
    err = rel_err(ref.forward(weights, cfg, ids), hf_logits(model, ids))
    print(f"forward from .bin: rel err {err:.2e}")
    assert err <= HF_REL_TOL


@pytest.mark.parametrize("name", ["odd", "tiny"])
def test_greedy_matches_hf_generate(hf_gpt2, name):
    model, directory = hf_gpt2(name)
    cfg, weights = load_checkpoint(directory)
    prompt = [int(i) for i in np.random.default_rng(2).integers(0, cfg.n_vocab, 5)]
    n_new = 24
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False
        )
    theirs = out[0, len(prompt) :].tolist()
    ours = ref.generate_greedy(weights, cfg, prompt, n_new)
    assert ours == theirs
    assert len(set(ours)) > 3, "the oracle should not be a single repeated token"


@pytest.mark.parametrize(
    ("dtype", "tol"), [(np.float64, 1e-9), (np.float32, 1e-5)], ids=["float64", "float32"]
)
def test_decode_step_equals_last_row_of_forward(dtype, tol):
    cfg = preset("test-odd")
    weights = random_weights(cfg, seed=3)
    ids = np.random.default_rng(3).integers(0, cfg.n_vocab, cfg.n_ctx)
    full = ref.forward(weights, cfg, ids, dtype=dtype)
    n_prompt = 7
    logits, cache = ref.prefill(weights, cfg, ids[:n_prompt], dtype=dtype)
    assert logits.dtype == dtype
    np.testing.assert_allclose(logits, full[n_prompt - 1], rtol=0, atol=tol)
    for t in range(n_prompt, cfg.n_ctx):
        logits = ref.decode_step(weights, cfg, int(ids[t]), cache, dtype=dtype)
        assert len(cache) == t + 1
        err = rel_err(logits, full[t])
        assert err <= tol, f"position {t}: rel err {err:.2e}"
    assert [k.shape for k in cache.k] == [(cfg.n_ctx, cfg.n_embd)] * cfg.n_layer


def test_generate_greedy_equals_argmax_of_forward():
    cfg = preset("test-tiny")
    weights = random_weights(cfg, seed=4)
    ids = [5, 17, 200]
    out = ref.generate_greedy(weights, cfg, ids, 12)
    seq = list(ids)
    for _ in range(12):
        seq.append(int(np.argmax(ref.forward(weights, cfg, seq)[-1])))
    assert out == seq[len(ids) :]


def test_generate_greedy_fills_context_exactly():
    cfg = preset("test-tiny")
    weights = random_weights(cfg)
    assert len(ref.generate_greedy(weights, cfg, [1, 2], cfg.n_ctx - 2)) == cfg.n_ctx - 2
    assert ref.generate_greedy(weights, cfg, [1, 2], 0) == []


def test_embedded_default_with_tokenizer():
    from tandem.checkpoint import embedded_default
    from tandem.tokenizer import default_tokenizer

    cfg, weights = embedded_default()
    tok = default_tokenizer()
    out = ref.generate_greedy(weights, cfg, tok.encode("Hello, my name is"), 8)
    assert len(out) == 8 and all(0 <= i < cfg.n_vocab for i in out)
    assert isinstance(tok.decode(out), str)


def test_primitives_match_torch():
    x = np.random.default_rng(5).normal(0, 3, (4, 33))
    g, b = np.linspace(0.5, 1.5, 33), np.linspace(-1, 1, 33)
    xt = torch.tensor(x)
    np.testing.assert_allclose(
        ref.gelu(x), torch.nn.functional.gelu(xt, approximate="tanh").numpy(), atol=1e-12
    )
    np.testing.assert_allclose(ref.softmax(x), torch.softmax(xt, -1).numpy(), rtol=1e-12)
    expect = torch.nn.functional.layer_norm(xt, (33,), torch.tensor(g), torch.tensor(b), 1e-5)
    np.testing.assert_allclose(ref.layer_norm(x, g, b, 1e-5), expect.numpy(), atol=1e-12)
    # The row max is subtracted, so large logits do not overflow.
    assert np.allclose(ref.softmax(np.array([[1000.0, 1000.0]])), 0.5)


def test_causal_mask_offsets_by_past():
    m = ref.causal_mask(2, 5)
    assert (m[0] == 0).tolist() == [True, True, True, True, False]
    assert (m[1] == 0).all()


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("test-tiny")
    return cfg, random_weights(cfg)


@pytest.mark.parametrize(
    ("ids", "n_new", "match"),
    [
        ([], 4, "non-empty"),
        ([1, 256], 4, "out of range"),
        ([-1], 4, "out of range"),
        ([1.5, 2.0], 4, "integers"),
        ([[1, 2]], 4, "1-D"),
        (list(range(60)), 5, "exceeds the context of 64"),
        ([1], -1, "non-negative"),
        ([1], 2.0, "non-negative"),
    ],
)
def test_generate_greedy_rejects_bad_input(tiny, ids, n_new, match):
    cfg, weights = tiny
    with pytest.raises(ValueError, match=match):
        ref.generate_greedy(weights, cfg, ids, n_new)


def test_forward_rejects_too_long(tiny):
    cfg, weights = tiny
    with pytest.raises(ValueError, match="65 positions exceed the context of 64"):
        ref.forward(weights, cfg, [0] * 65)


def test_decode_step_rejects_bad_cache_and_overflow(tiny):
    cfg, weights = tiny
    with pytest.raises(ValueError, match="needs a cache from prefill"):
        ref.decode_step(weights, cfg, 1, ref.KVCache())
    _, cache = ref.prefill(weights, cfg, [1] * cfg.n_ctx)
    with pytest.raises(ValueError, match="exceed the context"):
        ref.decode_step(weights, cfg, 1, cache)
    with pytest.raises(ValueError, match="out of range"):
        ref.decode_step(weights, cfg, cfg.n_vocab, cache)
