# amaranth: UnusedElaboratable=no
"""cocotb testbench of the MPU (rtl/mpu.py), bit-exact against tandem.numerics.

Run from tests/rtl/test_mpu.py through tandem.sim.runner; the pytest side passes the geometry
and the suite size as parameters. The weight stream is built with tandem.layout.pack_tiled, the
one definition of the tiled format, and the expected results come from tandem.numerics.matvec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cocotb
import numpy as np

from tandem import numerics as nm
from tandem import sampling as S
from tandem import seeds
from tandem.geometry import geometry
from tandem.layout import (
    dense_stride,
    pack_quant_tiled,
    pack_tiled,
    quant_tiles,
    quant_wgroup,
    scale_run,
    wfmt_for,
)
from tandem.qweights import QuantizedMatrix
from tandem.rtl.mpu import MatvecCommand, MatvecFlags, MatvecSampling
from tandem.sim import streams
from tandem.sim.runner import tb_params

BLOCK = nm.BLOCK


# ----------------------------------------------------------------------------------------------
# the model: one command as the streams see it


_COMMAND = streams.Packer(MatvecCommand)
_FLAGS = streams.Packer(MatvecFlags)
_SAMPLING = streams.Packer(MatvecSampling)


def _cmd_word(
    rows,
    cols,
    live_rows,
    live_cols,
    bias,
    argmax,
    sampling=(0, 0, 0),
    wfmt=0,
    wgroup=0,
    fwd_index=None,
    fwd_col=False,
) -> int:
    flags = _FLAGS.pack(bias=bias, argmax=argmax)
    word, seed, pos = sampling
    return _COMMAND.pack(
        rows=rows,
        cols=cols,
        live_rows=live_rows,
        live_cols=live_cols,
        flags=flags,
        sampling=_SAMPLING.pack(word=word, seed=seed, pos=pos),
        wfmt=wfmt,
        wgroup=wgroup,
        fwd=int(fwd_index is not None),
        fwd_col=int(fwd_col),
        fwd_index=fwd_index or 0,
    )


def _row_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.ascontiguousarray(bits, dtype="<u2").tobytes(), "little")


def _int_row(value: int, n: int = BLOCK) -> np.ndarray:
    return np.frombuffer(value.to_bytes(2 * n, "little"), dtype="<u2").astype(np.uint16)


@dataclass
class Case:
    """One MATVEC: the allocated matrix in HBM (live part plus stale data), x, bias, flags."""

    w: np.ndarray  # uint16 [64 * groups_alloc, 64 * cbs_alloc]: whole tiles, stale data included
    rows: int
    cols: int
    live_rows: int
    live_cols: int
    x: np.ndarray  # uint16 [64 * cbs_alloc] (stale beyond live_cols)
    bias: np.ndarray | None  # uint16 [64 * groups_alloc] or None
    argmax: bool = False
    label: str = ""
    sampling: tuple[int, int, int] = (0, 0, 0)  # (word, seed, position), tandem.sampling
    # a forwarding product (tandem.isa): the 64 elements that replace the last live row (the
    # matrix's copy of that row is stale), or with ``fwd_col`` the last live column
    fwd: np.ndarray | None = None
    fwd_col: bool = False
    expect_rows: list[np.ndarray] = field(default_factory=list)
    expect_argmax: int | None = None

    @property
    def eff_rows(self):
        return min(self.rows, self.live_rows)

    @property
    def eff_cols(self):
        return min(self.cols, self.live_cols)

    @property
    def n_groups(self):
        return -(-self.eff_rows // BLOCK)

    @property
    def n_cb(self):
        return -(-self.eff_cols // BLOCK)

    def expect(self) -> None:
        r, c = self.eff_rows, self.eff_cols
        if r == 0:  # no live row: no rows, argmax 0 (as tandem.golden.isasim decides)
            self.expect_rows = []
            self.expect_argmax = 0 if self.argmax else None
            return
        w, x = self.w[:r, :c], self.x[:c]
        if self.fwd is not None and c:
            w = w.copy()
            if self.fwd_col:
                w[:, c - 1] = self.fwd[:r]
            else:
                w[r - 1] = self.fwd[:c]
        if c == 0:  # no live column: one all-zero block (isasim), so the result is the bias
            w, x = np.zeros((r, BLOCK), np.uint16), np.zeros(BLOCK, np.uint16)
        mat = nm.PreparedMatrix(w)
        bias = None if self.bias is None else self.bias[:r]
        acc, lam, nonfinite = nm.matvec(mat, x, bias)
        if self.argmax:
            self.expect_argmax = S.choose_word(acc, lam, nonfinite, *self.sampling)
            return
        y = nm.matvec_fp16(mat, x, bias)
        padded = np.zeros(self.n_groups * BLOCK, np.uint16)
        padded[:r] = y
        self.expect_rows = [padded[g * BLOCK : (g + 1) * BLOCK] for g in range(self.n_groups)]

    @property
    def fwd_index(self) -> int | None:
        """The forwarded row's (column's) index, None when nothing is forwarded: the command
        has no live row or column (as the controller sends it)."""
        if self.fwd is None or self.eff_rows == 0 or self.eff_cols == 0:
            return None
        return (self.eff_cols if self.fwd_col else self.eff_rows) - 1

    def streams(self, geom):
        """(cmd word, x beats, weight tiles, bias rows) as stream payload integers."""
        cmd = _cmd_word(
            self.rows,
            self.cols,
            self.live_rows,
            self.live_cols,
            int(self.bias is not None),
            int(self.argmax),
            self.sampling,
            fwd_index=self.fwd_index,
            fwd_col=self.fwd_col,
        )
        if self.n_groups == 0:  # the MPU takes nothing but the command
            return cmd, [], [], []
        xs = [_row_int(self.x[b * BLOCK : (b + 1) * BLOCK]) for b in range(self.n_cb)]
        if self.fwd is not None and self.n_cb:
            xs.append(_row_int(self.fwd))
        packed = pack_tiled(geom, self.w)  # the HBM image of the whole allocated matrix
        cbs_alloc = -(-self.cols // BLOCK)
        stride = dense_stride(geom)
        tiles = []
        for g in range(self.n_groups):
            for cb in range(self.n_cb):
                for rb in range(stride):
                    t = (g * cbs_alloc + cb) * stride + rb
                    beat = packed[:, t * geom.beat_bytes : (t + 1) * geom.beat_bytes]
                    tiles.append(int.from_bytes(beat.tobytes(), "little"))  # channel 0 lowest
        bias = []
        if self.bias is not None:
            bias = [_row_int(self.bias[g * BLOCK : (g + 1) * BLOCK]) for g in range(self.n_groups)]
        return cmd, xs, tiles, bias

    def cycles(self, mpu) -> int:
        return mpu.cycles(self.n_groups, self.n_cb, argmax=self.argmax)


@dataclass
class QuantCase:
    """One quantized MATVEC (``wfmt`` INT8/INT4): a dense matrix, x (stale past ``cols``),
    bias; the weight stream is the region :func:`tandem.layout.pack_quant_tiled` stores, scale
    beats included, and the expected results come from ``numerics.matvec_quant``."""

    m: QuantizedMatrix
    x: np.ndarray  # uint16 [64 * ceil(cols / 64)]
    bias: np.ndarray | None  # uint16 [64 * groups] or None
    argmax: bool = False
    label: str = ""
    sampling: tuple[int, int, int] = (0, 0, 0)
    expect_rows: list[np.ndarray] = field(default_factory=list)
    expect_argmax: int | None = None

    @property
    def n_groups(self):
        return -(-self.m.rows // BLOCK)

    @property
    def n_cb(self):
        return -(-self.m.cols // BLOCK)

    @property
    def wfmt(self) -> int:
        return int(wfmt_for(self.m.bits))

    @property
    def wgroup(self) -> int:
        return quant_wgroup(self.m.bits, self.m.group, self.m.cols)

    def expect(self) -> None:
        r, c = self.m.rows, self.m.cols
        mat = nm.PreparedQuantMatrix(self.m)
        bias = None if self.bias is None else self.bias[:r]
        acc, lam, nonfinite = nm.matvec_quant(mat, self.x[:c], bias)
        if self.argmax:
            self.expect_argmax = S.choose_word(acc, lam, nonfinite, *self.sampling)
            return
        y = nm.matvec_quant_fp16(mat, self.x[:c], bias)
        padded = np.zeros(self.n_groups * BLOCK, np.uint16)
        padded[:r] = y
        self.expect_rows = [padded[g * BLOCK : (g + 1) * BLOCK] for g in range(self.n_groups)]

    def streams(self, geom):
        r, c = self.m.rows, self.m.cols
        cmd = _cmd_word(
            r, c, r, c, int(self.bias is not None), int(self.argmax), self.sampling,
            wfmt=self.wfmt, wgroup=self.wgroup,
        )  # fmt: skip
        xs = [_row_int(self.x[b * BLOCK : (b + 1) * BLOCK]) for b in range(self.n_cb)]
        packed = pack_quant_tiled(geom, self.m)
        n = quant_tiles(geom, r, c, self.m.bits)
        beats = n + -(-n // scale_run(self.m.bits, self.wgroup))
        bb = geom.beat_bytes
        tiles = [
            int.from_bytes(packed[:, t * bb : (t + 1) * bb].tobytes(), "little")
            for t in range(beats)
        ]
        bias = []
        if self.bias is not None:
            bias = [_row_int(self.bias[g * BLOCK : (g + 1) * BLOCK]) for g in range(self.n_groups)]
        return cmd, xs, tiles, bias

    def cycles(self, mpu) -> int:
        return mpu.cycles(
            self.n_groups, self.n_cb, argmax=self.argmax, wfmt=self.wfmt, wgroup=self.wgroup
        )


def make_quant_case(
    rng, rows, cols, bits, group, *, bias=False, argmax=False, label="", scales=None, zeros=None
) -> QuantCase:
    """A random quantized matrix: every ``q`` and zero point of the range, scales of about
    ``1 / 2**bits`` (``scales(rng, shape)`` overrides them, ``zeros`` the zero points)."""
    g = cols if group is None else group
    ng = -(-cols // g)
    q = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    if scales is None:
        scale = normal_bits(rng, (rows, ng), 2.0**-bits)
    else:
        scale = scales(rng, (rows, ng))
    if zeros is None:
        zero = rng.integers(0, 1 << bits, size=(rows, ng), dtype=np.uint8)
    else:
        zero = zeros(rng, (rows, ng)).astype(np.uint8)
    m = QuantizedMatrix(q=q, scale=scale, zero=zero, bits=bits, group=g)
    x = garbage_bits(rng, -(-cols // BLOCK) * BLOCK)
    x[:cols] = normal_bits(rng, cols)
    b = None
    if bias:
        b = garbage_bits(rng, -(-rows // BLOCK) * BLOCK)
        b[:rows] = normal_bits(rng, rows, 4.0)
    case = QuantCase(m, x, b, argmax, label or f"INT{bits} g{group} {rows}x{cols}")
    case.expect()
    return case


# ----------------------------------------------------------------------------------------------
# value generators


def normal_bits(rng, shape, scale=1.0):
    return nm.to_bits(rng.standard_normal(shape) * scale)


def garbage_bits(rng, shape):
    """Stale HBM/VBUF contents: any pattern, Inf and NaN included."""
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)


FINITE_SPECIALS = list(nm.EDGE_FINITE)
NONFINITE = list(nm.EDGE_NONFINITE)
SPECIALS = np.array(FINITE_SPECIALS + NONFINITE, np.uint16)


def make_case(
    rng,
    rows,
    cols,
    *,
    live_rows=None,
    live_cols=None,
    bias=False,
    argmax=False,
    scale=1.0,
    label="",
    values=None,
    sampling=(0, 0, 0),
    fwd=False,
) -> Case:
    """A random MATVEC; ``fwd``: a forwarding product (``cols`` <= 64, no ARGMAX), whose last
    live row comes with x (its matrix copy stays garbage); ``fwd="col"``: one whose last live
    column comes with x (``rows`` <= 64)."""
    live_rows = rows if live_rows is None else live_rows
    live_cols = cols if live_cols is None else live_cols
    ga, ca = -(-rows // BLOCK), -(-cols // BLOCK)
    w = garbage_bits(rng, (ga * BLOCK, ca * BLOCK))
    r, c = min(rows, live_rows), min(cols, live_cols)
    w[:r, :c] = normal_bits(rng, (r, c), scale) if values is None else values(rng, (r, c))
    x = garbage_bits(rng, ca * BLOCK)
    x[:c] = normal_bits(rng, c) if values is None else values(rng, c)
    b = None
    if bias:
        b = garbage_bits(rng, ga * BLOCK)
        b[:r] = normal_bits(rng, r, 4.0) if values is None else values(rng, r)
    case = Case(w, rows, cols, live_rows, live_cols, x, b, argmax, label, sampling)
    if fwd == "col":
        assert rows <= BLOCK and not argmax
        case.fwd, case.fwd_col = garbage_bits(rng, BLOCK), True
        case.fwd[:r] = normal_bits(rng, r) if values is None else values(rng, r)
        if c:
            w[:, c - 1] = garbage_bits(rng, w.shape[0])  # the stale copy the column replaces
    elif fwd:
        assert cols <= BLOCK and not argmax
        case.fwd = garbage_bits(rng, BLOCK)
        case.fwd[:c] = normal_bits(rng, c) if values is None else values(rng, c)
        if r:
            w[r - 1] = garbage_bits(rng, w.shape[1])  # the stale copy the row replaces
    case.expect()
    return case


# ----------------------------------------------------------------------------------------------
# the testbench


class TB(streams.ClockedTB):
    """Clock, reset and one endpoint per MPU stream; :meth:`run` feeds commands and checks
    every output against the model, in order."""

    def __init__(self, dut, geom):
        super().__init__(dut)
        self.geom = geom
        self.cmd = streams.StreamSource(dut, "cmd")
        self.x = streams.StreamSource(dut, "x")
        self.w = streams.StreamSource(dut, "weights")
        self.bias = streams.StreamSource(dut, "bias")
        self.result = streams.StreamSink(dut, "result")
        self.argmax = streams.StreamSink(dut, "argmax")
        self.sources = [self.cmd, self.x, self.w, self.bias]
        self.sinks = [self.result, self.argmax]

    def set_patterns(self, inputs=None, outputs=None) -> None:
        """``inputs``/``outputs``: factories ``f(k)`` of 0/1 iterators (valid offered / ready)
        for the k-th stream; ``None`` means always."""
        for k, src in enumerate(self.sources):
            src.pattern = inputs(k) if inputs else None
        for k, sink in enumerate(self.sinks):
            sink.pattern = outputs(k) if outputs else None

    async def run(self, cases: list[Case], *, cycles_per_beat: int = 40) -> dict[str, list]:
        """Queue every case's streams at once, run until all outputs are out and the unit is
        idle, and check them. Returns the edges of every command transfer (``"cmd"``) and of
        every edge that sampled ``cmd.ready`` high (``"ready"``)."""
        n_rows = n_amax = budget = 0
        for case in cases:
            cmd, xs, tiles, bias = case.streams(self.geom)
            self.cmd.send([cmd])
            self.x.send(xs)
            self.w.send(tiles)
            self.bias.send(bias)
            n_rows += len(case.expect_rows)
            n_amax += case.expect_argmax is not None
            budget += 200 + cycles_per_beat * (len(tiles) + len(xs) + len(bias))
        rows0, amax0 = len(self.result.items), len(self.argmax.items)
        edges = {"cmd": [], "ready": []}
        cmd_sent = self.cmd.sent
        ready = self.dut.cmd__ready

        def monitor(edge: int) -> None:
            nonlocal cmd_sent
            if self.cmd.sent != cmd_sent:
                cmd_sent = self.cmd.sent
                edges["cmd"].append(edge)
            if ready.value:
                edges["ready"].append(edge)

        def done() -> bool:
            return (
                len(self.result.items) - rows0 == n_rows
                and len(self.argmax.items) - amax0 == n_amax
                and self.cmd.idle
                and bool(ready.value)
                and not self.dut.busy.value  # the last results have left
            )

        await streams.pump(
            self.clk, self.sources, self.sinks, until=done, timeout=budget, on_edge=monitor
        )
        await streams.pump(self.clk, self.sources, self.sinks, until=None, timeout=4)
        assert len(self.result.items) - rows0 == n_rows, "extra result rows"
        assert len(self.argmax.items) - amax0 == n_amax, "extra argmax transfers"
        for src in self.sources:
            assert src.idle, f"{len(src.queue)} {src.name} beats were not consumed"
        got_rows = iter(self.result.items[rows0:])
        got_amax = iter(self.argmax.items[amax0:])
        for case in cases:
            if case.expect_argmax is not None:
                got = next(got_amax)
                assert got == case.expect_argmax, (
                    f"{case.label}: argmax {got}, expected {case.expect_argmax}"
                )
            for g, want in enumerate(case.expect_rows):
                got = _int_row(next(got_rows))
                if not np.array_equal(got, want):
                    bad = np.flatnonzero(got != want)
                    i = bad[0]
                    raise AssertionError(
                        f"{case.label}: row group {g}: {bad.size} of 64 differ, first row "
                        f"{g * 64 + i}: got {got[i]:#06x}, expected {want[i]:#06x}"
                    )
        return edges


def _geom():
    return geometry(tb_params().get("geometry", "tiny"))


def _mpu_model():
    from tandem.rtl.mpu import MatrixUnit

    return MatrixUnit(_geom(), max_cols=tb_params().get("max_cols"))


def _lite() -> bool:
    """A smaller workload (for Icarus, about 20x slower per cycle than Verilator here)."""
    return tb_params().get("workload", "full") == "lite"


# ----------------------------------------------------------------------------------------------
# tests

# The first four are the lite workload; 384x64 is six row groups of one column block each,
# the case where most groups are in flight at once (the result FIFO's depth matters).
SHAPES = [(70, 130), (384, 64), (130, 65), (1, 1)]
SHAPES += [(3, 200), (64, 64), (128, 256), (65, 64), (200, 3)]


@cocotb.test()
async def shapes_and_cycle_formula(dut):
    """Fixed shapes in every mode, back to back with no stall: bit-exact and exact cycles."""
    geom = _geom()
    rng = np.random.default_rng(tb_params().get("seed", 1))
    tb = TB(dut, geom)
    await tb.reset()
    cases = []
    for k, (rows, cols) in enumerate(SHAPES[:4] if _lite() else SHAPES):
        modes = [(False, False), (True, False), (False, True)]  # (bias, argmax)
        for bias, argmax in [modes[k % 3]] if _lite() else modes:  # lite: one mode per shape
            label = f"{rows}x{cols}{' bias' if bias else ''}{' argmax' if argmax else ''}"
            cases.append(make_case(rng, rows, cols, bias=bias, argmax=argmax, label=label))
    cases.append(make_case(rng, 130, 200, live_rows=77, live_cols=90, bias=True, label="live"))
    cases.append(make_case(rng, 130, 200, live_rows=100, live_cols=1, argmax=True, label="live am"))
    # forwarding products (the attention's score products): the last live row from x's stream
    fwd_shapes = ((128, 5, 64, False), (130, 64, 64, True), (70, 70, 40, False))
    for rows, live_rows, cols, bias in fwd_shapes:
        label = f"fwd {live_rows}/{rows}x{cols}{' bias' if bias else ''}"
        cases.append(
            make_case(rng, rows, cols, live_rows=live_rows, bias=bias, fwd=True, label=label)
        )
    cases.append(make_case(rng, 64, 64, live_rows=0, fwd=True, label="fwd no live row"))
    # ... and the value products: the last live column (index 69 in the second block, 63 at a
    # block's end, 0, the last of 300)
    fwd_cols = ((64, 128, 70, False), (64, 200, 64, True), (40, 64, 1, False), (5, 300, 300, True))
    for rows, cols, live_cols, bias in fwd_cols:
        label = f"fwd col {rows}x{live_cols}/{cols}{' bias' if bias else ''}"
        cases.append(
            make_case(rng, rows, cols, live_cols=live_cols, bias=bias, fwd="col", label=label)
        )
    cases.append(make_case(rng, 64, 64, live_cols=0, fwd="col", label="fwd no live column"))
    # no live row (nothing happens) or no live column (results = bias, or +0)
    degenerate = [(0, 64, True, False), (0, 0, True, True), (130, 0, True, False)]
    degenerate += [(64, 0, True, True), (70, 0, False, False)]
    for live_rows, live_cols, bias, argmax in degenerate:
        label = (
            f"live {live_rows}x{live_cols}{' bias' if bias else ''}{' argmax' if argmax else ''}"
        )
        case = make_case(
            rng,
            130,
            100,
            live_rows=live_rows,
            live_cols=live_cols,
            bias=bias,
            argmax=argmax,
            label=label,
        )
        cases.append(case)
    edges = await tb.run(cases)
    # each command's occupancy: from its transfer to the next edge that samples cmd.ready high
    mpu = _mpu_model()
    report = []
    for case, c0 in zip(cases, edges["cmd"], strict=True):
        c1 = next(c for c in edges["ready"] if c > c0)
        want = case.cycles(mpu)
        report.append((case.label, case.n_groups, case.n_cb, c1 - c0, want))
    dut._log.info("cycles (label, n_groups, n_cb, measured, formula): %s", report)
    wrong = [r for r in report if r[3] != r[4]]
    assert not wrong, f"measured cycles differ from the documented formula: {wrong}"


@cocotb.test()
async def special_values(dut):
    """Subnormals, signed zeros, Inf/NaN (row -> NaN), max finite, huge dynamic range."""
    geom = _geom()
    rng = np.random.default_rng(tb_params().get("seed", 1) + 1)
    tb = TB(dut, geom)
    await tb.reset()

    def specials(r, shape, p=0.15):
        v = normal_bits(r, shape)
        pick = r.random(shape) < p
        return np.where(pick, r.choice(SPECIALS, size=shape), v).astype(np.uint16)

    def finite_specials(r, shape):
        v = specials(r, shape, 0.3)
        return np.where((v & 0x7C00) == 0x7C00, np.uint16(0x7BFF), v).astype(np.uint16)

    def wide_range(r, shape):
        e = r.integers(0, 31, size=shape)  # every exponent field but 31
        f = r.integers(0, 1024, size=shape)
        s = r.integers(0, 2, size=shape)
        return ((s << 15) | (e << 10) | f).astype(np.uint16)

    def subnormal(r, shape):
        return (r.integers(0, 1024, size=shape) | (r.integers(0, 2, size=shape) << 15)).astype(
            np.uint16
        )

    def rare_nonfinite(r, shape):  # a few rows hit Inf/NaN, the rest stay finite
        v = normal_bits(r, shape)
        if isinstance(shape, tuple):
            for _ in range(3):
                v[r.integers(shape[0]), r.integers(shape[1])] = r.choice(NONFINITE)
        return v

    def zeros(r, shape):
        return np.where(r.random(shape) < 0.5, 0x8000, 0).astype(np.uint16)

    def maxfin(r, shape):
        return np.where(r.random(shape) < 0.5, 0x7BFF, 0xFBFF).astype(np.uint16)

    cases = []
    for name, gen in (
        ("specials", specials),
        ("finite specials", finite_specials),
        ("wide range", wide_range),
        ("subnormal", subnormal),
        ("rare nonfinite", rare_nonfinite),
        ("zeros", zeros),
        ("max finite", maxfin),
    ):
        modes = [(False, False), (True, False), (False, True)]  # (bias, argmax)
        for bias, argmax in [modes[len(cases) % 3]] if _lite() else modes:
            label = f"{name}{' bias' if bias else ''}{' argmax' if argmax else ''}"
            cases.append(make_case(rng, 70, 130, bias=bias, argmax=argmax, values=gen, label=label))
    # argmax ties: identical rows, the lowest index must win
    tie = make_case(rng, 100, 64, argmax=True, label="ties")
    tie.w[:100, :64] = tie.w[7, :64]
    tie.expect()
    cases.append(tie)
    await tb.run(cases)


@cocotb.test()
async def stalls_and_random_shapes(dut):
    """Random shapes, flags and live parts, with idle cycles on every input and backpressure."""
    geom = _geom()
    params = tb_params()
    seed = params.get("seed", 1) + 2
    rng = np.random.default_rng(seeds.seed(seed))
    tb = TB(dut, geom)
    await tb.reset()
    # (input valid, output ready) patterns: 1 = offer / accept
    patterns = [
        (lambda k: streams.cycle([1, 1, 1, 0]), lambda k: streams.cycle([1, 1, 1, 0])),
        (lambda k: streams.bernoulli(0.7, seed + k), lambda k: streams.bernoulli(0.6, seed - k)),
        (None, lambda k: streams.bernoulli(0.1, seed + 10 + k)),  # heavy backpressure
        (lambda k: streams.bernoulli(0.2, seed + 20 + k), None),  # starved inputs
        (lambda k: streams.bursts(seed + 30 + k), lambda k: streams.bursts(seed + 40 + k)),
    ]
    if _lite():
        patterns = patterns[:3]
    for k, (inputs, outputs) in enumerate(patterns):
        tb.set_patterns(inputs, outputs)
        cases = []
        for i in range(params.get("random_cases", 6)):
            rows = int(rng.integers(1, 200))
            cols = int(rng.integers(1, 300))
            live = rng.random() < 0.4
            # a forwarding product: one column block and live rows (a forwarded row), or one
            # row group and live columns (a forwarded column)
            draw = rng.random()
            fwd = True if draw < 0.15 else "col" if draw < 0.3 else False
            if fwd is True:
                cols = int(rng.integers(1, BLOCK + 1))
            elif fwd:
                rows = int(rng.integers(1, BLOCK + 1))
            fwd_rows, fwd_cols = fwd is True, fwd == "col"
            cases.append(
                make_case(
                    rng,
                    rows,
                    cols,
                    live_rows=int(rng.integers(1, rows + 1)) if live or fwd_rows else None,
                    live_cols=int(rng.integers(1, cols + 1)) if live or fwd_cols else None,
                    bias=bool(rng.random() < 0.5),
                    argmax=not fwd and bool(rng.random() < 0.3),
                    label=f"pattern {k} case {i}{' fwd' if fwd_rows else ''}"
                    f"{' fwd col' if fwd_cols else ''}",
                    fwd=fwd,
                )
            )
        await tb.run(cases)


def random_sampling(rng) -> tuple[int, int, int]:
    """A sampling word (temperature 1/4096 .. 16, K 0 .. 127: out of range counts as 64), a
    32-bit seed and a 16-bit position."""
    tq = int(rng.choice([1, 300, 4096, 3277, 20000, 65535, int(rng.integers(1, 1 << 16))]))
    k = int(rng.choice([1, 2, 3, 5, 17, 40, 63, 64, 0, 65, 127, int(rng.integers(1, 65))]))
    return tq | k << 16, int(rng.integers(0, 1 << 32)), int(rng.integers(0, 1 << 16))


@cocotb.test()
async def sampling(dut):
    """ARGMAX with a temperature: Gumbel-max over the top K binary16 results (tandem.sampling),
    bit-exact: shapes from one row to several row groups, live rows, every K edge (1, the
    lane count, 64, out of range), ties, signed zeros, Inf and NaN rows, mixed with greedy
    ARGMAX and plain commands back to back (the per-command state is reset), no stall; then
    under random stalls on every stream."""
    geom = _geom()
    rng = np.random.default_rng(seeds.seed(tb_params().get("seed", 1) + 5))
    tb = TB(dut, geom)
    await tb.reset()
    cases = []
    shapes = [(1, 1), (2, 64), (3, 70), (64, 64), (130, 65), (200, 130)]
    for rows, cols in shapes[:4] if _lite() else shapes:
        for _ in range(2):
            smp = random_sampling(rng)
            cases.append(
                make_case(
                    rng,
                    rows,
                    cols,
                    argmax=True,
                    sampling=smp,
                    scale=cols**-0.5,  # logits of about unit size: the draw is wide
                    label=f"{rows}x{cols} {smp}",
                )
            )
        cases.append(make_case(rng, rows, cols, argmax=True, label=f"{rows}x{cols} greedy"))
        cases.append(make_case(rng, rows, cols, bias=True, label=f"{rows}x{cols} plain"))
    for k in (1, 2, 64, 0, 100):
        smp = (5000 | k << 16, 12345, 77)
        cases.append(
            make_case(
                rng, 150, 64, argmax=True, bias=True, sampling=smp, scale=0.125, label=f"K {k}"
            )
        )
    # live rows (the KV-style LIVE_ROWS), no live row (index 0) and no live column (the bias)
    smp = (8000 | 10 << 16, 9, 9)
    cases.append(make_case(rng, 130, 100, live_rows=77, argmax=True, sampling=smp, label="live"))
    cases.append(make_case(rng, 130, 100, live_rows=0, argmax=True, sampling=smp, label="none"))
    cases.append(
        make_case(rng, 130, 100, live_cols=0, bias=True, argmax=True, sampling=smp, label="nocol")
    )

    def ties(r, shape):  # few distinct values: equal logits, +0 and -0
        return r.choice(np.array([0x0000, 0x8000, 0x3C00, 0x3C00, 0xBC00], np.uint16), size=shape)

    def specials(r, shape):
        v = normal_bits(r, shape, 4.0)
        pick = r.random(shape) < 0.05
        return np.where(pick, r.choice(SPECIALS, size=shape), v).astype(np.uint16)

    def huge(r, shape):  # results that overflow binary16 (Inf) next to finite ones
        return nm.to_bits(r.standard_normal(shape) * 200)

    for name, gen in (("ties", ties), ("specials", specials), ("huge", huge)):
        for _ in range(2):
            smp = random_sampling(rng)
            cases.append(
                make_case(
                    rng, 100, 70, argmax=True, values=gen, sampling=smp, label=f"{name} {smp}"
                )
            )
    same = make_case(rng, 100, 64, argmax=True, sampling=(1 | 7 << 16, 3, 4), label="equal rows")
    same.w[:100, :64] = same.w[7, :64]
    same.expect()
    cases.append(same)
    # a temperature so small the top logit wins, and one so large the draw is wide
    cases.append(make_case(rng, 190, 64, argmax=True, sampling=(1 | 64 << 16, 1, 2), label="cold"))
    cases.append(
        make_case(rng, 190, 64, argmax=True, sampling=(65535 | 64 << 16, 1, 2), label="hot")
    )
    sampled = [c for c in cases if c.sampling[0] & 0xFFFF and c.eff_rows > 1 and c.eff_cols]
    greedy = []
    for c in sampled:
        r, k = c.eff_rows, c.eff_cols
        bias = None if c.bias is None else c.bias[:r]
        acc, _, _ = nm.matvec(nm.PreparedMatrix(c.w[:r, :k]), c.x[:k], bias)
        greedy.append(c.expect_argmax == nm.argmax(acc))
    # many draws are not the argmax, so a unit that ignored the temperature would fail
    assert len(sampled) - sum(greedy) >= len(sampled) // 3, (sum(greedy), len(sampled))
    edges = await tb.run(cases)
    # each command's occupancy against the documented formula (MatrixUnit.cycles)
    mpu = _mpu_model()
    report = []
    for case, c0 in zip(cases, edges["cmd"], strict=True):
        c1 = next(c for c in edges["ready"] if c > c0)
        smp = None
        if case.argmax and case.sampling[0] & 0xFFFF:
            smp = (S.unpack(case.sampling[0])[1], case.eff_rows)
        want = mpu.cycles(case.n_groups, case.n_cb, argmax=case.argmax, sample=smp)
        report.append((case.label, case.n_groups, case.n_cb, c1 - c0, want))
    dut._log.info("cycles (label, n_groups, n_cb, measured, formula): %s", report)
    wrong = [r for r in report if r[3] != r[4]]
    assert not wrong, f"measured cycles differ from the documented formula: {wrong}"
    # random stalls and backpressure on every stream
    seed = tb_params().get("seed", 1) + 6
    patterns = [
        (lambda k: streams.bernoulli(0.6, seed + k), lambda k: streams.bernoulli(0.5, seed - k)),
        (None, lambda k: streams.bernoulli(0.1, seed + 10 + k)),
    ]
    for k, (inputs, outputs) in enumerate(patterns):
        tb.set_patterns(inputs, outputs)
        cases = []
        for i in range(3 if _lite() else 6):
            rows, cols = int(rng.integers(1, 200)), int(rng.integers(1, 200))
            smp = random_sampling(rng) if rng.random() < 0.7 else (0, 0, 0)
            cases.append(
                make_case(
                    rng,
                    rows,
                    cols,
                    live_rows=int(rng.integers(1, rows + 1)) if rng.random() < 0.3 else None,
                    bias=bool(rng.random() < 0.5),
                    argmax=bool(rng.random() < 0.8),
                    sampling=smp,
                    label=f"stalls {k} case {i} {smp}",
                )
            )
        await tb.run(cases)


# ----------------------------------------------------------------------------------------------
# quantized weights (issue 17)

# (bits, group) of every scale-beat shape: INT8 per channel / g64 / g128; INT4 g64 (K = 8),
# g128 (K = 16), g256 and per channel (K = 32). None: one group per row.
QUANT_FORMATS = [(8, None), (8, 64), (8, 128), (4, 64), (4, 128), (4, 256), (4, None)]


@cocotb.test()
async def quantized_weights(dut):
    """INT8 and INT4 matrices of every group size, with bias and argmax, odd shapes, back to
    back with FP16 commands and no stall: bit-exact against numerics.matvec_quant, and the
    cycle formula with the scale beats; then special scales; then random stalls."""
    geom = _geom()
    rng = np.random.default_rng(tb_params().get("seed", 1) + 7)
    tb = TB(dut, geom)
    await tb.reset()
    lite = _lite()
    # lite (Icarus, where the DSP array's cycles cost most): one shape, INT8 per channel and
    # INT4 g64, one special case, one stalled pattern
    shapes = [(70, 130)] if lite else [(70, 130), (130, 300), (64, 64), (3, 520)]
    cases = []
    for k, (bits, group) in enumerate(QUANT_FORMATS[::3][:2] if lite else QUANT_FORMATS):
        for i, (rows, cols) in enumerate(shapes):
            mode = (k + i) % 3  # plain, bias, argmax
            cases.append(
                make_quant_case(rng, rows, cols, bits, group, bias=mode == 1, argmax=mode == 2)
            )
        # an FP16 command between quantized ones: formats overlap in the pipeline
        fp_cols = 64 if lite else 130
        cases.append(make_case(rng, 70, fp_cols, bias=bool(k % 2), label=f"fp16 after {k}"))
    edges = await tb.run(cases)
    mpu = _mpu_model()
    report = []
    for case, c0 in zip(cases, edges["cmd"], strict=True):
        c1 = next(c for c in edges["ready"] if c > c0)
        report.append((case.label, c1 - c0, case.cycles(mpu)))
    dut._log.info("cycles (label, measured, formula): %s", report)
    wrong = [r for r in report if r[1] != r[2]]
    assert not wrong, f"measured cycles differ from the documented formula: {wrong}"

    # scales: subnormal, zero, negative, the largest, and Inf/NaN in a few rows (row -> NaN);
    # zero points at both ends
    def special_scales(r, shape):
        v = normal_bits(r, shape, 2.0**-4)
        pick = r.random(shape) < 0.3
        return np.where(pick, r.choice(SPECIALS, size=shape), v).astype(np.uint16)

    def edge_zeros(r, shape, bits):
        return r.choice([0, (1 << bits) - 1], size=shape)

    cases = []
    for bits, group in [(4, 128)] if lite else [(8, None), (8, 64), (4, 64), (4, 128)]:
        for mode in [1] if lite else range(3):
            cases.append(
                make_quant_case(
                    rng, 70, 200, bits, group,
                    bias=mode == 1, argmax=mode == 2,
                    scales=special_scales,
                    zeros=lambda r, s, b=bits: edge_zeros(r, s, b),
                    label=f"special scales INT{bits} g{group} mode {mode}",
                )
            )  # fmt: skip
    await tb.run(cases)

    # random shapes and formats under random stalls and backpressure
    seed = tb_params().get("seed", 1) + 8
    patterns = [
        (lambda k: streams.cycle([1, 1, 1, 0]), lambda k: streams.cycle([1, 1, 1, 0])),
        (lambda k: streams.bernoulli(0.6, seed + k), lambda k: streams.bernoulli(0.5, seed - k)),
        (lambda k: streams.bursts(seed + 30 + k), lambda k: streams.bursts(seed + 40 + k)),
    ]
    for k, (inputs, outputs) in enumerate(patterns[1:2] if lite else patterns):
        tb.set_patterns(inputs, outputs)
        cases = []
        for i in range(1 if lite else 4):
            bits, group = QUANT_FORMATS[int(rng.integers(len(QUANT_FORMATS)))]
            rows = int(rng.integers(1, 100 if lite else 200))
            cols = int(rng.integers(1, 300 if lite else 400))
            cases.append(
                make_quant_case(
                    rng, rows, cols, bits, group,
                    bias=bool(rng.random() < 0.5), argmax=bool(rng.random() < 0.3),
                    label=f"stalls {k} case {i} INT{bits} g{group} {rows}x{cols}",
                )
            )  # fmt: skip
            if i == 1:
                cases.append(make_case(rng, 50, 70, label=f"stalls {k} fp16"))
        await tb.run(cases)
    tb.set_patterns(None, None)
