"""Quantized weights on the software backends: the faithful model and torch agree bit for bit,
the float reference dequantizes, the compiler refuses what the core cannot map,
and the faithful model stays within a measured bound of the dequantized float reference.

``python tests/test_quant_backends.py`` prints the distance table of docs/numerics.md
("Quantized weights")."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from tandem import numerics as nm
from tandem.checkpoint import (
    CheckpointError,
    builtin_checkpoint,
    lively_weights,
    load_checkpoint,
    random_weights,
)
from tandem.compiler import compile_model
from tandem.config import GPT2Config, preset
from tandem.geometry import geometry
from tandem.golden import reference
from tandem.golden.faithful import FaithfulModel, quantized_mpu_matrix
from tandem.gpu.decode import generate
from tandem.gpu.prefill import PreparedModel, prefill
from tandem.layout import LayoutError, mpu_tensors
from tandem.qweights import (
    LM_HEAD,
    PER_CHANNEL,
    QuantizationError,
    QuantizedMatrix,
    dequantize_weights,
    quantize_weights,
)
from tandem.seeds import seed

# (model, bits, group): INT8 per channel, INT4 in groups of one block and of two
CASES = [
    ("test-tiny", 8, PER_CHANNEL),
    ("test-tiny", 4, 64),
    ("test-odd", 8, PER_CHANNEL),
    ("test-odd", 4, 64),
    ("test-odd", 4, 128),
]
PROMPT = (464, 2068, 7586, 21831)  # scripts/measure_numerics.py's, reduced modulo n_vocab


def quantized(name: str, bits: int, group: int, weights_seed: int = 7):
    cfg = preset(name)
    return cfg, quantize_weights(
        lively_weights(cfg, seed=weights_seed), cfg, bits=bits, group=group
    )


@pytest.mark.parametrize("name, bits, group", CASES)
def test_torch_equals_faithful(name, bits, group):
    """Prefill (K, V^T, every position's binary16 logits) and greedy decode: torch == faithful."""
    cfg, qw = quantized(name, bits, group)
    fm = FaithfulModel(cfg, qw)
    pm = PreparedModel(cfg, qw, "cpu")
    ids = np.random.default_rng(seed(bits + group)).integers(0, cfg.n_vocab, 19).tolist()
    got = prefill(cfg, pm, ids, logits=True)
    cache = fm.new_cache()
    logits = [fm.step(t, p, cache).logits16 for p, t in enumerate(ids)]
    np.testing.assert_array_equal(got.logits16.numpy().view(np.uint16), np.stack(logits))
    for layer in range(cfg.n_layer):
        k, vt = got.kv_numpy(layer)
        np.testing.assert_array_equal(k, cache.k[layer, :, : len(ids)])
        np.testing.assert_array_equal(vt, cache.vt[layer, :, :, : len(ids)])
    tokens = generate(cfg, pm, ids[:5], 12).tokens
    assert tokens == fm.generate(ids[:5], 12)
    assert len(set(tokens)) > 1


@pytest.mark.parametrize(
    "bits, cols, group, T", [(8, 100, 100, 5), (4, 200, 64, 9), (4, 300, 128, 3)]
)
def test_torch_matmul_equals_numerics(bits, cols, group, T, monkeypatch):
    """The torch contract on quantized matrices with any scale (negative, subnormal, zero,
    non-finite), inputs with special values, row slices, the transposed product and small T
    chunks: every row equals numerics.matvec_quant."""
    from tandem.gpu import contract as c

    rng = np.random.default_rng(seed(170 + bits + cols + T))
    rows = 40
    ng = -(-cols // group)
    scale = nm.to_bits(rng.normal(size=(rows, ng)) * 2.0 ** rng.integers(-16, 4, (rows, ng)))
    specials = rng.random((rows, ng)) < 0.15
    scale[specials] = rng.choice(np.array(nm.EDGE_BITS, np.uint16), int(specials.sum()))
    m = QuantizedMatrix(
        q=rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8),
        scale=scale,
        zero=rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8),
        bits=bits,
        group=group,
    )
    x = nm.to_bits(rng.normal(size=(T, cols)) * 2.0 ** rng.integers(-12, 3, (T, 1)))
    x[rng.random(x.shape) < 0.03] = 0x0001
    x[-1, 7] = 0x7C00 if T > 1 else x[-1, 7]
    b = nm.to_bits(rng.normal(size=rows))
    b[3] = 0xFE00
    pm = nm.PreparedQuantMatrix(m)
    want = [nm.matvec_quant(pm, x[t], b) for t in range(T)]
    tm = c.PreparedMatrix.from_numpy(pm)
    assert isinstance(tm, c.QuantPreparedMatrix)
    for chunk in (c._CHUNK_ELEMS, 2 * pm.n_blocks * rows):
        monkeypatch.setattr(c, "_CHUNK_ELEMS", chunk)
        acc, lam, nf = c.matmul(tm, c.bits_from_numpy(x), c.bits_from_numpy(b))
        got16 = c.bits_to_numpy(c.matmul_fp16(tm, c.bits_from_numpy(x), c.bits_from_numpy(b)))
        for t, (a_ref, l_ref, nf_ref) in enumerate(want):
            np.testing.assert_array_equal(acc[t].numpy(), a_ref)
            assert int(lam[t]) == l_ref
            np.testing.assert_array_equal(nf[t].numpy(), nf_ref)
            np.testing.assert_array_equal(got16[t], nm.matvec_quant_fp16(pm, x[t], b))
        bottom = tm.row_slice(13, rows)
        got = c.matmul(bottom, c.bits_from_numpy(x), c.bits_from_numpy(b[13:]), transposed=True)
        assert torch.equal(got[0], acc[:, 13:].T) and torch.equal(got[2], nf[:, 13:].T)
    assert nf.any() and not nf.all()
    with pytest.raises(TypeError, match=r"prepared from numerics\.PreparedQuantMatrix"):
        c.QuantPreparedMatrix.from_bits(c.bits_from_numpy(x))


def test_reference_dequantizes_exactly():
    """The float reference computes with exactly ``dequantize().T``: no rounding on the way,
    in float32 and float64 (values the binary16 grid does not hold)."""
    _, qw = quantized("test-odd", 8, PER_CHANNEL)
    key = "h.1.mlp.c_fc.weight"
    exact = qw[key].dequantize().T
    assert not np.array_equal(nm.from_bits(nm.to_bits(exact)), exact)
    for dtype in (np.float32, np.float64):
        w = reference.float_weights(qw, dtype)
        assert w[key].dtype == dtype and np.array_equal(w[key], exact)
        assert np.array_equal(w[LM_HEAD], qw[LM_HEAD].dequantize())
        assert np.array_equal(reference.layer_params(qw, 1, dtype)["mlp.c_fc.weight"], exact)


@pytest.mark.parametrize("name, bits, group", CASES[:2])
def test_faithful_uses_the_quantized_contract(name, bits, group):
    """The LM head is the quantized one (numerics.matvec_quant of the hidden state), and the
    quantized model's logits are not the FP16 contract's on the same (dequantized) values."""
    cfg, qw = quantized(name, bits, group)
    fm = FaithfulModel(cfg, qw)
    r = fm.step(3, 0, fm.new_cache())
    acc, lam, _ = nm.matvec_quant(nm.PreparedQuantMatrix(qw[LM_HEAD]), r.hidden16)
    assert np.array_equal(r.acc, acc) and r.lam == lam
    fp = FaithfulModel(cfg, dequantize_weights(qw) | {"wte.weight": qw["wte.weight"]})
    fp_r = fp.step(3, 0, fp.new_cache())
    assert not np.array_equal(fp_r.hidden16, r.hidden16)


def representable(cfg: GPT2Config, weights_seed: int = 3):
    """(quantized, float) weights of ``cfg`` standing for exactly the same values: W4 in groups
    of 64 with power-of-two scales, so every weight is also a binary16 (the LM head is a
    quantized wte, and the float model's wte is its dequantization)."""
    rng = np.random.default_rng(seed(weights_seed))
    qw = quantize_weights(random_weights(cfg, seed=weights_seed), cfg, bits=4, group=64)
    for key, m in qw.items():
        if isinstance(m, QuantizedMatrix):
            pow2 = 2.0 ** rng.integers(-9, -4, m.scale.shape)
            qw[key] = QuantizedMatrix(m.q, nm.to_bits(pow2), m.zero, m.bits, m.group)
    fw = dequantize_weights(qw)
    fw["wte.weight"] = fw.pop(LM_HEAD)
    qw["wte.weight"] = fw["wte.weight"]
    return qw, fw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_dequantized_path_equals_float_path(dtype):
    cfg = preset("test-odd")
    qw, fw = representable(cfg)
    ids = [5, 1, 90, 33, 7]
    a = reference.forward(qw, cfg, ids, dtype=dtype)
    b = reference.forward(fw, cfg, ids, dtype=dtype)
    assert a.dtype == dtype and np.array_equal(a, b)
    assert reference.generate_greedy(qw, cfg, ids, 6, dtype) == reference.generate_greedy(
        fw, cfg, ids, 6, dtype
    )
    la, ca = reference.prefill(qw, cfg, ids, dtype)
    lb, cb = reference.prefill(fw, cfg, ids, dtype)
    assert np.array_equal(la, lb)
    assert np.array_equal(
        reference.decode_step(qw, cfg, 4, ca, dtype), reference.decode_step(fw, cfg, 4, cb, dtype)
    )
    # the logits come from the quantized LM head: negating its scales negates them
    qw2 = dict(qw)
    qw2[LM_HEAD] = QuantizedMatrix(
        qw[LM_HEAD].q, qw[LM_HEAD].scale ^ np.uint16(0x8000), qw[LM_HEAD].zero, 4, 64
    )
    assert np.array_equal(reference.forward(qw2, cfg, ids, dtype=dtype), -a)


@pytest.mark.parametrize("key", ["h.1.attn.c_attn.weight", "h.2.attn.c_proj.weight"])
def test_head_padding_is_the_layouts(key):
    """On test-odd (3 heads of 32, padded to 64), the quantized matrix as the core computes
    with it stands for exactly the binary16 matrix mpu_tensors makes of the same values."""
    cfg = preset("test-odd")
    qw, fw = representable(cfg)
    padded = quantized_mpu_matrix(cfg, key, qw[key])
    want = nm.from_bits(mpu_tensors(cfg, fw)[key]).astype(np.float64)
    assert padded.shape == want.shape == ((3 * 192, 96) if "c_attn" in key else (96, 192))
    assert np.array_equal(padded.dequantize(), want)
    assert (np.abs(want) > 0).mean() > 0.4  # not a matrix of zeros


def test_head_straddling_a_group_is_refused():
    cfg = GPT2Config(n_vocab=50, n_ctx=16, n_embd=144, n_head=3, n_layer=1, name="hd48")
    qw = quantize_weights(random_weights(cfg, seed=1), cfg, bits=4, group=64)
    with pytest.raises(
        QuantizationError,
        match=r"h.0.attn.c_proj.weight: head 1 \(columns "
        r"48..95\) straddles two groups of 64",
    ):
        FaithfulModel(cfg, qw)
    # per channel, the same model is fine
    FaithfulModel(cfg, quantize_weights(random_weights(cfg, seed=1), cfg, bits=8, group=-1))


def test_misplaced_quantized_weights_are_refused():
    cfg, qw = quantized("test-tiny", 4, 64)
    m = qw["h.0.mlp.c_fc.weight"]
    bad = dict(qw)
    bad["h.0.mlp.c_proj.weight"] = m  # [256, 64], expected [64, 256]
    with pytest.raises(
        CheckpointError,
        match=r"'h.0.mlp.c_proj.weight' has shape \(256, 64\), "
        r"expected \(64, 256\)",
    ):
        FaithfulModel(cfg, bad)
    with pytest.raises(CheckpointError, match=r"'h.0.mlp.c_proj.weight' has shape"):
        PreparedModel(cfg, bad, "cpu")
    bad = dict(qw)
    bad["wpe.weight"] = m
    with pytest.raises(CheckpointError, match=r"'wpe.weight' is quantized, but only"):
        FaithfulModel(cfg, bad)


def test_compiler_refuses_what_the_core_cannot_map():
    """The compiler places quantized weights (tests/test_quant_isasim.py runs them); a head
    straddling two groups is one clear LayoutError, on every path that compiles."""
    from tandem.host.runtime import Session

    cfg = GPT2Config(n_vocab=50, n_ctx=16, n_embd=144, n_head=3, n_layer=1, name="hd48")
    qw = quantize_weights(random_weights(cfg, seed=1), cfg, bits=4, group=64)
    msg = r"h.0.attn.c_proj.weight: head 1 \(columns 48..95\) straddles two groups of 64"
    with pytest.raises(LayoutError, match=msg):
        compile_model(cfg, qw, geometry("tiny"))
    with pytest.raises(LayoutError, match=msg):
        Session(cfg, qw, "tiny", backend="model")


# --------------------------------------------------------------------------------------------
# distance from the dequantized float reference (the method of scripts/measure_numerics.py)


def measure(cfg: GPT2Config, weights, prompt, steps: int) -> dict:
    """Teacher-forced: the float64 reference (dequantized) greedy-decodes ``steps - 1`` tokens
    after ``prompt``; at each of the ``steps`` positions from ``len(prompt) - 1`` on, the
    faithful logits (``acc * 2**lam``) are compared with the reference's. Returns per-step
    ``logits_rel`` (``max|a - b| / max|b|``) and ``top1`` (same argmax)."""
    prompt = [t % cfg.n_vocab for t in prompt]
    steps = min(steps, cfg.n_ctx - len(prompt) + 1)
    gen = reference.generate_greedy(weights, cfg, prompt, steps - 1, dtype=np.float64)
    ids = prompt + gen
    ref = reference.forward(weights, cfg, ids, dtype=np.float64)
    fm = FaithfulModel(cfg, weights)
    cache = fm.new_cache()
    first = len(prompt) - 1
    if first:
        fm.prefill(ids[:first], cache)
    rel, top1 = np.empty(steps), np.empty(steps, bool)
    for j in range(steps):
        r = fm.step(ids[first + j], first + j, cache)
        b = ref[first + j]
        rel[j] = np.max(np.abs(r.logits() - b)) / np.max(np.abs(b))
        top1[j] = r.token == int(np.argmax(b))
    return {"logits_rel": rel, "top1": top1, "steps": steps}


# The stated bounds (docs/numerics.md, "Quantized weights"): the quantized contract adds no more
# error to the dequantized model than the FP16 contract adds to a float model (whose bound in
# tests/test_faithful.py is 5e-3 with 95% top-1 on random weights).
MAX_REL = 5e-3
MIN_TOP1 = 0.95


@pytest.mark.parametrize("name, bits, group", [c for c in CASES if c[2] != 128])
def test_faithful_within_bound_of_dequantized_reference(name, bits, group):
    cfg = preset(name)
    qw = quantize_weights(random_weights(cfg, seed=0), cfg, bits=bits, group=group)
    m = measure(cfg, qw, PROMPT, 48)
    assert m["logits_rel"].max() < MAX_REL
    assert m["top1"].mean() >= MIN_TOP1
    assert m["logits_rel"].max() > 0  # the contract is not the float computation


def main() -> int:
    """Print the table of docs/numerics.md (random_weights seed 0; the built-in model)."""
    rows = []
    models = [("test-tiny", 256), ("test-odd", 256), ("shakespeare", 64)]
    for name, steps in models:
        if name == "shakespeare":
            cfg, w = load_checkpoint(builtin_checkpoint())
        else:
            cfg, w = preset(name), random_weights(preset(name), seed=0)
        for label, bits, group in (
            ("FP16", None, None),
            ("W8 per channel", 8, PER_CHANNEL),
            ("W4 group 64", 4, 64),
        ):
            t0 = time.perf_counter()
            qw = w if bits is None else quantize_weights(w, cfg, bits=bits, group=group)
            m = measure(cfg, qw, PROMPT, steps)
            rows.append(
                f"| `{name}` | {label} | {m['steps']} | {m['logits_rel'].max():.1e} | "
                f"{m['logits_rel'].mean():.1e} | {m['top1'].mean():.1%} "
                f"({int(m['top1'].sum())}/{m['steps']}) | {time.perf_counter() - t0:.0f} s |"
            )
            print(rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
