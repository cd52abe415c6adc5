"""Float reference GPT-2 in NumPy (picoGPT style), with KV-cache prefill and decode.

This is tier one of the golden models: plain float math in the order that reads most
clearly, checked against Hugging Face ``transformers``. The hardware-faithful model is
compared with it, not the other way round. Weights are keyed as in ``tandem.checkpoint``;
``c_attn``, ``c_proj`` and ``c_fc`` weights are [in, out], so a layer is ``x @ w + b``.

Quantized weights (``tandem.qweights``): a :class:`~tandem.qweights.QuantizedMatrix` entry is
used as the float matrix it stands for, ``dequantize().T`` (exact in float32 and float64), and a
quantized ``lm_head.weight`` [n_vocab, n_embd] gives the logits instead of ``wte``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.config import GPT2Config
from tandem.qweights import LM_HEAD, QuantizedMatrix

Weights = Mapping[str, np.ndarray]


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU, the tanh approximation."""
    # Python float constants: NumPy 2 would promote float32 arrays by a np.float64 scalar.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; subtracting the row max keeps exp finite."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    # [n_seq, n_embd] -> [n_seq, n_embd]; biased variance, as torch.nn.LayerNorm
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    # [n_seq, n_in] @ [n_in, n_out] + [n_out] -> [n_seq, n_out]
    return x @ w + b


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [n_q, d], [n_kv, d], [n_kv, d], [n_q, n_kv] -> [n_q, d]
    return softmax(q @ k.T / math.sqrt(q.shape[-1]) + mask) @ v


def causal_mask(n_q: int, n_kv: int, dtype=np.float32) -> np.ndarray:
    """[n_q, n_kv] additive mask for queries at the last ``n_q`` of ``n_kv`` positions."""
    past = n_kv - n_q
    q_pos = past + np.arange(n_q)[:, None]
    k_pos = np.arange(n_kv)[None, :]
    # A large finite negative rather than -inf: exp gives exactly 0 without inf - inf NaNs.
    return np.where(k_pos <= q_pos, 0.0, -1e10).astype(dtype)


def mha(
    x: np.ndarray,
    lp: Mapping[str, np.ndarray],
    n_head: int,
    past_k: np.ndarray | None = None,
    past_v: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal multi-head self-attention over ``x`` after ``past_k``/``past_v`` positions.

    [n_seq, n_embd] -> ([n_seq, n_embd] output, [n_past + n_seq, n_embd] k, same v)
    """
    qkv = linear(x, lp["attn.c_attn.weight"], lp["attn.c_attn.bias"])  # [n_seq, 3*n_embd]
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [n_seq, n_embd]
    if past_k is not None:
        k = np.concatenate([past_k, k])  # [n_past + n_seq, n_embd]
        v = np.concatenate([past_v, v])
    mask = causal_mask(q.shape[0], k.shape[0], x.dtype)  # [n_seq, n_past + n_seq]
    heads = [
        attention(qh, kh, vh, mask)  # [n_seq, head_dim]
        for qh, kh, vh in zip(
            np.split(q, n_head, axis=-1),
            np.split(k, n_head, axis=-1),
            np.split(v, n_head, axis=-1),
            strict=True,
        )
    ]
    out = linear(np.hstack(heads), lp["attn.c_proj.weight"], lp["attn.c_proj.bias"])
    return out, k, v


def ffn(x: np.ndarray, lp: Mapping[str, np.ndarray]) -> np.ndarray:
    # [n_seq, n_embd] -> [n_seq, 4*n_embd] -> [n_seq, n_embd]
    h = gelu(linear(x, lp["mlp.c_fc.weight"], lp["mlp.c_fc.bias"]))
    return linear(h, lp["mlp.c_proj.weight"], lp["mlp.c_proj.bias"])


def block(
    x: np.ndarray,
    lp: Mapping[str, np.ndarray],
    cfg: GPT2Config,
    past_k: np.ndarray | None = None,
    past_v: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pre-LN transformer block. [n_seq, n_embd] -> ([n_seq, n_embd], k, v)"""
    eps = cfg.layer_norm_epsilon
    a, k, v = mha(
        layer_norm(x, lp["ln_1.weight"], lp["ln_1.bias"], eps), lp, cfg.n_head, past_k, past_v
    )
    x = x + a
    x = x + ffn(layer_norm(x, lp["ln_2.weight"], lp["ln_2.bias"], eps), lp)
    return x, k, v


def as_float(key: str, w, dtype=np.float32) -> np.ndarray:
    """A weight as a float array of ``dtype``: a :class:`QuantizedMatrix` dequantized into the
    checkpoint's orientation (Conv1D [in, out]; ``lm_head.weight`` stays [n_vocab, n_embd])."""
    if isinstance(w, QuantizedMatrix):
        d = w.dequantize()
        return (d if key == LM_HEAD else d.T).astype(dtype)
    return np.asarray(w, dtype=dtype)


def float_weights(weights: Weights, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every weight as a float array of ``dtype`` (:func:`as_float`): cast once, reuse per step."""
    return {k: as_float(k, w, dtype) for k, w in weights.items()}


def layer_params(weights: Weights, i: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Block ``i``'s weights keyed without the ``h.{i}.`` prefix, cast to ``dtype``
    (quantized ones dequantized)."""
    p = f"h.{i}."
    return {k[len(p) :]: as_float(k, w, dtype) for k, w in weights.items() if k.startswith(p)}


@dataclass
class KVCache:
    """Keys and values of every position seen so far: per layer, [n_tokens, n_embd] each.

    Heads are side by side along the last axis, as ``c_attn`` produces them.
    """

    k: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def __len__(self) -> int:
        return self.n_tokens


def _check_ids(cfg: GPT2Config, ids: Sequence[int], start: int = 0) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= cfg.n_vocab)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is out of range [0, {cfg.n_vocab})")
    if start + arr.size > cfg.n_ctx:
        raise ValueError(
            f"{start + arr.size} positions exceed the context of {cfg.n_ctx} for {cfg.name!r}"
        )
    return arr


def _run(
    weights: Weights,
    cfg: GPT2Config,
    ids: np.ndarray,
    cache: KVCache | None,
    dtype,
) -> tuple[np.ndarray, KVCache]:
    """Positions ``len(cache) ..`` for ``ids``. Returns ([n_seq, n_vocab] logits, new cache)."""
    start = len(cache) if cache is not None else 0
    wte = np.asarray(weights["wte.weight"], dtype=dtype)
    wpe = np.asarray(weights["wpe.weight"], dtype=dtype)
    x = wte[ids] + wpe[start : start + len(ids)]  # [n_seq, n_embd]
    new = KVCache()
    for i in range(cfg.n_layer):
        past_k = cache.k[i] if cache is not None else None
        past_v = cache.v[i] if cache is not None else None
        x, k, v = block(x, layer_params(weights, i, dtype), cfg, past_k, past_v)
        new.k.append(k)
        new.v.append(v)
    g, b = (np.asarray(weights[f"ln_f.{n}"], dtype=dtype) for n in ("weight", "bias"))
    x = layer_norm(x, g, b, cfg.layer_norm_epsilon)
    head = as_float(LM_HEAD, weights[LM_HEAD], dtype) if LM_HEAD in weights else wte
    return x @ head.T, new  # LM head (tied to wte): [n_seq, n_embd] -> [n_seq, n_vocab]


def forward(weights: Weights, cfg: GPT2Config, ids: Sequence[int], dtype=np.float32) -> np.ndarray:
    """Full causal forward pass. [n_seq] ids -> [n_seq, n_vocab] logits."""
    logits, _ = _run(weights, cfg, _check_ids(cfg, ids), None, dtype)
    return logits


def prefill(
    weights: Weights, cfg: GPT2Config, ids: Sequence[int], dtype=np.float32
) -> tuple[np.ndarray, KVCache]:
    """Run the prompt. Returns ([n_vocab] logits of the last position, KV cache of the prompt)."""
    logits, cache = _run(weights, cfg, _check_ids(cfg, ids), None, dtype)
    return logits[-1], cache


def decode_step(
    weights: Weights, cfg: GPT2Config, token: int, cache: KVCache, dtype=np.float32
) -> np.ndarray:
    """One token at position ``len(cache)``; appends its k and v to ``cache``.

    Returns [n_vocab] logits.
    """
    if cache.n_tokens == 0 or len(cache.k) != cfg.n_layer:
        raise ValueError(
            f"decode_step needs a cache from prefill with {cfg.n_layer} layers, "
            f"got {len(cache.k)} layers and {cache.n_tokens} tokens"
        )
    ids = _check_ids(cfg, [token], start=cache.n_tokens)
    logits, new = _run(weights, cfg, ids, cache, dtype)
    cache.k[:] = new.k
    cache.v[:] = new.v
    return logits[-1]


def generate_greedy(
    weights: Weights, cfg: GPT2Config, ids: Sequence[int], n_new: int, dtype=np.float32
) -> list[int]:
    """Greedy decoding: prefill, then ``n_new - 1`` cached decode steps.

    Returns only the ``n_new`` generated ids. The last generated token is never fed back,
    so ``len(ids) + n_new`` may equal ``n_ctx``.
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int | np.integer) or n_new < 0:
        raise ValueError(f"n_new must be a non-negative int, not {n_new!r}")
    ids = _check_ids(cfg, ids)
    if len(ids) + n_new > cfg.n_ctx:
        raise ValueError(
            f"prompt of {len(ids)} tokens + {n_new} new tokens exceeds the context of "
            f"{cfg.n_ctx} for {cfg.name!r}"
        )
    if n_new == 0:
        return []
    # Cast (and dequantize) once here, not in every step.
    w = float_weights(weights, dtype)
    logits, cache = prefill(w, cfg, ids, dtype)
    out = [int(np.argmax(logits))]
    while len(out) < n_new:
        logits = decode_step(w, cfg, out[-1], cache, dtype)
        out.append(int(np.argmax(logits)))
    return out
