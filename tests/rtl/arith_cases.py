"""Units, stimulus and expected results for the arithmetic-unit testbench (arith_tb.py).

Shared by the pytest side (which builds the unit) and the cocotb side (which drives it): both
call :func:`build_unit` with the same name, so the Verilog and the testbench's payload layouts
always agree. Every expected value comes from ``tandem.numerics``.
"""

from __future__ import annotations

import numpy as np
from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from tandem import numerics as nm
from tandem.rtl.arith import (
    AccToFP16,
    Accumulator,
    AccumulatorShift,
    AddOp,
    BlockAlign,
    BlockDot,
    FP16Add,
    FP16Mul,
    FP16Table,
    table_plan,
)
from tandem.sim.streams import Packer

TAG = unsigned(8)
"""Every unit under test carries an 8-bit sequence number, to catch lost or reordered items."""


# --------------------------------------------------------------------------------------------
# a one-row dot product built from the block-floating-point units


class RowKind:
    BLOCK = 0
    BIAS = 1


BEAT = data.StructLayout({"xe_max": 5, "bias": 16, "kind": 1, "first": 1, "last": 1, "tag": TAG})
"""Side data of one DotRow beat."""


class DotRow(wiring.Component):
    """Test wrapper: one row of ``numerics.matvec`` from BlockAlign, BlockDot, AccumulatorShift,
    Accumulator and AccToFP16, the way an MPU lane composes them.

    A row is a stream of beats: an optional bias beat (``kind = BIAS``, ``bias`` holds the
    binary16 bias) and then one beat per 64-column block (``w`` and ``x`` blocks). ``first``
    marks the row's first beat, ``last`` its last; ``xe_max`` is the largest block exponent of
    the whole input vector (the MPU knows it from aligning x once). Output per row: the raw
    accumulator and the binary16 result.
    """

    def __init__(self):
        # w and the beat fields first, in BlockAlign's payload order: the w aligner's input is
        # then one slice of ours (Icarus re-evaluates a unit once per driver of its payload)
        self.in_layout = data.StructLayout(
            {"w": data.ArrayLayout(16, nm.BLOCK), "beat": BEAT, "x": data.ArrayLayout(16, nm.BLOCK)}
        )
        self.out_layout = data.StructLayout({"value": 16, "acc": signed(64), "tag": TAG})
        super().__init__(
            {
                "i": In(stream.Signature(self.in_layout)),
                "o": Out(stream.Signature(self.out_layout)),
            }
        )
        self.tag = TAG

    def elaborate(self, platform):
        m = Module()
        beat = BEAT
        m.submodules.w_align = wa = BlockAlign(tag=beat)
        m.submodules.x_align = xa = BlockAlign()
        dot_tag = data.StructLayout({"beat": beat, "w_exp": 5, "x_exp": 5, "nonfinite": 1})
        m.submodules.dot = dot = BlockDot(tag=dot_tag)
        shift_tag = data.StructLayout({"beat": beat, "nonfinite": 1})
        m.submodules.shift = shift = AccumulatorShift(tag=shift_tag)
        acc_tag = data.StructLayout({"xe_max": 5, "nonfinite": 1, "tag": TAG})
        m.submodules.acc = acc = Accumulator(tag=acc_tag)
        m.submodules.round = rnd = AccToFP16(tag=data.StructLayout({"acc": signed(64), "tag": TAG}))

        i = self.i.payload
        # the two aligners run in lockstep: same valid in, same ready out
        m.d.comb += [
            wa.i.valid.eq(self.i.valid),
            xa.i.valid.eq(self.i.valid),
            self.i.ready.eq(wa.i.ready),
            wa.i.payload.as_value().eq(i.as_value()[: data.Layout.cast(wa.in_layout).size]),
            xa.i.payload.as_value().eq(i.x.as_value()),
            dot.i.valid.eq(wa.o.valid),
            wa.o.ready.eq(dot.i.ready),
            xa.o.ready.eq(dot.i.ready),
            dot.i.payload.w.eq(wa.o.payload.q),
            dot.i.payload.x.eq(xa.o.payload.q),
            dot.i.payload.tag.beat.eq(wa.o.payload.tag),
            dot.i.payload.tag.w_exp.eq(wa.o.payload.exp),
            dot.i.payload.tag.x_exp.eq(xa.o.payload.exp),
            dot.i.payload.tag.nonfinite.eq(wa.o.payload.nonfinite | xa.o.payload.nonfinite),
        ]
        # a bias beat replaces the block sum by the bias significand, placed with x_exp = 25
        b = dot.o.payload.tag.beat
        bias_exp = b.bias[10:15]
        bias_sig = Signal(11)
        m.d.comb += bias_sig.eq(b.bias[:10] | ((bias_exp != 0) << 10))
        m.d.comb += [
            shift.i.valid.eq(dot.o.valid),
            dot.o.ready.eq(shift.i.ready),
            shift.i.payload.xe_max.eq(b.xe_max),
            shift.i.payload.tag.beat.eq(b),
        ]
        with m.If(b.kind == RowKind.BIAS):
            m.d.comb += [
                shift.i.payload.sum.eq(Mux(b.bias[15], -bias_sig, bias_sig)),
                shift.i.payload.w_exp.eq(Mux(bias_exp == 0, 1, bias_exp)),
                shift.i.payload.x_exp.eq(25),
                shift.i.payload.tag.nonfinite.eq(bias_exp == 31),
            ]
        with m.Else():
            m.d.comb += [
                shift.i.payload.sum.eq(dot.o.payload.sum),
                shift.i.payload.w_exp.eq(dot.o.payload.tag.w_exp),
                shift.i.payload.x_exp.eq(dot.o.payload.tag.x_exp),
                shift.i.payload.tag.nonfinite.eq(dot.o.payload.tag.nonfinite),
            ]
        # the row's non-finite flag is an OR over its beats, kept beside the accumulator
        sb = shift.o.payload.tag.beat
        nf_run = Signal()
        nf_now = Signal()
        m.d.comb += nf_now.eq(shift.o.payload.tag.nonfinite | (~sb.first & nf_run))
        with m.If(shift.o.valid & shift.o.ready):
            m.d.sync += nf_run.eq(nf_now)
        m.d.comb += [
            acc.i.valid.eq(shift.o.valid),
            shift.o.ready.eq(acc.i.ready),
            acc.i.payload.value.eq(shift.o.payload.value),
            acc.i.payload.first.eq(sb.first),
            acc.i.payload.last.eq(sb.last),
            acc.i.payload.tag.xe_max.eq(sb.xe_max),
            acc.i.payload.tag.nonfinite.eq(nf_now),
            acc.i.payload.tag.tag.eq(sb.tag),
            rnd.i.valid.eq(acc.o.valid),
            acc.o.ready.eq(rnd.i.ready),
            rnd.i.payload.acc.eq(acc.o.payload.acc),
            rnd.i.payload.lam.eq(acc.o.payload.tag.xe_max + nm.EW_MAX - 50 - nm.ACC_FRAC),
            rnd.i.payload.nonfinite.eq(acc.o.payload.tag.nonfinite),
            rnd.i.payload.tag.acc.eq(acc.o.payload.acc),
            rnd.i.payload.tag.tag.eq(acc.o.payload.tag.tag),
            self.o.valid.eq(rnd.o.valid),
            rnd.o.ready.eq(self.o.ready),
            self.o.payload.value.eq(rnd.o.payload.value),
            self.o.payload.acc.eq(rnd.o.payload.tag.acc),
            self.o.payload.tag.eq(rnd.o.payload.tag.tag),
        ]
        return m


# --------------------------------------------------------------------------------------------
# units by name


def build_unit(name: str):
    """The unit called ``name``: ``add``, ``mul``, ``table-<function>`` (reduced ROM),
    ``table-full-<function>`` (65,536 entries), ``table2-<function>`` (the reduced ROM with
    two lookup ports), ``align``, ``dot``, ``shift``, ``acc``, ``round`` or ``dotrow``."""
    if name.startswith("table-full-"):
        return FP16Table(name.removeprefix("table-full-"), reduced=False, tag=TAG)
    if name.startswith("table-"):
        return FP16Table(name.removeprefix("table-"), tag=TAG)
    if name.startswith("table2-"):
        return FP16Table(name.removeprefix("table2-"), ports=2, tag=TAG)
    factories = {
        "add": lambda: FP16Add(tag=TAG),
        "mul": lambda: FP16Mul(tag=TAG),
        "align": lambda: BlockAlign(tag=TAG),
        "dot": lambda: BlockDot(tag=TAG),
        "shift": lambda: AccumulatorShift(tag=TAG),
        "acc": lambda: Accumulator(tag=TAG),
        "round": lambda: AccToFP16(tag=TAG),
        "dotrow": DotRow,
    }
    if name not in factories:
        raise ValueError(f"unknown unit {name!r}")
    return factories[name]()


# --------------------------------------------------------------------------------------------
# binary16 stimulus

SPECIALS = np.array(nm.EDGE_BITS, dtype=np.uint16)
"""binary16 special classes; every pair of them is tested for add, sub and mul."""


def _fields(sign, exp, frac):
    return ((np.asarray(sign) << 15) | (np.asarray(exp) << 10) | np.asarray(frac)).astype(np.uint16)


def _ties(a, b, op) -> np.ndarray:
    """Which pairs have an exact result exactly halfway between two binary16 values."""
    fa = a.view(np.float16).astype(np.float64)
    fb = b.view(np.float16).astype(np.float64)
    with np.errstate(all="ignore"):
        exact = op(fa, fb)  # exact in float64 for binary16 operands
        r = exact.astype(np.float16)
        toward = np.where(exact > r.astype(np.float64), np.float16(np.inf), np.float16(-np.inf))
        other = np.nextafter(r, toward.astype(np.float16))
        mid = (r.astype(np.float64) + other.astype(np.float64)) / 2
    return np.isfinite(exact) & np.isfinite(mid) & (exact != r) & (mid == exact)


def _near_pairs(op: str, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with close exponents (add/sub: cancellation and alignment) or exponent sums at the
    subnormal and overflow thresholds (mul)."""
    sa, sb = rng.integers(0, 2, (2, n))
    fa, fb = rng.integers(0, 1024, (2, n))
    ea = rng.integers(0, 31, n)
    if op == "mul":
        target = rng.choice([2, 3, 5, 8, 10, 12, 14, 15, 44, 45, 46, 47], n)
        eb = np.clip(target - ea, 0, 30)
    else:
        eb = np.clip(ea - rng.integers(-13, 14, n), 0, 30)
    return _fields(sa, ea, fa), _fields(sb, eb, fb)


def _tie_pairs(op: str, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` pairs whose exact result lies exactly halfway between two binary16 values,
    found by filtering random candidates with close exponents."""
    fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[op]
    found_a, found_b, have = [], [], 0
    for _ in range(40):
        if have >= n:
            break
        m = 200_000
        ca = _fields(rng.integers(0, 2, m), rng.integers(0, 31, m), rng.integers(0, 1024, m))
        if op == "mul":
            eb = rng.integers(0, 31, m)
        else:
            eb = np.clip(((ca >> 10) & 31).astype(np.int64) - rng.integers(0, 14, m), 0, 30)
        cb = _fields(rng.integers(0, 2, m), eb, rng.integers(0, 1024, m))
        sel = _ties(ca, cb, fn)
        found_a.append(ca[sel])
        found_b.append(cb[sel])
        have += int(sel.sum())
    return np.concatenate(found_a)[:n], np.concatenate(found_b)[:n]


def binary_pairs(op: str, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``n`` random operand pairs for ``add``/``sub``/``mul``: half uniform bit
    patterns, a tenth exact rounding ties (as many as a bounded search finds), the rest close
    exponents or overflow/underflow boundaries (:func:`_near_pairs`), shuffled."""
    ua = rng.integers(0, 1 << 16, n // 2, dtype=np.uint16)
    ub = rng.integers(0, 1 << 16, n // 2, dtype=np.uint16)
    ta, tb = _tie_pairs(op, n // 10, rng)
    na, nb = _near_pairs(op, n - len(ua) - len(ta), rng)
    a, b = np.concatenate([ua, ta, na]), np.concatenate([ub, tb, nb])
    order = rng.permutation(n)
    return a[order], b[order]


def special_pairs() -> tuple[np.ndarray, np.ndarray]:
    a, b = np.meshgrid(SPECIALS, SPECIALS, indexing="ij")
    return a.ravel(), b.ravel()


# --------------------------------------------------------------------------------------------
# cases: (inputs, expected outputs, input index of each output)


def case_add(params, rng):
    a0, b0 = special_pairs()
    a1, b1 = binary_pairs("add", params.get("pairs", 20000), rng)
    a = np.concatenate([a0, a0, a1])
    b = np.concatenate([b0, b0, b1])
    sub = np.concatenate([np.zeros_like(a0), np.ones_like(a0), rng.integers(0, 2, len(a1))])
    want = np.where(sub == 1, nm.fp16_sub(a, b), nm.fp16_add(a, b))
    ops = [AddOp.SUB.value if s else AddOp.ADD.value for s in sub]
    inputs = [{"a": int(x), "b": int(y), "op": o} for x, y, o in zip(a, b, ops, strict=True)]
    return inputs, [{"value": int(v)} for v in want], None


def case_mul(params, rng):
    a0, b0 = special_pairs()
    a1, b1 = binary_pairs("mul", params.get("pairs", 20000), rng)
    a = np.concatenate([a0, a1])
    b = np.concatenate([b0, b1])
    want = nm.fp16_mul(a, b)
    inputs = [{"a": int(x), "b": int(y)} for x, y in zip(a, b, strict=True)]
    return inputs, [{"value": int(v)} for v in want], None


def case_table(params, rng):
    name = params["unit"].removeprefix("table-").removeprefix("full-")
    xs = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    # all inputs in order, then a random sample again (it runs under backpressure)
    xs = np.concatenate([xs, rng.integers(0, 1 << 16, params.get("extra", 4000), dtype=np.uint16)])
    want = nm.lookup(name, xs)
    return [{"x": int(x)} for x in xs], [{"value": int(v)} for v in want], None


def table_edges(name: str) -> np.ndarray:
    """Inputs at every boundary of the reduced table's plan (each end of each stored window
    and its neighbours, per sign), the binary16 special values, and the ends of both halves."""
    plan = table_plan(name)
    mags = [0, 1, 0x3FF, 0x400, 0x7BFF, 0x7C00, 0x7C01, 0x7E00, 0x7FFF]
    for s in (0, 1):
        mags += [plan.lo[s] + d for d in (-1, 0, 1)] + [plan.hi[s] + d for d in (-1, 0, 1)]
    mags = [m for m in mags if 0 <= m <= 0x7FFF]
    xs = [sign << 15 | m for sign in (0, 1) for m in mags] + list(SPECIALS)
    return np.unique(np.array(xs, dtype=np.uint16))


def case_table2(params, rng):
    """Per port (a list of two cases): the edge inputs and a random sample (``sample`` each,
    default 3,000) in a port-specific order; with ``exhaustive``, port 0 also takes all 65,536
    inputs in increasing order and port 1 in decreasing order, so both ports read every entry
    while the other reads elsewhere."""
    name = params["unit"].removeprefix("table2-")
    edges = table_edges(name)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    cases = []
    for port in (0, 1):
        parts = [rng.permutation(edges), rng.integers(0, 1 << 16, params.get("sample", 3000))]
        if params.get("exhaustive"):
            parts.insert(0, every if port == 0 else every[::-1])
        xs = np.concatenate(parts).astype(np.uint16)
        want = nm.lookup(name, xs)
        cases.append(([{"x": int(x)} for x in xs], [{"value": int(v)} for v in want], None))
    return cases


def random_blocks(n: int, rng) -> np.ndarray:
    """``n`` blocks of 64 binary16 values: uniform bits, finite values within an exponent
    window, and hand-made extremes (zeros, subnormals, one large value among tiny ones,
    +-largest values, Inf and NaN, gaps of 10..12 exponents)."""
    blocks = []
    for k in range(n):
        kind = k % 8
        if kind == 0:
            blk = rng.integers(0, 1 << 16, nm.BLOCK, dtype=np.uint16)
        elif kind in (1, 2, 3):
            top = rng.integers(1, 31)
            exp = np.clip(top - rng.integers(0, 16, nm.BLOCK), 0, 30)
            blk = _fields(rng.integers(0, 2, nm.BLOCK), exp, rng.integers(0, 1024, nm.BLOCK))
        elif kind == 4:
            blk = _fields(rng.integers(0, 2, nm.BLOCK), 0, rng.integers(0, 1024, nm.BLOCK))
        elif kind == 5:
            top = rng.integers(12, 31)
            gap = rng.integers(9, 14, nm.BLOCK)
            blk = _fields(rng.integers(0, 2, nm.BLOCK), top - gap, rng.integers(0, 1024, nm.BLOCK))
            blk[rng.integers(nm.BLOCK)] = _fields(rng.integers(0, 2), top, rng.integers(0, 1024))
        elif kind == 6:
            blk = rng.choice(np.array([0x7BFF, 0xFBFF, 0x0000, 0x8000], np.uint16), nm.BLOCK)
        else:
            blk = rng.choice(SPECIALS, nm.BLOCK)
        blocks.append(blk.astype(np.uint16))
    return np.stack(blocks)


def case_align(params, rng):
    blocks = random_blocks(params.get("blocks", 400), rng)
    q, exp, nonfinite = nm.bfp_blocks(blocks)
    inputs = [{"x": [int(v) for v in blk]} for blk in blocks]
    expected = [
        {"q": [int(v) for v in q[k]], "exp": int(exp[k, 0]), "nonfinite": int(nonfinite[k, 0])}
        for k in range(len(blocks))
    ]
    return inputs, expected, None


def case_dot(params, rng):
    n = params.get("blocks", 400)
    top = (1 << nm.SIG_BITS) - 1
    w = rng.integers(-top, top + 1, (n, nm.BLOCK))
    x = rng.integers(-top, top + 1, (n, nm.BLOCK))
    w[0], x[0] = top, top  # largest sum
    w[1], x[1] = -top, top  # smallest sum
    w[2], x[2] = 0, top
    small = rng.integers(-3, 4, (n // 4, nm.BLOCK))
    w[3 : 3 + len(small)] = small
    sums = (w * x).sum(axis=1)
    inputs = [{"w": list(map(int, w[k])), "x": list(map(int, x[k]))} for k in range(n)]
    return inputs, [{"sum": int(s)} for s in sums], None


def case_shift(params, rng):
    n = params.get("items", 4000)
    limit = 1 << 28
    mags = rng.integers(0, 29, n)
    sums = rng.integers(-limit, limit, n) >> mags
    sums[:8] = [0, 1, -1, limit - 1, -limit, 12345, -12345, -2]
    w, x, xm = rng.integers(0, 32, (3, n))
    x = np.where(rng.random(n) < 0.75, np.minimum(x, xm), x)  # mostly the MPU's xe_max >= x_exp
    want = nm.shift_floor(sums, nm.block_shift(w, x, xm))
    inputs = [
        {"sum": int(s), "w_exp": int(a), "x_exp": int(b), "xe_max": int(c)}
        for s, a, b, c in zip(sums, w, x, xm, strict=True)
    ]
    return inputs, [{"value": int(v)} for v in want], None


def case_acc(params, rng):
    inputs, expected, index = [], [], []
    for _ in range(params.get("rows", 600)):
        length = int(rng.integers(1, 6))
        values = rng.integers(-(1 << 61), 1 << 61, length) >> rng.integers(0, 61, length)
        if rng.random() < 0.05:
            values[0] = np.int64(2**63 - 1)  # wraps like int64
        for k, v in enumerate(values):
            inputs.append({"value": int(v), "first": int(k == 0), "last": int(k == length - 1)})
        with np.errstate(over="ignore"):
            total = np.add.reduce(values, dtype=np.int64)
        expected.append({"acc": int(total)})
        index.append(len(inputs) - 1)
    return inputs, expected, index


def case_round(params, rng):
    n = params.get("items", 6000)
    bits = rng.integers(0, 62, n)
    acc = rng.integers(0, 1 << 62, n) >> (61 - bits)
    acc = np.where(rng.random(n) < 0.5, -acc, acc)
    lam = np.where(rng.random(n) < 0.7, rng.integers(-42, -11, n), rng.integers(-77, 60, n)).astype(
        np.int64
    )
    # exact ties: r.5 ulp for random 11-bit r and shift s
    k = n // 6
    s = rng.integers(1, 40, k)
    r = rng.integers(1 << 10, 1 << 11, k)
    acc[:k] = (r << s) + (1 << (s - 1))
    lam[:k] = rng.integers(-42, -11, k)
    # overflow boundary: values around 65504 and 65520 (the rounding threshold to Inf)
    j = n // 12
    acc[k : k + j] = (65520 << 20) + rng.integers(-(1 << 16), 1 << 16, j)
    lam[k : k + j] = -20
    # underflow boundary: around 2**-25 and 2**-24
    acc[k + j : k + 2 * j] = (1 << 17) + rng.integers(-4, 5, j)
    lam[k + j : k + 2 * j] = -42
    acc[-4:] = [0, 1, -1, (1 << 62) - 1]
    nonfinite = (rng.random(n) < 0.05).astype(int)
    want = np.where(nonfinite == 1, nm.CANONICAL_NAN, nm.acc_to_fp16(acc, lam))
    inputs = [
        {"acc": int(a), "lam": int(m), "nonfinite": int(f)}
        for a, m, f in zip(acc, lam, nonfinite, strict=True)
    ]
    return inputs, [{"value": int(v)} for v in want], None


_BEAT_PACKER = Packer(BEAT)


def case_dotrow(params, rng):
    inputs, expected, index = [], [], []
    for row in range(params.get("rows", 120)):
        n_blocks = int(rng.integers(1, 5))
        cols = n_blocks * nm.BLOCK - int(rng.integers(0, nm.BLOCK)) if row % 3 else None
        w = random_blocks(n_blocks, rng).ravel()
        x = random_blocks(n_blocks, rng).ravel()
        if row % 4 == 1:  # keep most rows finite so that the accumulator path is exercised
            w = np.where((w & 0x7C00) == 0x7C00, w & 0x3FFF, w).astype(np.uint16)
            x = np.where((x & 0x7C00) == 0x7C00, x & 0x3FFF, x).astype(np.uint16)
        if row % 8 == 2:  # blocks far apart in exponent: shifts far right, floors to -1
            head = x[: nm.BLOCK]
            x[: nm.BLOCK] = np.where((head & 0x7C00) == 0x7C00, 0, head | 0x7800)
        if cols is not None:
            w, x = w[:cols], x[:cols]
        bias = None
        if row % 2:
            bias = rng.choice(
                np.concatenate(
                    [np.array(nm.EDGE_FINITE, np.uint16), rng.integers(0, 0x7C00, 8, np.uint16)]
                ),
                1,
            ).astype(np.uint16)
        mat = nm.PreparedMatrix(w[None, :])
        acc, _, _ = nm.matvec(mat, x, bias)
        value = nm.matvec_fp16(mat, x, bias)
        wp, xp = nm.pad_to_block(w), nm.pad_to_block(x)
        _, xe, _ = nm.bfp_blocks(xp)
        xe_max = int(xe.max())
        beats = []
        if bias is not None:
            beats.append({"kind": RowKind.BIAS, "bias": int(bias[0]), "w": [0] * 64, "x": [0] * 64})
        for blk in range(n_blocks):
            sl = slice(blk * nm.BLOCK, (blk + 1) * nm.BLOCK)
            beats.append(
                {
                    "kind": RowKind.BLOCK,
                    "bias": 0,
                    "w": list(map(int, wp[sl])),
                    "x": list(map(int, xp[sl])),
                }
            )
        for k, beat in enumerate(beats):
            side = {f: beat.pop(f) for f in ("kind", "bias")}
            side.update(
                first=int(k == 0),
                last=int(k == len(beats) - 1),
                xe_max=xe_max,
                tag=len(inputs) & 0xFF,
            )
            beat["beat"] = _BEAT_PACKER.pack(**side)
            inputs.append(beat)
        expected.append({"acc": int(acc[0]), "value": int(value[0])})
        index.append(len(inputs) - 1)
    return inputs, expected, index


CASES = {
    "add": case_add,
    "mul": case_mul,
    "table": case_table,
    "table2": case_table2,
    "align": case_align,
    "dot": case_dot,
    "shift": case_shift,
    "acc": case_acc,
    "round": case_round,
    "dotrow": case_dotrow,
}
"""Stimulus per unit family (``table-*`` units share ``table``, ``table2-*`` ``table2``). A
unit with several stream pairs gets a list of cases, one per pair."""


def case_for(unit: str):
    for family in ("table", "table2"):
        if unit.startswith(f"{family}-"):
            return CASES[family]
    return CASES[unit]
