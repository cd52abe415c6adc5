"""Python models of stream ends for RTL units on Amaranth's simulator (tests/rtl/test_feeders.py,
tests/rtl/test_relay.py): a Source offering items after random gaps, a Sink taking them with random
ready gaps and checking the stream rule (once valid, held with the same payload until taken)."""

from __future__ import annotations

from amaranth.sim import Simulator

from tandem.sim.streams import bernoulli


def _value(v):
    """A payload as a plain value (a View's bits)."""
    return v.as_value() if hasattr(v, "as_value") else v


def _bits(ctx, value) -> int:
    return ctx.get(_value(value))


class Source:
    """Drives an input stream from a list: after a random gap, offers the next item and holds it
    until it is taken."""

    def __init__(self, port, items=(), *, stall=0.0, seed=0):
        self.port, self.items = port, list(items)
        self.go = bernoulli(1 - stall, seed)
        self.offer = False
        self.fire = False
        self.taken = []

    def drive(self, ctx):
        if not self.offer and self.items and next(self.go):
            self.offer = True
        ctx.set(self.port.valid, self.offer)
        if self.offer:
            ctx.set(_value(self.port.payload), self.items[0])

    def sample(self, ctx):
        self.fire = self.offer and bool(ctx.get(self.port.ready))

    def update(self):
        if self.fire:
            self.taken.append(self.items.pop(0))
            self.offer = False


class Sink:
    """Takes an output stream with random ready gaps; records payloads (as bits) and checks
    that a valid payload is held until taken."""

    def __init__(self, port, *, stall=0.0, seed=0, name="sink"):
        self.port, self.name = port, name
        self.ready = bernoulli(1 - stall, seed)
        self.got = []
        self.waiting = None  # payload offered and not taken last cycle
        self.r = 0

    def drive(self, ctx):
        self.r = next(self.ready)
        ctx.set(self.port.ready, self.r)

    def sample(self, ctx):
        valid = bool(ctx.get(self.port.valid))
        payload = _bits(ctx, self.port.payload) if valid else None
        if self.waiting is not None:
            assert valid and payload == self.waiting, f"{self.name}: valid or payload dropped"
        if valid and self.r:
            self.got.append(payload)
            self.waiting = None
        else:
            self.waiting = payload

    def update(self):
        pass


def run(dut, bench, *, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
