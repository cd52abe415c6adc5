# amaranth: UnusedElaboratable=no
"""Fast checks of rtl/arith.py without an HDL simulator: construction, the reduced tables, and
latency and values on Amaranth's own simulator (the cocotb tests in test_arith.py are the
bit-exact proof on generated Verilog)."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth import signed, unsigned
from amaranth.sim import Simulator

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


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="unknown function table 'sin'"):
        FP16Table("sin")
    with pytest.raises(ValueError, match="size must be a positive power of two, not 48"):
        BlockAlign(48)
    with pytest.raises(ValueError, match="size must be a positive power of two, not 0"):
        BlockDot(0)
    with pytest.raises(ValueError, match="sum_shape must be signed"):
        AccumulatorShift(sum_shape=unsigned(29))
    with pytest.raises(ValueError, match="acc_width"):
        AccToFP16(acc_width=1)
    with pytest.raises(TypeError, match="tag must be a shape"):
        FP16Add(tag="seven")
    for ports in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match=r"ports must be an integer in 1\.\.2"):
            FP16Table("exp", ports=ports)


def test_parameters_are_read_only():
    dot = BlockDot(16, tag=unsigned(3))
    assert (dot.size, dot.tag, dot.sum_shape, dot.latency) == (16, unsigned(3), signed(27), 3)
    with pytest.raises(AttributeError):
        dot.size = 64
    assert BlockDot().latency == 4 and BlockDot().sum_shape == signed(29)
    assert FP16Table("exp").depth == table_plan("exp").depth < 1 << 15
    assert FP16Table("exp", reduced=False).depth == 1 << 16
    one, two = FP16Table("gelu"), FP16Table("gelu", ports=2, tag=unsigned(4))
    assert (one.ports, two.ports, two.depth) == (1, 2, one.depth)
    assert one.stream_pairs == [(one.i, one.o)]
    assert two.stream_pairs == [(two.i[0], two.o[0]), (two.i[1], two.o[1])]
    assert two.in_layout == two.i[1].payload.shape() and two.tag == unsigned(4)


@pytest.mark.parametrize("name", ["exp", "recip", "rsqrt", "gelu"])
def test_reduced_table_reproduces_every_entry(name):
    plan = table_plan(name)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(plan.lookup(every), nm.table(name))
    assert plan.depth <= 35_000


def _set(ctx, target, value):
    if isinstance(value, list):
        for k, v in enumerate(value):
            _set(ctx, target[k], v)
    else:
        ctx.set(target.as_value() if hasattr(target, "as_value") else target, value)


def _get(ctx, target, length=None):
    if length is not None:
        return [_get(ctx, target[k]) for k in range(length)]
    return ctx.get(target.as_value() if hasattr(target, "as_value") else target)


def simulate(unit, items: list[dict], *, out_fields=("value",), lengths=None, n_out=None):
    """Feed ``items`` one per cycle with ``o.ready`` high; return (outputs, first-output cycle)."""
    sim = Simulator(unit)
    sim.add_clock(1e-8)
    outputs, first = [], []
    lengths = lengths or {}

    async def bench(ctx):
        ctx.set(unit.o.ready, 1)
        cycle = 0
        pending = list(items)
        while len(outputs) < (len(items) if n_out is None else n_out):
            if pending:
                ctx.set(unit.i.valid, 1)
                for key, value in pending[0].items():
                    _set(ctx, unit.i.payload[key], value)
            else:
                ctx.set(unit.i.valid, 0)
            await ctx.tick()
            cycle += 1
            if pending:
                pending.pop(0)
            if ctx.get(unit.o.valid):
                if not first:
                    first.append(cycle)
                outputs.append(
                    {f: _get(ctx, unit.o.payload[f], lengths.get(f)) for f in out_fields}
                )
            if cycle > len(items) + 64:
                raise TimeoutError("no output")

    sim.add_testbench(bench)
    sim.run()
    return outputs, first[0]


@pytest.mark.parametrize("name", ["recip", "gelu"])
def test_two_port_table_under_random_handshakes(name):
    """FP16Table(ports=2) on Amaranth's simulator: each port takes its own stream (the plan's
    boundary inputs and random ones) under its own random valid and ready, a new item offered
    only when the last was taken; outputs come back in order, with their tags, equal to
    numerics.lookup. A stall on one port must not disturb the other."""
    import arith_cases

    unit = FP16Table(name, ports=2, tag=unsigned(16))
    rng = np.random.default_rng(7)
    edges = arith_cases.table_edges(name)
    xs = [
        np.concatenate([rng.permutation(edges), rng.integers(0, 1 << 16, 150)]).astype(np.uint16)
        for _ in range(2)
    ]
    got = [[], []]
    independent = [0, 0]  # items port k took while the other port's output was held
    sim = Simulator(unit)
    sim.add_clock(1e-8)

    async def bench(ctx):
        sent = [0, 0]
        offering = [False, False]
        for _ in range(4 * max(map(len, xs)) + 100):
            taken = []
            for k, (i, o) in enumerate(unit.stream_pairs):
                if not offering[k] and sent[k] < len(xs[k]) and rng.random() < 0.6:
                    offering[k] = True
                    ctx.set(i.payload.x.as_value(), int(xs[k][sent[k]]))
                    ctx.set(i.payload.tag, sent[k])
                ctx.set(i.valid, offering[k])
                ctx.set(o.ready, int(rng.random() < 0.6))
            held = [ctx.get(o.valid) and not ctx.get(o.ready) for _, o in unit.stream_pairs]
            for k, (i, o) in enumerate(unit.stream_pairs):
                taken.append(offering[k] and ctx.get(i.ready))
                independent[k] += taken[k] and held[1 - k]
                if ctx.get(o.valid) and ctx.get(o.ready):
                    got[k].append((ctx.get(o.payload.tag), ctx.get(o.payload.value.as_value())))
            await ctx.tick()
            for k in (0, 1):
                if taken[k]:
                    sent[k] += 1
                    offering[k] = False
            if all(len(g) == len(x) for g, x in zip(got, xs, strict=True)):
                return

    sim.add_testbench(bench)
    sim.run()
    for k in (0, 1):
        want = nm.lookup(name, xs[k])
        assert got[k] == [(j, int(v)) for j, v in enumerate(want)], f"port {k}"
    assert min(independent) > 10, independent


def test_fp16_add_and_mul_on_amaranth_sim():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 1 << 16, 150, dtype=np.uint16)
    b = rng.integers(0, 1 << 16, 150, dtype=np.uint16)
    items = [{"a": int(x), "b": int(y), "op": AddOp.SUB} for x, y in zip(a, b, strict=True)]
    out, first = simulate(FP16Add(), items)
    assert first == FP16Add.LATENCY
    assert [o["value"] for o in out] == nm.fp16_sub(a, b).tolist()
    out, first = simulate(
        FP16Mul(), [{"a": int(x), "b": int(y)} for x, y in zip(a, b, strict=True)]
    )
    assert first == FP16Mul.LATENCY
    assert [o["value"] for o in out] == nm.fp16_mul(a, b).tolist()


def test_block_units_latency_and_values():
    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 0x7C00, (3, 8), dtype=np.uint16)
    out, first = simulate(
        BlockAlign(8),
        [{"x": list(map(int, b))} for b in blocks],
        out_fields=("exp", "q"),
        lengths={"q": 8},
    )
    assert first == BlockAlign.LATENCY
    q, exp, _ = nm.bfp_blocks(np.pad(blocks, ((0, 0), (0, 56))))  # 8 values, zero padded
    assert [o["exp"] for o in out] == exp[:, 0].tolist()
    assert [list(o["q"]) for o in out] == q[:, :8].tolist()

    dot = BlockDot(8)
    w, x = rng.integers(-2047, 2048, (2, 3, 8))
    out, first = simulate(
        dot,
        [{"w": list(map(int, a)), "x": list(map(int, b))} for a, b in zip(w, x, strict=True)],
        out_fields=("sum",),
    )
    assert first == dot.latency == 3
    assert [o["sum"] for o in out] == (w * x).sum(axis=1).tolist()

    items = [{"sum": -12345, "w_exp": 3, "x_exp": 2, "xe_max": 30}]
    out, first = simulate(AccumulatorShift(), items)
    assert first == AccumulatorShift.LATENCY
    assert out[0]["value"] == nm.shift_floor(-12345, nm.block_shift(3, 2, 30))

    out, first = simulate(
        Accumulator(),
        [{"value": 5, "first": 1, "last": 0}, {"value": -7, "first": 0, "last": 1}],
        out_fields=("acc",),
        n_out=1,
    )
    assert out == [{"acc": -2}]

    accs = [0, 1, -1, 3 << 40, -(5 << 20), (1 << 62) - 1]
    out, first = simulate(AccToFP16(), [{"acc": v, "lam": -30} for v in accs])
    assert first == AccToFP16.LATENCY
    assert [o["value"] for o in out] == nm.acc_to_fp16(np.array(accs), -30).tolist()
