# amaranth: UnusedElaboratable=no
"""The whole kernel end to end (rtl/core.py ``tandem_decode_core``) under cocotb: compiled GPT-2
test models in AXI memory models, driven through tandem/driver.KernelDriver, bit-exact against the
ISA simulator (core_tb.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tandem.floorplan import floorplan
from tandem.geometry import geometry
from tandem.rtl.axi import vitis_ports
from tandem.rtl.controller import MAX_PENDING
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
def _verilog(plan: str = "u55c", dma_queue: int = MAX_PENDING) -> str:
    """The tiny core's Verilog, converted once per process (about 30 s; the runner takes the
    text as is and keys its build cache on it). By default with the u55c floorplan, so every
    stream between blocks in different SLRs has its stages and the reset its tree, as the u55c
    build; ``"flat"`` is the core with no stages. ``dma_queue``: ``DecodeCore``'s."""
    core = DecodeCore(geometry("tiny"), floorplan=floorplan(plan), dma_queue=dma_queue)
    return runner.to_verilog(core, toplevel=TOPLEVEL, ports=vitis_ports(core))


def run_cases(sim, cases, name="core-tiny", plan="u55c", dma_queue=MAX_PENDING):
    if plan != "u55c":
        name = f"{name}-{plan}"
    if dma_queue != MAX_PENDING:
        name = f"{name}-q{dma_queue}"
    runner.run(
        _verilog(plan, dma_queue),
        TB,
        name=name,
        sim=sim,
        toplevel=TOPLEVEL,
        params={"cases": cases},
        extra_env={"PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("sim", _sims(icarus_default=True))
def test_tiny_prompt_1(sim):
    run_cases(sim, [{"cfg": "test-tiny", "prompt": [7], "n_new": 3, "max_cycles": 60_000}])


def _clean(token, n_new=1):
    """A short clean run (test-tiny, one prompt token) to follow an error case."""
    return {"cfg": "test-tiny", "prompt": [token], "n_new": n_new, "want": "ok"}


def _then_clean(cases):
    """Each case followed by a clean run with a different prompt token."""
    out = []
    for k, case in enumerate(cases):
        out += [case, _clean(3 + 11 * k)]
    return out


@pytest.mark.parametrize("sim", _sims())
def test_errors_then_clean_run(sim):
    """Instruction errors, each followed by a clean run with no reset in between: an illegal
    opcode, a LOADV, a MATVEC and a STOREV with a vector operand one row past the vector
    buffer, a VADD whose dst partly overlaps an operand (all at instruction step + 5; the VADD
    also over the first VEXP, with the next MATVEC's weights already prefetched), and an
    hbm_bytes that only covers the control area (the fetch check). Status registers, ERROR_PC
    and the status record equal IsaSim's, KernelStatus.check() raises."""
    tiny = {"cfg": "test-tiny", "prompt": [1, 2], "n_new": 3}
    run_cases(
        sim,
        _then_clean(
            [
                {**tiny, "error": "opcode", "want": "ILLEGAL_INSTRUCTION"},
                {**tiny, "error": "vbuf_loadv", "want": "VBUF_RANGE"},
                {**tiny, "error": "vbuf_matvec", "want": "VBUF_RANGE"},
                {**tiny, "error": "vbuf_storev", "want": "VBUF_RANGE"},
                {**tiny, "error": "vbuf_overlap", "want": "VBUF_RANGE"},
                {**tiny, "error": "vbuf_overlap", "error_at": "VEXP", "want": "VBUF_RANGE"},
                {**tiny, "error": "hbm_bytes", "want": "HBM_RANGE"},
            ]
        ),
    )


@pytest.mark.parametrize("sim", _sims())
def test_bad_arguments_then_clean_run(sim):
    """Kernel arguments the program or the DMA refuses, each followed by a clean run:
    start_pos >= prompt_len and prompt_len 0 (HALT BAD_ARGS), a prompt token past the
    vocabulary (BAD_ARGS after the LDW), n_new 0 (a clean HALT with no token), hbm_bytes ending
    before the weights (HBM_RANGE at the first LOADV, a DMA read) and before the KV cache
    (HBM_RANGE at the first STROW, a DMA write), and start_pos at the last position of a full
    prompt (one token, then CONTEXT_FULL): all as IsaSim."""
    tiny = {"cfg": "test-tiny", "prompt": [1], "n_new": 2}
    full = [(5 + 7 * i) % 256 for i in range(64)]  # test-tiny: n_ctx 64
    run_cases(
        sim,
        _then_clean(
            [
                {**tiny, "args": {"start_pos": 1}, "want": "PROGRAM_ERROR:BAD_ARGS"},
                {**tiny, "args": {"prompt_len": 0}, "want": "PROGRAM_ERROR:BAD_ARGS"},
                {**tiny, "prompt": [999], "want": "PROGRAM_ERROR:BAD_ARGS"},
                {**tiny, "n_new": 0, "want": "ok"},
                {**tiny, "args": {"hbm_bytes": "wte"}, "want": "HBM_RANGE"},
                {**tiny, "args": {"hbm_bytes": "h.0.k"}, "want": "HBM_RANGE"},
                {**tiny, "prompt": full, "args": {"start_pos": 63},
                 "want": "PROGRAM_ERROR:CONTEXT_FULL"},
            ]
        ),
    )  # fmt: skip


_HANG = {"cfg": "test-tiny", "prompt": [3], "n_new": 2, "want": "WATCHDOG"}
_HANG["args"] = {"watchdog": 400}  # cycles without an instruction issued


@pytest.mark.parametrize("sim", _sims())
def test_watchdog_then_clean_run(sim):
    """A memory that never answers, with watchdog = 400 cycles: channel 0 holds the first LDW's
    read, so the instruction after it waits for its register. The core reports done and raises
    its interrupt with STATUS = WATCHDOG exactly, ERROR_PC the waiting instruction, TOKENS and
    the status record as IsaSim with the instruction budget ending there; then the held read
    is released and a clean run follows. Then channel 1 holds the embedding LOADV's rows (the
    core drains with LOADV rows due, which arrive after done): the same, with ERROR_PC between
    that LOADV and the first vector op, and a clean run."""
    run_cases(sim, [{**_HANG, "hang": "ldw"}, _clean(9), {**_HANG, "hang": "loadv"}, _clean(4)])


@pytest.mark.parametrize("sim", _sims())
def test_watchdog_in_fetch_then_clean_run(sim):
    """The program fetch held on channel 1: WATCHDOG at pc 0 as IsaSim with no instruction
    budget; then the held reads are released (after done: the old fetch's rows are still due)
    and the MATVEC chain program runs (a different program, so a stale program beat would
    show: the new fetch must drop the old fetch's rows), with a short cycle budget."""
    chain = {"cfg": "test-tiny", "prompt": [1], "n_new": 1, "program": "chain", "want": "ok"}
    run_cases(sim, [{**_HANG, "hang": "fetch"}, {**chain, "max_cycles": 20_000}])


@pytest.mark.parametrize("sim", _sims())
def test_axi_error_pc(sim):
    """DECERR on the embedding LOADV (IsaSim: AXI_ERROR at that LOADV), ERROR_PC compared."""
    fault = {"region": "wte", "resp": "DECERR"}
    run_cases(sim, [{"cfg": "test-tiny", "prompt": [3], "n_new": 2, "fault": fault}])


@pytest.mark.parametrize("sim", _sims())
def test_axi_errors_then_clean_run(sim):
    """SLVERR and DECERR from every HBM memory for each beat from a layout region on, IsaSim on
    the image cut there (its AXI_ERROR: an access inside hbm_bytes past the buffer): from wte
    the first error is a read (the embedding LOADV), from h.0.k a write (the first K STROW),
    ERROR_PC that instruction's as IsaSim. Each followed by a clean run."""
    tiny = {"cfg": "test-tiny", "prompt": [3], "n_new": 2, "want": "AXI_ERROR"}
    run_cases(
        sim,
        _then_clean(
            [
                {**tiny, "fault": {"region": region, "resp": resp}}
                for region in ("wte", "h.0.k")
                for resp in ("SLVERR", "DECERR")
            ]
        ),
    )


@pytest.mark.parametrize("sim", _sims())
def test_status_write_held_then_clean_run(sim):
    """Channel 0's memory never answers the status record's write (held until after done),
    watchdog = 2000 cycles: the core gives up waiting for the write response and reports done
    with STATUS = WATCHDOG exactly (the run itself is clean: IsaSim ok), ERROR_PC the HALT's pc,
    TOKENS as IsaSim; once released the record written is IsaSim's (status 0, sampled before
    the watchdog fired). Then a clean run with no reset: the held write's late response must
    not disturb it."""
    held = {"cfg": "test-tiny", "prompt": [3], "n_new": 1, "want": "ok", "hold_status": True}
    run_cases(sim, [{**held, "args": {"watchdog": 2000}}, _clean(6)])


@pytest.mark.parametrize("sim", _sims())
def test_matvec_chain(sim):
    """MATVECs back to back that read earlier ones' results (x rows, bias rows) and ones that
    do not (the MPU feeder overlaps those), without and with AXI stalls: every byte as IsaSim."""
    chain = {"cfg": "test-tiny", "prompt": [1], "n_new": 1, "program": "chain"}
    run_cases(sim, [chain, {**chain, "stall": 0.3}])


PENDING = {"cfg": "test-tiny", "prompt": [1], "n_new": 1, "program": "pending"}


@pytest.mark.parametrize("sim", _sims())
def test_pending_reads_fill_the_dma(sim):
    """MAX_PENDING MATVECs' weight reads with the DMA and one more from the look-ahead while a
    vector op holds their MPU commands (core_tb.pending_reads): the commands go when it ends,
    without and with AXI stalls, every byte as IsaSim. The DMA as the core builds it holds
    all nine reads; the next test keeps some in the read relays."""
    run_cases(sim, [PENDING, {**PENDING, "stall": 0.3}])


@pytest.mark.slow
@pytest.mark.parametrize("sim", ["verilator"])
def test_pending_reads_wait_in_the_relays(sim):
    """The same program on a core whose DMA plans 4 reads ahead with 4-deep run FIFOs (a build
    of its own, hence the slow tier): some weight reads wait in the read relays while the MPU
    commands must go. Issue 17's deadlock: with busy.loadv counting those reads as LOADVs in
    flight, this hung at pc 11 (the VADD; seen at 093c9af with the old rule, 300,000 cycles
    without progress); busy.loadv counts only ROWS reads (Relay.busy_mark)."""
    run_cases(sim, [PENDING, {**PENDING, "stall": 0.3}], dma_queue=4)


@pytest.mark.parametrize("sim", _sims())
def test_odd_8_tokens_with_stalls(sim):
    """The second model (3 heads, vocab 97), 8 generated tokens, random pauses on every AXI
    channel of all four memories and the control port."""
    run_cases(sim, [{"cfg": "test-odd", "prompt": [3, 14, 15], "n_new": 8, "stall": 0.3}])


@pytest.mark.parametrize("sim", _sims())
def test_context_full(sim):
    """A prompt that reaches the context limit: the tokens that fit, then CONTEXT_FULL; then a
    clean run in the same simulation."""
    n_ctx = 48  # test-odd
    prompt = [(5 + 7 * i) % 97 for i in range(n_ctx - 2)]
    full = {"cfg": "test-odd", "prompt": prompt, "n_new": 5, "max_cycles": 20_000_000}
    run_cases(sim, [{**full, "want": "PROGRAM_ERROR:CONTEXT_FULL"}, _clean(5, n_new=2)])
