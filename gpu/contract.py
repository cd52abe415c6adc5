"""Tandem's numeric contract (``tandem.numerics``) as PyTorch tensor ops, batched.

The GPU prefill must leave exactly the KV cache and first token the decode core would, so it
computes with the same arithmetic: block-floating-point dot products, one RNE rounding of an
exact accumulator, IEEE binary16 element-wise ops and the 65,536-entry function tables. Every
function here equals its ``tandem.numerics`` counterpart bit for bit (tests/test_gpu_contract.py).

Representation: a binary16 tensor is held as its bit pattern in ``torch.int16`` (the same bytes
as NumPy's ``uint16``; ``.view(torch.float16)`` is free). Integer work uses int64.

Exactness with BLAS, as in ``numerics.matvec``: aligned significands (|q| <= 2047) are float32;
the input side is split ``q = 32 * hi + lo`` (both signed) so every partial sum over a 64-block
stays below 2**24 and a float32 matmul is exact in any summation order (on CUDA only with TF32
off: see :mod:`tandem.gpu.cuda`). Block sums (< 2**29) are recombined in float64; the flooring
shift into the accumulator is ``floor(s * 2**shift)`` in float64, exact because the result has
at most 53 bits.

Quantized weights (``numerics.matvec_quant``) take the same path: :class:`QuantPreparedMatrix`
holds ``d = q - zero`` (|d| <= 255) where the significands were, so the float32 partial sums stay
below 2**20; the block sum ``P`` is multiplied by the block's scale significand in float64
(``T``, exact below 2**36), and ``T * 2**shift`` stays below 2**52.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tandem import numerics as nm

BLOCK = nm.BLOCK
_SHIFT_OFFSET = nm.ACC_FRAC - nm.EW_MAX  # shift = we + xe - xe_max + this
CANONICAL_NAN = nm.CANONICAL_NAN


# --------------------------------------------------------------------------------------------
# bit patterns


def bits_from_numpy(a: np.ndarray, device="cpu") -> torch.Tensor:
    """NumPy uint16 binary16 bits -> int16 tensor on ``device``."""
    a = np.ascontiguousarray(np.asarray(a, dtype=np.uint16))
    return torch.from_numpy(a.view(np.int16).copy()).to(device)


def bits_to_numpy(t: torch.Tensor) -> np.ndarray:
    """int16 bit tensor -> NumPy uint16 (copied to the host)."""
    return t.detach().to("cpu").contiguous().numpy().view(np.uint16)


def _u(bits: torch.Tensor) -> torch.Tensor:
    """int16 bits -> int64 in 0..65535."""
    return bits.to(torch.int64) & 0xFFFF


def _s16(u: torch.Tensor) -> torch.Tensor:
    """int64 in 0..65535 -> int16 bits (two's complement reinterpretation)."""
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)


def const(bits: int, shape=(), device="cpu") -> torch.Tensor:
    """A tensor filled with one binary16 bit pattern."""
    return torch.full(
        shape, bits - 0x10000 if bits >= 0x8000 else bits, dtype=torch.int16, device=device
    )


def is_nan(bits: torch.Tensor) -> torch.Tensor:
    u = _u(bits)
    return ((u & 0x7C00) == 0x7C00) & ((u & 0x3FF) != 0)


def canonicalize_nan(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(is_nan(bits), const(CANONICAL_NAN, device=bits.device), bits)


def decode(bits: torch.Tensor):
    """(negative, significand, exponent) as ``numerics.decode``, int64 tensors."""
    u = _u(bits)
    neg = (u >> 15) & 1
    field = (u >> 10) & 0x1F
    frac = u & 0x3FF
    sig = torch.where(field == 0, frac, frac | 0x400)
    return neg.bool(), sig, torch.clamp(field, min=1)


def pad_to_block(bits: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last axis to a multiple of 64 (+0.0 is bits 0)."""
    pad = (-bits.shape[-1]) % BLOCK
    return torch.nn.functional.pad(bits, (0, pad)) if pad else bits


def bfp_blocks(bits: torch.Tensor):
    """``numerics.bfp_blocks``: (q int64 [..., n], block_exp int64 [..., n/64], nonfinite)."""
    n = bits.shape[-1]
    if n % BLOCK:
        raise ValueError(f"length {n} is not a multiple of the block size {BLOCK}; pad first")
    neg, sig, exp = decode(bits)
    shape = (*bits.shape[:-1], n // BLOCK, BLOCK)
    exp_b = exp.reshape(shape)
    block_exp = exp_b.amax(dim=-1)
    mag = sig.reshape(shape) >> torch.clamp(block_exp[..., None] - exp_b, max=63)
    q = torch.where(neg.reshape(shape), -mag, mag).reshape(bits.shape)
    return q, block_exp, (exp_b == 31).any(dim=-1)


def split_input(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q = 32 * hi + lo`` with both parts signed, as float32 (exact BLAS operands)."""
    mag, sgn = q.abs(), torch.sign(q)
    return (sgn * (mag >> 5)).to(torch.float32), (sgn * (mag & 31)).to(torch.float32)


def shift_floor(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``floor(v * 2**shift)`` for int64 ``v`` and integer ``shift`` of either sign."""
    left = torch.bitwise_left_shift(v, torch.clamp(shift, 0, 62))
    right = torch.bitwise_right_shift(v, torch.clamp(-shift, 0, 63))  # arithmetic: floor
    return torch.where(shift >= 0, left, right)


def floor_scale(s: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``floor(s * 2**shift)`` for integer-valued float64 ``s`` with ``|s * 2**shift| < 2**53``
    (block sums: |s| < 2**29, shift <= 24; quantized block terms: |s| < 2**36, shift <= 24 -
    bits): exact in float64, returned as int64."""
    scale = torch.pow(torch.tensor(2.0, dtype=torch.float64, device=s.device), shift.double())
    return torch.floor(s * scale).to(torch.int64)


def bias_to_acc(bias_bits: torch.Tensor, lam: torch.Tensor):
    """A bias placed in the accumulator with LSB weight ``2**lam``: (int64, nonfinite)."""
    neg, sig, exp = decode(bias_bits)
    return shift_floor(torch.where(neg, -sig, sig), exp - nm.BIAS_EXP - lam), exp == 31


# --------------------------------------------------------------------------------------------
# rounding the accumulator


def _bit_length(mag: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(mag.to(torch.float64))
    e = e.to(torch.int64)
    too_high = (e > 0) & (torch.bitwise_right_shift(mag, torch.clamp(e - 1, min=0)) == 0)
    return e - too_high.to(torch.int64)


def acc_to_fp16(acc: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``numerics.acc_to_fp16``: round ``acc * 2**lam`` to binary16 (RNE), as int16 bits."""
    lam = torch.broadcast_to(torch.as_tensor(lam, dtype=torch.int64, device=acc.device), acc.shape)
    neg = acc < 0
    mag = acc.abs()
    top = _bit_length(mag) - 1 + lam
    qexp = torch.clamp(top - (nm.SIG_BITS - 1), min=-24)
    shift = qexp - lam
    sh = torch.clamp(shift, 0, 63)
    kept = torch.bitwise_right_shift(mag, sh)
    rem = mag - torch.bitwise_left_shift(kept, sh)
    one = torch.ones_like(mag)
    half = torch.where(shift > 0, torch.bitwise_left_shift(one, torch.clamp(shift - 1, 0, 62)), 0)
    round_up = (shift > 0) & ((rem > half) | ((rem == half) & ((kept & 1) == 1)))
    r = torch.where(
        shift <= 0,
        torch.bitwise_left_shift(mag, torch.clamp(-shift, 0, 62)),
        kept + round_up.to(torch.int64),
    )
    carry = r == (1 << nm.SIG_BITS)
    r = torch.where(carry, r >> 1, r)
    qexp = qexp + carry.to(torch.int64)
    normal = r >= (1 << (nm.SIG_BITS - 1))
    field = torch.where(normal, qexp + nm.BIAS_EXP, 0)
    out = torch.where(normal, (field << 10) | (r & 0x3FF), r)
    out = torch.where(field > 30, nm.POS_INF, out)
    out = torch.where(mag == 0, 0, out | (neg.to(torch.int64) << 15))
    return _s16(out)


def round_acc(acc: torch.Tensor, lam, nonfinite: torch.Tensor) -> torch.Tensor:
    """``matvec_fp16``'s rounding: binary16 bits, canonical NaN where an operand was non-finite."""
    out = acc_to_fp16(acc, lam)
    return torch.where(nonfinite, const(CANONICAL_NAN, device=acc.device), out)


# --------------------------------------------------------------------------------------------
# block floating point products


class PreparedMatrix:
    """A binary16 matrix [rows, cols] aligned once, as ``numerics.PreparedMatrix``, on a device.

    ``q`` float32 [n_blocks, rows, 64], ``block_exp`` int64 [n_blocks, rows],
    ``nonfinite_rows`` bool [rows].
    """

    bits = 0  # the accumulator's LSB over the FP16 contract's (QuantPreparedMatrix: its bits)
    scale_sig = None  # per-block scale significands (QuantPreparedMatrix only)

    def __init__(self, q, block_exp, nonfinite_rows, cols: int):
        self.q, self.block_exp, self.nonfinite_rows = q, block_exp, nonfinite_rows
        self.n_blocks, self.rows = block_exp.shape
        self.cols = cols

    @classmethod
    def from_bits(cls, bits: torch.Tensor) -> PreparedMatrix:
        if bits.ndim != 2:
            raise ValueError(f"a matrix must be 2-D, not shape {tuple(bits.shape)}")
        rows, cols = bits.shape
        q, e, nf = bfp_blocks(pad_to_block(bits))
        nb = e.shape[1]
        q = q.reshape(rows, nb, BLOCK).permute(1, 0, 2).to(torch.float32).contiguous()
        return cls(q, e.T.contiguous(), nf.any(dim=1), cols)

    def row_slice(self, start: int, stop: int) -> PreparedMatrix:
        """Rows ``start:stop`` as a PreparedMatrix of views (no copy). Rows are independent in
        :func:`matmul` (each has its own block exponents), so its results equal the matching
        rows of the whole matrix's, bit for bit."""
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}:{stop} out of 0:{self.rows}")
        return PreparedMatrix(
            self.q[:, start:stop],
            self.block_exp[:, start:stop],
            self.nonfinite_rows[start:stop],
            self.cols,
        )

    @classmethod
    def from_numpy(cls, pm: nm.PreparedMatrix, device="cpu") -> PreparedMatrix:
        """Reuse an alignment ``tandem.numerics`` already made (same numbers, no recompute); a
        ``numerics.PreparedQuantMatrix`` gives a :class:`QuantPreparedMatrix`."""
        if isinstance(pm, nm.PreparedQuantMatrix):
            return QuantPreparedMatrix.from_numpy(pm, device)
        return cls(
            torch.from_numpy(pm.q).to(device),
            torch.from_numpy(pm.block_exp).to(device),
            torch.from_numpy(np.asarray(pm.nonfinite_rows)).to(device),
            pm.cols,
        )


class QuantPreparedMatrix(PreparedMatrix):
    """A quantized matrix prepared as ``numerics.PreparedQuantMatrix``, on a device: ``q`` holds
    ``d = q - zero`` (float32 [n_blocks, rows, 64]), ``block_exp`` the block's scale exponent and
    ``scale_sig`` its signed scale significand (float64), both [n_blocks, rows]; ``bits`` the
    weight width. :func:`matmul` computes the quantized contract for it."""

    def __init__(self, q, block_exp, nonfinite_rows, cols: int, scale_sig, bits: int):
        super().__init__(q, block_exp, nonfinite_rows, cols)
        self.scale_sig, self.bits = scale_sig, int(bits)

    @classmethod
    def from_bits(cls, bits):
        raise TypeError("a quantized matrix is prepared from numerics.PreparedQuantMatrix")

    def row_slice(self, start: int, stop: int) -> QuantPreparedMatrix:
        """Rows ``start:stop`` (views), as :meth:`PreparedMatrix.row_slice`."""
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}:{stop} out of 0:{self.rows}")
        return QuantPreparedMatrix(
            self.q[:, start:stop],
            self.block_exp[:, start:stop],
            self.nonfinite_rows[start:stop],
            self.cols,
            self.scale_sig[:, start:stop],
            self.bits,
        )

    @classmethod
    def from_numpy(cls, pm: nm.PreparedQuantMatrix, device="cpu") -> QuantPreparedMatrix:
        """The numbers of a ``numerics.PreparedQuantMatrix`` on ``device``."""
        return cls(
            torch.from_numpy(pm.d).to(device),
            torch.from_numpy(pm.scale_exp).to(device),
            torch.from_numpy(np.asarray(pm.nonfinite_rows)).to(device),
            pm.cols,
            torch.from_numpy(pm.scale_sig).to(device),
            pm.bits,
        )


# Elements of the float64 block-sum tensor one matmul chunk may make (bounds memory).
_CHUNK_ELEMS = 1 << 24


def matmul(
    mat: PreparedMatrix,
    x_bits: torch.Tensor,
    bias_bits: torch.Tensor | None = None,
    transposed: bool = False,
):
    """``numerics.matvec`` for every row of ``x_bits`` [T, cols] at once (for a
    :class:`QuantPreparedMatrix`, ``numerics.matvec_quant``).

    Returns (acc int64 [T, rows], lam int64 [T], nonfinite bool [T, rows]); row ``t`` equals
    ``numerics.matvec(mat, x_bits[t], bias_bits)``. With ``transposed=True``, ``acc`` and
    ``nonfinite`` are [rows, T] instead (column ``t`` is that product): the batched product's
    natural orientation, so no transposing copy is made. The values are the same either way.
    """
    T, cols = x_bits.shape
    if cols != mat.cols:
        raise ValueError(f"input has {cols} columns, the matrix {mat.cols}")
    xq, xe, xnf = bfp_blocks(pad_to_block(x_bits))  # [T, nb*64], [T, nb], [T, nb]
    nb = mat.n_blocks
    xe_max = xe.amax(dim=1)  # [T]
    lam = xe_max + (nm.LAM_OFFSET + mat.bits)
    hi, lo = split_input(xq.reshape(T, nb, BLOCK).permute(1, 2, 0))  # [nb, 64, T]
    step = max(1, _CHUNK_ELEMS // (nb * mat.rows))
    accs = []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        xs = torch.cat([hi[:, :, t0:t1], lo[:, :, t0:t1]], dim=2)  # [nb, 64, 2c]
        sums = torch.bmm(mat.q, xs)  # [nb, rows, 2c]: every partial sum < 2**24, exact
        c = t1 - t0
        s = sums[:, :, :c].double() * 32 + sums[:, :, c:].double()
        if mat.scale_sig is not None:
            s = s * mat.scale_sig[:, :, None]  # quantized: T = +-m_s * P, exact
        shift = mat.block_exp[:, :, None] + (xe[t0:t1] - xe_max[t0:t1, None]).T[:, None, :]
        accs.append(floor_scale(s, shift + (_SHIFT_OFFSET - mat.bits)).sum(dim=0))  # [rows, c]
    xnf_t = xnf.any(dim=1)  # [T]
    if transposed:
        acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=1)  # [rows, T]
        nonfinite = mat.nonfinite_rows[:, None] | xnf_t[None, :]
        bias_shape, lam_b = (slice(None), None), lam[None, :]
    else:
        acc = torch.cat([a.T for a in accs], dim=0)  # [T, rows]
        nonfinite = mat.nonfinite_rows[None, :] | xnf_t[:, None]
        bias_shape, lam_b = (None, slice(None)), lam[:, None]
    if bias_bits is not None:
        if bias_bits.shape != (mat.rows,):
            raise ValueError(f"bias shape {tuple(bias_bits.shape)} does not match {mat.rows} rows")
        b, bnf = bias_to_acc(bias_bits[bias_shape], lam_b)
        acc = acc + b
        nonfinite = nonfinite | bnf
    return acc, lam, nonfinite


def matmul_fp16(mat: PreparedMatrix, x_bits, bias_bits=None, transposed=False) -> torch.Tensor:
    """:func:`matmul` rounded: [T, rows] binary16 bits (``numerics.matvec_fp16`` per row), or
    [rows, T] with ``transposed=True`` (same values, no transposing copy)."""
    acc, lam, nonfinite = matmul(mat, x_bits, bias_bits, transposed)
    return round_acc(acc, lam[None, :] if transposed else lam[:, None], nonfinite)


def dot_rows(a_bits: torch.Tensor, b_bits: torch.Tensor):
    """``numerics.dot_fp16(a[i], b[i])`` for every row, unrounded: (acc, lam, nonfinite).

    ``a`` is the weight side, ``b`` the input side; shapes [..., n] (broadcasting).
    """
    a_bits, b_bits = torch.broadcast_tensors(a_bits, b_bits)
    aq, ae, anf = bfp_blocks(pad_to_block(a_bits))
    bq, be, bnf = bfp_blocks(pad_to_block(b_bits))
    shape = (*aq.shape[:-1], ae.shape[-1], BLOCK)
    s = (aq.reshape(shape) * bq.reshape(shape)).sum(dim=-1)  # exact block sums, int64
    be_max = be.amax(dim=-1, keepdim=True)
    acc = shift_floor(s, ae + be - be_max + _SHIFT_OFFSET).sum(dim=-1)
    return acc, be_max[..., 0] + nm.LAM_OFFSET, anf.any(dim=-1) | bnf.any(dim=-1)


def dot_fp16(a_bits, b_bits) -> torch.Tensor:
    """Row-wise ``VDOT`` rounded to binary16."""
    return round_acc(*dot_rows(a_bits, b_bits))


# --------------------------------------------------------------------------------------------
# element-wise binary16


def _binary(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float16 +, -, * round once to nearest even on CPU and CUDA (the CPU computes in float32
    # and rounds, which is exact for binary16 since 24 >= 2 * 11 + 2); tests check it.
    r = op(a.view(torch.float16), b.view(torch.float16))
    return canonicalize_nan(r.view(torch.int16))


def fp16_add(a, b) -> torch.Tensor:
    return _binary(torch.add, a, b)


def fp16_sub(a, b) -> torch.Tensor:
    return _binary(torch.sub, a, b)


def fp16_mul(a, b) -> torch.Tensor:
    return _binary(torch.mul, a, b)


def order_key(bits: torch.Tensor) -> torch.Tensor:
    """int64 key whose order is binary16's numeric order (-0 < +0), as ``numerics.order_key``."""
    u = _u(bits)
    return torch.where((u & 0x8000) != 0, 0xFFFF - u, u | 0x8000)


def fp16_max(bits: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """``numerics.fp16_max`` over the last axis, counting only ``live`` elements (bool mask)."""
    key = order_key(bits)
    nan = is_nan(bits)
    if live is not None:
        key = torch.where(live, key, -1)
        nan = nan & live
    top = torch.gather(bits, -1, key.argmax(dim=-1, keepdim=True))[..., 0]
    return torch.where(nan.any(dim=-1), const(CANONICAL_NAN, device=bits.device), top)


# --------------------------------------------------------------------------------------------
# function tables


@functools.cache
def _table(name: str, device: str) -> torch.Tensor:
    return bits_from_numpy(nm.table(name), device)


def lookup(name: str, bits: torch.Tensor) -> torch.Tensor:
    """Apply a 65,536-entry function table (``numerics.table``) element-wise."""
    return _table(name, str(bits.device))[_u(bits)]
