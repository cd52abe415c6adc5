"""Registered stages for the streams and control signals between the core's blocks, so that a
path between two super logic regions (SLRs) is a register-to-register hop.

- :class:`Relay`: a valid/ready stream through ``stages`` plain register stages into a FIFO at
  the far end, paced by credit (no register between SLRs has logic in front of it), with a
  ``busy`` flag at its input side that stays up until the far side's acceptance of every item
  it carried has come back (so a scoreboard on the near side never sees a command in flight as
  idle).
- :class:`Delay`: a plain register chain for level signals (busy flags, status, arguments,
  pulses) whose meaning survives a fixed delay.

Each register of a stage can be given its own clock domain (``domains``), which is how
:class:`tandem.rtl.core.DecodeCore` puts each stage on its side of an SLR boundary, under the
reset leaf of that SLR (:mod:`tandem.floorplan`).
"""

# No `from __future__ import annotations`: Amaranth reads annotations as shapes.

import itertools

from amaranth import DomainRenamer, Module, Shape, Signal
from amaranth.lib import fifo as fifo_lib
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Delay", "Relay", "RelayStage", "relay_depth"]


def _domains(stages: int, domains) -> tuple[str, ...]:
    if not isinstance(stages, int) or stages < 0:
        raise ValueError(f"stages must be an int >= 0, not {stages!r}")
    if domains is None:
        return ("sync",) * stages
    domains = tuple(domains)
    if len(domains) != stages or not all(isinstance(d, str) for d in domains):
        raise ValueError(
            f"domains must name one clock domain per stage ({stages}), not {domains!r}"
        )
    return domains


class RelayStage(wiring.Component):
    """One register stage of a :class:`Relay` in clock domain ``domain``: the item forward
    (``valid``, ``payload``) and the acknowledgement back (``ack``), each a plain register with
    nothing in front of it, so that a stage and its neighbour in the next SLR are joined by
    wires alone and both can sit in Laguna sites (``USER_SLL_REG``).

    Timing: latency 1 cycle each way, one item per cycle, no enable: the stage never holds an
    item back (the :class:`Relay`'s credit keeps its far-end buffer from overflowing). Logic
    depth 0.
    """

    def __init__(self, shape, *, domain: str = "sync"):
        self._domain = domain
        super().__init__(
            {
                "valid_i": In(1),
                "payload_i": In(shape),
                "valid_o": Out(1),
                "payload_o": Out(shape),
                "ack_i": In(1),
                "ack_o": Out(1),
            }
        )

    def elaborate(self, platform):
        m = Module()
        d = m.d[self._domain]
        # Only the flags are reset (UG1393: reset the control registers that need it); the
        # payload register, the stream's width, stays off the reset tree.
        payload = Signal.like(self.payload_i, name="payload", reset_less=True)
        d += [self.valid_o.eq(self.valid_i), payload.eq(self.payload_i), self.ack_o.eq(self.ack_i)]
        m.d.comb += self.payload_o.eq(payload)
        return m


def relay_depth(stages: int) -> int:
    """Items a :class:`Relay` of ``stages`` stages buffers at its far end: its round trip, so
    that a credit comes back in time to keep one item per cycle moving."""
    return 2 * stages + 3 if stages else 0


class Relay(wiring.Component):
    """A stream through ``stages`` :class:`RelayStage`\\ s and a FIFO at the far end (0 stages:
    wires), paced by credit, with an in-flight flag. This is the relay station of the TAPA and
    AutoBridge multi-die designs: every register between two SLRs is fed by a register alone.

    The near end sends an item whenever fewer than :func:`relay_depth` items are in flight
    (taken and not yet acknowledged); items move through the stages unconditionally into the
    far-end FIFO, which therefore never overflows; each item the far side takes from the FIFO
    sends an acknowledgement back through the stages, which returns the credit. With
    ``2 * stages + 3`` items of credit the round trip is covered and the stream moves one item
    per cycle when neither end stalls.

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    busy : Out(1)
        At the input side: an item taken on ``i`` whose acceptance on ``o`` has not yet come
        back through ``stages`` return registers. Raised the cycle after the item is taken and
        lowered ``stages`` cycles after the far side took it, so a far-side busy flag brought
        back through a :class:`Delay` of at most ``stages`` cycles, raised the cycle after it
        takes the item, covers the rest without a gap (``DecodeCore`` relies on this). Always 0
        with ``stages=0``.

    Timing: latency ``stages + 2`` cycles (the FIFO's write and its registered output), one
    item per cycle;
    :func:`relay_depth` items of buffering, in the far end's FIFO (submodule ``fifo``, clock
    domain ``domains[-1]``; the count of items in flight is kept in ``domains[0]``). ``i.ready``
    is one comparison of that count; ``o`` comes from the FIFO's output register.
    """

    def __init__(self, shape, stages: int, *, domains=None, mark=None):
        self._shape = shape
        self._stages = stages
        self._domains = _domains(stages, domains)
        self._mark = mark
        members = {
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)),
            "busy": Out(1),
        }
        if mark is not None:
            # ``busy`` for the items ``mark(payload)`` selects only (same timing)
            members["busy_mark"] = Out(1)
        super().__init__(members)

    @property
    def stages(self) -> int:
        return self._stages

    @property
    def latency(self) -> int:
        return self._stages + 2 if self._stages else 0

    @property
    def depth(self) -> int:
        return relay_depth(self._stages)

    def elaborate(self, platform):
        m = Module()
        if self._stages == 0:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
            return m  # busy and busy_mark stay 0
        stages = []
        for k, dom in enumerate(self._domains):
            stage = RelayStage(self._shape, domain=dom)
            m.submodules[f"stage{k}"] = stage
            stages.append(stage)
        depth = self.depth
        fifo = fifo_lib.SyncFIFOBuffered(width=Shape.cast(self._shape).width, depth=depth)
        m.submodules.fifo = DomainRenamer(self._domains[-1])(fifo)

        # Items taken and not yet acknowledged; the credit is depth - n.
        n = Signal(range(depth + 1))
        m.d.comb += self.i.ready.eq(n != depth)
        taken = self.i.valid & self.i.ready
        m.d.comb += [stages[0].valid_i.eq(taken), stages[0].payload_i.eq(self.i.payload)]
        for a, b in itertools.pairwise(stages):
            m.d.comb += [
                b.valid_i.eq(a.valid_o),
                b.payload_i.eq(a.payload_o),
                a.ack_i.eq(b.ack_o),
            ]
        last = stages[-1]
        popped = self.o.valid & self.o.ready
        m.d.comb += [
            fifo.w_en.eq(last.valid_o),
            fifo.w_data.eq(last.payload_o),
            self.o.valid.eq(fifo.r_rdy),
            self.o.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.o.ready),
            last.ack_i.eq(popped),
        ]
        m.d[self._domains[0]] += n.eq(n + taken - stages[0].ack_o)
        m.d.comb += self.busy.eq(n != 0)
        if self._mark is not None:
            # the marks of the items in flight, in order (acknowledgements come back in order)
            marks = fifo_lib.SyncFIFO(width=1, depth=depth)
            m.submodules.marks = DomainRenamer(self._domains[0])(marks)
            n_mark = Signal(range(depth + 1))
            is_marked = Signal()
            m.d.comb += [
                is_marked.eq(self._mark(self.i.payload)),
                marks.w_en.eq(taken),
                marks.w_data.eq(is_marked),
                marks.r_en.eq(stages[0].ack_o),
            ]
            acked_mark = stages[0].ack_o & marks.r_data[0]
            m.d[self._domains[0]] += n_mark.eq(n_mark + (taken & is_marked) - acked_mark)
            m.d.comb += self.busy_mark.eq(n_mark != 0)
        return m


class _Register(wiring.Component):
    """One register of a :class:`Delay`, its own instance so that a floorplan can place it."""

    def __init__(self, shape, *, domain: str, init, attrs):
        self._domain, self._init, self._attrs = domain, init, attrs
        super().__init__({"i": In(shape), "o": Out(shape)})

    def elaborate(self, platform):
        m = Module()
        reg = Signal.like(self.o, name="q", init=self._init, attrs=self._attrs)
        m.d[self._domain] += reg.eq(self.i)
        m.d.comb += self.o.eq(reg)
        return m


class Delay(wiring.Component):
    """``o`` is ``i`` from ``stages`` cycles before (0: a wire), through plain registers.

    For level signals whose meaning survives a fixed delay. Each register starts at ``init``
    and is its own submodule ``stage<k>`` in clock domain ``domains[k]``; ``keep=True`` marks
    the registers ``keep`` so that synthesis does not merge them with an equivalent chain (the
    branches of a reset tree).
    """

    def __init__(self, shape, stages: int, *, domains=None, init=0, keep: bool = False):
        self._shape = shape
        self._stages = stages
        self._domains = _domains(stages, domains)
        self._init = init
        self._attrs = {"keep": "true"} if keep else {}
        super().__init__({"i": In(shape), "o": Out(shape)})

    @property
    def stages(self) -> int:
        return self._stages

    def elaborate(self, platform):
        m = Module()
        prev = self.i
        for k, dom in enumerate(self._domains):
            reg = _Register(self._shape, domain=dom, init=self._init, attrs=self._attrs)
            m.submodules[f"stage{k}"] = reg
            m.d.comb += reg.i.eq(prev)
            prev = reg.o
        m.d.comb += self.o.eq(prev)
        return m
