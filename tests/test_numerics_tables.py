"""The function tables (``tandem.numerics.table``: exp, recip, rsqrt, gelu) over all 65,536 inputs
against an independent model: the exact function in mpmath's arbitrary precision, rounded to
binary16 by a rounding routine written here from IEEE 754's definition (round to nearest, ties to
even, gradual underflow, overflow to Inf). Nothing of tandem.numerics is used to build the
expected values, so a table that is checked against itself cannot pass here.

The documented special cases (docs/numerics.md, ``table``'s docstring) are asserted one by one.
Runs in about 20 s on the project's 2-core machine."""

from __future__ import annotations

import functools

import mpmath
import numpy as np
import pytest

from tandem import numerics as nm

PREC = 200  # bits; GELU's 1 + tanh(z) loses at most ~130 of them where it is evaluated directly
CANONICAL_NAN = 0x7E00
ALL = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def value(bits: int) -> float:
    """The binary16 with these bits as a Python float (through NumPy's float16, exact)."""
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def is_nan(bits: int) -> bool:
    return (bits & 0x7C00) == 0x7C00 and (bits & 0x03FF) != 0


def round_binary16(magnitude: mpmath.mpf, negative: bool) -> int:
    """The binary16 nearest to ``(-1)**negative * magnitude`` (ties to even); +-Inf past the
    largest finite value's rounding boundary (65520); +-0 below half the smallest subnormal."""
    sign = 0x8000 if negative else 0
    if magnitude == 0:
        return sign
    if mpmath.isinf(magnitude):
        return sign | 0x7C00
    _, k = mpmath.frexp(magnitude)  # magnitude = m * 2**k, 0.5 <= m < 1
    e = max(int(k) - 1, -14)  # binary exponent of the result's quantum grid (subnormals: -14)
    n = mpmath.ldexp(magnitude, 10 - e)  # in units of the quantum 2**(e - 10): exact
    f = int(mpmath.floor(n))
    r = n - f
    if r > 0.5 or (r == 0.5 and f % 2 == 1):
        f += 1
    if f == 2048:  # rounded up to the next binade
        e, f = e + 1, 1024
    if e > 15:
        return sign | 0x7C00
    # normal: field e + 15, fraction f - 1024; subnormal (e = -14, f < 1024): field 0, fraction f
    return sign | (((e + 15) << 10) + f - 1024)


def exact(name: str, x: mpmath.mpf) -> mpmath.mpf:
    """The function at a finite input, to PREC bits."""
    if name == "exp":
        return mpmath.exp(x)
    if name == "recip":
        return 1 / x
    if name == "rsqrt":
        return 1 / mpmath.sqrt(x)
    if name == "gelu":
        # GPT-2's tanh form with its decimal constants: 0.5 x (1 + tanh(sqrt(2/pi) (x + c x^3)))
        z = mpmath.sqrt(2 / mpmath.pi) * (x + mpmath.mpf("0.044715") * x**3)
        if z > -40:
            return x * (1 + mpmath.tanh(z)) / 2
        # far left, 1 + tanh(z) = 2 e^(2z) / (1 + e^(2z)) exactly, without the cancellation
        e2z = mpmath.exp(2 * z)
        return x * e2z / (1 + e2z)
    raise ValueError(name)


@functools.cache
def expected(name: str) -> np.ndarray:
    """The independent table: every input, specials by IEEE/contract rules spelled out here."""
    out = np.zeros(1 << 16, np.uint16)
    with mpmath.workprec(PREC):
        for b in range(1 << 16):
            if is_nan(b):
                out[b] = CANONICAL_NAN
                continue
            x = value(b)
            neg_in = (b & 0x8000) != 0
            if np.isinf(x):
                continue  # the specials below
            if x == 0 and name in ("recip", "rsqrt"):
                out[b] = 0xFC00 if neg_in else 0x7C00
                continue
            if name == "rsqrt" and x < 0:
                out[b] = CANONICAL_NAN
                continue
            y = exact(name, mpmath.mpf(x))
            if name == "gelu":
                negative = neg_in  # gelu(x) has the sign of x (gelu(-0) = -0)
            else:
                negative = y < 0
            out[b] = round_binary16(abs(y), negative)
    specials = {
        "exp": {0x7C00: 0x7C00, 0xFC00: 0x0000},
        "recip": {0x7C00: 0x0000, 0xFC00: 0x8000},
        "rsqrt": {0x7C00: 0x0000, 0xFC00: CANONICAL_NAN},
        "gelu": {0x7C00: 0x7C00, 0xFC00: 0x8000},
    }[name]
    for b, want in specials.items():
        out[b] = want
    return out


def test_rounding_routine_on_known_values():
    """The independent rounding itself, on values whose binary16 is known by hand."""
    mp = mpmath.mpf
    with mpmath.workprec(PREC):
        assert round_binary16(mp(1), False) == 0x3C00
        assert round_binary16(mp(65504), False) == 0x7BFF
        assert round_binary16(mp(65519.99), False) == 0x7BFF
        assert round_binary16(mp(65520), False) == 0x7C00  # the tie rounds to even: Inf
        assert round_binary16(mp(2) ** -24, True) == 0x8001  # smallest subnormal
        assert round_binary16(mp(2) ** -25, False) == 0x0000  # tie with 0: even
        assert round_binary16(mp(3) * mp(2) ** -25, False) == 0x0002  # tie 1.5 ulp: even
        assert round_binary16(mp(2) ** -14, False) == 0x0400  # smallest normal
        assert round_binary16(mp(1) + mp(2) ** -11, False) == 0x3C00  # tie: even (down)
        assert round_binary16(mp(1) + 3 * mp(2) ** -11, False) == 0x3C02  # tie: even (up)
        assert round_binary16(mp(2) - mp(2) ** -12, False) == 0x4000  # carries into 2.0


@pytest.mark.parametrize("name", ["exp", "recip", "rsqrt", "gelu"])
def test_table_equals_independent_model_on_all_inputs(name):
    got = nm.table(name)
    want = expected(name)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [
        (hex(int(b)), value(int(b)), hex(int(got[b])), hex(int(want[b]))) for b in bad[:10]
    ]


NANS = [b for b in range(1 << 16) if is_nan(b)]


@pytest.mark.parametrize("name", ["exp", "recip", "rsqrt", "gelu"])
def test_every_nan_input_gives_the_canonical_nan(name):
    t = nm.table(name)
    assert len(NANS) == 2046
    assert {int(v) for v in t[NANS]} == {CANONICAL_NAN}


@pytest.mark.parametrize(
    "name,x,want",
    [
        ("exp", 0x7C00, 0x7C00),  # exp(+Inf) = +Inf
        ("exp", 0xFC00, 0x0000),  # exp(-Inf) = +0
        ("exp", 0x0000, 0x3C00),  # exp(+-0) = 1
        ("exp", 0x8000, 0x3C00),
        ("exp", 0x4A00, 0x7C00),  # exp(12) overflows
        ("exp", 0xCC80, 0x0000),  # exp(-18) underflows to +0
        ("recip", 0x0000, 0x7C00),  # recip(+0) = +Inf
        ("recip", 0x8000, 0xFC00),  # recip(-0) = -Inf
        ("recip", 0x7C00, 0x0000),  # recip(+Inf) = +0
        ("recip", 0xFC00, 0x8000),  # recip(-Inf) = -0
        ("recip", 0x0001, 0x7C00),  # 1 / 2**-24 overflows
        ("recip", 0x4000, 0x3800),  # 1/2
        ("rsqrt", 0x0000, 0x7C00),  # rsqrt(+0) = +Inf
        ("rsqrt", 0x8000, 0xFC00),  # rsqrt(-0) = -Inf
        ("rsqrt", 0x7C00, 0x0000),  # rsqrt(+Inf) = +0
        ("rsqrt", 0xFC00, CANONICAL_NAN),  # rsqrt(-Inf) = NaN
        ("rsqrt", 0xBC00, CANONICAL_NAN),  # rsqrt(-1) = NaN
        ("rsqrt", 0x8001, CANONICAL_NAN),  # rsqrt(-subnormal) = NaN
        ("rsqrt", 0x4400, 0x3800),  # rsqrt(4) = 1/2
        ("gelu", 0x7C00, 0x7C00),  # gelu(+Inf) = +Inf
        ("gelu", 0xFC00, 0x8000),  # gelu(-Inf) = -0
        ("gelu", 0x0000, 0x0000),
        ("gelu", 0x8000, 0x8000),
        ("gelu", 0x7BFF, 0x7BFF),  # gelu(65504) = 65504
        ("gelu", 0xFBFF, 0x8000),  # gelu(-65504) = -0
    ],
)
def test_documented_special_cases(name, x, want):
    assert int(nm.table(name)[x]) == want
    assert int(nm.lookup(name, np.array([x], np.uint16))[0]) == want


def test_a_wrong_table_entry_is_caught():
    """The comparison can fail: one entry off by an ulp is reported."""
    bad = nm.table("exp").copy()
    bad[0x3C00] += 1
    assert np.flatnonzero(bad != expected("exp")).tolist() == [0x3C00]
