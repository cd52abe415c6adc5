"""cocotb testbench for rtl/arith.py, run from test_arith.py through tandem.sim.runner.

The pytest side builds one unit and passes its name, a seed, sizes and a handshake schedule
(``tandem.sim.runner.tb_params``). The unit is driven through its ``i``/``o`` streams with a
sequence number in its ``tag``; outputs are compared with ``tandem.numerics`` in order, so a
lost, duplicated or reordered item fails as surely as a wrong value. A unit with two stream
pairs (the two-port table) is driven on both at once, each pair with its own stimulus and its
own valid and ready patterns, and each checked on its own.
"""

from __future__ import annotations

import itertools
import time

import arith_cases
import cocotb
import numpy as np
from amaranth import Shape

from tandem import seeds
from tandem.sim import streams
from tandem.sim.runner import tb_params


def schedule(name: str, n: int, seed: int, *, rotate: int = 0):
    """(valid pattern, ready pattern) for ``n`` items.

    ``full``: always valid, always ready. ``mixed``: the first 60% at full rate, then stretches
    of fixed and random idle cycles on ``valid`` against fixed and random backpressure on
    ``ready``, each pairing for a tenth of the items (``rotate`` starts at a later pairing, so
    two ports stall differently). ``random``: the same pairings from the first item on, one
    after another, a tenth of the items each.
    """
    if name == "full":
        return None, None
    if name not in ("mixed", "random"):
        raise ValueError(f"unknown schedule {name!r}")
    span = max(1, n // 10)
    pairs = [
        ("three-of-four", "every-other"),
        ("random-half", "always"),
        ("always", "random-bursts"),
        ("random-bursts", "random-half"),
    ]
    pairs = pairs[rotate % len(pairs) :] + pairs[: rotate % len(pairs)]
    if name == "random":
        pairs = pairs * 3
    full = 6 * span if name == "mixed" else 0
    valid = [itertools.repeat(1, full)]
    ready = [itertools.repeat(1, full)]
    for k, (v, r) in enumerate(pairs):
        # ready is consumed every cycle, valid only when free to change: size both by cycles
        valid.append(itertools.islice(streams.PATTERNS[v](seed + 2 * k), 3 * span))
        ready.append(itertools.islice(streams.PATTERNS[r](seed + 2 * k + 1), 3 * span))
    valid.append(itertools.repeat(1))
    ready.append(itertools.repeat(1))
    return itertools.chain(*valid), itertools.chain(*ready)


def stream_pairs(unit) -> int:
    """Input/output stream pairs of a unit (2 for a two-port table)."""
    return len(unit.stream_pairs) if hasattr(unit, "stream_pairs") else 1


class ArithTB(streams.ClockedTB):
    """Clock, reset, the streams and the payload packers of one arithmetic unit: one source
    and one sink per stream pair (``i``/``o``, or ``i[k]``/``o[k]``)."""

    def __init__(self, dut, unit):
        super().__init__(dut)
        self.unit = unit
        n = stream_pairs(unit)
        # Amaranth names the members of a stream array i__0__valid, i__1__valid, ...
        names = [("i", "o")] if n == 1 else [(f"i__{k}", f"o__{k}") for k in range(n)]
        self.sources = [streams.StreamSource(dut, i) for i, _ in names]
        self.sinks = [streams.StreamSink(dut, o) for _, o in names]
        self.pack_in = streams.Packer(unit.in_layout)
        self.pack_out = streams.Packer(unit.out_layout)
        self.tag_mask = (1 << Shape.cast(unit.tag).width) - 1

    async def transfer(self, words, n_out, *, valid=None, ready=None, drain=32):
        """Send ``words[k]`` into pair ``k``, collect ``n_out[k]`` outputs from it (lists, one
        entry per pair), then watch ``drain`` more cycles for anything extra."""
        n = len(self.sources)
        valid, ready = valid or [None] * n, ready or [None] * n
        for k in range(n):
            self.sources[k].pattern, self.sinks[k].pattern = valid[k], ready[k]
            self.sources[k].send(words[k])
        t0 = time.perf_counter()
        cycles = await streams.pump(
            self.clk,
            self.sources,
            self.sinks,
            until=lambda: all(len(s.items) >= c for s, c in zip(self.sinks, n_out, strict=True)),
            timeout=40 * max(map(len, words)) + 200,
        )
        dt = time.perf_counter() - t0
        self.log.info(
            f"{sum(map(len, words))} items in, {sum(n_out)} out, {cycles} cycles, {dt:.2f} s "
            f"({cycles / max(dt, 1e-9):,.0f} cycles/s)"
        )
        for sink in self.sinks:
            sink.pattern = None
        await streams.pump(self.clk, [], self.sinks, until=None, timeout=drain)
        return cycles

    def check(self, inputs, expected, index, *, pair: int = 0):
        got_words = self.sinks[pair].items
        where = f"pair {pair}: " if len(self.sinks) > 1 else ""
        if len(got_words) != len(expected):
            raise AssertionError(f"{where}{len(got_words)} outputs, expected {len(expected)}")
        bad = []
        for j, (word, want) in enumerate(zip(got_words, expected, strict=True)):
            got = self.pack_out.unpack(word)
            k = j if index is None else index[j]
            if got["tag"] != k & self.tag_mask:
                raise AssertionError(
                    f"{where}output {j} carries tag {got['tag']}, expected "
                    f"{k & self.tag_mask}: an item was lost, duplicated or reordered"
                )
            diff = {f: (got[f], v) for f, v in want.items() if got[f] != v}
            if diff:
                bad.append((j, inputs[k], diff))
        if bad:
            lines = [f"  #{j}: in {i} -> (got, expected) {d}" for j, i, d in bad[:10]]
            raise AssertionError(
                f"{where}{len(bad)} of {len(expected)} results differ from tandem.numerics:\n"
                + "\n".join(lines)
            )
        self.log.info(f"{where}{len(expected)} results bit-exact with tandem.numerics")


@cocotb.test()
async def arith_unit(dut):
    """Drive the unit named in the parameters with its stimulus under the chosen schedule."""
    params = tb_params()
    unit = arith_cases.build_unit(params["unit"])
    tb = ArithTB(dut, unit)
    await tb.reset()
    seed = params.get("seed", 1)
    rng = np.random.default_rng(seeds.seed(seed))
    t0 = time.perf_counter()
    cases = arith_cases.case_for(params["unit"])(params, rng)
    if stream_pairs(unit) == 1:
        cases = [cases]
    # units take the sequence number in their tag; DotRow's stimulus packs it in itself
    own_tag = "tag" in tb.pack_in.names
    words = [
        [
            tb.pack_in.pack(**inp, **({"tag": k & tb.tag_mask} if own_tag else {}))
            for k, inp in enumerate(inputs)
        ]
        for inputs, _, _ in cases
    ]
    tb.log.info(f"stimulus: {sum(map(len, words))} items in {time.perf_counter() - t0:.1f} s")
    # each pair its own patterns: other seeds, and the stall pairings in another order
    patterns = [
        schedule(params.get("schedule", "mixed"), len(w), seed + 1000 * k, rotate=k)
        for k, w in enumerate(words)
    ]
    await tb.transfer(
        words,
        [len(expected) for _, expected, _ in cases],
        valid=[v for v, _ in patterns],
        ready=[r for _, r in patterns],
    )
    for pair, (inputs, expected, index) in enumerate(cases):
        tb.check(inputs, expected, index, pair=pair)
