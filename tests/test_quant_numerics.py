"""The quantized-weight contract (tandem.numerics.matvec_quant) against a slow per-element Python
model written from its definition (docs/numerics.md, "Quantized weights")."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from test_numerics import round_fraction

from tandem import numerics as nm
from tandem.qweights import QuantizedMatrix
from tandem.seeds import seed


def fields(b: int) -> tuple[int, int, int]:
    """(sign +-1, significand with hidden bit, exponent with subnormals at 1) of binary16 ``b``."""
    b = int(b)
    field, frac = (b >> 10) & 0x1F, b & 0x3FF
    return (-1 if b >> 15 else 1), (frac | 0x400 if field else frac), max(field, 1)


def floor_shift(v: int, shift: int) -> int:
    return v << shift if shift >= 0 else v >> -shift  # Python's >> floors


def slow_row(q, scale, zero, bits, group, x, bias=None):
    """One output row, element by element: (acc, lam, nonfinite), Python integers throughout.

    ``q`` is the row's integers [cols], ``scale``/``zero`` its groups, ``x`` the input bits."""
    cols = len(q)
    n = -(-cols // 64) * 64
    x = [int(b) for b in x] + [0] * (n - cols)
    xint, xe = [], []
    for k in range(0, n, 64):
        f = [fields(b) for b in x[k : k + 64]]
        e = max(ex for _, _, ex in f)
        xe.append(e)
        xint += [s * (m >> (e - ex)) for s, m, ex in f]
    xe_max = max(xe)
    lam = xe_max + 31 - 50 - 24 + bits
    acc = 0
    nonfinite = any((b & 0x7C00) == 0x7C00 for b in x)
    if bias is not None:
        s, m, e = fields(bias)
        acc = floor_shift(s * m, e - 25 - lam)
        nonfinite |= (int(bias) & 0x7C00) == 0x7C00
    for k in range(n // 64):
        p = 0
        for c in range(k * 64, min((k + 1) * 64, cols)):
            p += (int(q[c]) - int(zero[c // group])) * xint[c]
        assert abs(p) < 2**25
        s, m, e = fields(scale[(k * 64) // group])
        t = s * m * p
        assert abs(t) < 2**36
        term = floor_shift(t, e + xe[k] - 50 - lam)  # T weighs 2**(es + xe - 50)
        assert abs(term) < 2**52
        acc += term
    assert abs(acc) < 2**61
    nonfinite |= any((int(sc) & 0x7C00) == 0x7C00 for sc in scale)
    return acc, lam, nonfinite


def slow_fp16(acc: int, lam: int, nonfinite: bool) -> int:
    return nm.CANONICAL_NAN if nonfinite else round_fraction(Fraction(acc) * Fraction(2) ** lam)


def check_matrix(m: QuantizedMatrix, x, bias=None):
    """matvec_quant and matvec_quant_fp16 equal the slow model on every row."""
    pm = nm.PreparedQuantMatrix(m)
    acc, lam, nf = nm.matvec_quant(pm, x, bias)
    out = nm.matvec_quant_fp16(pm, x, bias)
    assert out.dtype == np.uint16 and acc.dtype == np.int64
    for r in range(m.rows):
        want = slow_row(
            m.q[r], m.scale[r], m.zero[r], m.bits, m.group, x, None if bias is None else bias[r]
        )
        assert (int(acc[r]), lam, bool(nf[r])) == want, f"row {r}"
        assert int(out[r]) == slow_fp16(*want), f"row {r}"
    return acc, lam, nf, out


def random_matrix(rng, rows, cols, bits, group, *, scale_exp=(-12, -3)) -> QuantizedMatrix:
    ng = -(-cols // group)
    mags = rng.uniform(1, 2, (rows, ng)) * 2.0 ** rng.integers(*scale_exp, (rows, ng))
    scale = nm.to_bits(np.where(rng.random((rows, ng)) < 0.2, -mags, mags))
    return QuantizedMatrix(
        q=rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8),
        scale=scale,
        zero=rng.integers(0, 1 << bits, (rows, ng), dtype=np.uint8),
        bits=bits,
        group=group,
    )


def random_input(rng, n, spread=14):
    """Blocks of very different magnitude (so some block terms floor), edge values mixed in."""
    nb = -(-n // 64)
    mag = 2.0 ** rng.integers(-spread, 3, nb).repeat(64)[:n]
    x = nm.to_bits(rng.normal(size=n) * mag)
    edges = np.array(nm.EDGE_FINITE, np.uint16)
    pick = rng.random(n) < 0.05
    x[pick] = rng.choice(edges, int(pick.sum()))
    return x


@pytest.mark.parametrize(
    "bits, cols, group",
    [
        (8, 64, 64),
        (8, 100, 100),  # per channel, odd cols: one group, padding in the last block
        (8, 200, 200),
        (4, 128, 64),
        (4, 200, 64),  # odd cols, group 64: the last group is 8 columns
        (4, 256, 128),  # group 128 over 64-blocks
        (4, 300, 128),  # the last group is a block and a bit
        (8, 130, 128),
    ],
)
def test_matvec_quant_equals_slow_model(bits, cols, group):
    rng = np.random.default_rng(seed(17_000 + 7 * cols + bits + group))
    for trial in range(3):
        m = random_matrix(rng, 6, cols, bits, group)
        x = random_input(rng, cols)
        bias = nm.to_bits(rng.normal(size=6) * 2.0 ** rng.integers(-10, 4, 6))
        _acc, _lam, nf, _ = check_matrix(m, x, bias if trial else None)
        assert not nf.any()


def test_some_block_terms_floor():
    """The random cases reach the flooring (negative) shift and the left shift both."""
    rng = np.random.default_rng(seed(17_001))
    m = random_matrix(rng, 6, 256, 4, 64, scale_exp=(-12, 12))
    x = random_input(rng, 256)
    pm = nm.PreparedQuantMatrix(m)
    _, xe, _ = nm.bfp_blocks(x)
    shift = nm.quant_block_shift(pm.scale_exp, xe[:, None], xe.max(), 4)
    assert (shift < 0).any() and (shift > 0).any()
    check_matrix(m, x)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_points_at_both_ends(bits):
    """zero = 0 and zero = 2**bits - 1 with q at both ends: d from -(2**bits - 1) to 2**bits - 1."""
    top = (1 << bits) - 1
    rng = np.random.default_rng(seed(17_002 + bits))
    q = np.array([[top] * 64 + [0] * 64, [0] * 64 + [top] * 64, [0, top] * 64], np.uint8)
    zero = np.array([[0, top], [top, 0], [top, 0]], np.uint8)
    scale = nm.to_bits(np.array([[0.5, -0.25], [3.0, 1e-3], [-7.0, 2.0**-20]]))
    m = QuantizedMatrix(q=q, scale=scale, zero=zero, bits=bits, group=64)
    assert m.dequantize()[0, 0] == 0.5 * top and m.dequantize()[1, 0] == -3.0 * top
    for x in (random_input(rng, 128), np.full(128, nm.to_bits(1.0)), np.zeros(128, np.uint16)):
        check_matrix(m, x)


def test_subnormal_negative_and_zero_scales():
    rng = np.random.default_rng(seed(17_003))
    scales = [0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x0000, 0x8000, 0xBC00, 0x7BFF, 0xFBFF]
    m = QuantizedMatrix(
        q=rng.integers(0, 16, (len(scales), 128), dtype=np.uint8),
        scale=np.array(scales, np.uint16)[:, None],
        zero=np.full((len(scales), 1), 8, np.uint8),
        bits=4,
        group=128,
    )
    x = random_input(rng, 128, spread=4)
    bias = nm.to_bits(rng.normal(size=len(scales)))
    bias[5] = bias[6]
    acc, lam, nf, _out = check_matrix(m, x, bias)
    assert not nf.any()
    # a zero scale (either sign) leaves the bias alone
    assert acc[5] == acc[6] == nm.bias_at(bias[5], lam)[0]
    # a negative scale negates the row: rows 0/1 and 2/3 share q only in distribution, so
    # check the sign against the dequantized product instead
    w = m.dequantize() @ nm.from_bits(x).astype(np.float64)
    assert np.sign(acc[1] - nm.bias_at(bias[1], lam)[0]) in (np.sign(w[1]), 0)


def test_bias_only_and_exact_zero():
    m = QuantizedMatrix(
        q=np.full((3, 64), 5, np.uint8),
        scale=np.full((3, 1), nm.to_bits(1.0), np.uint16),
        zero=np.full((3, 1), 5, np.uint8),  # d = 0 everywhere
        bits=8,
        group=64,
    )
    x = nm.to_bits(np.linspace(-3, 3, 64))
    bias = nm.to_bits(np.array([0.0, -0.0, 1.5]))
    _acc, _lam, _nf, out = check_matrix(m, x, bias)
    assert list(out) == [0x0000, 0x0000, nm.to_bits(1.5)]  # an exact zero is +0


@pytest.mark.parametrize("bits", [4, 8])
def test_worst_case_magnitudes_do_not_overflow(bits):
    """Every factor at its largest (exponent-31 scale, the longest dot, the largest bias): the
    int64/float64 path still equals the unbounded Python integers (the bounds of the contract)."""
    top = (1 << bits) - 1
    cols = nm.MAX_DOT_LEN
    m = QuantizedMatrix(
        q=np.full((2, cols), top, np.uint8),
        scale=np.array([[0x7FFF], [0xFBFF]], np.uint16),  # NaN (exponent 31, sig 2047); -65504
        zero=np.zeros((2, 1), np.uint8),
        bits=bits,
        group=cols,
    )
    x = np.full(cols, 0x7BFF, np.uint16)  # 65504 (every element exponent 30)
    x[0] = 0x83FF  # one subnormal, so not every block is alike
    acc, _lam, nf, out = check_matrix(m, x, np.array([0x7BFF, 0xFBFF], np.uint16))
    assert list(nf) == [True, False] and out[0] == nm.CANONICAL_NAN and out[1] == nm.NEG_INF
    assert 2**58 < abs(int(acc[0])) < 2**61


def test_nonfinite_scale_input_and_bias():
    rng = np.random.default_rng(seed(17_004))
    m = random_matrix(rng, 5, 192, 4, 64)
    scale = m.scale.copy()
    scale[1, 2] = 0x7C00  # +Inf in the last group of row 1
    scale[3, 0] = 0xFE00  # a NaN in the first group of row 3
    m = QuantizedMatrix(q=m.q, scale=scale, zero=m.zero, bits=4, group=64)
    x = random_input(rng, 192)
    bias = nm.to_bits(rng.normal(size=5))
    bias[4] = 0xFC00
    _acc, _lam, nf, out = check_matrix(m, x, bias)
    assert list(nf) == [False, True, False, True, True]
    assert list(out[[1, 3, 4]]) == [nm.CANONICAL_NAN] * 3
    assert (out[[0, 2]] != nm.CANONICAL_NAN).all()
    x[100] = 0x7C01  # a NaN input: every row
    _, _, nf, out = check_matrix(m, x, bias)
    assert nf.all() and (out == nm.CANONICAL_NAN).all()


def test_block_order_does_not_matter():
    """Permuting whole blocks (of the input and of a group-64 matrix alike) keeps every
    accumulator: each block term floors on its own."""
    rng = np.random.default_rng(seed(17_005))
    m = random_matrix(rng, 8, 512, 4, 64, scale_exp=(-20, -1))
    x = random_input(rng, 512, spread=20)
    perm = rng.permutation(8)
    cols = (perm[:, None] * 64 + np.arange(64)).ravel()
    mp = QuantizedMatrix(
        q=m.q[:, cols], scale=m.scale[:, perm], zero=m.zero[:, perm], bits=4, group=64
    )
    a, lam, _ = nm.matvec_quant(nm.PreparedQuantMatrix(m), x)
    b, lam2, _ = nm.matvec_quant(nm.PreparedQuantMatrix(mp), x[cols])
    assert lam == lam2 and np.array_equal(a, b)


def test_lam_and_shift_definitions():
    """The accumulator sits ``bits`` above the FP16 contract's; block terms shift by at most
    24 - bits."""
    for bits in (4, 8):
        for xe_max in (1, 15, 31):
            assert nm.quant_lsb_exponent(xe_max, bits) == xe_max + 31 - 50 - 24 + bits
            assert nm.quant_block_shift(31, xe_max, xe_max, bits) == 24 - bits
        assert nm.quant_block_shift(10, 3, 20, bits) == 10 + 3 - 20 - 7 - bits


def test_fp16_matvec_untouched_by_bias_refactor():
    """bias_to_acc is bias_at at the FP16 contract's lam."""
    b = np.array(nm.EDGE_BITS, np.uint16)
    for xe_max in (1, 13, 31):
        v1, f1 = nm.bias_to_acc(b, xe_max)
        v2, f2 = nm.bias_at(b, nm.acc_lsb_exponent(xe_max))
        assert np.array_equal(v1, v2) and np.array_equal(f1, f2)


def test_matvec_any_dispatches():
    rng = np.random.default_rng(seed(17_006))
    m = random_matrix(rng, 4, 64, 8, 64)
    x = random_input(rng, 64)
    pq = nm.PreparedQuantMatrix(m)
    pf = nm.PreparedMatrix(nm.to_bits(m.dequantize()))
    assert np.array_equal(nm.matvec_any_fp16(pq, x), nm.matvec_quant_fp16(pq, x))
    assert np.array_equal(nm.matvec_any_fp16(pf, x), nm.matvec_fp16(pf, x))
    assert nm.matvec_any(pq, x)[1] == nm.matvec_quant(pq, x)[1]


def test_bad_inputs_get_one_line_errors():
    rng = np.random.default_rng(seed(17_007))
    m = random_matrix(rng, 4, 100, 8, 100)
    pm = nm.PreparedQuantMatrix(m)
    with pytest.raises(ValueError, match=r"input shape \(99,\) does not match 100 columns"):
        nm.matvec_quant(pm, np.zeros(99, np.uint16))
    with pytest.raises(ValueError, match=r"bias shape \(3,\) does not match 4 rows"):
        nm.matvec_quant(pm, np.zeros(100, np.uint16), np.zeros(3, np.uint16))
    with pytest.raises(TypeError, match="needs a QuantizedMatrix, not ndarray"):
        nm.PreparedQuantMatrix(np.zeros((4, 64)))
    big = QuantizedMatrix(
        q=np.zeros((1, nm.MAX_DOT_LEN + 64), np.uint8),
        scale=np.zeros((1, 1), np.uint16),
        zero=np.zeros((1, 1), np.uint8),
        bits=4,
        group=nm.MAX_DOT_LEN + 64,
    )
    with pytest.raises(ValueError, match="16448 columns exceed the contract's 16384"):
        nm.PreparedQuantMatrix(big)
