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
