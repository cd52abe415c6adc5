"""tandem.gpu.contract equals tandem.numerics bit for bit, on random inputs and special values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem import numerics as nm
from tandem.gpu import contract as c
from tandem.seeds import seed

SPECIALS = np.array(nm.EDGE_BITS, np.uint16)


def _random_bits(rng, shape, specials=True, scale=None):
    if scale is None:
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    else:
        bits = nm.to_bits(rng.standard_normal(shape) * scale)
    if specials:
        mask = rng.random(shape) < 0.05
        bits = np.where(mask, rng.choice(SPECIALS, size=shape), bits).astype(np.uint16)
    return bits


def _t(a):
    return c.bits_from_numpy(a)


def _n(t):
    return c.bits_to_numpy(t)


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_elementwise(op):
    rng = np.random.default_rng(seed(1))
    a = np.concatenate([_random_bits(rng, 200_000), np.repeat(SPECIALS, SPECIALS.size)])
    b = np.concatenate([_random_bits(rng, 200_000), np.tile(SPECIALS, SPECIALS.size)])
    got = _n(getattr(c, f"fp16_{op}")(_t(a), _t(b)))
    np.testing.assert_array_equal(got, getattr(nm, f"fp16_{op}")(a, b))


def test_acc_to_fp16():
    rng = np.random.default_rng(seed(2))
    acc = np.concatenate(
        [
            rng.integers(-(1 << 61), 1 << 61, 20_000),
            rng.integers(-5000, 5000, 20_000),
            np.array([0, 1, -1, 2047, 2048, 2049, 4095, 4097, -(1 << 61)]),
        ]
    ).astype(np.int64)
    lam = rng.integers(-90, 10, acc.size).astype(np.int64)
    got = _n(c.acc_to_fp16(torch.from_numpy(acc), torch.from_numpy(lam)))
    np.testing.assert_array_equal(got, nm.acc_to_fp16(acc, lam))


@pytest.mark.parametrize("rows,cols,T", [(5, 64, 3), (37, 200, 7), (130, 96, 1)])
@pytest.mark.parametrize("specials", [False, True])
def test_matmul(rows, cols, T, specials):
    rng = np.random.default_rng(seed(rows + cols + T))
    w = _random_bits(rng, (rows, cols), specials, scale=None if specials else 0.5)
    x = _random_bits(rng, (T, cols), specials, scale=None if specials else 2.0)
    b = _random_bits(rng, (rows,), specials, scale=None if specials else 0.1)
    pm = nm.PreparedMatrix(w)
    for prep in (c.PreparedMatrix.from_bits(_t(w)), c.PreparedMatrix.from_numpy(pm)):
        acc, lam, nf = c.matmul(prep, _t(x), _t(b))
        got16 = _n(c.matmul_fp16(prep, _t(x), _t(b)))
        for t in range(T):
            a_ref, l_ref, nf_ref = nm.matvec(pm, x[t], b)
            np.testing.assert_array_equal(acc[t].numpy(), a_ref)
            assert int(lam[t]) == l_ref
            np.testing.assert_array_equal(nf[t].numpy(), nf_ref)
            np.testing.assert_array_equal(got16[t], nm.matvec_fp16(pm, x[t], b))


@pytest.mark.parametrize("rows,cols,T,split", [(192, 130, 37, 128), (96, 64, 1, 32), (9, 70, 5, 3)])
@pytest.mark.parametrize("specials", [False, True])
def test_matmul_row_slices_and_transposed(rows, cols, T, split, specials, monkeypatch):
    """The prefill's c_attn product: row slices of one prepared matrix (Q/K, and V taken
    transposed) equal the whole product's columns bit for bit, non-finite values included; also
    across several T chunks (a small chunk budget)."""
    rng = np.random.default_rng(seed(rows * T + split))
    w = _random_bits(rng, (rows, cols), False, scale=0.5)
    x = _random_bits(rng, (T, cols), False, scale=2.0)
    b = _random_bits(rng, (rows,), False, scale=0.1)
    if specials:  # a non-finite weight row, input position and bias, and +-0 / subnormals
        w[1, 5], x[0, 3], b[-1] = 0x7C00, 0x7E00 if T > 1 else 0x0001, 0xFC00
        w[2], x[-1, :7] = 0x8000, SPECIALS[1:8]  # -0 and subnormals
    pm = c.PreparedMatrix.from_bits(_t(w))
    for chunk in (c._CHUNK_ELEMS, 2 * pm.n_blocks * rows):
        monkeypatch.setattr(c, "_CHUNK_ELEMS", chunk)
        whole = c.matmul(pm, _t(x), _t(b))
        whole16 = c.matmul_fp16(pm, _t(x), _t(b))
        top, bottom = pm.row_slice(0, split), pm.row_slice(split, rows)
        assert torch.equal(c.matmul_fp16(top, _t(x), _t(b[:split])), whole16[:, :split])
        got = c.matmul(bottom, _t(x), _t(b[split:]), transposed=True)
        assert torch.equal(got[0], whole[0][:, split:].T)
        assert torch.equal(got[1], whole[1])
        assert torch.equal(got[2], whole[2][:, split:].T)
        vt = c.matmul_fp16(bottom, _t(x), _t(b[split:]), transposed=True)
        assert vt.shape == (rows - split, T) and vt.is_contiguous()
        assert torch.equal(vt, whole16[:, split:].T)
    if specials:
        assert c.is_nan(whole16).any() and not c.is_nan(whole16).all()
    with pytest.raises(ValueError, match="out of"):
        pm.row_slice(3, rows + 1)


@pytest.mark.parametrize("n", [1, 64, 100, 1024])
def test_dot_rows(n):
    rng = np.random.default_rng(seed(n))
    for specials in (False, True):
        a = _random_bits(rng, (9, n), specials, scale=None if specials else 1.0)
        b = _random_bits(rng, (9, n), specials, scale=None if specials else 0.01)
        got = _n(c.dot_fp16(_t(a), _t(b)))
        want = np.array([nm.dot_fp16(a[i], b[i]) for i in range(9)], np.uint16)
        np.testing.assert_array_equal(got, want)


def test_max_and_tables():
    rng = np.random.default_rng(seed(5))
    x = _random_bits(rng, (50, 33))
    x[3] = nm.to_bits(rng.standard_normal(33))
    got = _n(c.fp16_max(_t(x)))
    np.testing.assert_array_equal(got, [nm.fp16_max(r) for r in x])
    live = rng.random((50, 33)) < 0.5
    live[:, 0] = True
    got = _n(c.fp16_max(_t(x), torch.from_numpy(live)))
    np.testing.assert_array_equal(got, [nm.fp16_max(r[m]) for r, m in zip(x, live, strict=True)])
    allbits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for name in ("exp", "recip", "rsqrt", "gelu"):
        np.testing.assert_array_equal(_n(c.lookup(name, _t(allbits))), nm.lookup(name, allbits))
