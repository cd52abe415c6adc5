"""cocotb testbench for the whole kernel, rtl/core.py ``tandem_decode_core``, run from
test_core.py.

One cocotbext-axi ``AxiRam`` per HBM port holds that channel's image (compiled program, weights,
prompt); the host side is an ``AxiLiteMaster`` on ``s_axi_control`` driven only through
:class:`tandem.driver.KernelDriver`. Every case compares the whole memory of every channel
with :class:`tandem.golden.isasim.IsaSim` run on the same image and arguments, bit for bit (output
tokens, KV regions, everything), and the status record and status registers field by field
(cycles aside).

Parameters (``tb_params()``): ``cases``, a list of dicts run one after another in one
simulation without a reset in between (so a case after an error case checks the core recovers):

``cfg``          model preset (``test-tiny``, ``test-odd``)
``prompt``       prompt token ids (ids past the vocabulary are allowed: the program stops with
                 ``BAD_ARGS``)
``n_new``        tokens to generate
``args``         scalar kernel arguments replacing the compiled program's (``start_pos``,
                 ``prompt_len``, ``n_new``, ``hbm_bytes``, ``watchdog``); a string value for
                 ``hbm_bytes`` names a layout region, whose base it becomes
``stall``        probability of a pause cycle on every AXI channel of the memories and the
                 control port (0: none)
``program``      ``"chain"``: :func:`matvec_chain` instead of the compiled program
``error``        an instruction written over the program: ``"opcode"`` (an all-zero word),
                 ``"vbuf_loadv"``, ``"vbuf_matvec"``, ``"vbuf_storev"`` (an operand past the
                 vector buffer) or ``"vbuf_overlap"`` (a VADD whose dst partly overlaps an
                 operand), all at instruction ``step + 5`` (or, with ``error_at`` naming an
                 opcode, over the first instruction of that opcode: ``"VEXP"`` is inside the
                 softmax, after the look-ahead has sent the weights of the next MATVEC); or
                 ``"hbm_bytes"`` (hbm_bytes just covering the control area)
``fault``        ``{"region": name, "resp": "SLVERR" | "DECERR"}``: every memory answers ``resp``
                 to any beat at or past that layout region's base, and IsaSim runs on the image
                 cut there (its ``AXI_ERROR``: an access inside ``hbm_bytes`` past the buffer)
``hang``         a memory holds some reads (:data:`HANGS`): ``"fetch"``, the program area on
                 channel 1, so the program fetch never ends; ``"ldw"``, the prompt area on
                 channel 0, so the first ``LDW`` never returns; ``"loadv"``, ``wte`` on channel
                 1, so the embedding LOADV's rows never arrive (ERROR_PC may be anywhere from
                 the instruction after that LOADV to the first vector op: how many LOADVs the
                 DMA queues is not architectural). Use with a small ``args.watchdog``. The
                 expected outcome is IsaSim's with the instruction budget (``max_steps``, its
                 stand-in for the watchdog) that stops it where the core must stop
                 (:func:`budget_run`); the held reads are released after ``done``, before the
                 next case
``hold_status``  ``True``: channel 0's memory holds the write of the status record (no write
                 response) until released after ``done``: the core must give up on it after
                 ``args.watchdog`` cycles and report done with STATUS = IsaSim's status |
                 ``WATCHDOG``, ERROR_PC, ERROR_CODE and TOKENS as IsaSim; once released, the
                 record written is IsaSim's (it was sampled before the watchdog fired)
``want``         the outcome the case must provoke, checked on IsaSim's result before the RTL is
                 compared with it: ``"ok"``, or the status bit names joined by ``|``, with
                 ``:HALTCODE`` for ``PROGRAM_ERROR`` (e.g. ``"PROGRAM_ERROR:BAD_ARGS"``)
``max_cycles``   cycle budget for the run (a hang fails the case)

After every case: ``ap_done`` seen within ``max_cycles``, the interrupt (``GIER``/``IER.done``
enabled at reset) high with ``ISR.done`` set, cleared by writing ``ISR``; the status registers,
the status record (cycles aside) and every byte of every channel equal to IsaSim.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Event, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam, AxiResp

from tandem import isa
from tandem import layout as L
from tandem.checkpoint import lively_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.driver import KernelDriver, KernelError
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.regmap import GIER, IER, ISR, HaltCode, Status, status_names
from tandem.sim import streams
from tandem.sim.runner import tb_params

GEOM = geometry("tiny")
POLL_CYCLES = 200
BASE_STEP = 0x10000  # channel ch's buffer starts at (ch + 1) * BASE_STEP in its memory


@functools.cache
def compiled(name):
    cfg = preset(name)
    return compile_model(cfg, lively_weights(cfg), GEOM)


class _Fault(Exception):
    """An access :class:`TestRam` answers with an error response."""


class TestRam(AxiRam):
    """An ``AxiRam`` that can answer SLVERR or DECERR, and hold reads or writes until released.

    ``fault_from``: every read or written beat reaching this address answers ``fault_resp``
    (nothing is written, reads return zeros); ``hold = (lo, hi)``: a read beat touching
    ``[lo, hi)`` is not answered until ``released`` is set (the read channel serves bursts in
    order, so every later read waits too); ``hold_writes = (lo, hi)``: the same for written
    beats (the burst's write response waits). Addresses are the memory's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault_from: int | None = None
        self.fault_resp = AxiResp.SLVERR
        self.faults = 0
        self.hold: tuple[int, int] | None = None
        self.released = Event()
        self.held = 0
        self.hold_writes: tuple[int, int] | None = None
        self.held_writes = 0
        self.read_if._read = self._read_beat
        self.write_if._write = self._write_beat
        # cocotbext-axi answers SLVERR when _read/_write raise; map that to fault_resp
        for chan, field in ((self.read_if.r_channel, "rresp"), (self.write_if.b_channel, "bresp")):
            chan.send = self._mapped(chan.send, field)

    def _mapped(self, send, field):
        async def mapped_send(t):
            if getattr(t, field) == AxiResp.SLVERR:
                setattr(t, field, self.fault_resp)
            await send(t)

        return mapped_send

    def _faulty(self, address: int, length: int) -> bool:
        if self.fault_from is not None and address + length > self.fault_from:
            self.faults += 1
            return True
        return False

    async def _read_beat(self, address, length):
        if self.hold is not None and address < self.hold[1] and self.hold[0] < address + length:
            self.held += 1
            await self.released.wait()
        if self._faulty(address, length):
            raise _Fault(f"read {address:#x}")
        return self.read(address % self.size, length)

    async def _write_beat(self, address, data):
        hw = self.hold_writes
        if hw is not None and address < hw[1] and hw[0] < address + len(data):
            self.held_writes += 1
            await self.released.wait()
        if self._faulty(address, len(data)):
            raise _Fault(f"write {address:#x}")
        self.write(address % self.size, data)

    def clear(self) -> None:
        self.fault_from, self.fault_resp, self.faults = None, AxiResp.SLVERR, 0
        self.hold, self.held = None, 0
        self.hold_writes, self.held_writes = None, 0
        self.released = Event()


class CoreTB:
    def __init__(self, dut):
        self.dut = dut
        self.clk = dut.ap_clk
        self.log = dut._log
        Clock(self.clk, 4, unit="ns").start()
        self.cycles = 0
        cocotb.start_soon(self._count())
        self.host = AxiLiteMaster(
            AxiLiteBus.from_prefix(dut, "s_axi_control"),
            self.clk,
            dut.ap_rst_n,
            reset_active_level=False,
        )
        size = max(compiled(n).image.nbytes for n in ("test-tiny", "test-odd"))
        self.rams = [
            TestRam(
                AxiBus.from_prefix(dut, f"m_axi_hbm{ch}"),
                self.clk,
                dut.ap_rst_n,
                reset_active_level=False,
                size=self.base(ch) + size + 8192,
            )
            for ch in range(GEOM.channels)
        ]

        async def read32(offset):
            return await self.host.read_dword(offset)

        async def write32(offset, value):
            await self.host.write_dword(offset, value)

        self.driver = KernelDriver(GEOM.channels, read32, write32)

    async def _count(self):
        while True:
            await RisingEdge(self.clk)
            self.cycles += 1

    def pc(self) -> str:
        try:
            return str(int(self.dut.ctrl.pc.value))
        except Exception:  # internal names differ between simulators
            return "?"

    DEBUG = (
        "mpu_active",
        "store_active",
        "cmd_sent",
        "rd_phase",
        "rd_i",
        "rd_wait",
        "held",
        "res_i",
        "st_cmd_sent",
        "st_i",
        "st_rows",
        "st_wait",
        "st_held",
        "loadv_rows",
        "fetching",
        "fetch_rows_left",
        "vpu_busy",
        "busy",
        "read_idle",
        "write_idle",
        "mpu__valid",
        "mpu__ready",
        "x__valid",
        "x__ready",
        "bias__valid",
        "bias__ready",
        "result__valid",
        "argmax__valid",
        "store__valid",
        "store__ready",
        "store_data__valid",
        "store_data__ready",
        "dma_store__valid",
        "rows__valid",
        "rows__ready",
    )

    def dump_state(self) -> None:
        """Top-level feeder state, for a run that did not finish."""
        vals = []
        for name in self.DEBUG:
            try:
                vals.append(f"{name}={int(getattr(self.dut, name).value):#x}")
            except Exception:  # not visible on this simulator
                vals.append(f"{name}=?")
        self.log.error("state at timeout: pc %s %s", self.pc(), " ".join(vals))

    @staticmethod
    def base(ch: int) -> int:
        return (ch + 1) * BASE_STEP

    def set_stalls(self, p: float, seed: int) -> None:
        chans = []
        for ram in self.rams:
            w, r = ram.write_if, ram.read_if
            chans += [w.aw_channel, w.w_channel, w.b_channel, r.ar_channel, r.r_channel]
        h = self.host
        chans += [h.write_if.aw_channel, h.write_if.w_channel, h.write_if.b_channel]
        chans += [h.read_if.ar_channel, h.read_if.r_channel]
        for k, chan in enumerate(chans):
            if p:
                chan.set_pause_generator(streams.bernoulli(p, seed * 1000 + k))
            else:
                # killing the generator leaves the channel as it was: paused, if it was then
                chan.clear_pause_generator()
                chan.pause = False

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.clk, 8)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.clk, 2)

    async def enable_interrupt(self):
        await self.host.write_dword(IER.offset, IER.mask("done"))
        await self.host.write_dword(GIER.offset, GIER.mask("enable"))

    async def check_interrupt(self):
        """The interrupt is up after done with ISR.done set; writing ISR.done clears both."""
        assert int(self.dut.interrupt.value) == 1, "no interrupt after done"
        assert await self.host.read_dword(ISR.offset) == ISR.mask("done")
        await self.host.write_dword(ISR.offset, ISR.mask("done"))
        assert await self.host.read_dword(ISR.offset) == 0
        await ClockCycles(self.clk, 2)
        assert int(self.dut.interrupt.value) == 0, "interrupt still up after clearing ISR"

    def load(self, image: L.HBMImage) -> None:
        for ch, ram in enumerate(self.rams):
            ram.write(self.base(ch), image.data[ch].tobytes())

    def dump(self, nbytes: int) -> np.ndarray:
        return np.stack(
            [
                np.frombuffer(ram.read(self.base(ch), nbytes), np.uint8)
                for ch, ram in enumerate(self.rams)
            ]
        )

    async def run_case(self, case: dict, index: int):
        c = compiled(case["cfg"])
        prompt, n_new = list(case["prompt"]), int(case["n_new"])
        image = L.HBMImage(GEOM, c.image.nbytes)
        image.data[:] = c.image.data
        c.write_prompt(image, prompt)
        args = c.args(len(prompt), n_new)
        for name, value in case.get("args", {}).items():
            if name not in args:
                raise ValueError(f"unknown argument {name!r}")
            args[name] = c.layout[value].base if isinstance(value, str) else int(value)
        if case.get("program") is not None:
            program = isa.encode_program(PROGRAMS[case["program"]](c))
            image.write_channel(0, L.PROGRAM_BASE, program)
        error = case.get("error")
        if error == "hbm_bytes":
            args["hbm_bytes"] = c.layout["wte"].base
        elif error is not None:
            at = case.get("error_at")
            pc = c.labels["step"] + 5 if at is None else first_op(image, [isa.Op[at]])
            word = bad_instruction(c, error)
            image.write_channel(0, L.PROGRAM_BASE + pc * isa.WORD_BYTES, word)
        # reference: IsaSim on a copy (cut at a faulting region), budget for a hang
        fault = case.get("fault")
        cut = c.layout[fault["region"]].base if fault else image.nbytes
        ref = L.HBMImage(GEOM, cut)
        ref.data[:] = image.data[:, :cut]
        hang = case.get("hang")
        if hang is not None and hang not in HANGS:
            raise ValueError(f"unknown hang {hang!r}")
        t0 = time.monotonic()
        if hang is None:
            want = IsaSim(GEOM, ref).run(args)
        else:
            want = budget_run(ref, args, HANGS[hang][2](image))
        t_ref = time.monotonic() - t0
        expect_outcome(want, case.get("want"))
        # the memory: what IsaSim leaves, and past a cut the image unchanged
        expect = image.data.copy()
        expect[:, :cut] = ref.data
        # the kernel
        self.load(image)
        for ch, ram in enumerate(self.rams):
            if fault:
                ram.fault_from = self.base(ch) + cut
                ram.fault_resp = AxiResp[fault["resp"]]
        if hang is not None:
            ch, region = HANGS[hang][:2]  # hold the reads of `region` on channel `ch`
            lo, hi = (
                (L.PROGRAM_BASE, L.PROGRAM_BASE + GEOM.imem_words * isa.WORD_BYTES)
                if region == "program"
                else (c.layout[region].base, c.layout[region].end)
            )
            self.rams[ch].hold = (self.base(ch) + lo, self.base(ch) + hi)
        hold_status = bool(case.get("hold_status"))
        srec = c.layout["status"]
        if hold_status:
            self.rams[0].hold_writes = (self.base(0) + srec.base, self.base(0) + srec.end)
        self.set_stalls(float(case.get("stall", 0)), index + 1)
        max_cycles = int(case.get("max_cycles", 300_000))

        polls = 0

        async def poll():
            nonlocal polls
            polls += 1
            if polls % 100 == 0:
                self.log.info(
                    "case %d: %d cycles, %.0f s, pc %s",
                    index, self.cycles - start, time.monotonic() - t0, self.pc(),
                )  # fmt: skip
            await ClockCycles(self.clk, POLL_CYCLES)

        start = self.cycles
        t0 = time.monotonic()
        try:
            st = await self.driver.run(
                args,
                {ch: self.base(ch) for ch in range(GEOM.channels)},
                poll=poll,
                max_polls=max_cycles // POLL_CYCLES + 1,
            )
        except TimeoutError:
            self.dump_state()
            raise
        took = self.cycles - start
        wall = time.monotonic() - t0
        self.log.info(
            "case %d %s prompt %d n_new %d stall %s error %s fault %s hang %s: %d cycles, "
            "%.1f s (%.0f cycles/s), IsaSim %.2f s; status %#x pc %d code %d tokens %d",
            index, case["cfg"], len(prompt), n_new, case.get("stall", 0), error, fault, hang,
            took, wall, took / max(wall, 1e-9), t_ref, st.status, st.error_pc, st.error_code,
            st.tokens,
        )  # fmt: skip
        await self.check_interrupt()
        self.set_stalls(0, 0)
        if hang is not None:
            # the core reported done with the reads still held; now let them finish
            held = [ram.held for ram in self.rams]
            assert any(held), f"hang {hang!r}: no read was held"
            for ram in self.rams:
                ram.released.set()
            await ClockCycles(self.clk, 200)
            wd = args["watchdog"]
            # the watchdog fires after `watchdog` cycles without progress, then bounds the drain
            assert st.cycles >= 2 * wd, (st, wd)
        if hold_status:
            # the core gave up on the record's write response; now let the write finish
            assert self.rams[0].held_writes, "hold_status: the status record was not held"
            self.rams[0].released.set()
            await ClockCycles(self.clk, 200)
        if fault:
            assert sum(ram.faults for ram in self.rams), "no access reached the faulting range"
        for ram in self.rams:
            ram.clear()
        await ClockCycles(self.clk, 4)
        got = self.dump(image.nbytes)

        # status registers and the host helper
        lowest = HANGS[hang][3] if hang is not None else None
        if lowest is not None:
            # stopped where the held read backs up to: between the lowest pc and IsaSim's
            assert lowest(image) <= st.error_pc <= want.pc, (st, want.pc)
            want = replace(want, pc=st.error_pc)
        want_status = int(want.status) | (Status.WATCHDOG if hold_status else 0)
        assert (st.status, st.error_pc, st.error_code, st.tokens) == (
            want_status,
            want.pc,
            want.halt_code,
            want.tokens,
        ), (st, want)
        if want_status:
            try:
                st.check()
            except KernelError as err:
                self.log.info("KernelStatus.check(): %s", err)
            else:
                raise AssertionError("KernelStatus.check() did not raise on an error status")
        else:
            st.check()
        # status record, cycles aside
        rec = L.StatusRecord.unpack(got[0, srec.base : srec.base + srec.nbytes])
        assert rec.cycles > 0 or want.status & Status.HBM_RANGE, rec
        assert replace(rec, cycles=0) == want.record(), (rec, want.record())
        # tokens, then every byte outside the status record (KV regions, scratch, everything)
        out = c.read_output(_Mem(got), want.tokens)
        assert out == c.read_output(ref, want.tokens), (out, c.read_output(ref, want.tokens))
        mask = np.ones(image.nbytes, bool)
        mask[srec.base : srec.base + srec.nbytes] = False
        for ch in range(GEOM.channels):
            diff = np.nonzero((got[ch] != expect[ch]) & mask)[0]
            if diff.size:
                regions = sorted(
                    {
                        r.name
                        for r in c.layout.regions.values()
                        for b in diff[:2000]
                        if r.base <= b < r.end
                    }
                    if hasattr(c.layout, "regions")
                    else []
                )
                raise AssertionError(
                    f"channel {ch}: {diff.size} bytes differ from IsaSim, first at {diff[0]:#x} "
                    f"(got {got[ch, diff[0]]:#x}, want {expect[ch, diff[0]]:#x}); regions "
                    f"{regions}"
                )
        self.log.info("case %d: %s, tokens %s match IsaSim", index, want.message, out)
        return took


def bad_instruction(c, error: str) -> bytes:
    """The 16-byte word an ``error`` case writes over instruction ``step + 5``."""
    Op, vb = isa.Op, GEOM.vbuf_elems
    wte, mlp = c.layout["wte"], c.layout["h.0.mlp.c_fc.weight"]
    if error == "opcode":
        return bytes(isa.WORD_BYTES)
    instr = {
        # 128 elements from the last row: one row past the buffer
        "vbuf_loadv": isa.make(Op.LOADV, dst=vb - 64, len=128, line=wte.line, stride=1),
        "vbuf_storev": isa.make(Op.STOREV, src=vb - 64, len=128, line=c.layout["h.1.k"].line),
        # a result of `rows` elements from the last row
        "vbuf_matvec": isa.make(
            Op.MATVEC, dst=vb - 64, src=0, line=mlp.line, rows=mlp.rows, cols=mlp.cols
        ),
        # dst [64, 192) against a [0, 128): same length, different start
        "vbuf_overlap": isa.make(Op.VADD, dst=64, a=0, b=256, len=128),
    }.get(error)
    if instr is None:
        raise ValueError(f"unknown error case {error!r}")
    return isa.encode(instr).to_bytes(isa.WORD_BYTES, "little")


def first_op(image, ops, start: int = 0) -> int:
    """Index of the first instruction at or after ``start`` whose opcode is in ``ops``, in the
    program in ``image``."""
    words = image.read_channel(0, L.PROGRAM_BASE, GEOM.imem_words * isa.WORD_BYTES)
    codes = {int(op) for op in ops}
    for pc in range(start, GEOM.imem_words):
        if words[pc * isa.WORD_BYTES] in codes:
            return pc
    raise ValueError(f"no {ops} in the program after {start}")


_VPU_OPS = [op for op, unit in isa.UNITS.items() if unit is isa.Unit.VPU]

HANGS = {
    # hang: (channel, region whose reads that channel's memory holds, the pc the core must
    # stop at with WATCHDOG given the program image, None or the lowest pc it may stop at)
    "fetch": (1, "program", lambda image: 0, None),  # the program fetch reads every channel
    # LDW blocks the next instruction until its register is written
    "ldw": (0, "prompt", lambda image: first_op(image, [isa.Op.LDW]) + 1, None),
    # LOADVs follow each other and the first vector op waits for their rows, but a LOADV
    # also waits while the DMA's read queue is full: the core stops after the held LOADV, at
    # the latest at the first vector op (at the tiny geometry, 6 LOADVs in)
    "loadv": (
        1,
        "wte",
        lambda image: first_op(image, _VPU_OPS, first_op(image, [isa.Op.LOADV])),
        lambda image: first_op(image, [isa.Op.LOADV]) + 1,
    ),
}
"""The ``hang`` cases."""


def budget_run(ref, args, pc: int):
    """IsaSim on ``ref`` with the instruction budget (its stand-in for the watchdog) that makes
    it stop at ``pc``: WATCHDOG there, with the memory as the instructions before left it."""
    for steps in range(GEOM.imem_words):
        trial = L.HBMImage(GEOM, ref.nbytes)
        trial.data[:] = ref.data
        result = IsaSim(GEOM, trial, max_steps=steps).run(args)
        if result.pc == pc and result.status == Status.WATCHDOG:
            ref.data[:] = trial.data
            return result
        if result.status != Status.WATCHDOG:
            break
    raise AssertionError(f"IsaSim never stops at pc {pc} with an instruction budget")


def expect_outcome(result, want: str | None) -> None:
    """Check that IsaSim's ``result`` is the outcome a case is meant to provoke."""
    if want is None:
        return
    names, _, code = want.partition(":")
    got = "|".join(status_names(result.status)) or "ok"
    got_code = HaltCode(result.halt_code).name if result.halt_code else ""
    assert (got, got_code) == (names, code), f"IsaSim gives {got}:{got_code}, not {want}"


def matvec_chain(c) -> list:
    """A hand-written program of MATVECs back to back, each reading what an earlier one wrote
    (x rows, bias rows) or independent of the running one, so the core's MPU feeder must both
    overlap them and hold them back; the results are stored to HBM for the byte compare."""
    Op, F = isa.Op, isa.MatFlag
    lay = c.layout
    X, Y, Z, V, A = 0, 64, 320, 384, 448  # VBUF: x [64], y [256], z [64], v [64], a [256]

    def mv(dst, src, name, flags=0):
        r = lay[name]
        return isa.make(Op.MATVEC, dst=dst, src=src, line=r.line, rows=r.rows, cols=r.cols,
                        flags=flags)  # fmt: skip

    scratch = lay["h.1.k"].line
    return [
        isa.make(Op.LOADV, dst=X, len=64, line=lay["wte"].line, stride=lay["wte"].row_bytes // 64),
        mv(Y, X, "h.0.mlp.c_fc.weight"),  # y = W1 x
        mv(Z, Y, "h.0.mlp.c_proj.weight"),  # z = W2 y: its x rows are y's results
        mv(V, Y, "h.0.attn.c_proj.weight"),  # v = W3 y[:128]: independent of the running one
        mv(V, Z, "h.0.attn.c_proj.weight", F.BIAS),  # v = W3 z + v: bias rows and x still due
        mv(A, V, "h.0.mlp.c_fc.weight"),  # a = W1 v
        mv(X, A, "h.0.mlp.c_proj.weight"),  # x = W2 a: overwrites its own first input
        isa.make(Op.STOREV, src=X, len=64 + 256 + 64 + 64 + 256, line=scratch),
        isa.make(Op.HALT),
    ]


def pending_reads(c) -> list:
    """A hand-written program that fills every read queue on the way to the DMA: a long vector
    op holds the MPU commands back while ``MAX_PENDING`` MATVECs of 128 tiles each (more than
    the DMA's read FIFOs hold together) send their weight reads, then a vector op makes Exec
    wait while the look-ahead sends one more MATVEC's read, which the full DMA leaves in the
    read relays. The MPU commands must still go when the long op ends (a weight read in the
    relays is not a LOADV in flight: rtl/core.py, ``busy.loadv``), or the core hangs until its
    watchdog. The weights are whatever the first lines of the image hold."""
    from tandem.rtl.controller import MAX_PENDING

    Op = isa.Op
    lay = c.layout
    X, M, W, E = 0, 256, 1024, 2048  # VBUF: x [256], results [64 each], VADD out, VEXP [2048]
    rows, cols = 64, 256
    lines = L.tiled_bytes(GEOM, rows, cols) // isa.LINE  # 128 tiles, a line per channel each
    wte = lay["wte"]
    prog = [
        isa.make(Op.LOADV, dst=X, len=cols, line=wte.line, stride=wte.row_bytes // 64),
        isa.make(Op.LOADV, dst=E, len=2048, line=wte.line),
        isa.make(Op.VEXP, dst=E, a=E, len=2048),  # the MPU commands wait for it
    ]
    for i in range(MAX_PENDING + 1):
        if i == MAX_PENDING:  # Exec waits here; the look-ahead sends the next read
            prog.append(isa.make(Op.VADD, dst=W, a=E, b=E, len=64))
        prog.append(
            isa.make(Op.MATVEC, dst=M + i * rows, src=X, line=i * lines, rows=rows, cols=cols)
        )
    prog.append(isa.make(Op.STOREV, src=M, len=(MAX_PENDING + 1) * rows, line=lay["h.1.k"].line))
    return [*prog, isa.make(Op.HALT)]


PROGRAMS = {"chain": matvec_chain, "pending": pending_reads}


class _Mem:
    def __init__(self, data):
        self.data = data

    def read_channel(self, ch, base, n):
        return self.data[ch, base : base + n].tobytes()


@cocotb.test()
async def core_cases(dut):
    tb = CoreTB(dut)
    await tb.reset()
    await tb.enable_interrupt()
    for k, case in enumerate(tb_params()["cases"]):
        await tb.run_case(case, k)
