# amaranth: UnusedElaboratable=no
"""The RTL job harness (sim/rtljob.py): the whole core over the simulated HBM in Verilator,
driven through tandem/driver.KernelDriver, bit-exact with the ISA simulator on a compiled test-tiny
model. The same build (``rtljob-tiny-1m``) serves the ``rtl`` device backend's test
(tests/test_rtldevice.py), so the suite pays for one Verilator build of the tiny core."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tandem import layout as L
from tandem.checkpoint import lively_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.sim import rtljob, runner

pytestmark = pytest.mark.core

GEOM = geometry("tiny")
CYCLES_FIELD = slice(16, 24)  # StatusRecord "<IIIIQ": the u64 cycles


def _verilator_only():
    if "verilator" not in runner.simulators():
        pytest.skip("the RTL job harness runs on Verilator; SIM selects another simulator")


@functools.cache
def compiled():
    cfg = preset("test-tiny")
    return compile_model(cfg, lively_weights(cfg, seed=1), GEOM)


def _job(prompt, n_new):
    c = compiled()
    image = L.HBMImage(GEOM, c.image.nbytes)
    image.data[:] = c.image.data
    c.write_prompt(image, prompt)
    return c, image, c.args(len(prompt), n_new)


def test_tiny_job_equals_isasim():
    """Prompt of 2, 3 new tokens: status registers, status record, tokens and every byte of
    all 4 channels (outside the record's cycles field) equal IsaSim; per-token cycles and the
    read counters are consistent with the core's own cycle count."""
    _verilator_only()
    c, image, args = _job([7, 3], 3)
    ref = L.HBMImage(GEOM, image.nbytes)
    ref.data[:] = image.data
    want = IsaSim(GEOM, ref).run(args)
    assert want.ok and want.tokens == 3, want

    res = rtljob.run_job(GEOM, image, args, profile=len(c.program) + 4)

    st = res.status
    assert (st.status, st.error_pc, st.error_code, st.tokens) == (
        int(want.status), want.pc, want.halt_code, want.tokens
    ), (st, want)  # fmt: skip
    st.check()
    rec, want_rec = res.record, c.read_status(ref)
    assert (rec.status, rec.pc, rec.tokens, rec.halt_code) == (
        want_rec.status, want_rec.pc, want_rec.tokens, want_rec.halt_code
    ), (rec, want_rec)  # fmt: skip
    # the record is written before the core waits for its write response and raises done
    assert 0 < rec.cycles <= st.cycles, (rec, st)

    want_tokens = c.read_output(ref, want.tokens)
    assert res.tokens == want_tokens  # from the monitor (the STW's value)
    assert c.read_output(_Mem(res.memory), want.tokens) == want_tokens  # from memory
    assert len(set(want_tokens)) > 1, "weak test: greedy decoding repeated one token"

    got = res.memory
    assert got.shape == ref.data.shape
    mask = np.ones(image.nbytes, bool)
    mask[CYCLES_FIELD] = False
    for ch in range(GEOM.channels):
        diff = np.nonzero((got[ch] != ref.data[ch]) & (mask if ch == 0 else True))[0]
        assert diff.size == 0, (
            f"channel {ch}: {diff.size} bytes differ from IsaSim, first at {diff[0]:#x} "
            f"(got {got[ch, diff[0]]:#x}, want {ref.data[ch, diff[0]]:#x})"
        )
    # the run changed memory (KV cache, tokens), so the comparison above is not vacuous
    assert (ref.data != image.data).sum() > 0

    # monitor: one event per token, then the status record, in cycle order, inside the run
    kinds = [e["kind"] for e in res.events]
    assert kinds == ["token"] * 3 + ["status"], kinds
    cyc = [e["cycles"] for e in res.events]
    assert cyc == sorted(cyc) and cyc[0] > 0 and cyc[-1] < st.cycles, (cyc, st.cycles)
    # the monitor counts the same start..done window as the core's CYCLES (within the cycle
    # of the done pulse)
    assert abs(res.counters["cycles"] - st.cycles) <= 2, (res.counters, st.cycles)
    # every byte IsaSim read came over the R channels (the RTL reads whole beats and tiles)
    reads = res.counters["r_beats"] * GEOM.beat_bytes
    assert reads >= want.hbm_read, (reads, want.hbm_read)
    assert res.counters["tiles"] > 0 and res.counters["r_cycles"] <= st.cycles
    assert res.counters["w_beats"] > 0

    # the profile by pc: every counted cycle at exactly one pc, each idle cycle (no R beat) too
    prof = res.profile
    assert len(prof) == len(c.program) + 4
    assert sum(e["cycles"] for e in prof) == res.counters["cycles"], prof
    idle = res.counters["cycles"] - res.counters["r_cycles"]
    assert sum(e["idle"] for e in prof) == idle, (idle, prof)
    assert all(e["idle"] <= e["cycles"] for e in prof)
    assert sum(e["tiles"] for e in prof) == res.counters["tiles"], prof
    assert sum(e["starved"] for e in prof) == res.counters["mpu_starved"], prof
    assert not any(e["cycles"] for e in prof[len(c.program) :])  # no pc past the program
    # Exec held the MATVECs' successors, the stores and the HALT; not just one pc
    held = [pc for pc, e in enumerate(prof) if e["cycles"]]
    assert len(held) > len(c.program) // 2, held
    assert prof[c.labels["done"]]["cycles"] > 0  # the HALT that ended the run


def test_job_timeout_is_reported():
    """A cycle budget far too small for the job: RtlJobError naming the missing ap_done."""
    _verilator_only()
    _, image, args = _job([1], 2)
    with pytest.raises(rtljob.RtlJobError, match="ap_done not seen"):
        rtljob.run_job(GEOM, image, args, max_cycles=1000)


def test_memory_class_and_rejections():
    assert rtljob.memory_class(145_600) == 1 << 20
    assert rtljob.memory_class((1 << 20) + 1) == 2 << 20
    assert rtljob.build_name(GEOM, 1 << 20) == "rtljob-tiny-1m"
    image = L.HBMImage(GEOM, 4096)
    with pytest.raises(ValueError, match="simulated HBM holds"):
        rtljob.run_job(GEOM, L.HBMImage(GEOM, 2 << 20), {}, mem_bytes=1 << 20)
    with pytest.raises(ValueError, match="channels"):
        rtljob.run_job(geometry("small"), image, {})


class _Mem:
    def __init__(self, data):
        self.data = data

    def read_channel(self, ch, base, n):
        return self.data[ch, base : base + n].tobytes()
