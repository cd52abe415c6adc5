"""Registered stages for the streams and control signals between the core's blocks, so that a
path between two super logic regions (SLRs) is a register-to-register hop.

- :class:`Relay`: a valid/ready stream through ``stages`` skid buffers, with a ``busy`` flag at
  its input side that stays up until the far side's acceptance of every item it carried has come
  back (so a scoreboard on the near side never sees a command in flight as idle).
- :class:`Delay`: a plain register chain for level signals (busy flags, status, arguments,
  pulses) whose meaning survives a fixed delay.

Each register of a stage can be given its own clock domain (``domains``), which is how
:class:`tandem.rtl.core.DecodeCore` puts each stage on its side of an SLR boundary, under the
reset leaf of that SLR (:mod:`tandem.floorplan`).
"""

# No `from __future__ import annotations`: Amaranth reads annotations as shapes.

import itertools

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Delay", "Relay", "SkidStage"]


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


class SkidStage(wiring.Component):
    """One registered valid/ready stage (a two-entry skid buffer) in clock domain ``domain``.

    ``o.valid``/``o.payload`` and ``i.ready`` are register outputs, so no combinational path
    passes through the stage in either direction. ``ack_i`` → ``ack_o`` is a one-register
    return path for :class:`Relay`'s acknowledgements.

    Timing: latency 1 cycle, throughput one item per cycle (with ``o.ready`` high); holds two
    items when the output stalls. Logic depth: a 2:1 multiplexer before the output register.
    """

    def __init__(self, shape, *, domain: str = "sync"):
        self._shape = shape
        self._domain = domain
        super().__init__(
            {
                "i": In(stream.Signature(shape)),
                "o": Out(stream.Signature(shape)),
                "ack_i": In(1),
                "ack_o": Out(1),
            }
        )

    def elaborate(self, platform):
        m = Module()
        d = m.d[self._domain]
        # Only the valid flags are reset (UG1393: reset the control registers that need it):
        # the payload registers, 2 x the stream's width, stay off the reset tree.
        out = Signal.like(self.i.payload, name="out", reset_less=True)
        skid = Signal.like(self.i.payload, name="skid", reset_less=True)
        skid_valid = Signal()
        # i.ready is a register: ready while the skid entry is free.
        m.d.comb += [self.i.ready.eq(~skid_valid), self.o.payload.eq(out)]
        take = self.i.valid & self.i.ready
        with m.If(~self.o.valid | self.o.ready):  # the output register moves
            with m.If(skid_valid):
                d += [out.eq(skid), self.o.valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                d += [out.eq(self.i.payload), self.o.valid.eq(self.i.valid)]
        with m.Elif(take):  # the output holds: park the incoming item
            d += [skid.eq(self.i.payload), skid_valid.eq(1)]
        d += self.ack_o.eq(self.ack_i)
        return m


class Relay(wiring.Component):
    """A stream through ``stages`` :class:`SkidStage`\\ s (0: wires), with an in-flight flag.

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

    Timing: latency ``stages`` cycles, one item per cycle; ``2 * stages`` items of buffering.
    ``domains`` gives each stage's clock domain (default ``sync``); the count of items in
    flight is kept in ``domains[0]``.
    """

    def __init__(self, shape, stages: int, *, domains=None):
        self._shape = shape
        self._stages = stages
        self._domains = _domains(stages, domains)
        super().__init__(
            {
                "i": In(stream.Signature(shape)),
                "o": Out(stream.Signature(shape)),
                "busy": Out(1),
            }
        )

    @property
    def stages(self) -> int:
        return self._stages

    @property
    def latency(self) -> int:
        return self._stages

    def elaborate(self, platform):
        m = Module()
        if self._stages == 0:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
            return m
        stages = []
        for k, dom in enumerate(self._domains):
            stage = SkidStage(self._shape, domain=dom)
            m.submodules[f"stage{k}"] = stage
            stages.append(stage)
        wiring.connect(m, wiring.flipped(self.i), stages[0].i)
        for a, b in itertools.pairwise(stages):
            wiring.connect(m, a.o, b.i)
            m.d.comb += a.ack_i.eq(b.ack_o)
        wiring.connect(m, stages[-1].o, wiring.flipped(self.o))
        m.d.comb += stages[-1].ack_i.eq(self.o.valid & self.o.ready)

        # Items taken and not yet acknowledged: at most 2 per stage buffered plus one
        # acknowledgement per return register.
        n = Signal(range(3 * self._stages + 2))
        taken = self.i.valid & self.i.ready
        acked = stages[0].ack_o
        m.d[self._domains[0]] += n.eq(n + taken - acked)
        m.d.comb += self.busy.eq(n != 0)
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
