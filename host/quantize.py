"""Weight quantization of a GPT-2 (``tandem quantize``): round to nearest, and GPTQ.

Round to nearest is :func:`tandem.qweights.quantize_rtn` on each matrix alone. GPTQ (Frantar et
al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantizes a matrix ``W`` [out, in] one input column at a time and spreads each column's error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's loss
``||W X - Q X||^2`` over calibration inputs ``X``. This module implements it in NumPy (float64):

- calibration: token sequences of the text given (``--calib FILE``), or, without one, sequences
  sampled from the float model itself (:func:`sample_calibration`), so no text of a held-out set
  is ever used unless the caller passes it;
- sequential, layer by layer and matrix by matrix ("true sequential"): the inputs of each matrix
  are collected by running the calibration tokens through the model whose earlier matrices are
  already quantized (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` of block 0,
  then block 1, ..., then the LM head on ``ln_f``'s output);
- ``H = 2 X X^T / n`` with damping ``percdamp`` (0.01) times the mean of its diagonal, inputs that
  never fire (zero diagonal) get ``H = 1`` there and their weights 0, as in the reference code;
- the Cholesky form: the upper Cholesky factor of ``H^-1`` gives each column's error weights;
- lazy batch updates: the error of a batch of 128 columns is applied to the later columns once;
- per-group scale and zero (:func:`tandem.qweights.group_params`) computed from the group's
  weights, as updated so far, when the group's first column is reached (per channel: once, from
  the whole matrix, before the first column);
- no act-order (``desc_act``): columns are taken in their order, because the core scales
  contiguous groups of whole 64-element blocks; act-order would make a group's columns scattered
  (a non-trivial ``g_idx``), which the core cannot map.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from tandem.config import GPT2Config
from tandem.golden.reference import gelu, layer_norm, softmax
from tandem.qweights import (
    LM_HEAD,
    PER_CHANNEL,
    QuantizationError,
    QuantizedMatrix,
    check_bits,
    core_matrix,
    group_for,
    group_params,
    quantize_rtn,
    quantize_with,
    quantized_keys,
)

METHODS = ("rtn", "gptq")
PERCDAMP = 0.01
BLOCKSIZE = 128
CALIB_SEQUENCES = 64
"""Calibration sequences used at most (GPTQ's paper: 128 of 2048 tokens)."""
CALIB_LEN = 256
"""Tokens per calibration sequence at most (the model's context if shorter)."""


def default_group(bits: int) -> int:
    """``tandem quantize``'s group size when none is given: one scale per output channel
    (``PER_CHANNEL``) at 8 bits, groups of 128 at 4."""
    check_bits(bits)
    return PER_CHANNEL if bits == 8 else 128


BLAS_THREADS = 1
"""BLAS threads for the quantizer's matrix products: its matrices are small, and more threads
made sampling the built-in model's calibration text 8x slower on this project's busy 2-core
machine (9.6 s against 1.1 s for 8 x 64 tokens)."""

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# GPTQ on one matrix


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / n`` of inputs ``x`` [n, cols] (one input vector a row), float64."""
    x = np.asarray(x, dtype=np.float64)
    return 2.0 * (x.T @ x) / max(1, x.shape[0])


def _upper_inverse_cholesky(h: np.ndarray, percdamp: float) -> np.ndarray:
    """The upper Cholesky factor of ``(H + damp I)^-1``; damping raised tenfold (up to three
    times) if ``H`` is not positive definite, then QuantizationError."""
    damp = percdamp * float(np.mean(np.diag(h)))
    eye = np.eye(h.shape[0])
    for _ in range(4):
        try:
            lower = np.linalg.cholesky(h + damp * eye)
            inv_lower = np.linalg.solve(lower, eye)  # L^-1, so H^-1 = L^-T L^-1
            return np.linalg.cholesky(inv_lower.T @ inv_lower).T
        except np.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6
    raise QuantizationError("the calibration Hessian is not positive definite, even damped")


def gptq_matrix(
    w,
    h: np.ndarray,
    bits: int,
    group: int,
    *,
    sym: bool = False,
    percdamp: float = PERCDAMP,
    blocksize: int = BLOCKSIZE,
) -> QuantizedMatrix:
    """GPTQ of ``w`` (float [rows = outputs, cols = inputs]) given the Hessian ``h`` [cols, cols]
    of its inputs (:func:`hessian`); groups as :func:`tandem.qweights.quantize_rtn`."""
    bits = check_bits(bits)
    W = np.array(w, dtype=np.float64)
    if W.ndim != 2 or not np.isfinite(W).all():
        raise QuantizationError(f"w must be a finite 2-D matrix, not {W.dtype} {W.shape}")
    rows, cols = W.shape
    H = np.array(h, dtype=np.float64)
    if H.shape != (cols, cols) or not np.isfinite(H).all():
        raise QuantizationError(f"the Hessian must be finite [{cols}, {cols}], not {H.shape}")
    g = group_for(group, cols)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _upper_inverse_cholesky(H, percdamp)
    n_groups = -(-cols // g)
    scale = np.zeros((rows, n_groups), dtype=np.uint16)
    zero = np.zeros((rows, n_groups), dtype=np.uint8)
    Q = np.zeros((rows, cols), dtype=np.uint8)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % g == 0:  # a group starts: its parameters from its weights as updated so far
                cur = np.concatenate([W1[:, i:], W[:, i2:]], axis=1)[:, : min(g, cols - c)]
                s, z = group_params(cur.min(axis=1), cur.max(axis=1), bits, sym=sym)
                scale[:, c // g], zero[:, c // g] = s, z
            s, z = scale[:, c // g], zero[:, c // g]
            q = quantize_with(W1[:, i], s, z, bits)
            Q[:, c] = q
            deq = s.view(np.float16).astype(np.float64) * (q.astype(np.float64) - z)
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return QuantizedMatrix(q=Q, scale=scale, zero=zero, bits=bits, group=g)


def output_error(w, m: QuantizedMatrix, x: np.ndarray) -> float:
    """``||W X - Q X||`` (Frobenius) of float ``w`` [out, in] against ``m`` on inputs ``x``
    [n, in]: the loss GPTQ minimises."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.linalg.norm(x @ (np.asarray(w, dtype=np.float64) - m.dequantize()).T))


# ---------------------------------------------------------------------------------------------
# the float model, batched, on weights where some matrices are already quantized


def _float_matrix(work: Mapping, key: str) -> np.ndarray:
    """``key``'s weight as ``x @ w`` takes it ([in, out]; the LM head [n_vocab, e] as stored),
    float64, dequantized if quantized."""
    w = work[key]
    if isinstance(w, QuantizedMatrix):
        return w.dequantize() if key == LM_HEAD else w.dequantize().T
    return np.asarray(w, dtype=np.float64)


def _heads(qkv: np.ndarray, n_head: int) -> np.ndarray:
    """Causal attention of ``qkv`` [B, T, 3e] (c_attn's output): heads side by side [B, T, e]."""
    B, T, e3 = qkv.shape
    e = e3 // 3
    d = e // n_head
    q, k, v = (a.reshape(B, T, n_head, d).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # [B, h, T, T]
    scores = scores + np.triu(np.full((T, T), -1e10), 1)
    out = softmax(scores) @ v  # [B, h, T, d]
    return out.transpose(0, 2, 1, 3).reshape(B, T, e)


def _embed(work: Mapping, ids: np.ndarray) -> np.ndarray:
    wte = np.asarray(work["wte.weight"], dtype=np.float64)
    wpe = np.asarray(work["wpe.weight"], dtype=np.float64)
    return wte[ids] + wpe[: ids.shape[1]]


def _vec(work: Mapping, key: str) -> np.ndarray:
    return np.asarray(work[key], dtype=np.float64)


def forward_logits(weights: Mapping, cfg: GPT2Config, ids: Sequence[int]) -> np.ndarray:
    """Float64 logits [len(ids), n_vocab] of the float model on ``weights`` whose quantized
    matrices (:class:`QuantizedMatrix`, ``lm_head.weight`` too) are dequantized: the float
    reference's math (tandem.golden.reference), batched."""
    x = _embed(weights, np.asarray(ids, dtype=np.int64)[None, :])
    for i in range(cfg.n_layer):
        x = _block(weights, cfg, i, x)
    return _head(weights, cfg, x)[0]


def _block(work: Mapping, cfg: GPT2Config, i: int, x: np.ndarray, hook=None) -> np.ndarray:
    """Block ``i`` on ``x`` [B, T, e]; ``hook(key, inputs)`` is called before each matrix and may
    quantize it in ``work`` (GPTQ's sequential order)."""
    p, eps = f"h.{i}.", cfg.layer_norm_epsilon

    def lin(name, a):
        key = p + name
        if hook is not None:
            hook(key, a)
        return a @ _float_matrix(work, key) + _vec(work, key[: -len("weight")] + "bias")

    h = layer_norm(x, _vec(work, p + "ln_1.weight"), _vec(work, p + "ln_1.bias"), eps)
    x = x + lin("attn.c_proj.weight", _heads(lin("attn.c_attn.weight", h), cfg.n_head))
    h = layer_norm(x, _vec(work, p + "ln_2.weight"), _vec(work, p + "ln_2.bias"), eps)
    return x + lin("mlp.c_proj.weight", gelu(lin("mlp.c_fc.weight", h)))


def _head(work: Mapping, cfg: GPT2Config, x: np.ndarray, hook=None) -> np.ndarray:
    h = layer_norm(x, _vec(work, "ln_f.weight"), _vec(work, "ln_f.bias"), cfg.layer_norm_epsilon)
    if LM_HEAD in work:
        if hook is not None:
            hook(LM_HEAD, h)
        return h @ _float_matrix(work, LM_HEAD).T
    return h @ np.asarray(work["wte.weight"], dtype=np.float64).T


# ---------------------------------------------------------------------------------------------
# calibration


def calibration_segments(
    ids: Sequence[int], cfg: GPT2Config, *, n: int = CALIB_SEQUENCES, length: int = CALIB_LEN
) -> np.ndarray:
    """Calibration token ids [n_seq, L] cut from ``ids`` (a tokenized text): consecutive
    segments of ``L = min(length, n_ctx, len(ids))`` tokens, at most ``n`` of them, spread evenly
    over the text when it holds more. QuantizationError for fewer than 2 tokens."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size < 2:
        raise QuantizationError(f"the calibration text has {ids.size} token(s): give more text")
    L = int(min(length, cfg.n_ctx, ids.size))
    count = ids.size // L
    picks = np.unique(np.linspace(0, count - 1, min(n, count)).round().astype(int))
    return np.stack([ids[k * L : (k + 1) * L] for k in picks])


def sample_calibration(
    weights: Mapping,
    cfg: GPT2Config,
    *,
    start: int,
    n: int = CALIB_SEQUENCES,
    length: int = CALIB_LEN,
    seed: int = 0,
) -> np.ndarray:
    """Calibration ids [n, L] sampled from the float model itself (temperature 1, seeded; ``L =
    min(length, n_ctx)``), each sequence starting with token ``start`` (the end-of-text token):
    text that needs no data set, and none held out."""
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _sample(weights, cfg, start, n, length, seed)


def _sample(weights, cfg, start, n, length, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    L = min(length, cfg.n_ctx)
    ids = np.full((n, L), start, dtype=np.int64)
    e, nh = cfg.n_embd, cfg.n_head
    d = e // nh
    ks = np.zeros((cfg.n_layer, n, nh, L, d))
    vs = np.zeros_like(ks)
    w = {k: _float_matrix(weights, k) for k in weights}  # float64 [in, out], once
    for t in range(L - 1):
        x = w["wte.weight"][ids[:, t]] + w["wpe.weight"][t]  # [n, e]
        for i in range(cfg.n_layer):
            p, eps = f"h.{i}.", cfg.layer_norm_epsilon
            h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
            q, k, v = (a.reshape(n, nh, d) for a in np.split(qkv, 3, -1))
            ks[i, :, :, t], vs[i, :, :, t] = k, v
            att = softmax(np.einsum("bhd,bhtd->bht", q, ks[i, :, :, : t + 1]) / math.sqrt(d))
            a = np.einsum("bht,bhtd->bhd", att, vs[i, :, :, : t + 1]).reshape(n, e)
            x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            f = gelu(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            x = x + f @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        logits = _head(w, cfg, x[:, None, :])[:, 0]
        prob = softmax(logits)
        cum = np.cumsum(prob, axis=1)
        u = rng.random((n, 1)) * cum[:, -1:]
        ids[:, t + 1] = np.minimum((cum < u).sum(axis=1), cfg.n_vocab - 1)
    return ids


# ---------------------------------------------------------------------------------------------
# a whole model


def quantize_model(
    weights: Mapping,
    cfg: GPT2Config,
    *,
    bits: int,
    group: int,
    method: str = "rtn",
    calib: np.ndarray | None = None,
    lm_head: bool = True,
    sym: bool = False,
    percdamp: float = PERCDAMP,
    progress: Progress | None = None,
) -> dict:
    """A copy of the float ``weights`` with every matrix of
    :func:`tandem.qweights.quantized_keys` quantized by ``method``: ``"rtn"``, or ``"gptq"`` on
    the calibration ids ``calib`` [n_seq, L] (:func:`calibration_segments`,
    :func:`sample_calibration`), sequentially (module docstring). ``progress(line)`` gets a
    line per layer."""
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _quantize_model(
            weights, cfg, bits, group, method, calib, lm_head, sym, percdamp, progress
        )


def _quantize_model(weights, cfg, bits, group, method, calib, lm_head, sym, percdamp, progress):
    if method not in METHODS:
        raise QuantizationError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    check_bits(bits)
    if group != PER_CHANNEL:
        group_for(group, 1 << 30)  # a multiple of 64, whatever the matrix
    keys = quantized_keys(cfg.n_layer, lm_head=lm_head)
    work = dict(weights)
    if method == "rtn":
        for key in keys:
            work[key] = _named(
                key, lambda key=key: quantize_rtn(core_matrix(weights, key), bits, group, sym=sym)
            )
        return work
    if calib is None:
        raise QuantizationError("GPTQ needs calibration token ids")
    ids = np.asarray(calib, dtype=np.int64)
    if ids.ndim != 2 or ids.size == 0 or ids.min() < 0 or ids.max() >= cfg.n_vocab:
        raise QuantizationError(
            f"calibration ids must be [n_seq, L] in [0, {cfg.n_vocab}), not {ids.shape}"
        )
    if lm_head:
        work[LM_HEAD] = np.asarray(weights["wte.weight"], dtype=np.float64)  # float until its turn

    def hook(key, a):
        x = a.reshape(-1, a.shape[-1])
        work[key] = _named(
            key,
            lambda: gptq_matrix(
                core_matrix(weights, key), hessian(x), bits, group, sym=sym, percdamp=percdamp
            ),
        )

    x = _embed(work, ids)
    for i in range(cfg.n_layer):
        x = _block(work, cfg, i, x, hook)
        if progress is not None:
            progress(f"layer {i + 1}/{cfg.n_layer} quantized (GPTQ, {ids.size:,} tokens)")
    if lm_head:
        _head(work, cfg, x, hook)
        if progress is not None:
            progress("LM head quantized (GPTQ)")
    return work


def _named(key: str, make):
    try:
        return make()
    except QuantizationError as err:
        raise QuantizationError(f"{key}: {err}") from None


def stderr_progress(line: str) -> None:
    print(f"[quantize] {line}", file=sys.stderr, flush=True)
