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
