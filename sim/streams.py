"""cocotb helpers for Amaranth designs: clock and reset, ``lib.stream`` sources and sinks with
idle and backpressure patterns, and packing of ``lib.data`` payloads into port integers.

Amaranth's Verilog names a stream member ``<name>__valid``, ``<name>__ready`` and
``<name>__payload`` (the payload flattened, first field at the LSB), with ``clk`` and ``rst``.

Speed matters: a Python round trip per clock edge is the cost of a cocotb test. So all
endpoints of a test are served by one coroutine (:func:`pump`), each edge reads every handshake
once and writes only what changed, and payloads are packed into plain integers up front
(:class:`Packer`).

Timing model: right after ``await RisingEdge(clk)`` reads return the values that the edge
sampled (Verilator and Icarus agree), so a transfer is seen as ``valid & ready`` read then; the
writes made then take effect for the next edge.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge

from tandem import seeds

# --------------------------------------------------------------------------------------------
# idle and backpressure patterns: infinite iterators of 0/1


def always() -> Iterator[int]:
    return itertools.repeat(1)


def cycle(pattern: Sequence[int]) -> Iterator[int]:
    """Repeat a fixed pattern, e.g. ``cycle([1, 1, 1, 0])``."""
    if not any(pattern):
        raise ValueError(f"a pattern that is never 1 stalls forever: {pattern!r}")
    return itertools.cycle(pattern)


def bernoulli(p: float, seed: int) -> Iterator[int]:
    """1 with probability ``p`` each cycle, from its own seeded generator (``p`` 0: never)."""
    if not 0 <= p <= 1:
        raise ValueError(f"probability must be in [0, 1], not {p!r}")
    rng = random.Random(seeds.seed(seed))
    while True:
        yield int(rng.random() < p)


def bursts(seed: int, on: tuple[int, int] = (1, 12), off: tuple[int, int] = (1, 6)):
    """Random runs of 1s and 0s (lengths uniform in the given ranges)."""
    rng = random.Random(seeds.seed(seed))
    while True:
        yield from itertools.repeat(1, rng.randint(*on))
        yield from itertools.repeat(0, rng.randint(*off))


PATTERNS: dict[str, Callable[[int], Iterator[int]]] = {
    "always": lambda seed: always(),
    "three-of-four": lambda seed: cycle([1, 1, 1, 0]),
    "every-other": lambda seed: cycle([1, 0]),
    "random-half": lambda seed: bernoulli(0.5, seed),
    "random-bursts": lambda seed: bursts(seed),
}
"""Named patterns (by seed), for tests that sweep valid gaps against ready backpressure."""


# --------------------------------------------------------------------------------------------
# payload packing


def _field_width(shape) -> int:
    from amaranth.lib import data

    if isinstance(shape, data.Layout):
        return shape.size
    from amaranth import Shape

    return Shape.cast(shape).width


def _field_signed(shape) -> bool:
    from amaranth import Shape
    from amaranth.lib import data

    return not isinstance(shape, data.Layout) and Shape.cast(shape).signed


class Packer:
    """Pack the top-level fields of a ``lib.data`` layout into the integer a port carries, and
    back.

    A field that is an ``ArrayLayout`` takes (and gives back) a sequence of its elements.
    Elements or fields that are layouts themselves (such as ``Binary16``) are plain integers of
    their size. Signed fields accept and return negative integers.
    """

    def __init__(self, layout):
        from amaranth.lib import data

        layout = data.Layout.cast(layout)
        self.width = layout.size
        self._fields = {}
        for name, field in layout:
            shape = field.shape
            if isinstance(shape, data.ArrayLayout):
                elem = shape.elem_shape
                self._fields[name] = (
                    field.offset,
                    _field_width(elem),
                    _field_signed(elem),
                    shape.length,
                )
            else:
                self._fields[name] = (field.offset, _field_width(shape), _field_signed(shape), None)

    @property
    def names(self) -> list[str]:
        return list(self._fields)

    def pack(self, **values) -> int:
        unknown = set(values) - set(self._fields)
        if unknown:
            raise KeyError(f"no fields {sorted(unknown)} in layout; fields: {self.names}")
        word = 0
        for name, value in values.items():
            offset, width, _, length = self._fields[name]
            mask = (1 << width) - 1
            if length is None:
                word |= (int(value) & mask) << offset
            else:
                if len(value) != length:
                    raise ValueError(f"field {name} takes {length} elements, not {len(value)}")
                packed = 0
                for k, v in enumerate(value):
                    packed |= (int(v) & mask) << (k * width)
                word |= packed << offset
        return word

    def unpack(self, word: int) -> dict:
        word = int(word)
        out = {}
        for name, (offset, width, signed, length) in self._fields.items():
            mask = (1 << width) - 1
            top = 1 << (width - 1) if width else 0

            def conv(v, signed=signed, mask=mask, top=top):
                v &= mask
                return v - (mask + 1) if signed and v & top else v

            if length is None:
                out[name] = conv(word >> offset)
            else:
                out[name] = [conv(word >> (offset + k * width)) for k in range(length)]
        return out


# --------------------------------------------------------------------------------------------
# stream endpoints


def _handle(dut, name: str, required: bool = True):
    try:
        return getattr(dut, name)
    except AttributeError:
        if required:
            raise AttributeError(
                f"the design has no port {name!r}: is the stream member named right?"
            ) from None
        return None


class StreamSource:
    """Drives a stream into the design: queue integers with :meth:`send`.

    ``valid`` follows ``pattern`` (a 0/1 iterator) whenever data is queued, and once raised it
    stays raised with a stable payload until the design takes the item (stream rules).
    """

    def __init__(self, dut, name: str, *, pattern: Iterator[int] | None = None):
        self.name = name
        self._valid = _handle(dut, f"{name}__valid")
        self._ready = _handle(dut, f"{name}__ready", required=False)
        self._payload = _handle(dut, f"{name}__payload", required=False)
        self.pattern = pattern
        self.queue: deque[int] = deque()
        self.sent = 0
        self._offering = False
        self._taken = False
        self._valid_high = False
        self._valid.value = 0

    def send(self, items: Iterable[int]) -> None:
        self.queue.extend(items)

    @property
    def idle(self) -> bool:
        return not self.queue

    def _sample(self) -> None:
        self._taken = self._offering and (self._ready is None or bool(self._ready.value))

    def _drive(self) -> None:
        if self._taken:
            self.queue.popleft()
            self.sent += 1
            self._offering = False
        if self._offering:
            return  # hold valid and payload until taken
        offer = bool(self.queue) and (self.pattern is None or bool(next(self.pattern)))
        if offer:
            if self._payload is not None:
                self._payload.value = self.queue[0]
            if not self._valid_high:
                self._valid.value = 1
                self._valid_high = True
            self._offering = True
        elif self._valid_high:
            self._valid.value = 0
            self._valid_high = False


class StreamSink:
    """Takes a stream out of the design into :attr:`items`; ``ready`` follows ``pattern``."""

    def __init__(self, dut, name: str, *, pattern: Iterator[int] | None = None):
        self.name = name
        self._valid = _handle(dut, f"{name}__valid")
        self._ready = _handle(dut, f"{name}__ready", required=False)
        self._payload = _handle(dut, f"{name}__payload", required=False)
        self.pattern = pattern
        self.items: list[int] = []
        self._ready_now = self._ready is None
        if self._ready is not None:
            self._ready.value = 0

    def _sample(self) -> None:
        if self._ready_now and bool(self._valid.value):
            self.items.append(int(self._payload.value) if self._payload is not None else 1)

    def _drive(self) -> None:
        if self._ready is None:
            return
        want = self.pattern is None or bool(next(self.pattern))
        if want != self._ready_now:
            self._ready.value = int(want)
            self._ready_now = want


async def pump(
    clk,
    sources: Sequence[StreamSource] = (),
    sinks: Sequence[StreamSink] = (),
    *,
    until: Callable[[], bool] | None,
    timeout: int,
    on_edge: Callable[[int], None] | None = None,
) -> int:
    """Serve every endpoint on every rising edge until ``until()`` holds; returns the cycles.

    With ``until=None`` it serves exactly ``timeout`` cycles (to watch for stray outputs).

    ``on_edge(cycle)``, if given, runs after the endpoints on every edge (for monitors that
    count cycles or watch other signals). Raises ``TimeoutError`` after ``timeout`` cycles,
    reporting how far each endpoint got.
    """
    edge = RisingEdge(clk)
    for endpoint in (*sources, *sinks):
        endpoint._drive()
    for cycle_no in range(1, timeout + 1):
        await edge
        for endpoint in sources:
            endpoint._sample()
        for endpoint in sinks:
            endpoint._sample()
        for endpoint in sources:
            endpoint._drive()
        for endpoint in sinks:
            endpoint._drive()
        if on_edge is not None:
            on_edge(cycle_no)
        if until is not None and until():
            return cycle_no
    if until is None:
        return timeout
    progress = ", ".join(
        [f"{s.name}: sent {s.sent}, queued {len(s.queue)}" for s in sources]
        + [f"{k.name}: received {len(k.items)}" for k in sinks]
    )
    raise TimeoutError(f"streams did not finish within {timeout} cycles ({progress})")


class ClockedTB:
    """Base testbench: owns the clock and reset of an Amaranth design (``clk``, ``rst``)."""

    def __init__(self, dut, *, period_ns: int = 4):
        self.dut = dut
        self.clk = dut.clk
        self.log = dut._log
        Clock(self.clk, period_ns, unit="ns").start()

    async def reset(self, cycles: int = 2) -> None:
        self.dut.rst.value = 1
        await ClockCycles(self.clk, cycles)
        self.dut.rst.value = 0
        await RisingEdge(self.clk)


__all__ = [
    "PATTERNS",
    "ClockedTB",
    "Packer",
    "StreamSink",
    "StreamSource",
    "always",
    "bernoulli",
    "bursts",
    "cycle",
    "pump",
]
