"""The quantizers (issue 17): round to nearest (``tandem.qweights.quantize_rtn``), its placement
in a GPT-2 (``quantize_weights``), and GPTQ (``tandem.host.quantize``). Exact values on
hand-made matrices."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.qweights import (
    LM_HEAD,
    PER_CHANNEL,
    QuantizationError,
    QuantizedMatrix,
    dequantize_weights,
    quantize_rtn,
    quantize_weights,
    quantized_keys,
)


def f16(x: float) -> float:
    return float(np.float16(x))


def row(values, cols=64, fill=0.0):
    r = np.full(cols, fill)
    r[: len(values)] = values
    return r[None, :]


# ---------------------------------------------------------------------------------------------
# round to nearest


def test_rtn_asymmetric_exact_values():
    # range [-1.5, 6] over 15 steps: scale 0.5, zero 3; 0.25 and 0.75 are ties (to even)
    w = row([-1.5, 6.0, 0.25, 0.75, 1.2, -0.2])
    m = quantize_rtn(w, 4, 64)
    assert m.scale.view(np.float16).tolist() == [[0.5]]
    assert m.zero.tolist() == [[3]]
    assert m.q[0, :6].tolist() == [0, 15, 3, 5, 5, 3]
    assert m.dequantize()[0, :6].tolist() == [-1.5, 6.0, 0.0, 1.0, 1.0, 0.0]
    assert (m.q[0, 6:] == 3).all()  # zeros are exact


def test_rtn_uses_the_binary16_scale():
    # range [-1, 2]: scale 0.2 is 0.199951171875 in binary16. 0.3 / 0.2 is 1.4999999999999998
    # in float64 (q would be 1 + 5), but with the stored scale it is 1.5004 -> 2 + 5.
    m = quantize_rtn(row([-1.0, 2.0, 0.3]), 4, 64)
    s = f16(0.2)
    assert m.scales()[0, 0] == s == 0.199951171875
    assert m.zero[0, 0] == 5  # round(1 / s) = round(5.0012)
    assert m.q[0, :3].tolist() == [0, 15, 7]
    assert m.dequantize()[0, :3].tolist() == [-5 * s, 10 * s, 2 * s]
    # the zero point too: range [-0.3, 0.7], 0.3 / (1 / 15) = 4.5 ties to 4, but with the
    # binary16 scale 0.066650390625 it is 4.5011 -> 5
    m = quantize_rtn(row([-0.3, 0.7]), 4, 64)
    assert (m.scales()[0, 0], m.zero[0, 0]) == (0.066650390625, 5)


def test_rtn_symmetric_exact_values():
    # amax 6: scale 12 / 15 = 0.8 (0.7998046875), zero 8; +6 clips to 15 (GPTQ's symmetric grid)
    m = quantize_rtn(row([-6.0, 6.0, 1.0, -0.4]), 4, 64, sym=True)
    s = f16(0.8)
    assert m.scales()[0, 0] == s
    assert m.zero[0, 0] == 8
    assert m.q[0, :4].tolist() == [
        0,
        15,
        9,
        7,
    ]  # -7.5 -> -8 (tie to even); 1.25 -> 1; -0.5 -> -0 (even)
    m8 = quantize_rtn(row([-6.0, 6.0, 1.0]), 8, 64, sym=True)
    assert m8.zero[0, 0] == 128 and m8.scales()[0, 0] == f16(12 / 255)


def test_rtn_groups_are_independent_and_the_last_may_be_short():
    w = np.zeros((2, 160))
    w[0, 0], w[0, 1] = -1.5, 6.0  # group 0: scale 0.5
    w[0, 64], w[0, 65] = 0.0, 15.0  # group 1: scale 1, zero 0
    w[0, 128], w[0, 129] = -30.0, 0.0  # group 2 (32 wide): scale 2, zero 15
    m = quantize_rtn(w, 4, 64)
    assert m.n_groups == 3 and m.group == 64
    assert m.scales()[0].tolist() == [0.5, 1.0, 2.0]
    assert m.zero[0].tolist() == [3, 0, 15]
    assert m.q[0, [0, 1, 64, 65, 128, 129]].tolist() == [0, 15, 0, 15, 0, 15]
    # an all-zero row: scale 1, every q at the zero point, exact zeros back
    assert m.scales()[1].tolist() == [1.0, 1.0, 1.0]
    assert (m.q[1] == m.zero[1, 0]).all()
    assert (m.dequantize()[1] == 0).all()
    np.testing.assert_array_equal(m.dequantize()[0, [0, 1, 65, 128]], [-1.5, 6.0, 15.0, -30.0])


def test_rtn_per_channel_and_group_128():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 192))
    pc = quantize_rtn(w, 8, PER_CHANNEL)
    assert (pc.group, pc.n_groups) == (192, 1)
    lo, hi = w.min(axis=1), w.max(axis=1)
    np.testing.assert_array_equal(pc.scales()[:, 0], np.float16((hi - lo) / 255))
    g128 = quantize_rtn(w, 4, 128)
    assert (g128.group, g128.n_groups) == (128, 2)
    # every weight within half a step of its value (the range holds it)
    err = np.abs(g128.dequantize() - w)
    step = g128.scales()[:, np.arange(192) // 128]
    assert (err <= step * 0.5 + 1e-12).all()


def test_rtn_tiny_range_keeps_a_positive_scale():
    m = quantize_rtn(row([1e-12, -1e-12]), 4, 64)
    assert m.scales()[0, 0] == 2.0**-24
    assert np.isfinite(m.dequantize()).all()


@pytest.mark.parametrize(
    ("w", "bits", "group", "message"),
    [
        (row([1.0]), 3, 64, "bits must be one of (4, 8), not 3"),
        (row([1.0]), 4, 32, "group size 32 is not a multiple of the 64-element block"),
        (row([1.0]), 4, 0, "group size 0 is not a multiple"),
        (row([np.nan]), 4, 64, "w holds a non-finite value at (0, 0)"),
        (np.zeros(64), 4, 64, "w must be a non-empty 2-D float matrix"),
        (np.zeros((2, 64), dtype=np.int32), 4, 64, "w must be a non-empty 2-D float matrix"),
        (row([-6e5, 6e5]), 4, 64, "its scale overflows binary16"),
    ],
)
def test_rtn_bad_input(w, bits, group, message):
    with pytest.raises(QuantizationError, match=re.escape(message)):
        quantize_rtn(w, bits, group)


# ---------------------------------------------------------------------------------------------
# which weights of a GPT-2


def test_quantize_weights_places_each_matrix_in_core_orientation():
    cfg = preset("test-tiny")
    w = random_weights(cfg, seed=2)
    qw = quantize_weights(w, cfg, bits=4, group=64)
    keys = quantized_keys(cfg.n_layer)
    assert keys[:4] == [
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_proj.weight",
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_proj.weight",
    ]
    assert keys[-1] == LM_HEAD and len(keys) == 4 * cfg.n_layer + 1
    assert {k for k, v in qw.items() if isinstance(v, QuantizedMatrix)} == set(keys)
    assert qw["h.1.mlp.c_fc.weight"].shape == (4 * cfg.n_embd, cfg.n_embd)
    assert qw[LM_HEAD].shape == (cfg.n_vocab, cfg.n_embd)
    for k in keys:
        src = "wte.weight" if k == LM_HEAD else k
        want = quantize_rtn(w[src] if k == LM_HEAD else w[src].T, 4, 64)
        np.testing.assert_array_equal(qw[k].q, want.q)
    assert qw["wte.weight"] is w["wte.weight"] and qw["h.0.ln_1.bias"] is w["h.0.ln_1.bias"]
    flat = dequantize_weights(qw)
    assert flat["h.0.attn.c_attn.weight"].shape == w["h.0.attn.c_attn.weight"].shape
    np.testing.assert_array_equal(
        flat["h.0.attn.c_attn.weight"],
        qw["h.0.attn.c_attn.weight"].dequantize().T.astype(np.float32),
    )
    no_head = quantize_weights(w, cfg, bits=8, group=PER_CHANNEL, lm_head=False)
    assert LM_HEAD not in no_head


def test_quantize_weights_refuses_gptq_and_names_the_tensor():
    cfg = preset("test-tiny")
    w = random_weights(cfg)
    with pytest.raises(QuantizationError, match=r"tandem\.host\.quantize"):
        quantize_weights(w, cfg, bits=4, group=64, method="gptq")
    w["h.1.mlp.c_proj.weight"] = w["h.1.mlp.c_proj.weight"].copy()
    w["h.1.mlp.c_proj.weight"][3, 2] = np.inf
    with pytest.raises(QuantizationError, match=r"^h\.1\.mlp\.c_proj\.weight: .*non-finite"):
        quantize_weights(w, cfg, bits=4, group=64)


# ---------------------------------------------------------------------------------------------
# GPTQ


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    # H diagonal: no column's error can be compensated by another, so GPTQ rounds to nearest
    from tandem.host.quantize import gptq_matrix

    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 192))
    h = np.diag(rng.uniform(0.5, 2.0, 192))
    for bits, group in ((4, 64), (4, 128), (8, PER_CHANNEL)):
        got, want = gptq_matrix(w, h, bits, group), quantize_rtn(w, bits, group)
        np.testing.assert_array_equal(got.q, want.q)
        np.testing.assert_array_equal(got.scale, want.scale)
        np.testing.assert_array_equal(got.zero, want.zero)


def test_gptq_lazy_batches_change_nothing_but_the_order_of_sums():
    from tandem.host.quantize import gptq_matrix, hessian

    rng = np.random.default_rng(5)
    x = rng.normal(size=(512, 192)) @ rng.normal(size=(192, 192))
    w = rng.normal(size=(16, 192))
    h = hessian(x)
    one = gptq_matrix(w, h, 4, 64, blocksize=192)  # one batch: every update at once
    for blocksize in (128, 64, 8):
        other = gptq_matrix(w, h, 4, 64, blocksize=blocksize)
        assert (other.q != one.q).mean() < 0.002, blocksize


def test_gptq_compensates_a_column_error_exact_values():
    from tandem.host.quantize import gptq_matrix

    # one row, per channel: range [0, 1.5] -> scale 0.1 (binary16 0.0999755859375), zero 0.
    # H = [[2, 1, 0], [1, 2, 0], [0, 0, 2]] + 0.02 I (1% of the mean diagonal).
    # Column 0: 0.45 / s = 4.5011 -> q 5, error 0.45 - 5 s = -0.0498779...
    # Column 1 absorbs it (optimal brain surgeon): 0.16 + err * 1 / 2.02 = 0.13531 -> q 1,
    # where round to nearest gives round(1.6004) = 2. Column 2 is uncorrelated: 15.
    s = 0.0999755859375
    w = np.array([[0.45, 0.16, 1.5]])
    h = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    m = gptq_matrix(w, h, 4, PER_CHANNEL)
    assert m.scales()[0, 0] == s and m.zero[0, 0] == 0
    assert m.q[0].tolist() == [5, 1, 15]
    assert quantize_rtn(w, 4, PER_CHANNEL).q[0].tolist() == [5, 2, 15]
    # a dead input (never nonzero in the calibration) gets weight 0
    h_dead = h.copy()
    h_dead[1, :] = h_dead[:, 1] = 0.0
    assert gptq_matrix(w, h_dead, 4, PER_CHANNEL).dequantize()[0, 1] == 0.0


def test_gptq_beats_rtn_on_the_calibration_inputs_of_the_builtin_model():
    """GPTQ's layer output error ||W X - Q X|| is below round to nearest's for the first block's
    QKV matrix of the built-in model, on inputs from calibration text sampled from the model."""
    from tandem.checkpoint import load_weights
    from tandem.golden.reference import layer_norm
    from tandem.host.quantize import gptq_matrix, hessian, output_error, sample_calibration

    cfg, w = load_weights()
    ids = sample_calibration(w, cfg, start=0, n=4, length=64, seed=1)
    assert ids.shape == (4, 64) and (ids[:, 0] == 0).all() and ids.max() < cfg.n_vocab
    x = w["wte.weight"][ids] + w["wpe.weight"][:64]
    x = layer_norm(x, w["h.0.ln_1.weight"], w["h.0.ln_1.bias"], cfg.layer_norm_epsilon)
    x = x.reshape(-1, cfg.n_embd).astype(np.float64)
    mat = w["h.0.attn.c_attn.weight"].T.astype(np.float64)
    h = hessian(x)
    for bits, group in ((4, 64), (4, 128), (8, PER_CHANNEL)):
        rtn = output_error(mat, quantize_rtn(mat, bits, group), x)
        gptq = output_error(mat, gptq_matrix(mat, h, bits, group), x)
        assert gptq < 0.9 * rtn, (bits, group, gptq, rtn)


def test_forward_logits_is_the_float_reference():
    from tandem.golden.reference import forward
    from tandem.host.quantize import forward_logits

    cfg = preset("test-odd")
    w = random_weights(cfg, seed=3)
    ids = [5, 1, 96, 40, 7]
    np.testing.assert_allclose(
        forward_logits(w, cfg, ids), forward(w, cfg, ids, dtype=np.float64), rtol=1e-12, atol=1e-12
    )
    # quantized matrices are dequantized and the quantized LM head is used: with the embedding
    # set to the dequantized head, the tied reference computes the same
    qw = quantize_weights(w, cfg, bits=4, group=64)
    flat = dequantize_weights(qw)
    flat["wte.weight"] = qw["wte.weight"] = flat.pop(LM_HEAD)
    got = forward_logits(qw, cfg, ids)
    np.testing.assert_allclose(
        got, forward(flat, cfg, ids, dtype=np.float64), rtol=1e-12, atol=1e-12
    )
    # with the float embedding: the hidden state of the tied model times the quantized head
    qw["wte.weight"] = w["wte.weight"]
    tied = dict(qw)
    del tied[LM_HEAD]
    wte = w["wte.weight"].astype(np.float64)
    hidden = np.linalg.lstsq(wte, forward_logits(tied, cfg, ids).T, rcond=None)[0].T
    want = hidden @ qw[LM_HEAD].dequantize().T
    np.testing.assert_allclose(forward_logits(qw, cfg, ids), want, rtol=1e-9, atol=1e-9)


def test_quantize_model_gptq_sequential_on_a_tiny_preset():
    from tandem.host.quantize import quantize_model, sample_calibration

    cfg = preset("test-tiny")
    w = random_weights(cfg, seed=1)
    calib = sample_calibration(w, cfg, start=0, n=4, length=32)
    lines = []
    q = quantize_model(w, cfg, bits=4, group=64, method="gptq", calib=calib, progress=lines.append)
    assert lines == [
        "layer 1/2 quantized (GPTQ, 128 tokens)",
        "layer 2/2 quantized (GPTQ, 128 tokens)",
        "LM head quantized (GPTQ)",
    ]
    assert {k for k, v in q.items() if isinstance(v, QuantizedMatrix)} == set(
        quantized_keys(cfg.n_layer)
    )
    with pytest.raises(QuantizationError, match="method must be one of rtn, gptq, not 'awq'"):
        quantize_model(w, cfg, bits=4, group=64, method="awq")
    with pytest.raises(QuantizationError, match="GPTQ needs calibration"):
        quantize_model(w, cfg, bits=4, group=64, method="gptq")
