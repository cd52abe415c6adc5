# amaranth: UnusedElaboratable=no
"""The quantized-weight units of rtl/arith.py (issue 17, part 4) on Amaranth's simulator, against
tandem.numerics' quantized contract: the block sums ``P = sum (q - zero) * x`` (the ``d`` of
``PreparedQuantMatrix`` times the aligned input of ``bfp_blocks``), the scaled and shifted
block term (``shift_floor(+-m_s * P, quant_block_shift(...))``), and both units chained into
the accumulator of ``matvec_quant``. Random and edge inputs, random valid/ready stalls; a tag
(the item's index) checks order."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth import unsigned
from amaranth.lib import data
from stream_models import Sink, Source, run

from tandem import numerics as nm
from tandem.qweights import QuantizedMatrix
from tandem.rtl.arith import BlockSum, QuantBlockDot, QuantBlockDotPair, QuantScale

TAG = unsigned(16)


def run_stream(unit, items, *, stall=0.0, seed=0):
    """Drive ``items`` (input field dicts, the tag added) through ``unit`` under random valid
    and ready gaps (``stall``: the chance of a gap each cycle); return (the outputs as layout
    constants, in order, the cycle the first one was valid)."""
    bits = [unit.in_layout.const({**it, "tag": k}).as_bits() for k, it in enumerate(items)]
    src = Source(unit.i, bits, stall=stall, seed=seed)
    sink = Sink(unit.o, stall=stall, seed=seed + 1)
    first = []

    async def bench(ctx):
        for cycle in range(20 * len(items) + 100):
            src.drive(ctx)
            sink.drive(ctx)
            src.sample(ctx)
            sink.sample(ctx)
            await ctx.tick()
            src.update()
            sink.update()
            if sink.got and not first:
                first.append(cycle)
            if len(sink.got) == len(items):
                return
        raise TimeoutError(f"{len(sink.got)} of {len(items)} outputs")

    run(unit, bench)
    outs = [data.Const(unit.out_layout, b) for b in sink.got]
    assert [o.tag for o in outs] == list(range(len(items))), "lost, repeated or reordered"
    return outs, first[0]


# --------------------------------------------------------------------------------------------
# stimulus


def fp16_block(rng, kind: str) -> np.ndarray:
    """64 binary16 inputs (finite) of one kind."""
    n = nm.BLOCK
    if kind == "random":
        v = rng.integers(0, 0x7C00, n) | (rng.integers(0, 2, n) << 15)
    elif kind == "max+":  # every aligned x = +2047
        v = np.full(n, 0x7BFF)
    elif kind == "max-":
        v = np.full(n, 0xFBFF)
    elif kind == "alternating":  # +-2047
        v = np.where(np.arange(n) % 2, 0xFBFF, 0x7BFF)
    elif kind == "zero":
        v = np.zeros(n, np.int64)
    elif kind == "subnormal":
        v = rng.integers(0, 0x400, n) | (rng.integers(0, 2, n) << 15)
    elif kind == "spread":  # one large value: the others align to small or zero
        v = rng.integers(0, 0x5000, n) | (rng.integers(0, 2, n) << 15)
        v[rng.integers(n)] = 0x7800
    else:
        raise ValueError(kind)
    return v.astype(np.uint16)


def weight_row(rng, bits: int, kind: str) -> tuple[np.ndarray, int]:
    """(q [64], zero) of one lane's block."""
    top = (1 << bits) - 1
    q = rng.integers(0, top + 1, nm.BLOCK)
    zero = int(rng.integers(0, top + 1))
    if kind == "max-zero0":
        q, zero = np.full(nm.BLOCK, top), 0
    elif kind == "zero-max":
        q, zero = np.zeros(nm.BLOCK, np.int64), top
    elif kind == "q=zero":
        q = np.full(nm.BLOCK, zero)
    elif kind == "zero0":
        zero = 0
    elif kind == "zeromax":
        zero = top
    elif kind != "random":
        raise ValueError(kind)
    return q.astype(np.uint8), zero


X_KINDS = ("max+", "max-", "alternating", "zero", "subnormal", "spread")
W_KINDS = ("max-zero0", "zero-max", "q=zero", "zero0", "zeromax")


def block_cases(rng, bits: int, lanes: int, n_random: int):
    """[(x bits [64], [(q, zero)] per lane)]: every edge x against every edge weight kind
    (lanes get different kinds), then random ones."""
    cases = []
    for xk in X_KINDS:
        for k in range(len(W_KINDS)):
            ws = [
                weight_row(rng, bits, W_KINDS[(k + lane) % len(W_KINDS)]) for lane in range(lanes)
            ]
            cases.append((fp16_block(rng, xk), ws))
    for _ in range(n_random):
        xk = ("random", "spread", "subnormal")[int(rng.integers(3))]
        ws = [weight_row(rng, bits, "random") for _ in range(lanes)]
        cases.append((fp16_block(rng, xk), ws))
    return cases


def contract_sums(bits: int, x_bits: np.ndarray, ws) -> tuple[list[int], np.ndarray]:
    """The block sums P of the contract: numerics' ``d`` (PreparedQuantMatrix of the lanes'
    rows, one 64-block, its own group) times numerics' aligned input; and that input."""
    mat = QuantizedMatrix(
        q=np.stack([q for q, _ in ws]),
        scale=np.full((len(ws), 1), 0x3C00, np.uint16),
        zero=np.array([[z] for _, z in ws], np.uint8),
        bits=bits,
        group=nm.BLOCK,
    )
    d = nm.PreparedQuantMatrix(mat).d[0].astype(np.int64)  # [lanes, 64]
    x_int, _, _ = nm.bfp_blocks(x_bits)
    return [int(v) for v in d @ x_int], x_int


# --------------------------------------------------------------------------------------------
# block sums


@pytest.mark.parametrize("stall", [0.0, 0.35])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["lut", "dsp-pair"])
def test_quant_block_sums(kind, bits, stall):
    """Both implementations of the quantized block sum equal the contract's P on every edge
    (largest magnitudes of both signs, zero points 0 and 2**bits - 1, all-zero blocks, q equal
    to the zero point, subnormal inputs) and random blocks; with no stalls the first result
    comes after the unit's latency."""
    rng = np.random.default_rng(100 * bits + (kind == "lut"))
    lanes = 1 if kind == "lut" else 2
    cases = block_cases(rng, bits, lanes, n_random=20)
    items, want = [], []
    for x_bits, ws in cases:
        sums, x_int = contract_sums(bits, x_bits, ws)
        want.append(sums)
        item = {"x": [int(v) for v in x_int], "xsum": int(x_int.sum())}
        if lanes == 1:
            item |= {"q": [int(v) for v in ws[0][0]], "zero": ws[0][1]}
        else:
            item |= {"qa": [int(v) for v in ws[0][0]], "za": ws[0][1]}
            item |= {"qb": [int(v) for v in ws[1][0]], "zb": ws[1][1]}
        items.append(item)
    unit = QuantBlockDot(bits, tag=TAG) if lanes == 1 else QuantBlockDotPair(bits, tag=TAG)
    outs, first = run_stream(unit, items, stall=stall, seed=bits)
    got = [[o.sum] if lanes == 1 else [o.sa, o.sb] for o in outs]
    assert got == want
    if not stall:
        assert first == unit.latency
    # the extremes are among the cases: |P| = 64 * (2**bits - 1) * 2047 of both signs
    extreme = 64 * ((1 << bits) - 1) * 2047
    flat = [v for w in want for v in w]
    assert extreme in flat and -extreme in flat


@pytest.mark.parametrize("stall", [0.0, 0.35])
def test_block_sum(stall):
    """BlockSum (the MPU's ``xsum`` per input block) equals the sum of numerics' aligned block
    on every edge input kind and random ones; with no stalls, after its latency."""
    rng = np.random.default_rng(7)
    kinds = [*X_KINDS, *(["random", "spread", "subnormal"] * 6)]
    xs = [nm.bfp_blocks(fp16_block(rng, k))[0] for k in kinds]
    unit = BlockSum(tag=TAG)
    outs, first = run_stream(unit, [{"x": [int(v) for v in x]} for x in xs], stall=stall)
    assert [o.sum for o in outs] == [int(x.sum()) for x in xs]
    assert 64 * 2047 in [o.sum for o in outs] and -64 * 2047 in [o.sum for o in outs]
    if not stall:
        assert first == unit.latency == 3


# --------------------------------------------------------------------------------------------
# scale and shift


def scale_cases(rng, n_random: int):
    """[(P, scale bits, x_exp, xe_max, bits)] at the edges, then random."""
    big = 64 * 255 * 2047
    sums = [0, 1, -1, big, -big, 64 * 15 * 2047, -(64 * 15 * 2047), (1 << 25) - 1, -(1 << 25)]
    scales = [
        *(0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF),  # zeros, subnormals
        *(0x0400, 0x3C00, 0xBC00, 0x1800, 0x2E66, 0xA11F),  # normal, typical GPTQ sizes
        *(0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFD00),  # largest, Inf, NaN
    ]
    exps = [(1, 1), (31, 31), (1, 31), (31, 1), (20, 20), (5, 28)]  # (x_exp, xe_max) as valid
    cases = []
    for k, s in enumerate(scales):
        for j, p in enumerate(sums):
            x_exp, xe_max = exps[(k + j) % len(exps)]
            x_exp = min(x_exp, xe_max)
            cases.append((p, s, x_exp, xe_max, (4, 8)[(k + j) % 2]))
    # the extreme shifts: -44 (tiny scale, smallest input block under the largest) and +20
    cases += [(p, s, 1, 31, 8) for p in (-big, -1, 1, big) for s in (0x0001, 0x83FF)]
    cases += [(p, s, 31, 31, 4) for p in (-big, big) for s in (0x7BFF, 0xFBFF)]
    for _ in range(n_random):
        xe_max = int(rng.integers(1, 32))
        bits = int(rng.choice([4, 8]))
        bound = 64 * ((1 << bits) - 1) * 2047
        cases.append(
            (
                int(rng.integers(-bound, bound + 1)),
                int(rng.integers(0, 1 << 16)),
                int(rng.integers(1, xe_max + 1)),
                xe_max,
                bits,
            )
        )
    return cases


def contract_term(p, scale, x_exp, xe_max, bits) -> tuple[int, int]:
    """(the shifted block term as int64, non-finite) of the contract."""
    neg, sig, es = nm.decode(np.array([scale], np.uint16))
    t = (-1 if neg[0] else 1) * int(sig[0]) * p
    shift = nm.quant_block_shift(es, x_exp, xe_max, bits)
    return int(nm.shift_floor(np.array([t]), shift)[0]), int(es[0] == 31)


def fp16_fields(b: int) -> dict:
    return {"frac": b & 0x3FF, "exp": (b >> 10) & 0x1F, "sign": b >> 15}


@pytest.mark.parametrize("stall", [0.0, 0.35])
def test_quant_scale(stall):
    """QuantScale equals shift_floor(+-m_s * P, quant_block_shift(es, x_exp, xe_max, bits))
    and flags exponent-31 scales, for zero, subnormal, negative, largest and non-finite scales,
    the largest block sums of both signs, the extreme left (20) and right (-44) shifts, both
    widths, and random items."""
    rng = np.random.default_rng(3)
    cases = scale_cases(rng, n_random=300)
    items = [
        {"sum": p, "scale": fp16_fields(s), "x_exp": xe, "xe_max": xm, "bits": b}
        for p, s, xe, xm, b in cases
    ]
    unit = QuantScale(tag=TAG)
    outs, first = run_stream(unit, items, stall=stall, seed=11)
    got = [(o.value, o.nonfinite) for o in outs]
    assert got == [contract_term(*c) for c in cases]
    if not stall:
        assert first == unit.latency
    shifts = [nm.quant_block_shift(max(s >> 10 & 31, 1), xe, xm, b) for _, s, xe, xm, b in cases]
    assert min(shifts) == -44 and max(shifts) == 20


# --------------------------------------------------------------------------------------------
# both units into the contract's accumulator


@pytest.mark.parametrize("bits", [4, 8])
def test_chain_equals_matvec_quant(bits):
    """Two rows of a quantized matrix (four 64-blocks, a group of 64 with its own scale each:
    negative, subnormal and typical) against a binary16 vector whose blocks have different
    exponents: QuantBlockDotPair's sums through QuantScale (x_exp, xe_max from the aligned
    input), summed per row, equal matvec_quant's accumulator."""
    rng = np.random.default_rng(40 + bits)
    nb = 4
    cols = nb * nm.BLOCK
    for trial in range(3):
        q = rng.integers(0, 1 << bits, (2, cols)).astype(np.uint8)
        zero = rng.integers(0, 1 << bits, (2, nb)).astype(np.uint8)
        scale = np.array(
            [[0x8001, 0x2E66, 0xA11F, 0x1C00], [0x03FF, 0x9800, 0x2000, 0x7BFF]], np.uint16
        )
        mat = QuantizedMatrix(q=q, scale=scale, zero=zero, bits=bits, group=nm.BLOCK)
        x = np.concatenate(
            [fp16_block(rng, k) for k in ("random", "spread", "subnormal", "max-")][:nb]
        )
        x[: nm.BLOCK] &= 0xBFFF if trial else 0xFFFF  # vary which block holds xe_max
        want, _, nonfinite = nm.matvec_quant(nm.PreparedQuantMatrix(mat), x)
        x_int, xe, _ = nm.bfp_blocks(x)
        xb = x_int.reshape(nb, nm.BLOCK)
        items = [
            {
                "qa": [int(v) for v in q[0, k * 64 : k * 64 + 64]],
                "qb": [int(v) for v in q[1, k * 64 : k * 64 + 64]],
                "za": int(zero[0, k]),
                "zb": int(zero[1, k]),
                "x": [int(v) for v in xb[k]],
                "xsum": int(xb[k].sum()),
            }
            for k in range(nb)
        ]
        sums, _ = run_stream(QuantBlockDotPair(bits, tag=TAG), items, stall=0.2, seed=trial)
        terms = [
            {
                "sum": getattr(sums[k], f"s{'ab'[r]}"),
                "scale": fp16_fields(int(scale[r, k])),
                "x_exp": int(xe[k]),
                "xe_max": int(xe.max()),
                "bits": bits,
            }
            for r in range(2)
            for k in range(nb)
        ]
        outs, _ = run_stream(QuantScale(tag=TAG), terms, stall=0.2, seed=trial + 5)
        acc = [sum(o.value for o in outs[r * nb : (r + 1) * nb]) for r in range(2)]
        assert acc == want.tolist()
        assert [any(o.nonfinite for o in outs[r * nb : (r + 1) * nb]) for r in range(2)] == list(
            nonfinite
        )


def test_parameters_are_validated():
    for bits in (2, 16, True, 8.0):
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            QuantBlockDot(bits)
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            QuantBlockDotPair(bits)
    with pytest.raises(ValueError, match="size must be a positive power of two"):
        QuantBlockDot(4, 48)
    with pytest.raises(ValueError, match="at most 27 bits"):
        QuantScale(sum_shape=__import__("amaranth").signed(28))
    assert QuantBlockDot(4).latency == QuantBlockDot(8).latency == 5
    assert (QuantBlockDotPair(4).latency, QuantBlockDotPair(8).latency) == (7, 8)
    assert QuantScale().latency == 4


# --------------------------------------------------------------------------------------------
# one DSP array for FP16, INT8 and INT4


def nibble_item(rng, fmt: str, case: int):
    """(NibbleDotPair input fields, expected [sa, sb] for the format's blocks): lanes' weights
    and the cycle's input blocks; FP16 weights are binary16 aligned by numerics.bfp_blocks, the
    quantized ones edge or random rows (zero points per block)."""
    kinds = (*X_KINDS, "random", "random")
    if fmt == "fp16":
        xs = [fp16_block(rng, kinds[case % len(kinds)])]
        ws = [fp16_block(rng, kinds[(case + lane + 1) % len(kinds)]) for lane in range(2)]
        x_int, _, _ = nm.bfp_blocks(xs[0])
        w_int = [nm.bfp_blocks(w)[0] for w in ws]
        want = [[int(w @ x_int)] for w in w_int]
        words = [sum((int(v) & 0xFFF) << (12 * j) for j, v in enumerate(w)) for w in w_int]
        zeros = [[0] * 4, [0] * 4]
        blocks = [x_int]
    else:
        bits = 8 if fmt == "int8" else 4
        nb = 16 // bits
        xs = [fp16_block(rng, kinds[(case + b) % len(kinds)]) for b in range(nb)]
        lanes = [
            [
                weight_row(rng, bits, (*W_KINDS, "random")[(case + b + 3 * lane) % 6])
                for b in range(nb)
            ]
            for lane in range(2)
        ]
        want = [[], []]
        blocks = []
        for b in range(nb):
            sums, x_int = contract_sums(bits, xs[b], [lanes[0][b], lanes[1][b]])
            want[0].append(sums[0])
            want[1].append(sums[1])
            blocks.append(x_int)
        words = [
            sum(
                int(q) << (bits * (64 * b + j))
                for b in range(nb)
                for j, q in enumerate(lanes[lane][b][0])
            )
            for lane in range(2)
        ]
        zeros = [[lanes[lane][b][1] for b in range(nb)] + [0] * (4 - nb) for lane in range(2)]
    blocks += [np.zeros(nm.BLOCK, np.int64)] * (4 - len(blocks))
    item = {
        "fmt": {"fp16": 0, "int8": 1, "int4": 2}[fmt],
        "wa": words[0],
        "wb": words[1],
        "za": zeros[0],
        "zb": zeros[1],
        "x": [[int(v) for v in blk] for blk in blocks],
        "xsum": [int(blk.sum()) for blk in blocks],
    }
    return item, want


@pytest.mark.parametrize("stall", [0.0, 0.35])
def test_nibble_dot_pair_all_formats(stall):
    """NibbleDotPair, formats interleaved item by item: FP16 block sums equal the FP16
    contract's (numerics.bfp_blocks of weights and input, summed exactly), INT8 and INT4 block
    sums equal the quantized contract's P, on edge and random blocks."""
    from tandem.rtl.arith import NibbleDotPair

    rng = np.random.default_rng(9)
    fmts = ["fp16", "int8", "int4"]
    pairs = [nibble_item(rng, fmts[k % 3], k // 3) for k in range(3 * 24)]
    unit = NibbleDotPair(tag=TAG)
    outs, first = run_stream(unit, [it for it, _ in pairs], stall=stall, seed=21)
    for k, (o, (_, want)) in enumerate(zip(outs, pairs, strict=True)):
        nb = len(want[0])
        got = [[o.sa[b] for b in range(nb)], [o.sb[b] for b in range(nb)]]
        assert got == want, f"item {k} ({fmts[k % 3]})"
    if not stall:
        assert first == unit.latency == 8


def test_quant_scale_places_the_bias():
    """The bias of a quantized product goes through QuantScale too: ``sum = +-significand``,
    scale 1.0 (``m_s = 2**10``, exponent 15) and ``x_exp`` = the bias's exponent give
    numerics.bias_at(bias, quant_lsb_exponent(xe_max, bits)), the non-finite flag aside."""
    rng = np.random.default_rng(12)
    biases = np.concatenate(
        [np.array(nm.EDGE_FINITE, np.uint16), rng.integers(0, 0x7C00, 120).astype(np.uint16)]
    )
    biases[len(nm.EDGE_FINITE) :] |= (rng.integers(0, 2, 120) << 15).astype(np.uint16)
    cases = [(int(b), int(rng.integers(1, 32)), int(rng.choice([4, 8]))) for b in biases]
    items = []
    for b, xe_max, bits in cases:
        neg, sig, exp = nm.decode(np.array([b], np.uint16))
        items.append(
            {
                "sum": int(-sig[0] if neg[0] else sig[0]),
                "scale": fp16_fields(0x3C00),
                "x_exp": int(exp[0]),
                "xe_max": xe_max,
                "bits": bits,
            }
        )
    outs, _ = run_stream(QuantScale(tag=TAG), items, stall=0.2, seed=4)
    want = [
        int(nm.bias_at(np.array([b], np.uint16), nm.quant_lsb_exponent(xe_max, bits))[0][0])
        for b, xe_max, bits in cases
    ]
    assert [o.value for o in outs] == want
