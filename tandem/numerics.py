"""The decode core's arithmetic, bit for bit: the single definition of Tandem's numeric contract.

Everything the core computes is defined here as NumPy operations on IEEE binary16 *bit patterns*
(``np.uint16``). The hardware-faithful GPT-2 model, the ISA simulator and the RTL tests all call
these functions; the RTL must equal them exactly. docs/numerics.md explains the choices.

Summary of the contract
-----------------------
* Storage: weights, activations and the KV cache are binary16.
* Dot products (the MPU, and the VPU's ``VDOT`` reduction) use block floating point:
  both operands are cut into blocks of :data:`BLOCK` (64) elements. Within a block every element
  is aligned to the block's largest exponent by a right shift of its 11-bit significand
  (truncation toward zero), giving signed integers of at most 11 magnitude bits. The 64 products
  of a block are summed exactly (an integer adder tree). Each block sum is then added into a
  64-bit two's-complement accumulator whose LSB weighs ``2**lam`` with
  ``lam = xe_max + EW_MAX - 50 - ACC_FRAC`` (``xe_max`` = the largest block exponent of the input
  vector); a block sum is shifted into that position with an arithmetic (flooring) shift.
  The optional bias starts the accumulator, floored into the same position.
  The exact integer sum is independent of the order of blocks, so hardware may use any
  parallelism. One rounding (round to nearest, ties to even) converts the accumulator to binary16.
* Non-finite operands (exponent field 31) are not special-cased inside the sum (they decode like
  a finite value with exponent 31); instead any non-finite operand in a row makes that row's
  binary16 result the canonical NaN ``0x7E00``. Argmax reads the raw accumulators.
* Quantized weights (:func:`matvec_quant`): per block, the exact integer sum of ``d = q - zero``
  times the aligned input, times the block's binary16 scale significand, shifted into the same
  accumulator, whose LSB sits ``bits`` above the FP16 product's; flooring per block, one
  rounding, NaN rows for a non-finite scale, input or bias.
* Element-wise add, sub and mul are IEEE binary16 with round-to-nearest-even, gradual underflow,
  and canonical NaN ``0x7E00`` for every NaN result.
* ``exp``, ``recip``, ``rsqrt`` and ``gelu`` are 65,536-entry tables: the correctly rounded
  binary16 of the exact function (GELU is GPT-2's tanh form with the decimal constants 0.044715
  and sqrt(2/pi)).
* ``max`` is a reduction over the IEEE total order restricted to numbers (-0 < +0); a NaN
  anywhere gives the canonical NaN.
"""

from __future__ import annotations

import decimal
import functools

import numpy as np

from tandem.qweights import QuantizedMatrix
from tandem.qweights import check as check_quantized

BLOCK = 64
"""Elements per block-floating-point block; equals the MPU tree width and GPT-2's head dim."""

ACC_FRAC = 24
"""Fraction bits the accumulator keeps below the largest possible block-sum position."""

EW_MAX = 31
"""Largest exponent field a binary16 operand can have; fixes the accumulator position."""

MAX_DOT_LEN = 1 << 14
"""Longest dot product the contract defines; bounds the accumulator to 61 bits (no overflow)."""

SIG_BITS = 11
"""Significand bits of binary16 including the hidden bit; also the aligned mantissa width."""

CANONICAL_NAN = 0x7E00
POS_INF = 0x7C00
NEG_INF = 0xFC00

EDGE_FINITE = (
    *(0x0000, 0x8000),  # +-0
    *(0x0001, 0x8001, 0x0002, 0x0003, 0x01FF, 0x0200, 0x03FF, 0x83FF),  # subnormals, +-largest
    *(0x0400, 0x8400, 0x0401, 0x07FF),  # smallest normals
    *(0x3C00, 0xBC00, 0x3C01, 0x3BFF, 0x3E00),  # around 1.0
    *(0x1000, 0x1400, 0x0C00),  # 2**-11, 2**-10, 2**-12: rounding ties against 1.0
    *(0x7800, 0x77FF, 0x5BFF, 0x5C00, 0x7BFE),  # large
    *(0x7BFF, 0xFBFF),  # +-largest finite
)
"""Finite binary16 patterns at the edges of the format, the stimulus every arithmetic test
(golden, GPU and RTL) mixes into its random operands. (The RTL tests run every pair of
:data:`EDGE_BITS` through the VPU; its 36 x 36 pairs fill most of the tiny core's VBUF.)"""

EDGE_NONFINITE = (0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7FFF, 0xFD00)
"""+-Inf, then NaNs: quiet and signalling, both signs."""

EDGE_BITS = EDGE_FINITE + EDGE_NONFINITE

BIAS_EXP = 25  # value = significand * 2**(e - 25) for binary16 with biased exponent e (1..31)


# --------------------------------------------------------------------------------------------
# bit-pattern helpers


def to_bits(a) -> np.ndarray:
    """Float array (any float dtype) -> binary16 bit patterns, rounding to nearest even."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float16).view(np.uint16)


def from_bits(bits) -> np.ndarray:
    """binary16 bit patterns -> ``np.float16`` array (a view, no copy when possible)."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16)


def canonicalize_nan(bits: np.ndarray) -> np.ndarray:
    """Replace every NaN pattern with :data:`CANONICAL_NAN` (hardware emits only that one)."""
    bits = np.asarray(bits, dtype=np.uint16)
    nan = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
    return np.where(nan, np.uint16(CANONICAL_NAN), bits).astype(np.uint16)


def decode(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split binary16 patterns into (negative, significand, exponent).

    ``significand`` includes the hidden bit (0..2047) and ``exponent`` is the biased exponent with
    subnormals mapped to 1, so that ``value = (-1)**negative * significand * 2**(exponent - 25)``
    for every finite input. Exponent 31 (Inf, NaN) decodes the same way; callers that care test
    ``exponent == 31``.
    """
    bits = np.asarray(bits, dtype=np.uint16).astype(np.int64)
    neg = (bits >> 15) & 1
    field = (bits >> 10) & 0x1F
    frac = bits & 0x3FF
    sig = np.where(field == 0, frac, frac | 0x400)
    exp = np.maximum(field, 1)
    return neg.astype(bool), sig, exp


# --------------------------------------------------------------------------------------------
# block floating point


def pad_to_block(bits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Zero-pad ``axis`` up to a multiple of :data:`BLOCK` (+0.0 has bits 0x0000)."""
    bits = np.asarray(bits, dtype=np.uint16)
    n = bits.shape[axis]
    pad = (-n) % BLOCK
    if pad == 0:
        return bits
    widths = [(0, 0)] * bits.ndim
    widths[axis] = (0, pad)
    return np.pad(bits, widths)


def bfp_blocks(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align binary16 values in blocks of 64 along the last axis.

    Parameters
    ----------
    bits : uint16 array [..., n]
        ``n`` must be a multiple of :data:`BLOCK` (use :func:`pad_to_block`).

    Returns
    -------
    q : int64 [..., n]
        Signed aligned significands, ``|q| <= 2047``: ``sign * (sig >> (block_exp - exp))``.
    block_exp : int64 [..., n // 64]
        Largest exponent in each block (at least 1, also for an all-zero block).
    nonfinite : bool [..., n // 64]
        Whether the block holds an Inf or NaN.
    """
    bits = np.asarray(bits, dtype=np.uint16)
    n = bits.shape[-1]
    if n % BLOCK:
        raise ValueError(f"length {n} is not a multiple of the block size {BLOCK}; pad first")
    neg, sig, exp = decode(bits)
    shape = (*bits.shape[:-1], n // BLOCK, BLOCK)
    exp_b = exp.reshape(shape)
    block_exp = exp_b.max(axis=-1)
    shift = np.minimum(block_exp[..., None] - exp_b, 63)
    mag = sig.reshape(shape) >> shift
    q = np.where(neg.reshape(shape), -mag, mag).reshape(bits.shape)
    nonfinite = (exp_b == 31).any(axis=-1)
    return q, block_exp, nonfinite


LAM_OFFSET = EW_MAX - 2 * BIAS_EXP - ACC_FRAC
"""The accumulator LSB's exponent minus the input's top block exponent (see
:func:`acc_lsb_exponent`)."""


def acc_lsb_exponent(xe_max) -> np.ndarray:
    """Weight of the accumulator LSB (as a power of two) for an input whose top block exponent is
    ``xe_max``. Block sums weigh ``2**(we + xe - 50)``; the largest possible is ``we = EW_MAX``."""
    return np.asarray(xe_max, dtype=np.int64) + LAM_OFFSET


def block_shift(w_exp, x_exp, xe_max) -> np.ndarray:
    """Left shift (negative: flooring right shift) that moves a block sum into the accumulator."""
    return (
        np.asarray(w_exp, dtype=np.int64)
        + np.asarray(x_exp, dtype=np.int64)
        - np.asarray(xe_max, dtype=np.int64)
        - EW_MAX
        + ACC_FRAC
    )


def shift_floor(v: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``floor(v * 2**shift)`` for int64 ``v`` and integer ``shift`` (either sign), exactly."""
    v = np.asarray(v, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.left_shift(v, np.clip(shift, 0, 62))
    right = np.right_shift(v, np.clip(-shift, 0, 63))  # arithmetic shift on int64 = floor
    return np.where(shift >= 0, left, right)


def bias_at(bias_bits: np.ndarray, lam) -> tuple[np.ndarray, np.ndarray]:
    """A bias vector floored into an accumulator whose LSB weighs ``2**lam``: (int64 value,
    non-finite flag)."""
    neg, sig, exp = decode(bias_bits)
    val = shift_floor(np.where(neg, -sig, sig), exp - BIAS_EXP - np.asarray(lam, dtype=np.int64))
    return val, exp == 31


def bias_to_acc(bias_bits: np.ndarray, xe_max) -> tuple[np.ndarray, np.ndarray]:
    """A bias vector placed in the accumulator: (int64 value, non-finite flag)."""
    return bias_at(bias_bits, acc_lsb_exponent(xe_max))


class PreparedMatrix:
    """A binary16 matrix aligned once into block floating point, ready for :func:`matvec`.

    The alignment is a pure function of the matrix, so static weights pay for it once. The
    aligned significands are kept as float32 in [n_blocks, rows, 64] order so that block sums can
    be formed by BLAS exactly (see :func:`matvec`).

    Parameters
    ----------
    bits : uint16 [rows, cols]
    """

    def __init__(self, bits: np.ndarray):
        bits = np.asarray(bits, dtype=np.uint16)
        if bits.ndim != 2:
            raise ValueError(f"a matrix must be 2-D, not shape {bits.shape}")
        self.rows, self.cols = bits.shape
        if self.cols > MAX_DOT_LEN:
            raise ValueError(f"{self.cols} columns exceed the contract's {MAX_DOT_LEN}")
        q, block_exp, nonfinite = bfp_blocks(pad_to_block(bits))
        nb = block_exp.shape[1]
        self.n_blocks = nb
        self.q = np.ascontiguousarray(
            q.reshape(self.rows, nb, BLOCK).transpose(1, 0, 2).astype(np.float32)
        )
        self.block_exp = np.ascontiguousarray(block_exp.T)  # [n_blocks, rows]
        self.nonfinite_rows = nonfinite.any(axis=1)


def prepare_input(x_bits: np.ndarray, n_blocks: int):
    """Align an input vector; returns (split significands [n_blocks, 64, 2], block_exp, nonfinite).

    The aligned significand ``q`` (|q| <= 2047) is split as ``q = 32 * hi + lo`` with both parts
    carrying the sign, so that every partial sum of ``w * hi`` or ``w * lo`` over a 64-block stays
    below 2**24 and float32 BLAS computes it exactly in any order.
    """
    x_bits = pad_to_block(np.asarray(x_bits, dtype=np.uint16))
    if x_bits.shape[-1] != n_blocks * BLOCK:
        raise ValueError(
            f"input has {x_bits.shape[-1]} padded elements, the matrix needs {n_blocks * BLOCK}"
        )
    q, xe, nf = bfp_blocks(x_bits)
    mag = np.abs(q)
    sgn = np.sign(q)
    split = np.stack([sgn * (mag >> 5), sgn * (mag & 31)], axis=-1).astype(np.float32)
    return split.reshape(n_blocks, BLOCK, 2), xe, nf


def _start_with_bias(acc, nonfinite, bias_bits, rows: int, lam: int):
    """``acc`` plus the bias floored into the accumulator position ``lam`` (:func:`bias_at`),
    and the rows made non-finite by it; unchanged without a bias. Shared by the FP16 and the
    quantized products."""
    if bias_bits is None:
        return acc, nonfinite
    bias_bits = np.asarray(bias_bits, dtype=np.uint16)
    if bias_bits.shape != (rows,):
        raise ValueError(f"bias shape {bias_bits.shape} does not match {rows} rows")
    b, bnf = bias_at(bias_bits, lam)
    return acc + b, nonfinite | bnf


def matvec(
    mat: PreparedMatrix, x_bits: np.ndarray, bias_bits: np.ndarray | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Matrix-vector product under the contract: returns (acc int64 [rows], lam, nonfinite [rows]).

    The real result is ``acc * 2**lam``; :func:`acc_to_fp16` rounds it, :func:`argmax` ranks it.
    A live part of a growing matrix (the KV cache) is a matrix of its own: prepare the slice, since
    columns beyond it must not take part in the block exponents.
    """
    x_bits = np.asarray(x_bits, dtype=np.uint16)
    if x_bits.shape != (mat.cols,):
        raise ValueError(f"input shape {x_bits.shape} does not match {mat.cols} columns")
    xs, xe, xnf = prepare_input(x_bits, mat.n_blocks)
    sums = np.matmul(mat.q, xs)  # [n_blocks, rows, 2]; every partial sum < 2**24: exact
    # Block sums (|s| < 2**29) scaled by powers of two stay exact in float64 (at most 53 bits
    # after a left shift of up to ACC_FRAC), so the flooring shift is ldexp + floor; this is the
    # same value as shift_floor on int64, at half the cost.
    s = sums[..., 0].astype(np.float64) * 32 + sums[..., 1]
    xe_max = int(xe.max())
    shift = block_shift(mat.block_exp, xe[:, None], xe_max)
    acc = np.floor(np.ldexp(s, shift)).astype(np.int64).sum(axis=0)
    nonfinite = mat.nonfinite_rows | bool(xnf.any())
    lam = int(acc_lsb_exponent(xe_max))
    acc, nonfinite = _start_with_bias(acc, nonfinite, bias_bits, mat.rows, lam)
    return acc, lam, nonfinite


def matvec_fp16(mat: PreparedMatrix, x_bits, bias_bits=None) -> np.ndarray:
    """:func:`matvec` rounded to binary16, with NaN for rows that saw a non-finite operand."""
    acc, lam, nonfinite = matvec(mat, x_bits, bias_bits)
    return np.where(nonfinite, np.uint16(CANONICAL_NAN), acc_to_fp16(acc, lam)).astype(np.uint16)


def dot_fp16(a_bits, b_bits) -> np.uint16:
    """The VPU's ``VDOT``: ``a`` takes the weight side, ``b`` the input side, result binary16."""
    a_bits = np.asarray(a_bits, dtype=np.uint16)
    return matvec_fp16(PreparedMatrix(a_bits[None, :]), b_bits)[0]


def argmax(acc: np.ndarray) -> int:
    """Index of the largest accumulator; the lowest index wins a tie."""
    return int(np.argmax(acc))


# --------------------------------------------------------------------------------------------
# quantized weights (issue 17): the same accumulator, integer weights scaled once per block


def quant_lsb_exponent(xe_max, bits) -> np.ndarray:
    """Weight of the accumulator LSB (as a power of two) for a product with a ``bits``-bit
    quantized matrix: :func:`acc_lsb_exponent` ``+ bits``, so a block term (``|T| < 2**(bits +
    28)``, a factor ``2**bits`` above an FP16 block sum) is shifted left by at most ``ACC_FRAC -
    bits`` and stays below ``2**52``, as an FP16 block sum does."""
    return acc_lsb_exponent(xe_max) + np.asarray(bits, dtype=np.int64)


def quant_block_shift(s_exp, x_exp, xe_max, bits) -> np.ndarray:
    """Left shift (negative: flooring right shift) that moves a quantized block term ``T`` (scale
    exponent ``s_exp``, input block exponent ``x_exp``) into the accumulator:
    ``s_exp + x_exp - xe_max - 7 - bits``, at most ``ACC_FRAC - bits``."""
    return block_shift(s_exp, x_exp, xe_max) - np.asarray(bits, dtype=np.int64)


class PreparedQuantMatrix:
    """A :class:`tandem.qweights.QuantizedMatrix` prepared once for :func:`matvec_quant`.

    Per 64-column block ``k`` of row ``r``: the integer weights ``d = q - zero`` (|d| <= 255;
    padding columns 0) as float32 [n_blocks, rows, 64], exact BLAS operands as
    :class:`PreparedMatrix`'s significands are; and the block's scale, the binary16 ``scale[r,
    g]`` of the group ``g = (64 k) // group`` holding the block, decoded like any binary16
    operand: ``scale_sig`` = +-significand (hidden bit included) as float64, ``scale_exp`` its
    exponent (subnormals 1), both [n_blocks, rows]. ``nonfinite_rows``: rows with a scale whose
    exponent field is 31. Every group holds at least one block, so every scale takes part.
    """

    def __init__(self, m):
        if not isinstance(m, QuantizedMatrix):
            raise TypeError(f"PreparedQuantMatrix needs a QuantizedMatrix, not {type(m).__name__}")
        check_quantized(m)
        self.rows, self.cols = m.shape
        if self.cols > MAX_DOT_LEN:
            raise ValueError(f"{self.cols} columns exceed the contract's {MAX_DOT_LEN}")
        self.bits = int(m.bits)
        self.group = int(m.group)
        nb = -(-self.cols // BLOCK)
        self.n_blocks = nb
        col_group = np.arange(self.cols) // self.group
        d = m.q.astype(np.int16) - m.zero.astype(np.int16)[:, col_group]  # [rows, cols]
        d = np.pad(d, ((0, 0), (0, nb * BLOCK - self.cols)))  # padding contributes 0
        self.d = np.ascontiguousarray(
            d.reshape(self.rows, nb, BLOCK).transpose(1, 0, 2).astype(np.float32)
        )
        block_group = np.arange(nb) * BLOCK // self.group  # [n_blocks]
        neg, sig, exp = decode(m.scale[:, block_group].T)  # [n_blocks, rows]
        self.scale_sig = np.ascontiguousarray(np.where(neg, -sig, sig).astype(np.float64))
        self.scale_exp = np.ascontiguousarray(exp)
        self.nonfinite_rows = (exp == 31).any(axis=0)


def matvec_quant(
    mat: PreparedQuantMatrix, x_bits: np.ndarray, bias_bits: np.ndarray | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Product of a quantized matrix and a binary16 vector under the contract: (acc int64
    [rows], lam, nonfinite [rows]), the real result ``acc * 2**lam`` as :func:`matvec`'s.

    Per row ``r`` and 64-block ``k``: ``x`` aligned as :func:`bfp_blocks` does (``x_int``,
    ``xe[k]``, ``xe_max``); ``P = sum d * x_int`` exact (``|P| < 64 * 255 * 2047 < 2**25``);
    ``T = +-m_s * P`` with the block's scale significand (exact, ``|T| < 2**36``); ``T`` weighs
    ``2**(es + xe[k] - 50)`` and is shifted into the accumulator by :func:`quant_block_shift`
    (flooring when negative, per block); the accumulator's LSB weighs ``2**lam`` with ``lam =``
    :func:`quant_lsb_exponent` ``(xe_max, bits)``; the bias starts it, floored into that
    position. A non-finite scale, input or bias makes the row non-finite.

    No overflow: ``|P| < 2**(bits + 17)``, ``|T| < 2**(bits + 28)``, and a shift of at most
    ``24 - bits`` keeps each block term below ``2**52``; at most 256 blocks (``MAX_DOT_LEN``)
    give less than ``2**60``, and the bias (below ``2**17``) at an LSB of at least
    ``2**(bits - 42)`` less than ``2**55``: the sum stays below ``2**61``. Hardware cost: a
    ``(bits + 1)`` x 12-bit signed product per weight, one 26 x 12-bit multiply per block per
    lane for the scale, then the FP16 product's shifter and accumulator (docs/numerics.md).

    Exactness at BLAS speed: ``d`` (|d| <= 255) times the input split ``32 * hi + lo`` (|hi| <=
    63, |lo| <= 31) keeps every float32 partial sum of a block below ``2**20``; ``P`` and ``T``
    are integers below ``2**53`` in float64, and ``T * 2**shift`` (below ``2**52``) is exact, so
    ``floor`` of it is the contract's flooring shift.
    """
    x_bits = np.asarray(x_bits, dtype=np.uint16)
    if x_bits.shape != (mat.cols,):
        raise ValueError(f"input shape {x_bits.shape} does not match {mat.cols} columns")
    xs, xe, xnf = prepare_input(x_bits, mat.n_blocks)
    sums = np.matmul(mat.d, xs)  # [n_blocks, rows, 2]; every partial sum < 2**20: exact
    t = (sums[..., 0].astype(np.float64) * 32 + sums[..., 1]) * mat.scale_sig  # T, exact
    xe_max = int(xe.max())
    shift = quant_block_shift(mat.scale_exp, xe[:, None], xe_max, mat.bits)
    acc = np.floor(np.ldexp(t, shift)).astype(np.int64).sum(axis=0)
    nonfinite = mat.nonfinite_rows | bool(xnf.any())
    lam = int(quant_lsb_exponent(xe_max, mat.bits))
    acc, nonfinite = _start_with_bias(acc, nonfinite, bias_bits, mat.rows, lam)
    return acc, lam, nonfinite


def matvec_quant_fp16(mat: PreparedQuantMatrix, x_bits, bias_bits=None) -> np.ndarray:
    """:func:`matvec_quant` rounded to binary16, NaN for rows that saw a non-finite operand."""
    acc, lam, nonfinite = matvec_quant(mat, x_bits, bias_bits)
    return np.where(nonfinite, np.uint16(CANONICAL_NAN), acc_to_fp16(acc, lam)).astype(np.uint16)


def matvec_any(mat, x_bits, bias_bits=None) -> tuple[np.ndarray, int, np.ndarray]:
    """:func:`matvec` or :func:`matvec_quant`, whichever kind of prepared matrix ``mat`` is."""
    if isinstance(mat, PreparedQuantMatrix):
        return matvec_quant(mat, x_bits, bias_bits)
    return matvec(mat, x_bits, bias_bits)


def matvec_any_fp16(mat, x_bits, bias_bits=None) -> np.ndarray:
    """:func:`matvec_fp16` or :func:`matvec_quant_fp16`, whichever kind ``mat`` is."""
    if isinstance(mat, PreparedQuantMatrix):
        return matvec_quant_fp16(mat, x_bits, bias_bits)
    return matvec_fp16(mat, x_bits, bias_bits)


# --------------------------------------------------------------------------------------------
# rounding the accumulator


def _bit_length(mag: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values below 2**62."""
    _, e = np.frexp(mag.astype(np.float64))  # may be one too high where float64 rounded up
    e = e.astype(np.int64)
    too_high = (e > 0) & (np.right_shift(mag, np.maximum(e - 1, 0)) == 0)
    return e - too_high


def acc_to_fp16(acc: np.ndarray, lam) -> np.ndarray:
    """Round ``acc * 2**lam`` (int64 ``acc``, |acc| < 2**62) to binary16 bits, nearest-even.

    Overflow gives +-Inf, tiny values round into the subnormals or to a zero of their sign, and an
    exact zero accumulator gives +0.
    """
    acc = np.asarray(acc, dtype=np.int64)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.int64), acc.shape)
    neg = acc < 0
    mag = np.abs(acc)
    top = _bit_length(mag) - 1 + lam  # exponent of the leading bit
    qexp = np.maximum(top - (SIG_BITS - 1), -24)  # weight of the result's LSB
    shift = qexp - lam
    kept = np.right_shift(mag, np.clip(shift, 0, 63))
    rem = mag - np.left_shift(kept, np.clip(shift, 0, 63))
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.clip(shift - 1, 0, 62)), 0)
    round_up = (shift > 0) & ((rem > half) | ((rem == half) & ((kept & 1) == 1)))
    r = np.where(shift <= 0, np.left_shift(mag, np.clip(-shift, 0, 62)), kept + round_up)
    carry = r == (1 << SIG_BITS)
    r = np.where(carry, r >> 1, r)
    qexp = qexp + carry
    normal = r >= (1 << (SIG_BITS - 1))
    field = np.where(normal, qexp + BIAS_EXP, 0)
    out = np.where(normal, (field << 10) | (r & 0x3FF), r)
    out = np.where(field > 30, POS_INF, out)
    out = np.where(mag == 0, 0, out | (neg.astype(np.int64) << 15))
    return out.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# element-wise IEEE binary16


def _binary(op, a, b) -> np.ndarray:
    # NumPy computes float16 arithmetic in float32 and rounds again to float16. For +, -, * that
    # double rounding is innocuous because float32 has at least 2*11 + 2 significand bits
    # (Figueroa, "When is double rounding innocuous?", 1995), so the result is correctly rounded.
    with np.errstate(all="ignore"):
        r = op(from_bits(a), from_bits(b))  # float16 ops round once, nearest-even
    return canonicalize_nan(np.asarray(r, dtype=np.float16).view(np.uint16))


def fp16_add(a, b) -> np.ndarray:
    """IEEE binary16 ``a + b`` (bit patterns in and out; broadcasting like NumPy)."""
    return _binary(np.add, a, b)


def fp16_sub(a, b) -> np.ndarray:
    """IEEE binary16 ``a - b``."""
    return _binary(np.subtract, a, b)


def fp16_mul(a, b) -> np.ndarray:
    """IEEE binary16 ``a * b``."""
    return _binary(np.multiply, a, b)


def order_key(bits) -> np.ndarray:
    """Unsigned key whose integer order is the numeric order of binary16 numbers (-0 < +0)."""
    b = np.asarray(bits, dtype=np.uint16).astype(np.int64)
    return np.where(b & 0x8000, 0xFFFF - b, b | 0x8000)


def fp16_max(bits) -> np.uint16:
    """Maximum of a binary16 vector; a NaN anywhere gives the canonical NaN."""
    bits = np.asarray(bits, dtype=np.uint16)
    if bits.size == 0:
        raise ValueError("max of an empty vector")
    if (((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0)).any():
        return np.uint16(CANONICAL_NAN)
    return bits[int(np.argmax(order_key(bits)))]


# --------------------------------------------------------------------------------------------
# function tables

_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
_FUNCTIONS = ("exp", "recip", "rsqrt", "gelu")


def _exact(name: str, x: float) -> decimal.Decimal:
    """The function at a finite binary16 input, to 60 significant digits."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        ctx.Emax, ctx.Emin = decimal.MAX_EMAX, decimal.MIN_EMIN
        d = decimal.Decimal(x)
        if name == "exp":
            return d.exp()
        if name == "recip":
            return 1 / d
        if name == "rsqrt":
            return 1 / d.sqrt()
        if name == "gelu":
            # 0.5 x (1 + tanh z) == x / (1 + exp(-2z)): no cancellation for negative x
            z = (2 / _PI).sqrt() * (d + decimal.Decimal("0.044715") * d**3)
            return d / (1 + (-2 * z).exp())
    raise ValueError(f"unknown function {name!r}")


def _float64(name: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        if name == "exp":
            return np.exp(x)
        if name == "recip":
            return 1.0 / x
        if name == "rsqrt":
            return 1.0 / np.sqrt(x)
        if name == "gelu":
            z = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
            return x / (1.0 + np.exp(-2.0 * z))
    raise ValueError(f"unknown function {name!r}")


def _value_or_65536(bits: np.ndarray) -> np.ndarray:
    """binary16 values as float64, with Inf standing for +-2**16 (where rounding places it)."""
    v = from_bits(bits).astype(np.float64)
    return np.where(np.isinf(v), np.copysign(65536.0, v), v)


def _round_decimal(d: decimal.Decimal, candidates: np.ndarray) -> int:
    """Correctly round an exact value among neighbouring binary16 patterns (all same sign)."""
    vals = [decimal.Decimal(float(v)) for v in _value_or_65536(candidates)]
    best = min(range(len(vals)), key=lambda i: (abs(vals[i] - d), int(candidates[i]) & 1))
    return int(candidates[best])


@functools.cache
def table(name: str) -> np.ndarray:
    """The 65,536-entry binary16 table of ``exp``, ``recip``, ``rsqrt`` or ``gelu``.

    Entry ``i`` is the correctly rounded binary16 of the function at the binary16 with bits ``i``.
    Values are computed in float64 and, where that lands within 2**-20 (relative) of a rounding
    boundary, recomputed in 60-digit decimal arithmetic, so the table does not depend on the
    platform's libm. Special inputs: NaN -> NaN; exp(+-Inf) = +Inf / +0; recip(+-0) = +-Inf;
    recip(+-Inf) = +-0; rsqrt(x<0) = NaN; rsqrt(+-0) = +-Inf; rsqrt(+Inf) = +0;
    gelu(+Inf) = +Inf; gelu(-Inf) = -0.
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; expected one of {_FUNCTIONS}")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = from_bits(bits).astype(np.float64)
    y = _float64(name, x)
    if name == "gelu":
        y = np.where(np.isposinf(x), np.inf, np.where(np.isneginf(x), -0.0, y))
    out = canonicalize_nan(to_bits(y))
    # float64 -> binary16 may round twice (through float32) and libm may be off by an ulp, so
    # every value within 2**-20 (relative) of a rounding boundary is settled in decimal.
    finite = np.isfinite(y) & np.isfinite(x) & (y != 0)
    v = _value_or_65536(out)
    lo = _value_or_65536(np.where(out & 0x7FFF == 0, out, out - 1).astype(np.uint16))
    hi = _value_or_65536(np.where(out & 0x7FFF >= 0x7C00, out, out + 1).astype(np.uint16))
    with np.errstate(all="ignore"):
        tol = np.abs(y) * 2.0**-20
        near = finite & ((np.abs(y - (v + lo) / 2) <= tol) | (np.abs(y - (v + hi) / 2) <= tol))
    for i in np.flatnonzero(near):
        c = int(out[i])
        cands = [p for p in (c - 1, c, c + 1) if (p >> 15) == (c >> 15) and (p & 0x7FFF) <= 0x7C00]
        out[i] = _round_decimal(_exact(name, float(x[i])), np.array(cands, np.uint16))
    out.flags.writeable = False
    return out


def lookup(name: str, bits) -> np.ndarray:
    """Apply a function table element-wise to binary16 bit patterns."""
    return table(name)[np.asarray(bits, dtype=np.uint16)]
