"""cocotb testbench for rtl/arith.py, run from test_arith.py through tandem.sim.runner.

The pytest side builds one unit and passes its name, a seed, sizes and a handshake schedule
(``tandem.sim.runner.tb_params``). The unit is driven through its ``i``/``o`` streams with a
sequence number in its ``tag``; outputs are compared with ``tandem.numerics`` in order, so a
lost, duplicated or reordered item fails as surely as a wrong value.
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


def schedule(name: str, n: int, seed: int):
    """(valid pattern, ready pattern) for ``n`` items.

    ``full``: always valid, always ready. ``mixed``: the first 60% at full rate, then stretches
    of fixed and random idle cycles on ``valid`` against fixed and random backpressure on
    ``ready``, each pairing for a tenth of the items.
    """
    if name == "full":
        return None, None
    if name != "mixed":
        raise ValueError(f"unknown schedule {name!r}")
    span = max(1, n // 10)
    pairs = [
        ("three-of-four", "every-other"),
        ("random-half", "always"),
        ("always", "random-bursts"),
        ("random-bursts", "random-half"),
    ]
    valid = [itertools.repeat(1, 6 * span)]
    ready = [itertools.repeat(1, 6 * span)]
    for k, (v, r) in enumerate(pairs):
        # ready is consumed every cycle, valid only when free to change: size both by cycles
        valid.append(itertools.islice(streams.PATTERNS[v](seed + 2 * k), 3 * span))
        ready.append(itertools.islice(streams.PATTERNS[r](seed + 2 * k + 1), 3 * span))
    valid.append(itertools.repeat(1))
    ready.append(itertools.repeat(1))
    return itertools.chain(*valid), itertools.chain(*ready)


class ArithTB(streams.ClockedTB):
    """Clock, reset, the two streams and the payload packers of one arithmetic unit."""

    def __init__(self, dut, unit):
        super().__init__(dut)
        self.unit = unit
        self.source = streams.StreamSource(dut, "i")
        self.sink = streams.StreamSink(dut, "o")
        self.pack_in = streams.Packer(unit.in_layout)
        self.pack_out = streams.Packer(unit.out_layout)
        self.tag_mask = (1 << Shape.cast(unit.tag).width) - 1

    async def transfer(self, words, n_out, *, valid=None, ready=None, drain=32):
        """Send ``words``, collect ``n_out`` outputs, then watch ``drain`` more cycles for
        anything extra."""
        self.source.pattern, self.sink.pattern = valid, ready
        self.source.send(words)
        t0 = time.perf_counter()
        cycles = await streams.pump(
            self.clk,
            [self.source],
            [self.sink],
            until=lambda: len(self.sink.items) >= n_out,
            timeout=40 * len(words) + 200,
        )
        dt = time.perf_counter() - t0
        self.log.info(
            f"{len(words)} items in, {n_out} out, {cycles} cycles, {dt:.2f} s "
            f"({cycles / max(dt, 1e-9):,.0f} cycles/s)"
        )
        self.sink.pattern = None
        await streams.pump(self.clk, [], [self.sink], until=None, timeout=drain)
        return cycles

    def check(self, inputs, expected, index):
        got_words = self.sink.items
        if len(got_words) != len(expected):
            raise AssertionError(f"{len(got_words)} outputs, expected {len(expected)}")
        bad = []
        for j, (word, want) in enumerate(zip(got_words, expected, strict=True)):
            got = self.pack_out.unpack(word)
            k = j if index is None else index[j]
            if got["tag"] != k & self.tag_mask:
                raise AssertionError(
                    f"output {j} carries tag {got['tag']}, expected {k & self.tag_mask}: an "
                    "item was lost, duplicated or reordered"
                )
            diff = {f: (got[f], v) for f, v in want.items() if got[f] != v}
            if diff:
                bad.append((j, inputs[k], diff))
        if bad:
            lines = [f"  #{j}: in {i} -> (got, expected) {d}" for j, i, d in bad[:10]]
            raise AssertionError(
                f"{len(bad)} of {len(expected)} results differ from tandem.numerics:\n"
                + "\n".join(lines)
            )
        self.log.info(f"{len(expected)} results bit-exact with tandem.numerics")


@cocotb.test()
async def arith_unit(dut):
    """Drive the unit named in the parameters with its stimulus under the chosen schedule."""
    params = tb_params()
    unit = arith_cases.build_unit(params["unit"])
    tb = ArithTB(dut, unit)
    await tb.reset()
    rng = np.random.default_rng(seeds.seed(params.get("seed", 1)))
    t0 = time.perf_counter()
    inputs, expected, index = arith_cases.case_for(params["unit"])(params, rng)
    # units take the sequence number in their tag; DotRow's stimulus packs it in itself
    own_tag = "tag" in tb.pack_in.names
    words = [
        tb.pack_in.pack(**inp, **({"tag": k & tb.tag_mask} if own_tag else {}))
        for k, inp in enumerate(inputs)
    ]
    tb.log.info(f"stimulus: {len(words)} items in {time.perf_counter() - t0:.1f} s")
    valid, ready = schedule(params.get("schedule", "mixed"), len(words), params.get("seed", 1))
    await tb.transfer(words, len(expected), valid=valid, ready=ready)
    tb.check(inputs, expected, index)
