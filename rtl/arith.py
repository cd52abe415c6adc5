"""Arithmetic units of the decode core, bit-exact with :mod:`tandem.numerics`.

Every unit is a pipelined ``wiring.Component`` with an input stream ``i`` and an output stream
``o`` (``lib.stream``, valid/ready). All of them stall the same way: the whole pipeline advances
when ``o`` can accept (``~o.valid | o.ready``), and ``i.ready`` is that advance signal, so a
unit takes and gives one item per cycle while ``o.ready`` stays high, and holds everything when
it drops. Latency is counted from the cycle an item is accepted on ``i`` to the first cycle it
is valid on ``o`` with no stall in between.

Each unit carries an optional ``tag`` (any shape, default zero bits) from input to output
unchanged, so that a datapath built from these units can keep row indices, flags and exponents
beside the data without parallel delay lines.

========================  ========  ==========  =============================================
unit                      latency   throughput  contract
========================  ========  ==========  =============================================
:class:`FP16Add`          5         1 / cycle   ``numerics.fp16_add`` / ``fp16_sub``
:class:`FP16Mul`          4         1 / cycle   ``numerics.fp16_mul``
:class:`FP16Table`        1         1 / cycle   ``numerics.table(name)`` (per port)
:class:`BlockAlign`       3         1 / cycle   ``numerics.bfp_blocks`` (one block)
:class:`BlockDot`         4         1 / cycle   exact integer block sum
:class:`AccumulatorShift` 2         1 / cycle   ``shift_floor(sum, block_shift(...))``
:class:`Accumulator`      1         1 / cycle   the 64-bit sum of a row's terms
:class:`AccToFP16`        5         1 / cycle   ``numerics.acc_to_fp16`` (NaN if non-finite)
========================  ========  ==========  =============================================

(Latencies are for the default block size of 64; :class:`BlockDot` grows by one cycle per
factor of four in block size.)

Quantized weights (issue 17; docs/rtl.md, "Quantized arithmetic"): :class:`QuantBlockDot`
(the block sum ``P = sum (q - zero) * x`` of one lane in LUTs, latency 5),
:class:`QuantBlockDotPair` (two lanes' ``P`` on DSP48E2s, two 4-bit products per DSP, latency
7 at INT4 and 8 at INT8), :class:`NibbleDotPair` (the same DSP array computing two lanes' FP16,
INT8 or INT4 block sums, latency 8) and :class:`QuantScale` (``+-m_s * P`` shifted into the
accumulator, ``numerics.matvec_quant``, latency 4); one item per cycle each.

Logic depth: the stages are cut so that no register-to-register path inside a unit has more
than 7 LUT levels (the 250 MHz budget is 10; docs/build.md, "Logic depth"), as Yosys
``synth_xilinx`` maps each unit alone (``python scripts/timing.py --unit NAME``, with
``--free-running`` as the MPU and VPU run them): FP16Add 5, FP16Mul 5-6, AccToFP16 5,
BlockAlign 6-7 (and 6 from its inputs to its first registers), BlockDot 2, AccumulatorShift 4,
Accumulator 2. Rounding to binary16 is two stages (:func:`_round_prepare`: the subnormal
shift and the exponent's cases; :func:`_round_finish`: the increment and packing), after the
normalisation (one stage in FP16Add, two in AccToFP16; FP16Mul normalises its operands before
the multiply, so its product's leading one has two possible places); bit masks are comparisons,
not subtractions. Rounding in one stage after a normalisation had been 14-22 levels.
"""

import functools
from dataclasses import dataclass

import numpy as np
from amaranth import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from tandem import numerics
from tandem.checks import check_int
from tandem.geometry import is_pow2

__all__ = [
    "AccToFP16",
    "Accumulator",
    "AccumulatorShift",
    "AddOp",
    "Binary16",
    "BlockAlign",
    "BlockDot",
    "BlockSum",
    "FP16Add",
    "FP16Mul",
    "FP16Table",
    "NibbleDotPair",
    "QuantBlockDot",
    "QuantBlockDotPair",
    "QuantScale",
    "Stall",
    "StreamUnit",
    "TablePlan",
    "block_sum_shape",
    "quant_sum_shape",
    "stream_pipe",
    "table_plan",
    "xsum_shape",
]


class Binary16(data.Struct):
    """An IEEE binary16 bit pattern, fields from the LSB up."""

    frac: unsigned(10)
    exp: unsigned(5)
    sign: unsigned(1)


class AddOp(enum.Enum, shape=1):
    """What :class:`FP16Add` computes."""

    ADD = 0
    SUB = 1


Q_WIDTH = numerics.SIG_BITS + 1
"""Width of an aligned significand: 11 magnitude bits and a sign (|q| <= 2047)."""

ACC_WIDTH = 64
"""The accumulator is 64-bit two's complement (numerics: 61 bits suffice for 2**14 columns)."""

EXP_WIDTH = 5
"""A biased binary16 exponent (block exponents are at least 1)."""

LAM_WIDTH = 8
"""Signed width of ``lam``, the accumulator LSB exponent (the contract uses -42..-12)."""

NO_TAG = unsigned(0)
"""The default ``tag``: no side data."""


# --------------------------------------------------------------------------------------------
# shared pieces


def _check_shape(name, shape):
    """Validate a shape-castable, keeping layouts (so a struct ``tag`` keeps its fields)."""
    try:
        Shape.cast(shape)
    except TypeError:
        raise TypeError(
            f"{name} must be a shape or layout (for example unsigned(8)), not {shape!r}"
        ) from None
    return shape


def _check_positive_pow2(name: str, value) -> int:
    if not is_pow2(value):
        raise ValueError(f"{name} must be a positive power of two, not {value!r}")
    return value


class Stall:
    """Register helper for a global-stall pipeline: registers load only when ``en`` is high."""

    def __init__(self, m: Module, en):
        self.m = m
        self.en = en

    def reg(self, value, shape=None, *, name: str, reset_less: bool = True):
        # Data registers need no reset (only the valid flags do): less logic and reset fanout.
        sig = Signal(value.shape() if shape is None else shape, name=name, reset_less=reset_less)
        with self.m.If(self.en):
            self.m.d.sync += sig.eq(value)
        return sig

    def valid_chain(self, first, stages: int, *, name: str):
        """``stages`` valid flags behind ``first`` (these reset to 0)."""
        prev = first
        for k in range(stages):
            prev = self.reg(prev, 1, name=f"{name}{k + 1}", reset_less=False)
        return prev


def stream_pipe(m: Module, i, o, *, name: str) -> Stall:
    """Wire the global stall of a unit: advance when the output register is empty or taken."""
    advance = Signal(name=f"{name}_advance")
    m.d.comb += [advance.eq(~o.valid | o.ready), i.ready.eq(advance)]
    return Stall(m, advance)


class StreamUnit(wiring.Component):
    """The frame every unit here shares: an input stream ``i`` and an output stream ``o``
    (layouts :attr:`in_layout` and :attr:`out_layout`, each the unit's fields and then
    ``tag``), the ``tag`` carried from one to the other unchanged, and :attr:`latency`
    (:attr:`LATENCY` unless the unit computes it). A subclass validates its own parameters,
    then calls ``super().__init__(in_fields, out_fields, tag=tag)``.

    A unit with ``streams=n`` (an int) has ``n`` independent pairs instead: ``i`` and ``o`` are
    arrays of ``n`` streams, ``i[k]`` answered on ``o[k]`` (:attr:`stream_pairs` lists them
    either way)."""

    def __init__(self, in_fields: dict, out_fields: dict, *, tag=NO_TAG, streams=None):
        self._tag = _check_shape("tag", tag)
        self.in_layout = data.StructLayout({**in_fields, "tag": self._tag})
        self.out_layout = data.StructLayout({**out_fields, "tag": self._tag})
        i = In(stream.Signature(self.in_layout))
        o = Out(stream.Signature(self.out_layout))
        if streams is not None:
            i, o = i.array(streams), o.array(streams)
        self._streams = streams
        super().__init__({"i": i, "o": o})

    @property
    def tag(self):
        """Shape (or layout) of the side data carried through."""
        return self._tag

    @property
    def latency(self) -> int:
        """Cycles from accepting an item on ``i`` to its first valid cycle on ``o``."""
        return self.LATENCY

    @property
    def stream_pairs(self) -> list:
        """``[(i, o)]``, or ``[(i[k], o[k]) ...]`` for a unit with several stream pairs."""
        if self._streams is None:
            return [(self.i, self.o)]
        return [(self.i[k], self.o[k]) for k in range(self._streams)]


def leading_zeros(m: Module, value, *, name: str) -> tuple:
    """(all zero, count of leading zeros) of an unsigned value, by a balanced tree.

    The count is only meaningful when the value is not zero. Every tree node is a signal:
    Amaranth lowers each use of an expression separately, so a node used twice as an
    expression would double the logic at every level.
    """
    width = len(value)
    size = 1 << max(0, (width - 1).bit_length())
    value = Cat(Const(0, size - width), value)  # pad at the LSB end: leading zeros unchanged

    def tree(v, path):
        if len(v) == 1:
            return ~v[0], Const(0, 0)
        half = len(v) // 2
        z_lo, c_lo = tree(v[:half], path + "l")
        z_hi, c_hi = tree(v[half:], path + "h")
        zero = Signal(name=f"{name}_z{path}")
        count = Signal(len(c_lo) + 1, name=f"{name}_c{path}")
        m.d.comb += [
            zero.eq(z_lo & z_hi),
            count.eq(Mux(z_hi, Cat(c_lo, Const(1, 1)), Cat(c_hi, Const(0, 1)))),
        ]
        return zero, count

    return tree(value, "")


def _max_tree(m: Module, values, *, name: str, levels: int | None = None) -> list:
    """The largest of ``values`` (unsigned) by a balanced tree of signals (see leading_zeros):
    the list left after ``levels`` levels of pairwise maxima (default: all, one value)."""
    level = list(values)
    depth = 0
    while len(level) > 1 and (levels is None or depth < levels):
        depth += 1
        nxt = []
        for k, (a, b) in enumerate(zip(level[0::2], level[1::2], strict=True)):
            node = Signal.like(a, name=f"{name}_{depth}_{k}")
            m.d.comb += node.eq(Mux(a > b, a, b))
            nxt.append(node)
        level = nxt
    return level


class _Normalized(data.Struct):
    """A magnitude normalised for rounding: value = 0.hi,sticky * 2**(top + 1)."""

    zero: unsigned(1)
    sign: unsigned(1)
    hi: unsigned(12)  # 11 result bits and the guard bit, leading one at the MSB
    sticky: unsigned(1)  # any one below the guard bit
    top: signed(12)  # exponent of the leading one (value = 1.xxx * 2**top)


def _leading(m: Module, mag, lam, *, name: str) -> tuple:
    """Comb, the first half of a normalisation (:func:`_shift_up` is the second): ``mag * 2**lam``
    as ``(mag, lam, zero, lz)``, ``mag`` widened to at least the 12 bits of the window (``lam``
    adjusted, the value unchanged) and ``lz`` its leading zeros."""
    width = len(mag)
    if width < 12:
        mag = Cat(Const(0, 12 - width), mag)
        lam = lam - (12 - width)
    zero, lz = leading_zeros(m, mag, name=f"{name}_lz")
    return mag, lam, zero, lz


def _shift_up(m: Module, mag, lam, zero, lz, sign, *, name: str):
    """Comb: the :class:`_Normalized` value of :func:`_leading`'s ``mag * 2**lam``."""
    width = len(mag)
    shifted = Signal(width, name=f"{name}_shifted")
    n = Signal(_Normalized, name=f"{name}_norm")
    m.d.comb += [
        shifted.eq(mag << lz),
        n.zero.eq(zero),
        n.sign.eq(sign),
        n.hi.eq(shifted[width - 12 :]),
        n.sticky.eq(shifted[: width - 12].any() if width > 12 else 0),
        n.top.eq((width - 1) + lam - lz),
    ]
    return n


def _normalize(m: Module, mag, lam, sign, *, name: str):
    """Comb: normalise ``mag * 2**lam`` (``mag`` unsigned, ``lam`` signed) for rounding."""
    mag, lam, zero, lz = _leading(m, mag, lam, name=name)
    return _shift_up(m, mag, lam, zero, lz, sign, name=name)


class _ExpCases(data.Struct):
    """What rounding needs of the exponent of a normalised value's leading one (``top``),
    computed ahead of the increment: :func:`_exp_cases`."""

    sub: unsigned(1)  # top < -14: a subnormal result (exponent field 1 if it rounds up to 2**-14)
    ovf0: unsigned(1)  # top > 15: Inf
    ovf1: unsigned(1)  # top > 14: Inf if rounding carries into a new leading bit
    e0: unsigned(5)  # exponent field of a normal result: top + 15
    e1: unsigned(5)  # top + 16, when rounding carries


def _exp_cases(c, top) -> list:
    """Assignments of the :class:`_ExpCases` view ``c`` for a leading one at ``2**top``."""
    return [
        c.sub.eq(top < -14),
        c.ovf0.eq(top > 15),
        c.ovf1.eq(top > 14),
        c.e0.eq(top + 15),
        c.e1.eq(top + 16),
    ]


class _Rounding(data.Struct):
    """A normalised value prepared for rounding (:func:`_round_prepare`): its 11 result bits
    already shifted into the subnormal range, and the exponent's cases, so that
    :func:`_round_finish` has only the increment left."""

    zero: unsigned(1)
    sign: unsigned(1)
    kept: unsigned(11)  # the result's significand before rounding
    guard: unsigned(1)  # the bit below it
    rest: unsigned(1)  # any one below the guard bit
    cases: _ExpCases


def _subnormal_shift(m: Module, top, *, name: str):
    """Comb: how far below the normal range a leading one at ``2**top`` is (the right shift that
    gives the result's LSB the weight 2**-24): ``clamp(-14 - top, 0, 13)``; 13 and more leave
    only sticky bits."""
    d = Signal(range(14), name=f"{name}_d")
    with m.If(top > -15):
        m.d.comb += d.eq(0)
    with m.Elif(top < -26):
        m.d.comb += d.eq(13)
    with m.Else():
        m.d.comb += d.eq((-14 - top)[:4])
    return d


def _round_prepare(m: Module, n, *, name: str):
    """Comb, the first half of rounding a :class:`_Normalized` value to binary16 as
    ``numerics.acc_to_fp16`` does: the subnormal shift and the exponent's cases
    (:class:`_Rounding`). :func:`_round_finish` completes it."""
    d = _subnormal_shift(m, n.top, name=name)
    window = Cat(n.sticky, n.hi)  # 13 bits: sticky, guard, 11 result bits
    shifted = Signal(13, name=f"{name}_window")
    # rest = the bits shifted out and the new LSB's neighbour: any one in window[0 : d + 1]
    # (a prefix OR picked by d, no mask arithmetic)
    ors = Signal(14, name=f"{name}_ors")
    m.d.comb += [
        shifted.eq(window >> d),
        ors.eq(Cat(*(window[: k + 1].any() for k in range(13)), window.any())),
    ]
    r = Signal(_Rounding, name=f"{name}_prep")
    m.d.comb += [
        r.zero.eq(n.zero),
        r.sign.eq(n.sign),
        r.kept.eq(shifted[2:13]),
        r.guard.eq(shifted[1]),
        r.rest.eq(ors.bit_select(d, 1)),
        *_exp_cases(r.cases, n.top),
    ]
    return r


def _round_finish(m: Module, r, *, name: str):
    """Comb: round a :class:`_Rounding` to nearest even and pack it as binary16 (subnormals,
    overflow to +-Inf, a zero value gives +0)."""
    rounded = Signal(12, name=f"{name}_rounded")
    m.d.comb += rounded.eq(r.kept + (r.guard & (r.rest | r.kept[0])))
    carry = rounded[11]  # the significand overflowed into a new leading bit (never subnormal)
    sig = Signal(11, name=f"{name}_sig")
    m.d.comb += sig.eq(Mux(carry, rounded[1:12], rounded[:11]))
    c = r.cases
    out = Signal(Binary16, name=f"{name}_out")
    with m.If(r.zero):
        m.d.comb += out.as_value().eq(0)
    with m.Elif(Mux(carry, c.ovf1, c.ovf0)):
        m.d.comb += [out.sign.eq(r.sign), out.exp.eq(31), out.frac.eq(0)]
    with m.Else():
        m.d.comb += [
            out.sign.eq(r.sign),
            out.exp.eq(Mux(c.sub, sig[10], Mux(carry, c.e1, c.e0))),
            out.frac.eq(sig[:10]),
        ]
    return out


def _round_and_pack(m: Module, p: Stall, o, s, zero_sign, valid, *, name: str):
    """The last stage of :class:`FP16Add` and :class:`FP16Mul`: round ``s["round"]`` (a
    :class:`_Rounding`) unless ``s["special"]`` gives ``s["special_value"]``; a zero is
    ``zero_sign`` with a zero magnitude. Loads ``o`` (``value``, ``tag`` = ``s["tag"]``,
    ``valid``) when ``p`` advances."""
    rounded = _round_finish(m, s["round"], name=f"{name}_round")
    result = Signal(16, name=f"{name}_result")
    with m.If(s["special"]):
        m.d.comb += result.eq(s["special_value"])
    with m.Elif(s["round"].zero):
        m.d.comb += result.eq(Cat(Const(0, 15), zero_sign))
    with m.Else():
        m.d.comb += result.eq(rounded.as_value())
    with m.If(p.en):
        m.d.sync += [o.payload.value.eq(result), o.payload.tag.eq(s["tag"]), o.valid.eq(valid)]


def _classify(x, m: Module, *, name: str) -> dict:
    """Comb: decode a :class:`Binary16` view as numerics.decode does, plus its class."""
    sig = Signal(11, name=f"{name}_sig")
    exp = Signal(5, name=f"{name}_exp")
    m.d.comb += [
        sig.eq(Cat(x.frac, x.exp != 0)),
        exp.eq(Mux(x.exp == 0, 1, x.exp)),
    ]
    special = x.exp == 31
    return {
        "sig": sig,
        "exp": exp,
        "nan": special & (x.frac != 0),
        "inf": special & (x.frac == 0),
        "zero": (x.exp == 0) & (x.frac == 0),
    }


def _canonical_nan():
    return Const(numerics.CANONICAL_NAN, 16)


# --------------------------------------------------------------------------------------------
# element-wise binary16


class FP16Add(StreamUnit):
    """IEEE binary16 adder/subtractor, round to nearest even, bit-exact with
    ``numerics.fp16_add`` and ``numerics.fp16_sub``.

    Subnormals are handled in and out, overflow gives +-Inf, every NaN result is the canonical
    ``0x7E00``, ``(+0) + (-0) = +0`` and ``x - x = +0``. The datapath keeps three bits below the
    larger operand's LSB (guard, round, sticky), which is enough for a correctly rounded sum.

    Parameters
    ----------
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(FP16Add.InLayout))``
        ``a``, ``b`` (:class:`Binary16`), ``op`` (:class:`AddOp`), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``value`` (:class:`Binary16`), ``tag``.

    Latency 5 cycles (decode and order; align and add; normalise; subnormal shift; round and
    pack), throughput one operation per cycle.
    """

    LATENCY = 5

    def __init__(self, *, tag=NO_TAG):
        super().__init__({"a": Binary16, "b": Binary16, "op": AddOp}, {"value": Binary16}, tag=tag)

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="add")
        a, b = self.i.payload.a, self.i.payload.b
        b_sign = Signal(name="b_sign")
        m.d.comb += b_sign.eq(b.sign ^ (self.i.payload.op == AddOp.SUB))
        ca = _classify(a, m, name="a")
        cb = _classify(b, m, name="b")

        # Stage 1: order by magnitude (bit order is magnitude order), detect special results.
        swap = Signal(name="swap")
        m.d.comb += swap.eq(b.as_value()[:15] > a.as_value()[:15])
        special = Signal(name="special")
        special_value = Signal(16, name="special_value")
        m.d.comb += special.eq(ca["nan"] | cb["nan"] | ca["inf"] | cb["inf"])
        with m.If(ca["nan"] | cb["nan"] | (ca["inf"] & cb["inf"] & (a.sign != b_sign))):
            m.d.comb += special_value.eq(_canonical_nan())
        with m.Elif(ca["inf"]):
            m.d.comb += special_value.eq(a.as_value())
        with m.Else():
            m.d.comb += special_value.eq(Cat(Const(0x7C00, 15), b_sign))
        s1 = {
            "special": p.reg(special, name="s1_special"),
            "special_value": p.reg(special_value, name="s1_special_value"),
            "both_zero": p.reg(ca["zero"] & cb["zero"], name="s1_both_zero"),
            "zero_sign": p.reg(a.sign & b_sign, name="s1_zero_sign"),
            "sign": p.reg(Mux(swap, b_sign, a.sign), name="s1_sign"),
            "subtract": p.reg(a.sign ^ b_sign, name="s1_subtract"),
            "exp": p.reg(Mux(swap, cb["exp"], ca["exp"]), name="s1_exp"),
            "diff": p.reg(
                Mux(swap, cb["exp"] - ca["exp"], ca["exp"] - cb["exp"])[:5], 5, name="s1_diff"
            ),
            "big": p.reg(Mux(swap, cb["sig"], ca["sig"]), name="s1_big"),
            "small": p.reg(Mux(swap, ca["sig"], cb["sig"]), name="s1_small"),
            "tag": p.reg(self.i.payload.tag, self._tag, name="s1_tag"),
        }
        v1 = p.valid_chain(self.i.valid, 1, name="add_valid")

        # Stage 2: align the smaller significand (3 extra bits, sticky in the LSB) and add. The
        # bits shifted out are those below position diff: a comparison per bit, no mask
        # arithmetic (a subtraction would put a carry chain between two LUT levels).
        small = Cat(Const(0, 3), s1["small"])  # 14 bits
        aligned = Signal(14, name="aligned")
        lost = Signal(name="align_lost")
        below = Cat(*(s1["diff"] > k for k in range(14)))
        m.d.comb += [aligned.eq(small >> s1["diff"]), lost.eq((small & below).any())]
        term = Cat(aligned[0] | lost, aligned[1:])
        big = Cat(Const(0, 3), s1["big"])
        total = Signal(15, name="total")
        m.d.comb += total.eq(Mux(s1["subtract"], big - term, big + term))
        s2 = {k: p.reg(s1[k], name=f"s2_{k}") for k in ("special", "special_value", "sign")}
        s2["total"] = p.reg(total, name="s2_total")
        s2["exact_zero_sign"] = p.reg(s1["both_zero"] & s1["zero_sign"], name="s2_exact_zero_sign")
        lam = Signal(signed(8), name="add_lam")
        m.d.comb += lam.eq(s1["exp"] - 28)  # total's LSB weighs 2**(exp - 25 - 3)
        s2["lam"] = p.reg(lam, name="s2_lam")
        s2["tag"] = p.reg(s1["tag"], self._tag, name="s2_tag")
        v2 = p.valid_chain(v1, 1, name="add_valid2_")

        # Stage 3: normalise.
        norm = _normalize(m, s2["total"], s2["lam"], s2["sign"], name="add")
        s3 = {k: p.reg(s2[k], name=f"s3_{k}") for k in ("special", "special_value")}
        s3["exact_zero_sign"] = p.reg(s2["exact_zero_sign"], name="s3_exact_zero_sign")
        s3["norm"] = p.reg(norm, name="s3_norm")
        s3["tag"] = p.reg(s2["tag"], self._tag, name="s3_tag")
        v3 = p.valid_chain(v2, 1, name="add_valid3_")

        # Stage 4: the subnormal shift and the exponent's cases.
        prep = _round_prepare(m, s3["norm"], name="add")
        s4 = {k: p.reg(s3[k], name=f"s4_{k}") for k in ("special", "special_value")}
        s4["exact_zero_sign"] = p.reg(s3["exact_zero_sign"], name="s4_exact_zero_sign")
        s4["round"] = p.reg(prep, name="s4_round")
        s4["tag"] = p.reg(s3["tag"], self._tag, name="s4_tag")
        v4 = p.valid_chain(v3, 1, name="add_valid4_")

        # Stage 5: round and pack. An exact zero is +0 unless both operands were -0.
        _round_and_pack(m, p, self.o, s4, s4["exact_zero_sign"], v4, name="add")
        return m


class FP16Mul(StreamUnit):
    """IEEE binary16 multiplier, round to nearest even, bit-exact with ``numerics.fp16_mul``.

    The 11 x 11-bit significand product is exact (22 bits); one rounding gives the result,
    with subnormals in and out, overflow to +-Inf, ``Inf * 0`` and every NaN result the
    canonical ``0x7E00``, and the sign of a zero result the XOR of the operand signs.

    Parameters
    ----------
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``a``, ``b`` (:class:`Binary16`), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``value`` (:class:`Binary16`), ``tag``.

    The significands are normalised before the multiply (a subnormal's leading one moved up
    to bit 10), so the product's leading one is at bit 20 or 21 and normalising it is a choice
    of two; the value, and so the rounding, is the same as of the plain product.

    Latency 4 cycles (decode and normalise the significands; multiply, and the exponent's cases
    for both positions of the leading one; the subnormal shift; round and pack), throughput
    one product per cycle.
    """

    LATENCY = 4

    def __init__(self, *, tag=NO_TAG):
        super().__init__({"a": Binary16, "b": Binary16}, {"value": Binary16}, tag=tag)

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="mul")
        a, b = self.i.payload.a, self.i.payload.b
        ca = _classify(a, m, name="a")
        cb = _classify(b, m, name="b")
        sign = a.sign ^ b.sign

        # Stage 1: specials; each significand normalised (leading one at bit 10).
        special = Signal(name="special")
        special_value = Signal(16, name="special_value")
        nan = ca["nan"] | cb["nan"] | (ca["inf"] & cb["zero"]) | (cb["inf"] & ca["zero"])
        m.d.comb += special.eq(ca["nan"] | cb["nan"] | ca["inf"] | cb["inf"])
        m.d.comb += special_value.eq(Mux(nan, _canonical_nan(), Cat(Const(0x7C00, 15), sign)))
        lam = Signal(signed(8), name="mul_lam")
        m.d.comb += lam.eq(ca["exp"] + cb["exp"] - 50)
        za, la = leading_zeros(m, ca["sig"], name="a_lz")
        zb, lb = leading_zeros(m, cb["sig"], name="b_lz")
        s1 = {
            "special": p.reg(special, name="s1_special"),
            "special_value": p.reg(special_value, name="s1_special_value"),
            "sign": p.reg(sign, name="s1_sign"),
            "zero": p.reg(za | zb, name="s1_zero"),
            "na": p.reg((ca["sig"] << la)[:11], 11, name="s1_na"),
            "nb": p.reg((cb["sig"] << lb)[:11], 11, name="s1_nb"),
            "la": p.reg(la, name="s1_la"),
            "lb": p.reg(lb, name="s1_lb"),
            "lam": p.reg(lam, name="s1_lam"),
            "tag": p.reg(self.i.payload.tag, self._tag, name="s1_tag"),
        }
        v1 = p.valid_chain(self.i.valid, 1, name="mul_valid")

        # Stage 2: the exact product of the normalised significands (leading one at bit 20 or
        # 21), and for both cases the exponent of the leading one (top) and what rounding
        # needs of it: the subnormal shift d, plus 1 when the leading one is at bit 21 (the
        # product's bits are taken from one position higher).
        top0 = Signal(signed(12), name="mul_top0")  # the leading one at bit 20
        m.d.comb += top0.eq(s1["lam"] + 20 - s1["la"] - s1["lb"])
        top1 = Signal(signed(12), name="mul_top1")
        m.d.comb += top1.eq(top0 + 1)
        cases = [Signal(_ExpCases, name=f"mul_cases{k}") for k in (0, 1)]
        for c, top in zip(cases, (top0, top1), strict=True):
            m.d.comb += _exp_cases(c, top)
        d0 = _subnormal_shift(m, top0, name="mul0")
        d1 = _subnormal_shift(m, top1, name="mul1")
        s2 = {k: p.reg(s1[k], name=f"s2_{k}") for k in ("special", "special_value", "sign")}
        s2["zero"] = p.reg(s1["zero"], name="s2_zero")
        s2["product"] = p.reg(s1["na"] * s1["nb"], 22, name="s2_product")
        s2["cases0"] = p.reg(cases[0], name="s2_cases0")
        s2["cases1"] = p.reg(cases[1], name="s2_cases1")
        s2["at0"] = p.reg(d0, range(15), name="s2_at0")
        s2["at1"] = p.reg(d1 + 1, range(15), name="s2_at1")
        s2["tag"] = p.reg(s1["tag"], self._tag, name="s2_tag")
        v2 = p.valid_chain(v1, 1, name="mul_valid2_")

        # Stage 3: the subnormal shift, straight from the product: with the leading one at
        # bit 20 + h and the shift d, the result bits start at bit 10 + h + d (at = h + d), the
        # guard bit is below them, and the rest is every bit below the guard bit.
        prod = s2["product"]
        high = prod[21]
        at = Signal(range(15), name="mul_at")
        m.d.comb += at.eq(Mux(high, s2["at1"], s2["at0"]))
        below = Signal(15, name="mul_below")  # below[j]: any one in prod[0 : 9 + j]
        m.d.comb += below.eq(Cat(*(prod[: min(9 + j, 22)].any() for j in range(15))))
        prep = Signal(_Rounding, name="mul_prep")
        m.d.comb += [
            prep.zero.eq(s2["zero"]),
            prep.sign.eq(s2["sign"]),
            prep.kept.eq((prod >> (10 + at))[:11]),
            prep.guard.eq((prod >> (9 + at))[0]),
            prep.rest.eq(below.bit_select(at, 1)),
            prep.cases.eq(Mux(high, s2["cases1"], s2["cases0"])),
        ]
        s3 = {k: p.reg(s2[k], name=f"s3_{k}") for k in ("special", "special_value", "sign")}
        s3["round"] = p.reg(prep, name="s3_round")
        s3["tag"] = p.reg(s2["tag"], self._tag, name="s3_tag")
        v3 = p.valid_chain(v2, 1, name="mul_valid3_")

        # Stage 4: round and pack; a zero product keeps the XOR sign.
        _round_and_pack(m, p, self.o, s3, s3["sign"], v3, name="mul")
        return m


# --------------------------------------------------------------------------------------------
# function tables


@dataclass(frozen=True)
class _Run:
    """Outputs at one end of a sign half that need no storage: a constant, or the input itself."""

    identity: bool
    value: int  # the constant (unused for identity)


@dataclass(frozen=True)
class TablePlan:
    """How :class:`FP16Table` stores a function table without losing an entry.

    Per sign, finite magnitudes ``m`` (``x & 0x7FFF < 0x7C00``) below ``lo[s]`` follow
    ``low[s]`` and above ``hi[s]`` follow ``high[s]``; only the window ``lo..hi`` is stored,
    at ROM address ``base[s] + m - lo[s]``. An odd function (``f(-x) = -f(x)``, so recip) stores
    the positive window once and flips the sign for negative inputs. Inf inputs give
    ``inf[s]`` and NaN inputs the canonical NaN (every table's rule). :func:`table_plan` checks
    that the plan reproduces all 65,536 entries.
    """

    name: str
    lo: tuple[int, int]
    hi: tuple[int, int]
    low: tuple[_Run, _Run]
    high: tuple[_Run, _Run]
    base: tuple[int, int]
    odd: bool
    inf: tuple[int, int]
    rom: np.ndarray

    @property
    def depth(self) -> int:
        return len(self.rom)

    def lookup(self, bits) -> np.ndarray:
        """The plan evaluated in NumPy (what the hardware computes)."""
        x = np.asarray(bits, dtype=np.uint16).astype(np.int64)
        s, m = x >> 15, x & 0x7FFF
        out = np.full(x.shape, numerics.CANONICAL_NAN, dtype=np.int64)
        for sign in (0, 1):
            here = s == sign
            lo, hi = self.lo[sign], self.hi[sign]
            for run, sel in ((self.low[sign], m < lo), (self.high[sign], (m > hi) & (m < 0x7C00))):
                out = np.where(here & sel, x if run.identity else run.value, out)
            win = here & (m >= lo) & (m <= hi) & (m < 0x7C00)
            addr = np.clip(self.base[sign] + m - lo, 0, max(self.depth - 1, 0))
            data = self.rom[addr].astype(np.int64) if self.depth else np.zeros_like(m)
            flip = 0x8000 if (self.odd and sign) else 0
            out = np.where(win, data ^ flip, out)
            out = np.where(here & (m == 0x7C00), self.inf[sign], out)
        return out.astype(np.uint16)


def _run(values: np.ndarray, inputs: np.ndarray) -> tuple[int, _Run]:
    """Longest prefix of ``values`` that is one constant or equal to ``inputs``."""
    const = int(np.argmax(values != values[0])) if (values != values[0]).any() else len(values)
    same = values == inputs
    ident = int(np.argmax(~same)) if (~same).any() else len(values)
    if ident > const:
        return ident, _Run(True, 0)
    return const, _Run(False, int(values[0]))


@functools.cache
def table_plan(name: str) -> TablePlan:
    """The exact reduced storage of ``numerics.table(name)`` (see :class:`TablePlan`)."""
    table = np.asarray(numerics.table(name), dtype=np.int64)
    finite = np.arange(0x7C00)
    halves = [table[finite], table[0x8000 | finite]]
    odd = bool((halves[1] == (halves[0] ^ 0x8000)).all())
    lo, hi, low, high = [], [], [], []
    for sign, vals in enumerate(halves):
        x = (sign << 15) | finite
        n_low, r_low = _run(vals, x)
        n_high, r_high = _run(vals[::-1], x[::-1])
        lo.append(n_low)
        hi.append(max(0x7C00 - 1 - n_high, n_low - 1))
        low.append(r_low)
        high.append(r_high)
    windows = [halves[s][lo[s] : hi[s] + 1] for s in (0, 1)]
    if odd:
        rom, base = windows[0], (0, 0)
    else:
        rom, base = np.concatenate(windows), (0, len(windows[0]))
    plan = TablePlan(
        name=name,
        lo=tuple(lo),
        hi=tuple(hi),
        low=tuple(low),
        high=tuple(high),
        base=base,
        odd=odd,
        inf=(int(table[0x7C00]), int(table[0xFC00])),
        rom=rom.astype(np.uint16),
    )
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if not (plan.lookup(every) == table).all():  # also requires every NaN entry canonical
        raise AssertionError(f"the reduced {name} table does not reproduce numerics.table")
    return plan


class FP16Table(StreamUnit):
    """One of the contract's binary16 function tables (``numerics.table(name)``) as a ROM.

    Bit-exact with ``numerics.lookup(name, x)`` for all 65,536 inputs.

    With ``reduced=True`` (the default) only the part of the table that carries information is
    stored (see :class:`TablePlan`): runs of a constant or of the identity at either end of each
    sign half, Inf and NaN inputs, and the negative half of an odd function are computed by
    comparators. That halves the ROM: exp 31,201 entries, recip 31,484, rsqrt 31,742 and
    gelu 34,825, against 65,536 for ``reduced=False``.

    With ``ports=2`` one ROM serves two independent lookup streams through the block RAM's two
    read ports: ``i[0]``/``o[0]`` and ``i[1]``/``o[1]`` each have their own comparators,
    registers and stall (``o[k].ready`` holds only port ``k``), and share the memory. Yosys
    (``synth_xilinx -family xcup``) maps it to one set of block RAMs with both ports reading,
    not two copies: exp 14 RAMB36 (13 with one port), gelu 16 (16). Two lanes cost one ROM.

    Parameters
    ----------
    name : str
        ``"exp"``, ``"recip"``, ``"rsqrt"`` or ``"gelu"``.
    ports : int
        1 (default) or 2 lookup streams on the one ROM.
    reduced : bool
        Store the reduced table (default) or all 65,536 entries.
    tag : shape
        Side data carried from input to output unchanged (default: none; the same shape on
        both ports).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``x`` (:class:`Binary16`), ``tag``. With ``ports=2`` an array of two such streams.
    o : ``Out(stream.Signature(...))``
        ``value`` (:class:`Binary16`), ``tag``. With ``ports=2`` an array of two, ``o[k]``
        answering ``i[k]``.

    Latency 2 cycles (the synchronous ROM read, then the output register that selects the ROM
    word or the comparators' value), throughput one lookup per cycle per port. The ROM address
    is ``mag`` plus an offset per sign, whatever the comparators say, so an input reaches the
    block RAM through an adder only; the block RAM's output reaches ``o`` through one register.
    """

    LATENCY = 2
    MAX_PORTS = 2
    """Read ports of a block RAM: lookups one ROM can serve per cycle."""

    def __init__(self, name: str, *, ports: int = 1, reduced: bool = True, tag=NO_TAG):
        if name not in numerics._FUNCTIONS:
            raise ValueError(
                f"unknown function table {name!r}; expected one of {numerics._FUNCTIONS}"
            )
        self._name = name
        self._ports = check_int("ports", ports, 1, self.MAX_PORTS)
        self._reduced = bool(reduced)
        super().__init__(
            {"x": Binary16}, {"value": Binary16}, tag=tag, streams=None if ports == 1 else ports
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def ports(self) -> int:
        """Lookup streams sharing the ROM."""
        return self._ports

    @property
    def reduced(self) -> bool:
        return self._reduced

    @property
    def depth(self) -> int:
        """ROM entries."""
        return table_plan(self._name).depth if self._reduced else 1 << 16

    def elaborate(self, platform):
        m = Module()
        if self._reduced:
            contents = table_plan(self._name).rom
        else:
            contents = np.asarray(numerics.table(self._name), dtype=np.uint16)
        m.submodules.rom = rom = memory.Memory(
            shape=unsigned(16), depth=max(len(contents), 1), init=[int(v) for v in contents]
        )
        pairs = self.stream_pairs
        for k, (i, o) in enumerate(pairs):
            prefix = "" if len(pairs) == 1 else f"p{k}_"
            port = rom.read_port()
            self._lookup(m, i, o, port, prefix)
        return m

    def _lookup(self, m, i, o, port, prefix):
        """One lookup stream on one ROM read port: its own stall, comparators and registers."""
        p = stream_pipe(m, i, o, name=f"{prefix}{self._name}")
        x = i.payload.x.as_value()
        m.d.comb += port.en.eq(p.en)
        s1_tag = p.reg(i.payload.tag, self._tag, name=f"{prefix}s1_tag")
        s1_valid = p.valid_chain(i.valid, 1, name=f"{prefix}{self._name}_valid")
        with m.If(p.en):
            m.d.sync += [o.payload.tag.eq(s1_tag), o.valid.eq(s1_valid)]
        if not self._reduced:
            m.d.comb += port.addr.eq(x)
            with m.If(p.en):
                m.d.sync += o.payload.value.eq(port.data)
            return

        plan = table_plan(self._name)
        mag, sign = x[:15], x[15]
        # Stage 1: the ROM read, and the comparators that pick the output, registered. The
        # address does not wait for them: outside the window the word read is not used (and
        # may lie past the ROM's end).
        m.d.comb += port.addr.eq(
            Mux(sign, plan.base[1] - plan.lo[1], plan.base[0] - plan.lo[0]) + mag
        )
        cases = {
            "nan": mag > 0x7C00,
            "inf": mag == 0x7C00,
            "low": mag < Mux(sign, plan.lo[1], plan.lo[0]),
            "high": mag > Mux(sign, plan.hi[1], plan.hi[0]),
        }
        s1 = {k: p.reg(v, 1, name=f"{prefix}s1_{k}") for k, v in cases.items()}
        s1_x = p.reg(x, 16, name=f"{prefix}s1_x")
        sign1 = s1_x[15]

        def run(runs):  # the value of a run at one end, for the input's sign
            return Mux(sign1, *(s1_x if r.identity else Const(r.value, 16) for r in runs[::-1]))

        # Stage 2: the ROM word or the comparators' value, registered (the block RAM's output
        # reaches no logic outside the unit). The cases are exclusive in this order.
        value = Signal(16, name=f"{prefix}value")
        with m.If(s1["nan"]):
            m.d.comb += value.eq(numerics.CANONICAL_NAN)
        with m.Elif(s1["inf"]):
            m.d.comb += value.eq(Mux(sign1, plan.inf[1], plan.inf[0]))
        with m.Elif(s1["low"]):
            m.d.comb += value.eq(run(plan.low))
        with m.Elif(s1["high"]):
            m.d.comb += value.eq(run(plan.high))
        with m.Else():
            m.d.comb += value.eq(port.data ^ Cat(Const(0, 15), sign1 & plan.odd))
        with m.If(p.en):
            m.d.sync += o.payload.value.eq(value)


# --------------------------------------------------------------------------------------------
# block floating point


def _aligned_layout(size: int):
    return data.ArrayLayout(signed(Q_WIDTH), size)


class BlockAlign(StreamUnit):
    """Align one block of binary16 values to its largest exponent (``numerics.bfp_blocks``).

    Each element's 11-bit significand is shifted right by ``block_exp - exp`` (truncating) and
    given its sign, so ``|q| <= 2047``. Subnormals take exponent 1, and Inf and NaN decode like
    finite values with exponent 31; ``nonfinite`` says the block held one of those.

    Parameters
    ----------
    size : int
        Elements per block (a power of two; the contract's block is 64).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``x`` (``size`` x :class:`Binary16`), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``exp`` (block exponent, 1..31), ``q`` (``size`` x ``signed(12)``), ``nonfinite``,
        ``tag``.

    Latency 3 cycles (the first three levels of the maximum tree; the rest of it; shift),
    throughput one block per cycle.
    """

    LATENCY = 3
    FIRST_LEVELS = 3
    """Levels of the block exponent's maximum tree in the first stage (the rest in the second:
    six levels for 64 elements would be about twelve LUT levels in one)."""

    def __init__(self, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._size = _check_positive_pow2("size", size)
        super().__init__(
            {"x": data.ArrayLayout(Binary16, size)},
            {"exp": unsigned(EXP_WIDTH), "q": _aligned_layout(size), "nonfinite": unsigned(1)},
            tag=tag,
        )

    @property
    def size(self) -> int:
        return self._size

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="align")
        xs = [self.i.payload.x[k] for k in range(self._size)]
        exps = [Signal(EXP_WIDTH, name=f"exp{k}") for k in range(self._size)]
        sigs = [Signal(11, name=f"sig{k}") for k in range(self._size)]
        for x, e, sig in zip(xs, exps, sigs, strict=True):
            m.d.comb += [e.eq(Mux(x.exp == 0, 1, x.exp)), sig.eq(Cat(x.frac, x.exp != 0))]

        # Stage 1: the first levels of the block exponent's maximum tree; keep sign,
        # significand and exponent of every element.
        part = _max_tree(m, exps, name="max", levels=self.FIRST_LEVELS)
        s1_part = [p.reg(e, name=f"s1_max{k}") for k, e in enumerate(part)]
        s1_nonfinite = p.reg(Cat(*(x.exp == 31 for x in xs)).any(), name="s1_nonfinite")
        s1_sig = [p.reg(s, 11, name=f"s1_sig{k}") for k, s in enumerate(sigs)]
        s1_e = [p.reg(e, EXP_WIDTH, name=f"s1_exp{k}") for k, e in enumerate(exps)]
        s1_neg = [p.reg(x.sign, 1, name=f"s1_neg{k}") for k, x in enumerate(xs)]
        s1_tag = p.reg(self.i.payload.tag, self._tag, name="s1_tag")
        v1 = p.valid_chain(self.i.valid, 1, name="align_valid")

        # Stage 2: the rest of the tree: the block exponent.
        (block_exp,) = _max_tree(m, s1_part, name="max_s2")
        s2_exp = p.reg(block_exp, EXP_WIDTH, name="s2_block_exp")
        s2_nonfinite = p.reg(s1_nonfinite, name="s2_nonfinite")
        s2_sig = [p.reg(s, name=f"s2_sig{k}") for k, s in enumerate(s1_sig)]
        s2_e = [p.reg(e, name=f"s2_exp{k}") for k, e in enumerate(s1_e)]
        s2_neg = [p.reg(n, name=f"s2_neg{k}") for k, n in enumerate(s1_neg)]
        s2_tag = p.reg(s1_tag, self._tag, name="s2_tag")
        v2 = p.valid_chain(v1, 1, name="align_valid2_")

        # Stage 3: shift right by the exponent gap (>= 11 leaves nothing) and apply the sign.
        mags = [Signal(11, name=f"mag{k}") for k in range(self._size)]
        for k, mag in enumerate(mags):
            m.d.comb += mag.eq(s2_sig[k] >> (s2_exp - s2_e[k])[:EXP_WIDTH])
        with m.If(p.en):
            for k, mag in enumerate(mags):
                m.d.sync += self.o.payload.q[k].eq(Mux(s2_neg[k], -mag, mag))
            m.d.sync += [
                self.o.payload.exp.eq(s2_exp),
                self.o.payload.nonfinite.eq(s2_nonfinite),
                self.o.payload.tag.eq(s2_tag),
                self.o.valid.eq(v2),
            ]
        return m


def block_sum_shape(size: int) -> Shape:
    """Exact shape of a sum of ``size`` products of aligned significands: a product needs 23
    bits (``2047**2 < 2**22``), and each level of the adder tree one more."""
    return signed(2 * Q_WIDTH - 1 + (size - 1).bit_length())


class BlockDot(StreamUnit):
    """Exact integer dot product of two aligned blocks: the sum of ``size`` products of
    ``signed(12)`` significands, by a pipelined adder tree.

    Parameters
    ----------
    size : int
        Elements per block (a power of two; the contract's block is 64).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``w``, ``x`` (``size`` x ``signed(12)``), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``sum`` (``signed(23 + log2(size))``, 29 bits for 64: exact since ``|q| <= 2047``),
        ``tag``.

    Latency ``1 + ceil(log2(size) / 2)`` cycles (products; a register after every two adder
    levels), 4 for a 64-block; throughput one block per cycle.
    """

    def __init__(self, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._size = _check_positive_pow2("size", size)
        self._levels = size.bit_length() - 1
        super().__init__(
            {"w": _aligned_layout(size), "x": _aligned_layout(size)},
            {"sum": block_sum_shape(size)},
            tag=tag,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def sum_shape(self) -> Shape:
        return block_sum_shape(self._size)

    @property
    def latency(self) -> int:
        return 1 + (self._levels + 1) // 2

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="dot")
        w, x = self.i.payload.w, self.i.payload.x
        width = 2 * Q_WIDTH - 1
        level = [p.reg(w[k] * x[k], signed(width), name=f"product{k}") for k in range(self._size)]
        tag = p.reg(self.i.payload.tag, self._tag, name="tag1")
        valid = p.valid_chain(self.i.valid, 1, name="dot_valid")
        depth = 0
        while len(level) > 1:
            width += 1
            depth += 1
            sums = [a + b for a, b in zip(level[0::2], level[1::2], strict=True)]
            if depth % 2 == 0 or len(sums) == 1:
                level = [
                    p.reg(s, signed(width), name=f"sum{depth}_{k}") for k, s in enumerate(sums)
                ]
                tag = p.reg(tag, self._tag, name=f"tag_d{depth}")
                valid = p.valid_chain(valid, 1, name=f"dot_valid_d{depth}_")
            else:
                level = sums
        m.d.comb += [
            self.o.payload.sum.eq(level[0]),
            self.o.payload.tag.eq(tag),
            self.o.valid.eq(valid),
        ]
        return m


class AccumulatorShift(StreamUnit):
    """Place a block sum in the accumulator's fixed point:
    ``numerics.shift_floor(sum, numerics.block_shift(w_exp, x_exp, xe_max))`` as int64.

    The shift is ``w_exp + x_exp - xe_max - EW_MAX + ACC_FRAC``: a left shift when positive, a
    flooring (arithmetic) right shift when negative; the result wraps to 64 bits as NumPy's
    int64 does. For 5-bit exponents the shift lies in -38..55, which the unit covers entirely.

    The same unit places a bias (``numerics.bias_to_acc``): give ``sum = +-significand``,
    ``w_exp`` the bias's exponent and ``x_exp = 25``, since
    ``exp - 25 - lam == exp + 25 - xe_max - EW_MAX + ACC_FRAC``.

    Parameters
    ----------
    sum_shape : shape
        Signed shape of the block sum (default the 64-block :class:`BlockDot` sum, 29 bits).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``sum``, ``w_exp``, ``x_exp``, ``xe_max`` (5-bit exponents), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``value`` (``signed(64)``), ``tag``.

    Latency 2 cycles (shift amount; shift), throughput one block sum per cycle.
    """

    LATENCY = 2

    def __init__(self, *, sum_shape=None, tag=NO_TAG):
        if sum_shape is None:
            sum_shape = block_sum_shape(numerics.BLOCK)
        self._sum_shape = _check_shape("sum_shape", sum_shape)
        if not self._sum_shape.signed or self._sum_shape.width > ACC_WIDTH:
            raise ValueError(f"sum_shape must be signed and at most 64 bits, not {sum_shape!r}")
        exp = unsigned(EXP_WIDTH)
        super().__init__(
            {"sum": self._sum_shape, "w_exp": exp, "x_exp": exp, "xe_max": exp},
            {"value": signed(ACC_WIDTH)},
            tag=tag,
        )

    @property
    def sum_shape(self) -> Shape:
        return self._sum_shape

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="ashift")
        i = self.i.payload
        shift = Signal(signed(8), name="shift")
        m.d.comb += shift.eq(i.w_exp + i.x_exp - i.xe_max - numerics.EW_MAX + numerics.ACC_FRAC)
        s1_shift = p.reg(shift, name="s1_shift")
        s1_sum = p.reg(i.sum, self._sum_shape, name="s1_sum")
        s1_tag = p.reg(i.tag, self._tag, name="s1_tag")
        v1 = p.valid_chain(self.i.valid, 1, name="ashift_valid")

        wide = Signal(signed(ACC_WIDTH), name="sum_wide")
        left = Signal(signed(ACC_WIDTH), name="shifted_left")
        right = Signal(signed(ACC_WIDTH), name="shifted_right")
        m.d.comb += [
            wide.eq(s1_sum),
            left.eq(wide << s1_shift.as_unsigned()[:6]),  # truncation = int64 wrap
            right.eq(wide >> (-s1_shift).as_unsigned()[:6]),  # >> on signed is flooring
        ]
        with m.If(p.en):
            m.d.sync += [
                self.o.payload.value.eq(Mux(s1_shift >= 0, left, right)),
                self.o.payload.tag.eq(s1_tag),
                self.o.valid.eq(v1),
            ]
        return m


class Accumulator(StreamUnit):
    """Sum a row's accumulator terms in 64-bit two's complement (wrapping like int64).

    Parameters
    ----------
    tag : shape
        Side data carried from the ``last`` term of a row to its sum (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``value`` (``signed(64)``), ``first`` (start a new sum), ``last`` (emit the sum),
        ``tag``.
    o : ``Out(stream.Signature(...))``
        ``acc`` (``signed(64)``), ``tag``: one item per ``last``.

    Latency 1 cycle from the ``last`` term, throughput one term per cycle.
    """

    LATENCY = 1

    def __init__(self, *, tag=NO_TAG):
        super().__init__(
            {"value": signed(ACC_WIDTH), "first": unsigned(1), "last": unsigned(1)},
            {"acc": signed(ACC_WIDTH)},
            tag=tag,
        )

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="acc")
        i = self.i.payload
        running = Signal(signed(ACC_WIDTH), name="running")
        total = Signal(signed(ACC_WIDTH), name="total")
        m.d.comb += total.eq(Mux(i.first, i.value, running + i.value))
        with m.If(p.en):
            m.d.sync += self.o.valid.eq(self.i.valid & i.last)
            with m.If(self.i.valid):
                m.d.sync += [
                    running.eq(total),
                    self.o.payload.acc.eq(total),
                    self.o.payload.tag.eq(i.tag),
                ]
        return m


class AccToFP16(StreamUnit):
    """Round ``acc * 2**lam`` to binary16, nearest-even (``numerics.acc_to_fp16``); a row that
    saw a non-finite operand gives the canonical NaN (``numerics.matvec_fp16``).

    Overflow gives +-Inf, tiny values round into the subnormals or to a signed zero, and a zero
    accumulator is +0.

    Parameters
    ----------
    acc_width : int
        Width of the signed accumulator (default 64). Results are exact for
        ``|acc| < 2**(acc_width - 1)``.
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``acc`` (``signed(acc_width)``), ``lam`` (``signed(8)``), ``nonfinite``, ``tag``.
    o : ``Out(stream.Signature(...))``
        ``value`` (:class:`Binary16`), ``tag``.

    Latency 5 cycles (magnitude; leading zeros; normalise; subnormal shift; round),
    throughput one value per cycle.
    """

    LATENCY = 5

    def __init__(self, *, acc_width: int = ACC_WIDTH, tag=NO_TAG):
        self._acc_width = check_int("acc_width", acc_width, 2, 128)
        super().__init__(
            {"acc": signed(acc_width), "lam": signed(LAM_WIDTH), "nonfinite": unsigned(1)},
            {"value": Binary16},
            tag=tag,
        )

    @property
    def acc_width(self) -> int:
        return self._acc_width

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="round")
        i = self.i.payload
        mag = Signal(self._acc_width, name="mag")
        m.d.comb += mag.eq(Mux(i.acc < 0, -i.acc, i.acc))
        s1_mag = p.reg(mag, name="s1_mag")
        s1_neg = p.reg(i.acc < 0, 1, name="s1_neg")
        s1_lam = p.reg(i.lam, signed(LAM_WIDTH), name="s1_lam")
        s1_nonfinite = p.reg(i.nonfinite, 1, name="s1_nonfinite")
        s1_tag = p.reg(i.tag, self._tag, name="s1_tag")
        v1 = p.valid_chain(self.i.valid, 1, name="round_valid")

        # Stage 2: the leading zeros; stage 3: shift the leading one to the top.
        wide, lam, zero, lz = _leading(m, s1_mag, s1_lam, name="acc")
        s2_mag = p.reg(wide, name="s2_mag")
        s2_lam = p.reg(lam, signed(LAM_WIDTH + 1), name="s2_lam")
        s2_zero = p.reg(zero, 1, name="s2_zero")
        s2_lz = p.reg(lz, name="s2_lz")
        s2_neg = p.reg(s1_neg, name="s2_neg")
        s2_nonfinite = p.reg(s1_nonfinite, name="s2_nonfinite")
        s2_tag = p.reg(s1_tag, self._tag, name="s2_tag")
        v2 = p.valid_chain(v1, 1, name="round_valid2_")

        norm = _shift_up(m, s2_mag, s2_lam, s2_zero, s2_lz, s2_neg, name="acc")
        s3_norm = p.reg(norm, name="s3_norm")
        s3_nonfinite = p.reg(s2_nonfinite, name="s3_nonfinite")
        s3_tag = p.reg(s2_tag, self._tag, name="s3_tag")
        v3 = p.valid_chain(v2, 1, name="round_valid3_")

        # Stage 4: the subnormal shift; stage 5: round.
        prep = _round_prepare(m, s3_norm, name="acc")
        s4_round = p.reg(prep, name="s4_round")
        s4_nonfinite = p.reg(s3_nonfinite, name="s4_nonfinite")
        s4_tag = p.reg(s3_tag, self._tag, name="s4_tag")
        v4 = p.valid_chain(v3, 1, name="round_valid4_")

        rounded = _round_finish(m, s4_round, name="acc_round")
        with m.If(p.en):
            m.d.sync += [
                self.o.payload.value.eq(Mux(s4_nonfinite, _canonical_nan(), rounded.as_value())),
                self.o.payload.tag.eq(s4_tag),
                self.o.valid.eq(v4),
            ]
        return m


# --------------------------------------------------------------------------------------------
# quantized weights (issue 17, part 4): the block sums P = sum (q - zero) * x, and T = +-m_s * P
# shifted into the accumulator (numerics.matvec_quant). Measured against each other in
# docs/rtl.md, "Quantized arithmetic (issue 17)".

QUANT_BITS = (4, 8)
"""Weight widths of the quantized contract (``tandem.qweights``)."""


def _check_quant_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANT_BITS:
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")
    return bits


def xsum_shape(size: int) -> Shape:
    """Exact shape of ``sum x`` over an aligned block (``|x| <= 2047``): 18 bits for 64."""
    return signed(Q_WIDTH + (size - 1).bit_length())


def quant_sum_shape(bits: int, size: int = numerics.BLOCK) -> Shape:
    """Exact shape of a quantized block sum ``P = sum (q - zero) * x``: ``|P| <= size * (2**bits
    - 1) * 2047``, 22 bits at INT4 and 26 at INT8 for a 64-block (numerics: ``|P| < 2**(bits +
    17)``)."""
    return signed(_bound_shape(size * ((1 << bits) - 1) * 2047).width)


def _bound_shape(bound: int) -> Shape:
    """The signed shape that holds every integer of magnitude at most ``bound``."""
    return signed(bound.bit_length() + 1)


def _tree_depths(counts) -> int:
    """Adder levels of :func:`_adder_trees` for trees of ``counts`` leaves (pairwise, an odd
    leaf carried up)."""
    return max((n - 1).bit_length() for n in counts)


def _adder_trees(p: Stall, trees, *, per_stage: int, name: str):
    """Exact sums of several lists of ``(value, bound)`` leaves (``|value| <= bound``), by
    pairwise adder trees reduced in step, a register after every ``per_stage`` levels and after
    the last; each register as wide as its bound needs. Returns (``[sum]``, registers on the
    way), the sums registered."""
    levels = [list(t) for t in trees]
    depth = _tree_depths([len(t) for t in trees])
    stages = 0
    for d in range(1, depth + 1):
        for t, level in enumerate(levels):
            nxt = [
                (a + b, ba + bb) for (a, ba), (b, bb) in zip(level[0::2], level[1::2], strict=False)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            levels[t] = nxt
        if d % per_stage == 0 or d == depth:
            stages += 1
            levels = [
                [
                    (p.reg(v, _bound_shape(b), name=f"{name}{t}_d{d}_{k}"), b)
                    for k, (v, b) in enumerate(level)
                ]
                for t, level in enumerate(levels)
            ]
    return [level[0][0] for level in levels], stages


def _tree_output(m: Module, p: Stall, unit: StreamUnit, total, stages: int, *, name: str):
    """Drive ``unit.o`` from an adder tree's registered ``total`` (``o.payload.sum``), ``stages``
    cycles after the input: the tag and valid bit delayed to match."""
    tag = unit.i.payload.tag
    for s in range(stages):
        tag = p.reg(tag, unit._tag, name=f"{name}_tag{s}")
    valid = p.valid_chain(unit.i.valid, stages, name=f"{name}_valid")
    m.d.comb += [
        unit.o.payload.sum.eq(total),
        unit.o.payload.tag.eq(tag),
        unit.o.valid.eq(valid),
    ]


class BlockSum(StreamUnit):
    """Exact sum of one aligned block, ``xsum = sum x`` (:func:`xsum_shape`): what the quantized
    block sums need once per input block (``sum (q - zero) * x = sum q * x - zero * xsum``), so
    the matrix unit computes it when it loads ``x``.

    Parameters
    ----------
    size : int
        Elements per block (a power of two; the contract's block is 64).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``x`` (``size`` x ``signed(12)``, aligned), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``sum`` (:func:`xsum_shape`), ``tag``.

    Latency ``ceil(log2(size) / 2)`` cycles (a register after every two adder levels): 3 for a
    64-block; throughput one block per cycle.
    """

    PER_STAGE = 2

    def __init__(self, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._size = _check_positive_pow2("size", size)
        super().__init__({"x": _aligned_layout(size)}, {"sum": xsum_shape(size)}, tag=tag)

    @property
    def size(self) -> int:
        return self._size

    @property
    def latency(self) -> int:
        return max(1, -(-_tree_depths([self._size]) // self.PER_STAGE))

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="bsum")
        i = self.i.payload
        leaves = [(i.x[k], 2047) for k in range(self._size)]
        if self._size == 1:
            (total,), stages = [p.reg(i.x[0], xsum_shape(1), name="bsum_t")], 1
        else:
            (total,), stages = _adder_trees(p, [leaves], per_stage=self.PER_STAGE, name="bsum_t")
        _tree_output(m, p, self, total, stages, name="bsum")
        return m


class QuantBlockDot(StreamUnit):
    """One lane's quantized block sum in LUTs: ``P = sum (q - zero) * x`` over a block, exactly,
    as ``sum q * x - zero * xsum`` (``xsum = sum x``, one per block, shared by all lanes).

    Every product is a sum of ``bits`` partial products ``q[j] ? x << j : 0`` (no ``$mul``, so
    Yosys maps no DSP), and ``-zero * xsum`` ``bits`` more; all of them go into one pipelined
    adder tree, whose first level absorbs the AND gates into its LUTs.

    Parameters
    ----------
    bits : int
        Weight width, 4 or 8 (``q`` and ``zero`` unsigned).
    size : int
        Elements per block (a power of two; the contract's block is 64).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``q`` (``size`` x ``unsigned(bits)``), ``zero`` (``unsigned(bits)``), ``x`` (``size`` x
        ``signed(12)``, aligned), ``xsum`` (:func:`xsum_shape`, the sum of this ``x``), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``sum`` (:func:`quant_sum_shape`), ``tag``.

    Latency ``ceil(levels / 2)`` cycles with ``levels = ceil(log2(size * bits + bits))`` (a
    register after every two adder levels): 5 for a 64-block at INT4 (9 levels) and at INT8
    (10); throughput one block per cycle.
    """

    PER_STAGE = 2

    def __init__(self, bits: int, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._bits = _check_quant_bits(bits)
        self._size = _check_positive_pow2("size", size)
        super().__init__(
            {
                "q": data.ArrayLayout(unsigned(bits), size),
                "zero": unsigned(bits),
                "x": _aligned_layout(size),
                "xsum": xsum_shape(size),
            },
            {"sum": quant_sum_shape(bits, size)},
            tag=tag,
        )

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def size(self) -> int:
        return self._size

    @property
    def latency(self) -> int:
        depth = _tree_depths([self._size * self._bits + self._bits])
        return -(-depth // self.PER_STAGE)

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="qdot")
        i = self.i.payload
        leaves = []
        for k in range(self._size):
            for j in range(self._bits):
                leaves.append((Mux(i.q[k][j], i.x[k] << j, 0), 2047 << j))
        neg_xsum = Signal(xsum_shape(self._size), name="neg_xsum")
        m.d.comb += neg_xsum.eq(-i.xsum)
        for j in range(self._bits):
            leaves.append((Mux(i.zero[j], neg_xsum << j, 0), (self._size * 2047) << j))
        (total,), stages = _adder_trees(p, [leaves], per_stage=self.PER_STAGE, name="qdot_t")
        _tree_output(m, p, self, total, stages, name="qdot")
        return m


class QuantBlockDotPair(StreamUnit):
    """Two lanes' quantized block sums on DSP48E2s, two 4-bit products per DSP: ``Pa = sum (qa -
    za) * x`` and ``Pb = sum (qb - zb) * x`` over one block (two lanes' rows, the same input).

    The weights are cut into nibbles (INT8: ``q = 16 * hi + lo``, two nibble planes; INT4 one),
    each offset to signed ``n' = n - 8``. Per element and plane one ``$mul`` of a packed
    ``A = na' + nb' * 2**15`` (20 bits) by ``x`` (``B``): ``|na' * x| <= 8 * 2047 < 2**14``,
    so the low product is the sign-extended low 15 bits of the DSP's result, and the high one
    the rest plus the low field's sign bit (its borrow, added in the adder tree). Two 8-bit
    products need 28 bits of ``A`` (27 are there), hence the nibbles: INT8 and INT4 take the
    same DSPs per cycle (2,048 on u55c). ``sum q * x = sum q' * x + c * xsum`` with ``c = 8``
    (INT4) or ``136`` (INT8), so the offsets and the zero point cost one ``(c - zero) * xsum``
    multiply per lane (a small DSP).

    Parameters, members: as :class:`QuantBlockDot`, with ``qa``, ``qb``, ``za``, ``zb`` in and
    ``sa``, ``sb`` out.

    Latency ``3 + ceil(levels / 2)`` cycles (packing; the DSP's ``M`` and ``P`` registers; the
    adder trees, ``levels = ceil(log2(2 * planes * size + 1))``): 7 at INT4, 8 at INT8 for a
    64-block; throughput one block pair per cycle.
    """

    PER_STAGE = 2
    SPACING = 15
    """Bit position of the second lane's product in a DSP's result."""

    def __init__(self, bits: int, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._bits = _check_quant_bits(bits)
        self._size = _check_positive_pow2("size", size)
        q = data.ArrayLayout(unsigned(bits), size)
        out = quant_sum_shape(bits, size)
        super().__init__(
            {
                "qa": q,
                "qb": q,
                "za": unsigned(bits),
                "zb": unsigned(bits),
                "x": _aligned_layout(size),
                "xsum": xsum_shape(size),
            },
            {"sa": out, "sb": out},
            tag=tag,
        )

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def size(self) -> int:
        return self._size

    @property
    def latency(self) -> int:
        planes = self._bits // 4
        return 3 + -(-_tree_depths([2 * planes * self._size + 1]) // self.PER_STAGE)

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="qpair")
        i = self.i.payload
        n, s = self._size, self.SPACING
        planes = self._bits // 4
        coef = sum(8 << (4 * j) for j in range(planes))  # sum q = sum q' + coef (per element)
        low_bound = 8 * 2047  # |n' * x|

        # Stage 1: the packed A operands (n' = the nibble with its MSB inverted, as signed), x,
        # and the zero points' coefficients (coef - zero).
        packed, xs = [], []
        for k in range(n):
            xs.append(p.reg(i.x[k], signed(Q_WIDTH), name=f"b{k}"))
            for j in range(planes):
                na = Signal(signed(4), name=f"na{k}_{j}")
                nb = Signal(signed(4), name=f"nb{k}_{j}")
                m.d.comb += [
                    na.eq(Cat(i.qa[k][4 * j : 4 * j + 3], ~i.qa[k][4 * j + 3])),
                    nb.eq(Cat(i.qb[k][4 * j : 4 * j + 3], ~i.qb[k][4 * j + 3])),
                ]
                packed.append((k, j, p.reg(na + (nb << s), signed(s + 5), name=f"a{k}_{j}")))
        ca = p.reg(coef - i.za, signed(self._bits + 1), name="za_coef")
        cb = p.reg(coef - i.zb, signed(self._bits + 1), name="zb_coef")
        xsum = p.reg(i.xsum, xsum_shape(n), name="xsum1")

        # Stages 2 and 3: the DSP's M and P registers.
        width = s + 5 + Q_WIDTH - 1  # |A| <= 8 * 2**15 + 8
        prod = []
        for k, j, a in packed:
            mreg = p.reg(a * xs[k], signed(width), name=f"m{k}_{j}")
            prod.append((j, p.reg(mreg, name=f"p{k}_{j}")))
        zbound = n * 2047 * max(coef, (1 << self._bits) - 1 - coef)
        za_term = p.reg(p.reg(ca * xsum, _bound_shape(zbound), name="za_m"), name="za_p")
        zb_term = p.reg(p.reg(cb * xsum, _bound_shape(zbound), name="zb_m"), name="zb_p")

        # Then the two adder trees: the low fields; the high fields and the borrows. Plane j
        # weighs 16**j.
        low = [(v[:s].as_signed() << 4 * j, low_bound << 4 * j) for j, v in prod]
        high = [(v[s:].as_signed() << 4 * j, (low_bound + 1) << 4 * j) for j, v in prod]
        borrows = [(v[s - 1].as_unsigned() << 4 * j, 1 << 4 * j) for j, v in prod]
        (sa, sb), stages = _adder_trees(
            p,
            [[*low, (za_term, zbound)], [*high, *borrows, (zb_term, zbound)]],
            per_stage=self.PER_STAGE,
            name="qpair_t",
        )
        tag = i.tag
        for k in range(3 + stages):
            tag = p.reg(tag, self._tag, name=f"qpair_tag{k}")
        valid = p.valid_chain(self.i.valid, 3 + stages, name="qpair_valid")
        m.d.comb += [
            self.o.payload.sa.eq(sa),
            self.o.payload.sb.eq(sb),
            self.o.payload.tag.eq(tag),
            self.o.valid.eq(valid),
        ]
        return m


class QuantScale(StreamUnit):
    """A quantized block sum scaled and placed in the accumulator (``numerics.matvec_quant``):
    ``T = +-m_s * P``, then ``shift_floor(T, quant_block_shift(es, x_exp, xe_max, bits))`` as
    int64, with ``m_s`` and ``es`` the block scale's significand and exponent as
    ``numerics.decode`` gives them (subnormals: exponent 1; exponent field 31 decodes as 31 and
    sets ``nonfinite``).

    The shift ``es + x_exp - xe_max - 7 - bits`` lies in -44..20 (``es``, ``x_exp`` 1..31,
    ``x_exp <= xe_max``); ``|T| < 2**37`` fits any left shift in 64 bits.

    Parameters
    ----------
    sum_shape : shape
        Signed shape of ``P`` (default the INT8 64-block sum, 26 bits; at most 27 for one DSP).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``sum`` (``P``), ``scale`` (:class:`Binary16`), ``x_exp``, ``xe_max`` (5-bit exponents),
        ``bits`` (4 or 8, the matrix's weight width: one bitstream for both), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``value`` (``signed(64)``), ``nonfinite`` (the scale's exponent field is 31), ``tag``.

    Latency 4 cycles (decode and shift amount; the DSP's ``M`` and ``P`` registers; shift),
    throughput one block per cycle.
    """

    LATENCY = 4

    def __init__(self, *, sum_shape=None, tag=NO_TAG):
        if sum_shape is None:
            sum_shape = quant_sum_shape(8)
        self._sum_shape = _check_shape("sum_shape", sum_shape)
        if not self._sum_shape.signed or self._sum_shape.width > 27:
            raise ValueError(f"sum_shape must be signed and at most 27 bits, not {sum_shape!r}")
        exp = unsigned(EXP_WIDTH)
        super().__init__(
            {
                "sum": self._sum_shape,
                "scale": Binary16,
                "x_exp": exp,
                "xe_max": exp,
                "bits": unsigned(4),
            },
            {"value": signed(ACC_WIDTH), "nonfinite": unsigned(1)},
            tag=tag,
        )

    @property
    def sum_shape(self) -> Shape:
        return self._sum_shape

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="qscale")
        i = self.i.payload
        sc = i.scale
        sig = Signal(11, name="scale_sig")
        es = Signal(EXP_WIDTH, name="scale_exp")
        shift = Signal(signed(8), name="shift")
        m.d.comb += [
            sig.eq(Cat(sc.frac, sc.exp != 0)),
            es.eq(Mux(sc.exp == 0, 1, sc.exp)),
            shift.eq(es + i.x_exp - i.xe_max - numerics.EW_MAX + numerics.ACC_FRAC - i.bits),
        ]
        s1_ms = p.reg(Mux(sc.sign, -sig, sig), signed(Q_WIDTH), name="s1_ms")
        s1_sum = p.reg(i.sum, self._sum_shape, name="s1_sum")
        s1_shift = p.reg(shift, name="s1_shift")
        s1_nonfinite = p.reg(sc.exp == 31, 1, name="s1_nonfinite")
        s1_tag = p.reg(i.tag, self._tag, name="s1_tag")

        t_shape = signed(self._sum_shape.width + Q_WIDTH - 1)
        s2_t = p.reg(s1_sum * s1_ms, t_shape, name="s2_t")  # the DSP's M register
        s3_t = p.reg(s2_t, name="s3_t")  # and its P register
        s3_shift = p.reg(p.reg(s1_shift, name="s2_shift"), name="s3_shift")
        s3_nonfinite = p.reg(p.reg(s1_nonfinite, name="s2_nonfinite"), name="s3_nonfinite")
        s3_tag = p.reg(p.reg(s1_tag, self._tag, name="s2_tag"), self._tag, name="s3_tag")
        v3 = p.valid_chain(self.i.valid, 3, name="qscale_valid")

        wide = Signal(signed(ACC_WIDTH), name="t_wide")
        left = Signal(signed(ACC_WIDTH), name="t_left")
        right = Signal(signed(ACC_WIDTH), name="t_right")
        m.d.comb += [
            wide.eq(s3_t),
            left.eq(wide << s3_shift.as_unsigned()[:5]),  # 0..20
            right.eq(wide >> (-s3_shift).as_unsigned()[:6]),  # 1..44, flooring
        ]
        with m.If(p.en):
            m.d.sync += [
                self.o.payload.value.eq(Mux(s3_shift >= 0, left, right)),
                self.o.payload.nonfinite.eq(s3_nonfinite),
                self.o.payload.tag.eq(s3_tag),
                self.o.valid.eq(v3),
            ]
        return m


class NibbleDotPair(StreamUnit):
    """Two lanes' block sums for every weight format on one array of DSP48E2s, two 4-bit
    products per DSP (as :class:`QuantBlockDotPair`): per cycle and lane one FP16 block (64
    aligned ``signed(12)`` weight significands), or two INT8 blocks, or four INT4 blocks (the
    quantized tile of ``tandem.layout``: 1,024 weight bits per lane).

    The array has ``4 x size`` DSP columns (``p``, ``j``): plane ``p`` of element ``j``. A lane's
    1,024 bits are 256 nibbles, and column (``p``, ``j``) takes nibble ``64p + j`` at INT4
    (block ``p``), ``128 (p // 2) + 2j + p % 2`` at INT8 (block ``p // 2``, weight ``16**(p %
    2)``) and ``3j + p`` at FP16 (the significand's nibbles; the top one signed, plane 3
    unused), with the input block it multiplies. Per plane the unit sums ``size`` products;
    the last stage combines the planes into block sums and adds ``(c - zero) * xsum`` (``c =
    8`` at INT4, ``136`` at INT8, and at FP16 ``136`` with no zero point: the offsets of the
    unsigned nibbles).

    Parameters
    ----------
    size : int
        Elements per block (a power of two; the contract's block is 64).
    tag : shape
        Side data carried from input to output unchanged (default: none).

    Members
    -------
    i : ``In(stream.Signature(...))``
        ``fmt`` (``tandem.isa.WFmt``: 0 FP16, 1 INT8, 2 INT4), ``wa``, ``wb`` (``unsigned(16 *
        size)``: the lanes' nibbles as above; FP16: 64 ``signed(12)`` in the low 768 bits),
        ``za``, ``zb`` (4 x ``unsigned(8)``, per block; ignored at FP16), ``x`` (4 blocks of
        ``size`` x ``signed(12)``: block ``b`` of the cycle in slot ``b``), ``xsum`` (4 x
        :func:`xsum_shape`), ``tag``.
    o : ``Out(stream.Signature(...))``
        ``sa``, ``sb`` (4 x :func:`block_sum_shape`: block ``b``'s sum in slot ``b``; slots
        past the format's blocks are unspecified), ``tag``.

    Latency ``4 + ceil(log2(2 * size) / 2)`` cycles (select and pack; the DSP's ``M`` and
    ``P`` registers; the plane trees; combine): 8 for a 64-block; throughput one tile row pair
    per cycle.
    """

    PER_STAGE = 2
    SPACING = 15
    FP16, INT8, INT4 = 0, 1, 2

    def __init__(self, size: int = numerics.BLOCK, *, tag=NO_TAG):
        self._size = _check_positive_pow2("size", size)
        blocks = data.ArrayLayout(_aligned_layout(size), 4)
        out = data.ArrayLayout(block_sum_shape(size), 4)
        zeros = data.ArrayLayout(unsigned(8), 4)
        super().__init__(
            {
                "fmt": unsigned(2),
                "wa": unsigned(16 * size),
                "wb": unsigned(16 * size),
                "za": zeros,
                "zb": zeros,
                "x": blocks,
                "xsum": data.ArrayLayout(xsum_shape(size), 4),
            },
            {"sa": out, "sb": out},
            tag=tag,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def latency(self) -> int:
        return 4 + -(-_tree_depths([2 * self._size]) // self.PER_STAGE)

    def _nibble(self, m, w, fmt, p, j, *, name):
        """Comb: the signed operand of column (p, j) of one lane: the nibble minus 8, or the
        FP16 significand's signed top nibble, or 0 (FP16, plane 3)."""
        n = self._size

        def nib(k):
            return w[4 * k : 4 * k + 4]

        raw = Signal(4, name=f"{name}_raw")
        with m.Switch(fmt):
            with m.Case(self.INT4):
                m.d.comb += raw.eq(nib(n * p + j))
            with m.Case(self.INT8):
                m.d.comb += raw.eq(nib(2 * n * (p // 2) + 2 * j + p % 2))
            with m.Default():
                m.d.comb += raw.eq(nib(3 * j + p) if p < 3 and 3 * j + p < 4 * n else 0)
        op = Signal(signed(4), name=f"{name}_op")
        if p == 3:  # FP16 leaves plane 3 empty (operand 0); else nibble - 8
            m.d.comb += op.eq(Mux(fmt == self.FP16, 0, Cat(raw[:3], ~raw[3])))
        elif p == 2:  # the FP16 significand's top nibble is signed
            m.d.comb += op.eq(Cat(raw[:3], raw[3] ^ (fmt != self.FP16)))
        else:
            m.d.comb += op.eq(Cat(raw[:3], ~raw[3]))
        return op

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="nib")
        i = self.i.payload
        n, s = self._size, self.SPACING
        fmt = i.fmt
        int4, fp16 = fmt == self.INT4, fmt == self.FP16

        # Stage 1: each column's packed operand and input element.
        cols = []
        for pl in range(4):
            for j in range(n):
                na = self._nibble(m, i.wa, fmt, pl, j, name=f"na{pl}_{j}")
                nb = self._nibble(m, i.wb, fmt, pl, j, name=f"nb{pl}_{j}")
                if pl == 1:
                    xsel = Mux(int4, i.x[1][j], i.x[0][j])
                elif pl == 2:
                    xsel = Mux(int4, i.x[2][j], Mux(fp16, i.x[0][j], i.x[1][j]))
                elif pl == 3:
                    xsel = Mux(int4, i.x[3][j], i.x[1][j])
                else:
                    xsel = i.x[0][j]
                a = p.reg(na + (nb << s), signed(s + 5), name=f"a{pl}_{j}")
                b = p.reg(xsel, signed(Q_WIDTH), name=f"b{pl}_{j}")
                cols.append((pl, a, b))
        coef = Mux(int4, 8, 136)
        terms = []
        for lane, z in (("a", i.za), ("b", i.zb)):
            for blk in range(4):
                c = p.reg(coef - Mux(fp16, 0, z[blk]), signed(9), name=f"coef{lane}{blk}")
                xs = p.reg(i.xsum[blk], xsum_shape(n), name=f"xsum{lane}{blk}")
                terms.append((c, xs))
        s1_fmt = p.reg(fmt, 2, name="s1_fmt")

        # Stages 2 and 3: the DSP's M and P registers.
        width = s + 5 + Q_WIDTH - 1
        prods = []
        for k, (pl, a, b) in enumerate(cols):
            mreg = p.reg(a * b, signed(width), name=f"m{k}")
            prods.append((pl, p.reg(mreg, name=f"p{k}")))
        zbound = n * 2047 * 136
        zterms = [
            p.reg(p.reg(c * xs, _bound_shape(zbound), name=f"zm{k}"), name=f"zp{k}")
            for k, (c, xs) in enumerate(terms)
        ]
        fmt3 = p.reg(p.reg(s1_fmt, name="s2_fmt"), name="s3_fmt")

        # The plane trees: lane a's low fields, lane b's high fields and borrows.
        trees = []
        for pl in range(4):
            vs = [v for q, v in prods if q == pl]
            trees.append([(v[:s].as_signed(), 8 * 2047) for v in vs])
            trees.append(
                [(v[s:].as_signed(), 8 * 2047 + 1) for v in vs]
                + [(v[s - 1].as_unsigned(), 1) for v in vs]
            )
        sums, stages = _adder_trees(p, trees, per_stage=self.PER_STAGE, name="nib_t")
        for k in range(stages):
            zterms = [p.reg(z, name=f"z{k}_{t}") for t, z in enumerate(zterms)]
            fmt3 = p.reg(fmt3, name=f"fmt_t{k}")
        tag = i.tag
        for k in range(3 + stages):
            tag = p.reg(tag, self._tag, name=f"nib_tag{k}")
        int4, fp16 = fmt3 == self.INT4, fmt3 == self.FP16

        # Combine: planes into block sums, plus the offsets' and zero points' terms.
        with m.If(p.en):
            for lane, out in ((0, self.o.payload.sa), (1, self.o.payload.sb)):
                sp = [sums[2 * pl + lane] for pl in range(4)]
                z = zterms[4 * lane : 4 * lane + 4]
                m.d.sync += [
                    out[0].eq(sp[0] + Mux(int4, 0, sp[1] << 4) + Mux(fp16, sp[2] << 8, 0) + z[0]),
                    out[1].eq(Mux(int4, sp[1], sp[2] + (sp[3] << 4)) + z[1]),
                    out[2].eq(sp[2] + z[2]),
                    out[3].eq(sp[3] + z[3]),
                ]
            m.d.sync += self.o.payload.tag.eq(tag)
        valid = p.valid_chain(self.i.valid, 3 + stages, name="nib_valid")
        with m.If(p.en):
            m.d.sync += self.o.valid.eq(valid)
        return m
