# amaranth: UnusedElaboratable=no
"""rtl/relay.py on Amaranth's simulator: Relay (register stages and a far-end FIFO paced by
credit, with its in-flight flag) and Delay, at stage counts 0 to 4 under random stalls on both
sides."""

from __future__ import annotations

import random

import pytest
from amaranth import Module, Signal
from stream_models import Sink, Source, run

from tandem.rtl.relay import Delay, Relay, relay_depth
from tandem.sim.streams import bernoulli

STAGES = [0, 1, 2, 4]


def _clocked(dut):
    """``dut`` in a module with a ``sync`` domain even at 0 stages (a relay of wires has none)."""
    m = Module()
    m.submodules.dut = dut
    tick = Signal()
    m.d.sync += tick.eq(~tick)
    return m
STALLS = [0.0, 0.3, 0.7]


@pytest.mark.parametrize("stall", STALLS)
@pytest.mark.parametrize("stages", STAGES)
def test_relay_order_latency_busy(stages, stall):
    """Every item comes out once, in order; with no stalls an item is on ``o`` exactly
    ``stages + 2`` cycles after it was taken (same cycle at 0), one per cycle; ``busy`` is up
    from the cycle after an item is taken until ``stages`` cycles after it left (never at 0);
    ``busy_mark`` the same over the marked items only (here: payload bit 0 set, about one in
    four items, in runs); never more than ``relay_depth(stages)`` items in flight."""
    rng = random.Random(stages * 10 + int(stall * 10))
    # marked items in runs and alone, so that busy_mark both stays up and drops while busy does not
    items = [(rng.getrandbits(36) << 1) | (rng.random() < 0.25) for _ in range(300)]
    dut = Relay(37, stages, mark=lambda p: p[0])
    src = Source(dut.i, items, stall=stall, seed=3 + stages)
    out = Sink(dut.o, stall=stall, seed=4 + stages, name="o")

    async def bench(ctx):
        taken_at, left_at = [], []
        mark_seen = [False, False]  # busy_mark seen up, and seen down while busy was up

        def in_flight(cyc, marked_only):
            """What busy (busy_mark) must be: some (marked) item taken before this cycle whose
            exit was less than `stages` cycles ago (or has not happened)."""
            return stages > 0 and any(
                t < cyc
                and (k >= len(left_at) or cyc <= left_at[k] + stages)
                and (items[k] & 1 or not marked_only)
                for k, t in enumerate(taken_at)
            )

        for cyc in range(20_000):
            src.drive(ctx)
            out.drive(ctx)
            src.sample(ctx)
            out.sample(ctx)
            busy = ctx.get(dut.busy)
            want = in_flight(cyc, False)
            assert busy == want, f"cycle {cyc}: busy {busy}, expected {want}"
            busy_mark = ctx.get(dut.busy_mark)
            want = in_flight(cyc, True)
            assert busy_mark == want, f"cycle {cyc}: busy_mark {busy_mark}, expected {want}"
            mark_seen[0] |= bool(busy_mark)
            mark_seen[1] |= bool(busy and not busy_mark)
            if src.fire:
                taken_at.append(cyc)
            if out.r and ctx.get(dut.o.valid):
                left_at.append(cyc)
                if stall == 0:
                    assert cyc == taken_at[len(left_at) - 1] + dut.latency
            if stages:
                assert len(taken_at) - len(left_at) <= relay_depth(stages)
            await ctx.tick()
            src.update()
            if not src.items and len(left_at) == len(items) and not ctx.get(dut.busy):
                break
        assert len(left_at) == len(items)
        if stall == 0:  # one per cycle
            assert left_at[-1] - left_at[0] == len(items) - 1
        assert mark_seen == [bool(stages)] * 2  # the check above saw both cases

    run(_clocked(dut), bench)
    assert out.got == items


def test_relay_without_mark_has_no_busy_mark():
    assert not hasattr(Relay(8, 2), "busy_mark")
    assert hasattr(Relay(8, 2, mark=lambda p: p[0]), "busy_mark")


def test_relay_registers_every_output():
    """With stages, no combinational path from ``i`` to ``o`` or from ``o.ready`` to
    ``i.ready``: changing the inputs within a cycle does not move the outputs. With the far
    side stalled, exactly ``relay_depth`` items are taken, then the input is held back."""
    dut = Relay(8, 2)
    assert relay_depth(2) == dut.depth == 7

    async def bench(ctx):
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload, 0x5A)
        ctx.set(dut.o.ready, 0)
        taken = 0
        for _ in range(20):
            taken += ctx.get(dut.i.ready)
            await ctx.tick()
        assert taken == 7
        # now the far end's FIFO is full and the input is held back
        before = (ctx.get(dut.o.valid), ctx.get(dut.o.payload), ctx.get(dut.i.ready))
        assert before == (1, 0x5A, 0)
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.payload, 0x33)
        ctx.set(dut.i.valid, 0)
        after = (ctx.get(dut.o.valid), ctx.get(dut.o.payload), ctx.get(dut.i.ready))
        assert after == before

    run(dut, bench)


@pytest.mark.parametrize("stages", STAGES)
def test_delay(stages):
    """``o`` is ``i`` from ``stages`` cycles before; registers start at ``init``."""
    dut = Delay(12, stages, init=0xABC)
    drive = bernoulli(0.5, stages)
    seen = []

    async def bench(ctx):
        for cyc in range(200):
            v = (cyc * 37 + next(drive)) & 0xFFF
            ctx.set(dut.i, v)
            seen.append(v)
            want = seen[cyc - stages] if cyc >= stages else 0xABC
            assert ctx.get(dut.o) == want
            await ctx.tick()

    run(_clocked(dut), bench)


def test_bad_stage_counts():
    with pytest.raises(ValueError, match="stages must be an int >= 0"):
        Relay(8, -1)
    with pytest.raises(ValueError, match="one clock domain per stage"):
        Relay(8, 2, domains=("a",))
    with pytest.raises(ValueError, match="one clock domain per stage"):
        Delay(Signal(4).shape(), 1, domains=("a", "b"))
