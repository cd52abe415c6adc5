"""cocotb testbench of one RTL job (:mod:`tandem.sim.rtljob`): load, run through
:class:`tandem.driver.KernelDriver`, dump.

Parameters come from ``tb_params()`` (written by :func:`tandem.sim.rtljob.run_job`); the job's
files live in ``job_dir``: ``hbm<ch>.hex`` (the image, moved into the working directory where
the memories' ``$readmemh`` looks), and on the way out ``result.json`` (status registers, events,
counters, timings, or ``error``) and ``dumps.npz`` (one array per requested range).

Nothing here runs per cycle: the clock is cocotb's GPI clock, the host polls ``CTRL`` every
``poll_cycles`` cycles with a timer, and the event watcher wakes only when the monitor's
``ev_count`` changes (one store per output token, and the status record).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge, Timer
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

from tandem.driver import KernelDriver
from tandem.sim.hbm_model import read_hex
from tandem.sim.rtljob import COUNTERS, EV_STATUS, EV_TOKEN, PROFILE_FIELDS
from tandem.sim.runner import tb_params


def _counters(dut, prefix: str) -> dict[str, int]:
    return {c: int(getattr(dut, f"{prefix}_{c}").value) for c in COUNTERS}


class Job:
    def __init__(self, dut, p: dict):
        self.dut = dut
        self.p = p
        self.clk = dut.ap_clk
        self.log = dut._log
        self.dir = Path(p["job_dir"])
        self.channels = int(p["channels"])
        self.beat = int(p["beat_bytes"])
        self.period = int(p["clock_ns"])
        self.events: list[dict] = []
        self.watch_error: Exception | None = None
        self.t0 = time.monotonic()
        self.last_log = self.t0
        Clock(self.clk, self.period, unit="ns").start()
        self.host = AxiLiteMaster(
            AxiLiteBus.from_prefix(dut, "s_axi_control"),
            self.clk,
            dut.ap_rst_n,
            reset_active_level=False,
        )
        for if_ in (self.host.read_if, self.host.write_if):
            if_.log.setLevel("WARNING")

        async def read32(offset):
            return await self.host.read_dword(offset)

        async def write32(offset, value):
            await self.host.write_dword(offset, value)

        self.driver = KernelDriver(self.channels, read32, write32)
        for name in ("hbm_load", "hbm_dump", "hbm_dump_lo", "hbm_dump_hi"):
            getattr(dut, name).value = 0
        dut.hbm_cfg.value = int(p["hbm_cfg"])  # the memory's timing, before reset

    async def reset(self):
        self.dut.ap_rst_n.value = 0
        await ClockCycles(self.clk, 8)
        self.dut.ap_rst_n.value = 1
        await ClockCycles(self.clk, 2)

    async def load(self):
        t = time.monotonic()
        for ch in range(self.channels):
            os.replace(self.dir / f"hbm{ch}.hex", f"hbm{ch}.hex")
        self.dut.hbm_load.value = 1
        await RisingEdge(self.clk)
        self.dut.hbm_load.value = 0
        await RisingEdge(self.clk)
        for ch in range(self.channels):
            os.unlink(f"hbm{ch}.hex")
        self.log.info("image loaded ($readmemh, %d channels) in %.1f s", self.channels,
                      time.monotonic() - t)  # fmt: skip
        return time.monotonic() - t

    async def dump(self, offset: int, nbytes: int) -> np.ndarray:
        lo = offset // self.beat
        hi = -(-(offset + nbytes) // self.beat) - 1
        self.dut.hbm_dump_lo.value = lo
        self.dut.hbm_dump_hi.value = hi
        self.dut.hbm_dump.value = 1
        await RisingEdge(self.clk)
        self.dut.hbm_dump.value = 0
        await RisingEdge(self.clk)
        skip = offset - lo * self.beat
        out = []
        for ch in range(self.channels):
            name = f"hbm{ch}.dump.hex"
            out.append(read_hex(name, self.beat)[skip : skip + nbytes])
            os.unlink(name)
        return np.stack(out)

    async def profile(self, n: int) -> list[dict]:
        """The monitor's profile for pcs 0 .. n-1 (combinational read ports, one address per
        nanosecond; the counting stopped at ``done``)."""
        out = []
        for pc in range(n):
            self.dut.prof_addr.value = pc
            await Timer(1, unit="ns")
            out.append({f: int(getattr(self.dut, f"prof_{f}").value) for f in PROFILE_FIELDS})
        return out

    async def watch_events(self):
        """One wake-up per monitor event: a token's STW or the status record. An error here is
        kept and raised by the next poll (a task's exception would only cancel the test)."""
        try:
            await self._watch_events()
        except Exception as err:
            self.watch_error = err

    async def _watch_events(self):
        dut = self.dut
        seen = int(dut.ev_count.value)
        while True:
            await dut.ev_count.value_change
            count = int(dut.ev_count.value)
            if count != seen + 1:
                self.log.warning("monitor events %d..%d arrived together", seen + 1, count)
            seen = count
            kind = int(dut.ev_kind.value)
            ev = {
                "kind": "token" if kind == EV_TOKEN else "status" if kind == EV_STATUS else kind,
                "value": int(dut.ev_value.value),
                **_counters(dut, "snap"),
            }
            n_tok = sum(e["kind"] == "token" for e in self.events)
            prev = self.events[-1]["cycles"] if self.events else 0
            self.events.append(ev)
            if ev["kind"] == "token":
                self.log.info(
                    "token %d: id %d at cycle %d (+%d), %.2f MB read so far, %.0f s",
                    n_tok, ev["value"], ev["cycles"], ev["cycles"] - prev,
                    ev["r_beats"] * self.beat / 1e6, time.monotonic() - self.t0,
                )  # fmt: skip

    async def run(self) -> dict:
        p = self.p
        await self.reset()
        t_load = await self.load()
        cocotb.start_soon(self.watch_events())
        poll_cycles = int(p["poll_cycles"])
        max_polls = int(p["max_cycles"]) // poll_cycles + 1
        progress_s = float(p["progress_s"])
        t_run = time.monotonic()

        async def poll():
            if self.watch_error is not None:
                raise self.watch_error
            await Timer(poll_cycles * self.period, unit="ns")
            now = time.monotonic()
            if now - self.last_log >= progress_s:
                self.last_log = now
                cyc = int(self.dut.cnt_cycles.value)
                self.log.info(
                    "running: %d cycles, %d tokens, %.0f s (%.0f cycles/s)",
                    cyc, sum(e["kind"] == "token" for e in self.events), now - t_run,
                    cyc / max(now - t_run, 1e-9),
                )  # fmt: skip

        scalars = {k: int(v) for k, v in p["scalars"].items()}
        pointers = {int(ch): int(a) for ch, a in p["pointers"].items()}
        try:
            st = await self.driver.run(scalars, pointers, poll=poll, max_polls=max_polls)
        except TimeoutError:
            cyc = int(self.dut.cnt_cycles.value)
            raise TimeoutError(
                f"ap_done not seen after {cyc:,} cycles (max_cycles {p['max_cycles']:,}); "
                f"{sum(e['kind'] == 'token' for e in self.events)} tokens issued"
            ) from None
        t_sim = time.monotonic() - t_run
        await ClockCycles(self.clk, 2)
        if self.watch_error is not None:
            raise self.watch_error
        counters = _counters(self.dut, "cnt")
        t = time.monotonic()
        arrays = {}
        for k, (off, n) in enumerate(p["dumps"]):
            arrays[f"d{k}"] = await self.dump(int(off), int(n))
        np.savez(self.dir / "dumps.npz", **arrays)
        profile = await self.profile(int(p.get("profile", 0)))
        t_dump = time.monotonic() - t
        self.log.info(
            "done: status %#x, %d tokens, %d cycles (monitor %d) in %.1f s (%.0f cycles/s)",
            st.status, st.tokens, st.cycles, counters["cycles"], t_sim,
            st.cycles / max(t_sim, 1e-9),
        )  # fmt: skip
        return {
            "status": {
                "status": st.status,
                "error_pc": st.error_pc,
                "error_code": st.error_code,
                "tokens": st.tokens,
                "cycles": st.cycles,
            },
            "events": self.events,
            "counters": counters,
            "runs": int(self.dut.runs.value),
            "profile": profile,
            "timings": {"load": t_load, "run": t_sim, "dump": t_dump},
        }


@cocotb.test()
async def rtl_job(dut):
    p = tb_params()
    job = Job(dut, p)
    out = Path(p["job_dir"]) / "result.json"
    try:
        result = await job.run()
    except BaseException as err:
        out.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        raise
    out.write_text(json.dumps(result))


@cocotb.test()
async def build_only(dut):
    """Nothing to run: :func:`tandem.sim.rtljob.build` calls this to build (or find) the model."""
    assert dut.ev_count is not None
