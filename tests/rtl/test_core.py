# amaranth: UnusedElaboratable=no
"""The whole kernel end to end (rtl/core.py ``tandem_decode_core``) under cocotb: compiled GPT-2
test models in AXI memory models, driven through tandem/driver.KernelDriver, bit-exact against the
ISA simulator (core_tb.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tandem.geometry import geometry
from tandem.rtl.axi import vitis_ports
from tandem.rtl.core import TOPLEVEL, DecodeCore
from tandem.sim import runner

pytestmark = pytest.mark.core

TB = Path(__file__).with_name("core_tb.py")


def _sims(*, icarus_default=False):
    """Verilator in the default suite for every case; Icarus for the one case with
    ``icarus_default`` (test_tiny_prompt_1: 14,491 cycles in about 90 s with its build), so
    both simulators stay covered. The other Icarus cases are marked ``slow`` (8 stalled tokens
    took Icarus over 10 minutes at load 4-6; they pass there). ``SIM`` picks one simulator."""
    return [
        s if s == "verilator" or icarus_default else pytest.param(s, marks=pytest.mark.slow)
        for s in runner.simulators()
    ]


@functools.cache
def _design():
    core = DecodeCore(geometry("tiny"))
    return core, vitis_ports(core)


def run_cases(sim, cases, name="core-tiny"):
    core, ports = _design()
    runner.run(
        core,
        TB,
        name=name,
        sim=sim,
        ports=ports,
        toplevel=TOPLEVEL,
        params={"cases": cases},
        extra_env={"PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("sim", _sims(icarus_default=True))
def test_tiny_prompt_1(sim):
    run_cases(sim, [{"cfg": "test-tiny", "prompt": [7], "n_new": 3, "max_cycles": 60_000}])


@pytest.mark.parametrize("sim", _sims())
def test_errors_then_clean_run(sim):
    """An illegal opcode, then an hbm_bytes that only covers the control area: status bits and
    ERROR_PC as IsaSim, KernelStatus.check() raises; then a clean run on a fresh image, with no
    reset in between."""
    run_cases(
        sim,
        [
            {"cfg": "test-tiny", "prompt": [1, 2], "n_new": 3, "error": "opcode"},
            {"cfg": "test-tiny", "prompt": [1, 2], "n_new": 3, "error": "hbm_bytes"},
            {"cfg": "test-tiny", "prompt": [5], "n_new": 2},
        ],
    )


@pytest.mark.parametrize("sim", _sims())
def test_matvec_chain(sim):
    """MATVECs back to back that read earlier ones' results (x rows, bias rows) and ones that
    do not (the MPU feeder overlaps those), without and with AXI stalls: every byte as IsaSim."""
    chain = {"cfg": "test-tiny", "prompt": [1], "n_new": 1, "program": "chain"}
    run_cases(sim, [chain, {**chain, "stall": 0.3}])


@pytest.mark.parametrize("sim", _sims())
def test_odd_8_tokens_with_stalls(sim):
    """The second model (3 heads, vocab 97), 8 generated tokens, random pauses on every AXI
    channel of all four memories and the control port."""
    run_cases(sim, [{"cfg": "test-odd", "prompt": [3, 14, 15], "n_new": 8, "stall": 0.3}])


@pytest.mark.parametrize("sim", _sims())
def test_context_full(sim):
    """A prompt that reaches the context limit: the tokens that fit, then CONTEXT_FULL."""
    n_ctx = 48  # test-odd
    prompt = [(5 + 7 * i) % 97 for i in range(n_ctx - 2)]
    run_cases(sim, [{"cfg": "test-odd", "prompt": prompt, "n_new": 5, "max_cycles": 20_000_000}])
