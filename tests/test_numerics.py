"""The numeric contract (tandem.numerics) against naive, obviously-correct Python models."""

import bisect
import decimal
from fractions import Fraction

import numpy as np
import pytest

from tandem import numerics as nm
from tandem.seeds import seed


def fp16_fraction(bits: int) -> Fraction:
    neg, sig, exp = (int(v[0]) for v in nm.decode(np.array([bits], np.uint16)))
    v = Fraction(sig) * Fraction(2) ** (exp - 25)
    return -v if neg else v


FINITE = [b for b in range(0x10000) if (b & 0x7C00) != 0x7C00]
FINITE_VALUES = sorted({fp16_fraction(b): b for b in FINITE if b != 0x8000}.items())
SORTED_VALUES = [v for v, _ in FINITE_VALUES]


def round_fraction(v: Fraction) -> int:
    """Nearest binary16 (ties to even) by search, overflow to Inf; the naive model of rounding."""
    if v == 0:
        return 0
    if abs(v) >= Fraction(65520):
        return 0xFC00 if v < 0 else 0x7C00
    i = bisect.bisect_left(SORTED_VALUES, v)
    cands = [FINITE_VALUES[j] for j in (i - 1, i) if 0 <= j < len(SORTED_VALUES)]
    best = min(cands, key=lambda c: (abs(c[0] - v), c[1] & 1))
    bits = best[1]
    if best[0] == 0 and v < 0:
        bits = 0x8000
    return bits


def naive_dot(w: list[int], x: list[int], bias: int | None) -> tuple[int, int]:
    """One row of the contract's dot product, element by element: (accumulator, lam)."""
    n = len(w)
    pad = (-n) % nm.BLOCK
    w = w + [0] * pad
    x = x + [0] * pad

    def fields(b):
        neg, sig, exp = (int(v[0]) for v in nm.decode(np.array([b], np.uint16)))
        return (-1 if neg else 1), sig, exp

    blocks = []
    for c in range(0, len(w), nm.BLOCK):
        wf = [fields(b) for b in w[c : c + nm.BLOCK]]
        xf = [fields(b) for b in x[c : c + nm.BLOCK]]
        we = max(f[2] for f in wf)
        xe = max(f[2] for f in xf)
        s = sum(
            (ws * (wm >> (we - wexp))) * (xs * (xm >> (xe - xexp)))
            for (ws, wm, wexp), (xs, xm, xexp) in zip(wf, xf, strict=False)
        )
        blocks.append((s, we, xe))
    xe_max = max(b[2] for b in blocks)
    lam = xe_max + nm.EW_MAX - 50 - nm.ACC_FRAC
    acc = 0
    for s, we, xe in blocks:
        sh = we + xe - xe_max - nm.EW_MAX + nm.ACC_FRAC
        acc += s << sh if sh >= 0 else s >> -sh  # Python >> floors
    if bias is not None:
        bs, bm, be = fields(bias)
        sh = be - 25 - lam
        acc += bs * bm << sh if sh >= 0 else (bs * bm) >> -sh
    return acc, lam


def random_fp16(rng, shape, scale=1.0):
    return nm.to_bits(rng.normal(0, scale, size=shape) * np.exp2(rng.integers(-6, 4, size=shape)))


@pytest.mark.parametrize(
    "rows,cols",
    # ... up to GPT-2's widths (768, 3,072) and the contract's longest dot product (16,384)
    [(1, 1), (3, 64), (5, 100), (17, 200), (2, 129), (4, 768), (3, 3072), (2, nm.MAX_DOT_LEN)],
)
def test_matvec_matches_naive_model(rows, cols):
    rng = np.random.default_rng(seed(rows * 1000 + cols))
    w = random_fp16(rng, (rows, cols))
    x = random_fp16(rng, (cols,), 4.0)
    b = random_fp16(rng, (rows,))
    acc, lam, nonfinite = nm.matvec(nm.PreparedMatrix(w), x, b)
    assert not nonfinite.any()
    for r in range(rows):
        want_acc, want_lam = naive_dot([int(v) for v in w[r]], [int(v) for v in x], int(b[r]))
        assert (int(acc[r]), lam) == (want_acc, want_lam)
    out = nm.acc_to_fp16(acc, lam)
    for r in range(rows):
        assert int(out[r]) == round_fraction(Fraction(int(acc[r])) * Fraction(2) ** lam)


def test_longest_dot_of_largest_values_does_not_overflow():
    """16,384 products of +-65504: the accumulator's worst case (the contract bounds it to 61
    bits) equals the naive model's unbounded integer sum, and rounds to +-Inf."""
    n = nm.MAX_DOT_LEN
    w = np.full((2, n), 0x7BFF, np.uint16)
    w[1] |= 0x8000
    x = np.full((n,), 0x7BFF, np.uint16)
    acc, lam, nonfinite = nm.matvec(nm.PreparedMatrix(w), x, None)
    assert not nonfinite.any()
    for r in range(2):
        want_acc, want_lam = naive_dot([int(v) for v in w[r]], [int(v) for v in x], None)
        assert (int(acc[r]), lam) == (want_acc, want_lam)
        assert abs(want_acc) < 1 << 61
    assert nm.acc_to_fp16(acc, lam).tolist() == [0x7C00, 0xFC00]


def test_matvec_extreme_exponents_and_subnormals():
    rng = np.random.default_rng(seed(7))
    specials = np.array(nm.EDGE_FINITE, np.uint16)
    w = rng.choice(specials, size=(4, 130)).astype(np.uint16)
    x = rng.choice(specials, size=(130,)).astype(np.uint16)
    acc, lam, _ = nm.matvec(nm.PreparedMatrix(w), x, w[:, 0].copy())
    for r in range(4):
        assert (int(acc[r]), lam) == naive_dot(
            [int(v) for v in w[r]], [int(v) for v in x], int(w[r, 0])
        )
    assert np.abs(acc).max() < 2**61


def test_nonfinite_operands_give_nan_rows():
    w = nm.to_bits(np.ones((3, 70)))
    w[1, 5] = nm.POS_INF
    x = nm.to_bits(np.ones(70))
    out = nm.matvec_fp16(nm.PreparedMatrix(w), x)
    assert [int(v) for v in out] == [int(nm.to_bits(70.0)), nm.CANONICAL_NAN, int(nm.to_bits(70.0))]
    x[69] = 0x7E01
    assert (nm.matvec_fp16(nm.PreparedMatrix(w), x) == nm.CANONICAL_NAN).all()


def test_acc_to_fp16_rounding_against_fractions():
    rng = np.random.default_rng(seed(1))
    acc = np.concatenate(
        [
            rng.integers(-(2**61), 2**61, size=300),
            rng.integers(-5000, 5000, size=300),
            np.array([0, 1, -1, 2047, 2048, 2049, 4095, 4097, 6143, 2**40 + 2**29]),
        ]
    ).astype(np.int64)
    for lam in (-80, -60, -40, -24, -30, 0, -10):
        got = nm.acc_to_fp16(acc, lam)
        for a, g in zip(acc, got, strict=False):
            assert int(g) == round_fraction(Fraction(int(a)) * Fraction(2) ** lam), (a, lam)


def test_elementwise_ops_are_correctly_rounded():
    rng = np.random.default_rng(seed(2))
    specials = np.array(nm.EDGE_BITS, np.uint16)
    a = np.concatenate([rng.integers(0, 0x10000, 4000).astype(np.uint16), np.repeat(specials, 15)])
    b = np.concatenate([rng.integers(0, 0x10000, 4000).astype(np.uint16), np.tile(specials, 15)])
    for op, fn in (
        (nm.fp16_add, lambda p, q: p + q),
        (nm.fp16_sub, lambda p, q: p - q),
        (nm.fp16_mul, lambda p, q: p * q),
    ):
        got = op(a, b)
        for p, q, g in zip(a, b, got, strict=False):
            p, q = int(p), int(q)
            if (p & 0x7C00) == 0x7C00 or (q & 0x7C00) == 0x7C00:
                continue  # IEEE special cases are checked by NumPy itself below
            want = round_fraction(fn(fp16_fraction(p), fp16_fraction(q)))
            exact = fn(fp16_fraction(p), fp16_fraction(q))
            if exact == 0:  # sign of an exact zero follows IEEE rules, not the fraction
                continue
            assert int(g) == want, (hex(p), hex(q))
    inf_minus_inf = nm.fp16_sub(np.uint16(0x7C00), np.uint16(0x7C00))
    assert int(inf_minus_inf) == nm.CANONICAL_NAN
    assert int(nm.fp16_add(np.uint16(0x0000), np.uint16(0x8000))) == 0x0000


def test_max_total_order_and_nan():
    assert int(nm.fp16_max(np.array([0x8000, 0x0000], np.uint16))) == 0x0000
    assert int(nm.fp16_max(np.array([0xFC00, 0xBC00], np.uint16))) == 0xBC00
    assert int(nm.fp16_max(np.array([0x3C00, 0x7D00], np.uint16))) == nm.CANONICAL_NAN


@pytest.mark.parametrize("name", ["exp", "recip", "rsqrt", "gelu"])
def test_tables_are_correctly_rounded_on_a_sample(name):
    t = nm.table(name)
    rng = np.random.default_rng(seed(3))
    for b in rng.choice(FINITE, size=300, replace=False):
        x = fp16_fraction(int(b))
        if (name in ("recip", "rsqrt") and x == 0) or (name == "rsqrt" and x < 0):
            continue
        d = nm._exact(name, float(x))
        if abs(d) >= 65520:
            want = 0xFC00 if d < 0 else 0x7C00
        elif abs(d) <= decimal.Decimal(2) ** -25:
            assert int(t[b]) & 0x7FFF in (0, 1), (name, hex(int(b)))
            continue
        else:
            want = round_fraction(Fraction(d))
        assert int(t[b]) == want, (name, hex(int(b)))


def test_argmax_lowest_index_on_tie():
    assert nm.argmax(np.array([3, 7, 7, 1], np.int64)) == 1
