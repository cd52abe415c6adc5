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
``prompt``       prompt token ids
``n_new``        tokens to generate
``stall``        probability of a pause cycle on every AXI channel of the memories and the
                 control port (0: none)
``error``        ``None``, ``"opcode"`` (an all-zero word over instruction ``step + 5``) or
                 ``"hbm_bytes"`` (hbm_bytes just covering the control area)
``max_cycles``   cycle budget for the run (a hang fails the case)
"""

from __future__ import annotations

import functools
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from tandem import isa
from tandem import layout as L
from tandem.checkpoint import lively_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.driver import KernelDriver, KernelError
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.regmap import Status
from tandem.sim import streams
from tandem.sim.runner import tb_params

GEOM = geometry("tiny")
POLL_CYCLES = 200
BASE_STEP = 0x10000  # channel ch's buffer starts at (ch + 1) * BASE_STEP in its memory


@functools.cache
def compiled(name):
    cfg = preset(name)
    return compile_model(cfg, lively_weights(cfg), GEOM)


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
            AxiRam(
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
                chan.clear_pause_generator()

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.clk, 8)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.clk, 2)

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
        if case.get("program") == "chain":
            program = isa.encode_program(matvec_chain(c))
            image.write_channel(0, L.PROGRAM_BASE, program)
        error = case.get("error")
        if error == "opcode":
            pc = c.labels["step"] + 5
            image.write_channel(0, L.PROGRAM_BASE + pc * isa.WORD_BYTES, bytes(isa.WORD_BYTES))
        elif error == "hbm_bytes":
            args["hbm_bytes"] = c.layout["wte"].base
        elif error is not None:
            raise ValueError(f"unknown error case {error!r}")
        # reference
        ref = L.HBMImage(GEOM, image.nbytes)
        ref.data[:] = image.data
        t0 = time.monotonic()
        want = IsaSim(GEOM, ref).run(args)
        t_ref = time.monotonic() - t0
        # the kernel
        self.load(image)
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
            "case %d %s prompt %d n_new %d stall %s error %s: %d cycles, %.1f s (%.0f cycles/s), "
            "IsaSim %.2f s; status %#x pc %d tokens %d",
            index, case["cfg"], len(prompt), n_new, case.get("stall", 0), error, took, wall,
            took / max(wall, 1e-9), t_ref, st.status, st.error_pc, st.tokens,
        )  # fmt: skip
        self.set_stalls(0, 0)
        await ClockCycles(self.clk, 4)
        got = self.dump(image.nbytes)

        # status registers and the host helper
        assert (st.status, st.error_pc, st.error_code, st.tokens) == (
            int(want.status),
            want.pc,
            want.halt_code,
            want.tokens,
        ), (st, want)
        if want.status:
            try:
                st.check()
            except KernelError as err:
                self.log.info("KernelStatus.check(): %s", err)
            else:
                raise AssertionError("KernelStatus.check() did not raise on an error status")
        else:
            st.check()
        # status record, cycles aside
        srec = c.layout["status"]
        rec = L.StatusRecord.unpack(got[0, srec.base : srec.base + srec.nbytes])
        want_rec = c.read_status(ref)
        assert rec.cycles > 0 or want.status & Status.HBM_RANGE, rec
        assert (rec.status, rec.pc, rec.tokens, rec.halt_code) == (
            want_rec.status, want_rec.pc, want_rec.tokens, want_rec.halt_code
        ), (rec, want_rec)  # fmt: skip
        # tokens, then every byte outside the status record (KV regions, scratch, everything)
        out = c.read_output(_Mem(got), want.tokens)
        assert out == c.read_output(ref, want.tokens), (out, c.read_output(ref, want.tokens))
        mask = np.ones(image.nbytes, bool)
        mask[srec.base : srec.base + srec.nbytes] = False
        for ch in range(GEOM.channels):
            diff = np.nonzero((got[ch] != ref.data[ch]) & mask)[0]
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
                    f"(got {got[ch, diff[0]]:#x}, want {ref.data[ch, diff[0]]:#x}); regions "
                    f"{regions}"
                )
        self.log.info("case %d: tokens %s match IsaSim", index, out)
        return took


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


class _Mem:
    def __init__(self, data):
        self.data = data

    def read_channel(self, ch, base, n):
        return self.data[ch, base : base + n].tobytes()


@cocotb.test()
async def core_cases(dut):
    tb = CoreTB(dut)
    await tb.reset()
    for k, case in enumerate(tb_params()["cases"]):
        await tb.run_case(case, k)
