"""Quantized weight matrices: the one in-memory form every part of the project shares.

A :class:`QuantizedMatrix` is a weight-only quantized matrix in the *core's* orientation: ``rows``
outputs, each a dot product over ``cols`` inputs (the reduction axis). The stored integers
``q[r, c]`` are unsigned, ``0 <= q < 2**bits``; each row is cut along the reduction axis into
groups of ``group`` columns (``group`` a multiple of the 64-element block, or the whole row:
one scale per output channel), and every (row, group) pair has an IEEE binary16 scale
``scale[r, g]`` and an integer zero point ``zero[r, g]``, ``0 <= zero < 2**bits``. The value a
weight stands for is::

    w[r, c] = float(scale[r, c // group]) * (q[r, c] - zero[r, c // group])

A symmetric quantizer stores ``zero = 2**(bits - 1)`` everywhere; it is stored all the same.

In a GPT-2 :data:`tandem.checkpoint.Weights` dict a quantized layer's ``.weight`` entry (a
Conv1D, stored [in, out] as float) is replaced by a :class:`QuantizedMatrix` of ``rows = out``,
``cols = in``: :meth:`dequantize` returns [rows, cols], so ``dequantize().T`` is the float
weight in the checkpoint's orientation. ``lm_head.weight`` (``rows = n_vocab``, ``cols =
n_embd``), when present, is the quantized LM head; the token embedding ``wte.weight`` stays
float (it is looked up, not multiplied).

How the core computes with these weights (block sums, the scale, the accumulator) is the
numeric contract's business (``tandem.numerics``, docs/numerics.md), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 64  # the contract's block (tandem.numerics): a group is whole blocks
BITS = (4, 8)


class QuantizationError(ValueError):
    """A quantized matrix the core cannot map, and why."""


@dataclass(frozen=True)
class QuantizedMatrix:
    """A weight-only quantized matrix (module docstring). Validated on construction."""

    q: np.ndarray  # uint8 [rows, cols], 0 <= q < 2**bits
    scale: np.ndarray  # uint16 binary16 bit patterns [rows, n_groups]
    zero: np.ndarray  # uint8 [rows, n_groups], 0 <= zero < 2**bits
    bits: int
    group: int

    def __post_init__(self):
        check(self)

    @property
    def rows(self) -> int:
        return int(self.q.shape[0])

    @property
    def cols(self) -> int:
        return int(self.q.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def n_groups(self) -> int:
        return -(-self.cols // self.group)

    def scales(self) -> np.ndarray:
        """The scales as float64 [rows, n_groups]."""
        return self.scale.view(np.float16).astype(np.float64)

    def dequantize(self) -> np.ndarray:
        """The weights the integers stand for, float64 [rows, cols] (exact: an 11-bit scale
        significand times a 9-bit integer)."""
        g = np.arange(self.cols) // self.group
        s = self.scales()[:, g]
        z = self.zero.astype(np.int64)[:, g]
        return s * (self.q.astype(np.int64) - z)


def check(m: QuantizedMatrix) -> None:
    """Raise :class:`QuantizationError` if ``m`` is not a matrix the core can map."""
    if m.bits not in BITS:
        raise QuantizationError(f"bits must be one of {BITS}, not {m.bits}")
    if m.q.ndim != 2 or m.q.dtype != np.uint8:
        raise QuantizationError(f"q must be a 2-D uint8 array, not {m.q.dtype} {m.q.shape}")
    rows, cols = m.q.shape
    if rows == 0 or cols == 0:
        raise QuantizationError(f"q is empty: {m.q.shape}")
    if not isinstance(m.group, (int, np.integer)) or m.group <= 0:
        raise QuantizationError(f"group must be a positive integer, not {m.group!r}")
    if m.group != cols and m.group % BLOCK:
        raise QuantizationError(
            f"group {m.group} is neither a multiple of the {BLOCK}-element block nor the whole "
            f"row ({cols}): the core scales whole blocks"
        )
    n_groups = -(-cols // m.group)
    for name, arr, dtype in (("scale", m.scale, np.uint16), ("zero", m.zero, np.uint8)):
        if arr.dtype != dtype or arr.shape != (rows, n_groups):
            raise QuantizationError(
                f"{name} must be {np.dtype(dtype).name} [{rows}, {n_groups}] for a "
                f"[{rows}, {cols}] matrix in groups of {m.group}, not {arr.dtype} {arr.shape}"
            )
    top = 1 << m.bits
    if int(m.q.max()) >= top:
        raise QuantizationError(f"q holds {int(m.q.max())}, past {m.bits}-bit range")
    if int(m.zero.max()) >= top:
        raise QuantizationError(f"zero holds {int(m.zero.max())}, past {m.bits}-bit range")


# --------------------------------------------------------------------------------------------
# Round-to-nearest quantization, and which weights of a GPT-2 are quantized

PER_CHANNEL = -1
"""``group`` for one scale per output channel (the whole row), as GPTQ's ``group_size = -1``."""


def group_for(group: int, cols: int) -> int:
    """The group size of a ``cols``-wide row: ``group`` itself, or ``cols`` for
    :data:`PER_CHANNEL`. QuantizationError if the core cannot map it (not a multiple of the
    64-element block, nor :data:`PER_CHANNEL`); the last group of a row may be shorter."""
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise QuantizationError(f"group must be an integer, not {group!r}")
    if group == PER_CHANNEL:
        return int(cols)
    if group <= 0 or group % BLOCK:
        raise QuantizationError(
            f"group size {group} is not a multiple of the {BLOCK}-element block (nor "
            f"{PER_CHANNEL}, one group per output channel): the core scales whole blocks"
        )
    return int(group)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise QuantizationError(f"bits must be one of {BITS}, not {bits!r}")
    return int(bits)


_F16_TINY = np.float16(2.0**-24)  # smallest positive binary16


def group_params(
    lo: np.ndarray, hi: np.ndarray, bits: int, *, sym: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (binary16 bit patterns) and zero point (uint8) of groups whose weights span
    ``[lo, hi]`` (float arrays of one shape), as GPTQ's quantizer chooses them.

    The range is widened to hold 0. Asymmetric: ``scale = (hi - lo) / (2**bits - 1)`` rounded to
    binary16, ``zero = round(-lo / scale)`` with that rounded scale (so the range maps onto
    ``[0, 2**bits - 1]`` as closely as the binary16 scale allows). Symmetric (``sym``):
    ``scale = 2 * max(|lo|, |hi|) / (2**bits - 1)``, ``zero = 2**(bits - 1)`` (the largest
    positive weight may clip by half a step, as in GPTQ). A group of zeros gets scale 1; a scale
    below binary16's smallest subnormal becomes that subnormal. QuantizationError if a range is
    not finite or its scale overflows binary16."""
    bits = check_bits(bits)
    maxq = (1 << bits) - 1
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise QuantizationError("the weights hold NaN or Inf: they cannot be quantized")
    if sym:
        amax = np.maximum(-lo, hi)
        lo, hi = -amax, amax
    span = hi - lo
    with np.errstate(over="ignore"):
        scale = np.where(span > 0, span / maxq, 1.0).astype(np.float16)
    if not np.isfinite(scale).all():
        raise QuantizationError(
            f"a group spans {float(span.max()):.6g}: its scale overflows binary16 (max 65504)"
        )
    scale = np.maximum(scale, _F16_TINY)
    if sym:
        zero = np.full(scale.shape, 1 << (bits - 1), dtype=np.uint8)
    else:
        zero = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, maxq).astype(np.uint8)
    return scale.view(np.uint16), zero


def quantize_with(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as uint8, round half to even, element
    by element (``scale`` binary16 bit patterns and ``zero`` broadcast against ``w``)."""
    s = np.asarray(scale, dtype=np.uint16).view(np.float16).astype(np.float64)
    q = np.rint(np.asarray(w, dtype=np.float64) / s) + np.asarray(zero, dtype=np.float64)
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def _as_matrix(w, what: str = "w") -> np.ndarray:
    a = np.asarray(w)
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        raise QuantizationError(
            f"{what} must be a non-empty 2-D float matrix [rows, cols], not {a.dtype} {a.shape}"
        )
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise QuantizationError(f"{what} holds a non-finite value at {bad}: it cannot be quantized")
    return a


def quantize_rtn(w, bits: int, group: int, *, sym: bool = False) -> QuantizedMatrix:
    """Round-to-nearest quantization of ``w`` (float [rows = outputs, cols = inputs], the core's
    orientation) to ``bits`` (4 or 8) in groups of ``group`` columns (a multiple of 64, or
    :data:`PER_CHANNEL`). Each (row, group) gets its scale and zero from its own min and max
    (:func:`group_params`), and ``q`` is computed with the binary16-rounded scale, so
    ``dequantize()`` is exactly what a model using the matrix computes with."""
    bits = check_bits(bits)
    a = _as_matrix(w)
    cols = a.shape[1]
    g = group_for(group, cols)
    starts = range(0, cols, g)
    lo = np.stack([a[:, c : c + g].min(axis=1) for c in starts], axis=1)
    hi = np.stack([a[:, c : c + g].max(axis=1) for c in starts], axis=1)
    scale, zero = group_params(lo, hi, bits, sym=sym)
    idx = np.arange(cols) // g
    q = quantize_with(a, scale[:, idx], zero[:, idx], bits)
    return QuantizedMatrix(q=q, scale=scale, zero=zero, bits=bits, group=g)


QUANTIZED_LAYERS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
"""The weights of each block ``h.{i}.`` that a quantized model stores as :class:`QuantizedMatrix`
(Conv1D weights, [in, out] as float; [out, in] quantized)."""

LM_HEAD = "lm_head.weight"
"""The key of the quantized LM head ([n_vocab, n_embd]), quantized from ``wte.weight``."""


def quantized_keys(n_layer: int, *, lm_head: bool = True) -> list[str]:
    """The keys a quantized model replaces, in the order the model uses them: each block's
    :data:`QUANTIZED_LAYERS`, then :data:`LM_HEAD` if ``lm_head``."""
    keys = [f"h.{i}.{name}" for i in range(n_layer) for name in QUANTIZED_LAYERS]
    return [*keys, LM_HEAD] if lm_head else keys


def core_matrix(weights, key: str) -> np.ndarray:
    """The float matrix that ``key`` quantizes, in the core's orientation [out, in] (float64):
    a Conv1D weight transposed, or ``wte.weight`` itself for :data:`LM_HEAD`."""
    src = "wte.weight" if key == LM_HEAD else key
    w = weights[src]
    if isinstance(w, QuantizedMatrix):
        raise QuantizationError(f"{src} is already quantized")
    a = np.asarray(w, dtype=np.float64)
    return a if key == LM_HEAD else a.T


def quantize_weights(
    weights,
    cfg,
    *,
    bits: int,
    group: int,
    method: str = "rtn",
    lm_head: bool = True,
    sym: bool = False,
) -> dict:
    """A copy of the float ``weights`` of ``cfg`` with :func:`quantized_keys` quantized
    (module docstring: the Weights-dict convention) by round to nearest (``method="rtn"``). GPTQ
    needs a forward pass over calibration text: ``tandem.host.quantize.quantize_model``."""
    if method != "rtn":
        raise QuantizationError(
            f"method {method!r}: quantize_weights does round to nearest ('rtn') only; GPTQ is "
            "tandem.host.quantize.quantize_model (it needs calibration text)"
        )
    check_bits(bits)
    out = dict(weights)
    for key in quantized_keys(cfg.n_layer, lm_head=lm_head):
        try:
            out[key] = quantize_rtn(core_matrix(weights, key), bits, group, sym=sym)
        except QuantizationError as err:
            raise QuantizationError(f"{key}: {err}") from None
    return out


def dequantize_weights(weights) -> dict:
    """Float32 weights in the checkpoint's orientation: every :class:`QuantizedMatrix` replaced by
    ``dequantize().T`` (``lm_head.weight`` stays [n_vocab, n_embd], as a Hugging Face LM head).
    Float entries pass through."""
    out = {}
    for key, w in weights.items():
        if isinstance(w, QuantizedMatrix):
            d = w.dequantize()
            out[key] = (d if key == LM_HEAD else d.T).astype(np.float32)
        else:
            out[key] = w
    return out


# --------------------------------------------------------------------------------------------
# The GPTQ checkpoint layout (AutoGPTQ / Hugging Face "gptq"), per quantized matrix
#
#   <name>.qweight  int32 [ceil(in * bits / 32), out]: q[out, in] packed along the input axis,
#                   32 / bits values per word, the lowest input in the lowest bits
#   <name>.qzeros   int32 [n_groups, ceil(out * bits / 32)]: zero points packed along the output
#                   axis the same way; format "gptq" (v1) stores zero - 1, "gptq_v2" zero
#   <name>.scales   float16 [n_groups, out]
#   <name>.g_idx    int32 [in]: the group of each input, i // group_size (no act-order)
#
# A dimension that 32 / bits does not divide is padded with zeros to whole words.

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("gptq", "gptq_v2")


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``values`` [n, m] along axis 0 into int32 words [ceil(n * bits / 32), m]."""
    per = 32 // bits
    n = values.shape[0]
    padded = np.zeros((-(-n // per) * per, values.shape[1]), dtype=np.uint32)
    padded[:n] = values
    words = np.zeros((padded.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for k in range(per):
        words |= padded[k::per] << np.uint32(bits * k)
    return words.view(np.int32)


def _unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of :func:`_pack`: the first ``n`` values along axis 0, as int64."""
    w = np.ascontiguousarray(words).view(np.uint32).astype(np.int64)
    per = 32 // bits
    mask = (1 << bits) - 1
    out = np.stack([(w >> (bits * k)) & mask for k in range(per)], axis=1)
    return out.reshape(-1, words.shape[1])[:n]


def to_gptq(m: QuantizedMatrix, fmt: str = "gptq_v2") -> dict[str, np.ndarray]:
    """``m`` as the four GPTQ tensors (layout above), keyed ``qweight``, ``qzeros``, ``scales``,
    ``g_idx``. Format ``"gptq"`` (v1) cannot store a zero point of 0 (it stores zero - 1):
    QuantizationError."""
    if fmt not in FORMATS:
        raise QuantizationError(f"checkpoint format must be one of {FORMATS}, not {fmt!r}")
    zero = m.zero.astype(np.int64)
    if fmt == "gptq":
        if (zero == 0).any():
            raise QuantizationError(
                "a zero point of 0 cannot be stored in the v1 'gptq' format (it stores zero - 1): "
                "write 'gptq_v2'"
            )
        zero = zero - 1
    return {
        "qweight": _pack(m.q.T, m.bits),
        "qzeros": _pack(zero, m.bits).T.copy(),
        "scales": m.scale.T.copy().view(np.float16),
        "g_idx": (np.arange(m.cols) // m.group).astype(np.int32),
    }


def from_gptq(
    tensors: dict, bits: int, group: int, fmt: str = "gptq_v2", *, cols: int | None = None
) -> QuantizedMatrix:
    """The :class:`QuantizedMatrix` of GPTQ tensors (``qweight``, ``qzeros``, ``scales``, and
    optionally ``g_idx``) quantized to ``bits`` in groups of ``group`` (:data:`PER_CHANNEL`
    allowed); ``cols`` (the input size) is needed when padding makes it ambiguous (default:
    all of qweight's rows). QuantizationError naming the tensor and the problem."""
    bits = check_bits(bits)
    if fmt not in FORMATS:
        raise QuantizationError(f"checkpoint format must be one of {FORMATS}, not {fmt!r}")
    missing = [n for n in GPTQ_TENSORS[:3] if n not in tensors]
    if missing:
        raise QuantizationError(
            f"{', '.join(missing)} missing (a GPTQ matrix needs qweight, qzeros and scales)"
        )
    qweight, qzeros, scales = (np.asarray(tensors[n]) for n in GPTQ_TENSORS[:3])
    per = 32 // bits
    for name, arr in (("qweight", qweight), ("qzeros", qzeros)):
        if arr.ndim != 2 or arr.dtype not in (np.int32, np.uint32):
            raise QuantizationError(f"{name} must be 2-D int32, not {arr.dtype} {arr.shape}")
    if scales.ndim != 2 or not np.issubdtype(scales.dtype, np.floating):
        raise QuantizationError(f"scales must be 2-D float16, not {scales.dtype} {scales.shape}")
    rows = scales.shape[1]
    cols = qweight.shape[0] * per if cols is None else cols
    g = group_for(group, cols)
    n_groups = -(-cols // g)
    for name, arr, want in (
        ("qweight", qweight, (-(-cols // per), rows)),
        ("qzeros", qzeros, (n_groups, -(-rows // per))),
        ("scales", scales, (n_groups, rows)),
    ):
        if arr.shape != want:
            raise QuantizationError(
                f"{name} has shape {arr.shape}, expected {want} for a [{rows}, {cols}] matrix "
                f"at {bits} bits in groups of {g}"
            )
    s16 = scales.astype(np.float16)
    if not np.isfinite(s16).all() or (
        scales.dtype != np.float16 and not np.array_equal(s16, scales)
    ):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(s16) | (s16 != scales))[0])
        raise QuantizationError(f"scales hold {scales[bad]} at {bad}: not a finite binary16")
    if "g_idx" in tensors and tensors["g_idx"] is not None:
        g_idx = np.asarray(tensors["g_idx"])
        want = np.arange(cols) // g
        if g_idx.shape != (cols,) or not np.array_equal(g_idx, want):
            raise QuantizationError(
                "g_idx is not input // group_size: an act-order (desc_act) checkpoint, whose "
                "groups are scattered; the core needs contiguous groups (quantize without "
                "act-order)"
            )
    zero = _unpack(qzeros.T, bits, rows) + (1 if fmt == "gptq" else 0)  # [rows, n_groups]
    top = 1 << bits
    if zero.max() >= top:
        at = tuple(int(i) for i in np.argwhere(zero >= top)[0])
        raise QuantizationError(
            f"qzeros holds zero point {int(zero[at])} at (output, group) {at}, past the "
            f"{bits}-bit range"
            + (
                " (v1 'gptq' stores zero - 1, so all ones there means zero 2**bits)"
                if fmt == "gptq"
                else ""
            )
        )
    q = _unpack(qweight, bits, cols).T
    return QuantizedMatrix(
        q=q.astype(np.uint8),
        scale=s16.view(np.uint16).T.copy(),
        zero=zero.astype(np.uint8),
        bits=bits,
        group=g,
    )
