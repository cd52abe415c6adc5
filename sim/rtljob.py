"""Run one whole kernel job on the RTL in Verilator: the decode core over simulated HBM.

The simulation top (:class:`JobTop`, Verilog module ``tandem_rtljob``) is ``DecodeCore(geom)``
(rtl/core.py) with one :class:`tandem.sim.hbm_model.HBMChannelModel` on every ``m_axi_hbm<ch>``
port (U55C per-channel bandwidth at the kernel clock, a read latency, memory inside the
simulator, loaded with ``$readmemh`` and dumped with ``$writememh``) and ``s_axi_control`` left
as a port, which the testbench (:mod:`tandem.sim.rtljob_tb`) drives with a cocotbext-axi
``AxiLiteMaster`` through :class:`tandem.driver.KernelDriver`, the same register-map code
the host uses. No Python runs per beat or per cycle: the clock is cocotb's GPI clock, the memory
is Verilog, and the testbench wakes only for its poll of ``CTRL`` and for monitor events.

Simulation-only monitors (in :class:`JobTop`, on the core's ``perf`` port and AXI ports only:
``DecodeCore(geom, perf=True)`` is the kernel's core with read-only taps brought out, see
:class:`tandem.rtl.core.PerfSignature`): counters that run from the shell's ``start`` pulse to
``done`` (:data:`COUNTERS`: cycles, HBM read and write beats, cycles with reads moving, MPU
tiles, unit busy cycles), and an event (``ev_count``, ``ev_kind``, ``ev_value``, ``snap_*``) at
every store the controller issues that is an ``STW`` (an output token: the core counts STWs as
its TOKENS) or the status record, with a snapshot of every counter at that cycle. So a job
reports the cycle at which each output token was issued and the bytes read before it.
A profile by program counter (``run_job(profile=n)``, :attr:`JobResult.profile`) adds, per
instruction, the cycles the controller's Exec stage held it and, of those, the cycles with no
HBM read beat on any channel: where a run waits, and where the memory idles meanwhile.

Usage::

    from tandem.sim import rtljob
    result = rtljob.run_job(geom, image, compiled.args(prompt_len=3, n_new=2))
    result.status            # KernelStatus from the s_axi_control registers
    result.memory            # uint8 [channels, image.nbytes] after the run
    result.token_cycles      # cycle (from start) at which each token's STW was issued

Builds are cached by :mod:`tandem.sim.runner` under ``build/sim/<name>-verilator`` (one per
geometry and memory size: see :func:`build_name`). The Verilog of a top is generated once per
process.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from amaranth import ClockDomain, DomainRenamer, Module, Mux, Signal
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from tandem.floorplan import Floorplan, for_geometry
from tandem.floorplan import floorplan as tandem_floorplan
from tandem.geometry import CoreGeometry
from tandem.layout import STATUS_BYTES, HBMImage, StatusRecord
from tandem.rtl.component import GeometryComponent
from tandem.sim.hbm_model import HBMTiming, hbm_timing

__all__ = [
    "COUNTERS",
    "PROFILE_FIELDS",
    "TOPLEVEL",
    "JobResult",
    "JobTop",
    "RtlJobError",
    "build",
    "build_name",
    "memory_class",
    "run_job",
]

TOPLEVEL = "tandem_rtljob"
TB_MODULE = "tandem.sim.rtljob_tb"
CLOCK_NS = 4  # the testbench clock period; cycles are what count
COUNTER_BITS = 48
MIN_MEMORY = 1 << 20

COUNTERS = (
    "cycles",  # cycles since start (the core's own CYCLES counts the same window)
    "r_beats",  # R handshakes, summed over channels
    "w_beats",  # W handshakes, summed over channels
    "r_cycles",  # cycles with an R handshake on any channel
    "tiles",  # MATVEC weight tiles the MPU took (one beat of every channel each)
    "mpu_starved",  # the MPU ready for a tile and none there (the weight stream is behind)
    "mpu_backpressure",  # a tile there and the MPU not ready for it
    "mpu_busy",  # the controller's busy flags (rtl/controller.py UnitBusy)
    "vpu_busy",
    "dma_read_busy",
    "dma_write_busy",
    "vpu_no_read",  # VPU busy and no R handshake on any channel
    "idle_no_read",  # neither MPU nor VPU busy and no R handshake on any channel; of those:
    "idle_read_wait",  # ... a DMA read in flight (HBM latency, or a queued read)
    "idle_write_wait",  # ... no read, an HBM write not yet acknowledged (or a store feeding)
    "refresh",  # channel-cycles the simulated HBM spent refreshing (summed over channels)
)
"""Counters of :class:`JobTop`, counting from the shell's ``start`` pulse to ``done``."""

EV_TOKEN = 1
EV_STATUS = 2

PROFILE_FIELDS = ("cycles", "idle", "tiles", "starved")
"""Per instruction (pc): the counted cycles the controller's Exec stage held it, those with no
HBM read beat on any channel, the MPU's tiles taken and its cycles waiting for a tile (busy
and ready, no tile: the ``tiles`` and ``mpu_starved`` counters) in them (:class:`JobTop`'s
profile)."""


class RtlJobError(RuntimeError):
    """A job did not finish (time-out, simulator failure); the message says what was seen."""


def memory_class(nbytes: int) -> int:
    """Per-channel memory of the simulated HBM for an image of ``nbytes`` per channel: the next
    power of two, at least 1 MiB (so that small models share one build)."""
    n = max(int(nbytes), MIN_MEMORY)
    return 1 << (n - 1).bit_length()


def build_name(geom: CoreGeometry, mem_bytes: int, floorplan: str | None = None) -> str:
    """The build folder's name (``build/sim/<name>-verilator``). The HBM model's timing is not
    part of it: it is set at run time (:class:`tandem.sim.hbm_model.HBMTiming`)."""
    mib = mem_bytes >> 20
    plan = "" if resolve_floorplan(geom, floorplan) is for_geometry(geom) else f"-{floorplan}"
    return f"rtljob-{geom.name}-{mib}m{plan}"


def resolve_floorplan(geom: CoreGeometry, floorplan: str | None) -> Floorplan:
    """The floorplan named ``floorplan``, or the geometry's own (``None``)."""
    return for_geometry(geom) if floorplan is None else tandem_floorplan(floorplan)


class JobTop(GeometryComponent):
    """``DecodeCore(geom, perf=True)`` over ``HBMModel(geom, size_bytes=mem_bytes)``, plus
    monitors on the core's ``perf`` port and AXI ports.

    Ports: ``ap_clk``, ``ap_rst_n``, ``interrupt``, ``s_axi_control_*`` (as the kernel's),
    ``hbm_load``, ``hbm_dump``, ``hbm_dump_lo``, ``hbm_dump_hi`` (the memory backdoor, files
    ``hbm<ch>.hex`` / ``hbm<ch>.dump.hex`` in the simulator's working directory), ``hbm_cfg``
    (the memory's timing, :meth:`tandem.sim.hbm_model.HBMTiming.pack`, set before reset is
    released), ``cnt_<c>``
    (live) and ``snap_<c>`` (at the last event) for every ``c`` in :data:`COUNTERS`, ``ev_count``
    (events so far, counted over the whole simulation), ``ev_kind`` (:data:`EV_TOKEN` or
    :data:`EV_STATUS`), ``ev_value`` (the token id an STW stored), ``runs`` (start pulses seen),
    ``prof_addr`` / ``prof_<f>`` for every ``f`` in :data:`PROFILE_FIELDS` (the profile: for
    the instruction at ``prof_addr``, the counted cycles Exec held it, those of them with no R
    beat on any channel, the tiles the MPU took and its cycles waiting for one, summed over
    every run of the simulation).

    Channel ``ch``'s memory is at byte address :meth:`base`, the pointer to pass as ``hbm<ch>``.
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        mem_bytes: int,
        floorplan: str | None = None,
    ):
        from tandem.rtl.core import DecodeCore
        from tandem.sim.hbm_model import HBMModel

        self.core = DecodeCore(geom, perf=True, floorplan=resolve_floorplan(geom, floorplan))
        self.hbm = HBMModel(geom, size_bytes=mem_bytes)
        self.mem_bytes = mem_bytes
        hm = self.hbm.signature.members
        members = {
            "ap_clk": In(1),
            "ap_rst_n": In(1),
            "interrupt": Out(1),
            "s_axi_control": self.core.signature.members["s_axi_control"],
            "hbm_load": In(1),
            "hbm_dump": In(1),
            "hbm_dump_lo": hm["hbm_dump_lo"],
            "hbm_dump_hi": hm["hbm_dump_hi"],
            "hbm_cfg": hm["hbm_cfg"],
            "ev_count": Out(32),
            "ev_kind": Out(2),
            "ev_value": Out(32),
            "runs": Out(16),
            "prof_addr": In(16),
        }
        for f in PROFILE_FIELDS:
            members[f"prof_{f}"] = Out(COUNTER_BITS)
        for c in COUNTERS:
            members[f"cnt_{c}"] = Out(COUNTER_BITS)
            members[f"snap_{c}"] = Out(COUNTER_BITS)
        super().__init__(geom, members)

    def base(self, channel: int) -> int:
        return self.hbm.base(channel)

    def elaborate(self, platform):
        from tandem.rtl.dma import StoreKind

        m = Module()
        g = self._geom
        core = self.core
        # DecodeCore defines its `sync` domain (ap_clk, synchronous reset = ~ap_rst_n) for
        # itself; the HBM model and the monitors run in `tb`, the same clock and reset defined
        # here.
        m.submodules.core = core
        m.domains.tb = tb = ClockDomain("tb")
        m.d.comb += [tb.clk.eq(self.ap_clk), tb.rst.eq(~self.ap_rst_n)]
        hbm = self.hbm
        m.submodules.hbm = DomainRenamer("tb")(hbm)
        wiring.connect(m, wiring.flipped(self.s_axi_control), core.s_axi_control)
        for ch in range(g.channels):
            port = f"m_axi_hbm{ch}"
            wiring.connect(m, getattr(core, port), getattr(hbm, port))
        m.d.comb += [
            core.ap_clk.eq(self.ap_clk),
            core.ap_rst_n.eq(self.ap_rst_n),
            self.interrupt.eq(core.interrupt),
            hbm.hbm_load.eq(self.hbm_load),
            hbm.hbm_dump.eq(self.hbm_dump),
            hbm.hbm_dump_lo.eq(self.hbm_dump_lo),
            hbm.hbm_dump_hi.eq(self.hbm_dump_hi),
            hbm.hbm_cfg.eq(self.hbm_cfg),
        ]

        # ---- monitors (simulation only): the core's perf port and its AXI ports -------------
        perf = core.perf
        axis = [getattr(core, f"m_axi_hbm{ch}") for ch in range(g.channels)]
        r_hs = [a.rvalid & a.rready for a in axis]
        w_hs = [a.wvalid & a.wready for a in axis]

        def popcount(bits):
            total = 0
            for b in bits:
                total = total + b
            return total

        any_r = Signal()
        m.d.comb += any_r.eq(_any(r_hs))
        busy = perf.busy
        idle = Signal()
        m.d.comb += idle.eq(~busy.mpu & ~busy.vpu & ~any_r)
        incs = {
            "cycles": 1,
            "r_beats": popcount(r_hs),
            "w_beats": popcount(w_hs),
            "r_cycles": any_r,
            "tiles": perf.tile_valid & perf.tile_ready,
            "mpu_starved": busy.mpu & perf.tile_ready & ~perf.tile_valid,
            "mpu_backpressure": perf.tile_valid & ~perf.tile_ready,
            "mpu_busy": busy.mpu,
            "vpu_busy": busy.vpu,
            "dma_read_busy": busy.dma_read,
            "dma_write_busy": busy.dma_write,
            "vpu_no_read": busy.vpu & ~any_r,
            "idle_no_read": idle,
            "idle_read_wait": idle & busy.dma_read,
            "idle_write_wait": idle & ~busy.dma_read & busy.dma_write,
            "refresh": popcount(hbm.hbm_refreshing),
        }
        assert set(incs) == set(COUNTERS)
        counting = Signal()
        with m.If(perf.start):
            m.d.tb += [counting.eq(1), self.runs.eq(self.runs + 1)]
        with m.Elif(perf.done):
            m.d.tb += counting.eq(0)
        counters = {}
        for c in COUNTERS:
            cnt = getattr(self, f"cnt_{c}")
            counters[c] = cnt
            with m.If(perf.start):
                m.d.tb += cnt.eq(0)
            with m.Elif(counting):
                m.d.tb += cnt.eq(cnt + incs[c])

        kind = perf.store.kind
        stw = perf.store_issued & (kind == StoreKind.WORD)
        status = perf.store_issued & (kind == StoreKind.STATUS)
        with m.If(stw | status):
            m.d.tb += [
                self.ev_count.eq(self.ev_count + 1),
                self.ev_kind.eq(EV_TOKEN),
                self.ev_value.eq(perf.store.value),
            ]
            with m.If(status):
                m.d.tb += self.ev_kind.eq(EV_STATUS)
            for c in COUNTERS:
                m.d.tb += getattr(self, f"snap_{c}").eq(counters[c])
        prof = {
            "cycles": 1,
            "idle": ~any_r,
            "tiles": incs["tiles"],
            "starved": incs["mpu_starved"],
        }
        assert set(prof) == set(PROFILE_FIELDS)
        self._profile(m, perf.pc, counting, perf.done, prof)
        return m

    def _profile(self, m, pc, counting, done, incs):
        """Cycles by Exec's pc: a run of cycles at one pc adds up in registers and goes into
        that pc's entries (read as they are, written a cycle later) when the pc changes and on
        the cycle after ``done``, so every counted cycle lands in exactly one entry."""
        depth = self._geom.imem_words
        cur = Signal(16)
        flush = Signal()  # the cycle after the last counted one
        m.d.tb += flush.eq(counting & done)
        for f in PROFILE_FIELDS:
            mem = memory.Memory(shape=COUNTER_BITS, depth=depth, init=[])
            m.submodules[f"prof_{f}"] = mem
            rd = mem.read_port(domain="comb")
            out = mem.read_port(domain="comb")
            wr = mem.write_port(domain="tb")
            acc = Signal(COUNTER_BITS, name=f"prof_acc_{f}")
            m.d.comb += [
                rd.addr.eq(cur),
                wr.addr.eq(cur),
                wr.data.eq(rd.data + acc),
                out.addr.eq(self.prof_addr),
                getattr(self, f"prof_{f}").eq(out.data),
            ]
            with m.If(counting & (pc == cur)):
                m.d.tb += acc.eq(acc + incs[f])
            with m.Elif(counting | flush):
                m.d.comb += wr.en.eq(1)
                m.d.tb += acc.eq(Mux(counting, incs[f], 0))
        with m.If(counting):
            m.d.tb += cur.eq(pc)


def _any(bits):
    out = 0
    for b in bits:
        out = out | b
    return out


# ---------------------------------------------------------------------------------------------
# building and running


_PORTS_VLT = """`verilator_config
// Only the top module's ports are visible to cocotb (the runner's --public-flat-rw is undone by
// --no-public-flat-rw): Verilator optimises everything inside, which builds and runs faster.
public_flat_rw -module "{top}" -var "*"
"""


def _support_files(folder: Path) -> list[Path]:
    from tandem.sim.hbm_model import memory_verilog_file

    vlt = folder / f"{TOPLEVEL}_ports.vlt"
    text = _PORTS_VLT.format(top=TOPLEVEL)
    folder.mkdir(parents=True, exist_ok=True)
    if not vlt.is_file() or vlt.read_text() != text:
        vlt.write_text(text)
    return [memory_verilog_file(folder), vlt]


def _source_key(geom: CoreGeometry, mem_bytes: int, floorplan: str | None = None) -> str:
    """A hash of everything the top's Verilog depends on: the Python sources of the RTL and of
    the definitions it imports (geometry, regmap, ISA, numerics tables), the source of
    :class:`JobTop` and its constants, the Amaranth version and the parameters."""
    import hashlib
    import inspect
    from importlib.metadata import version

    import tandem
    import tandem.rtl

    h = hashlib.sha256()
    plan = resolve_floorplan(geom, floorplan).name
    h.update(repr((_geom_dict(geom), mem_bytes, plan, version("amaranth"))).encode())
    own = (TOPLEVEL, COUNTERS, COUNTER_BITS, EV_TOKEN, EV_STATUS)
    h.update((inspect.getsource(JobTop) + inspect.getsource(_any) + repr(own)).encode())
    folders = [Path(tandem.__file__).parent, Path(tandem.rtl.__file__).parent]
    for f in sorted(f for d in folders for f in d.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _verilog_cache(geom: CoreGeometry, mem_bytes: int, floorplan: str | None = None) -> Path:
    """Where :func:`_top` keeps a top's Verilog, under a hash of its sources."""
    from tandem.sim import runner

    key = _source_key(geom, mem_bytes, floorplan)
    return runner.build_root() / "verilog" / f"{TOPLEVEL}-{geom.name}-{key}.v"


@functools.cache
def _top(geom: CoreGeometry, mem_bytes: int, floorplan: str | None = None) -> tuple[str, JobTop]:
    """(Verilog text, component) of a top. Converting the u55c core takes minutes, so the text
    is kept in ``build/sim/verilog/`` under a hash of its sources (:func:`_source_key`) and in
    memory for the process."""
    from tandem.rtl.axi import vitis_ports
    from tandem.sim import runner

    top = JobTop(geom, mem_bytes=mem_bytes, floorplan=floorplan)
    cache = _verilog_cache(geom, mem_bytes, floorplan)
    if cache.is_file():
        return cache.read_text(), top
    text = runner.to_verilog(top, toplevel=TOPLEVEL, ports=vitis_ports(top))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(cache)
    return text, top


BUILD_ARGS = ("--no-public-flat-rw",)


def build(
    geom: CoreGeometry,
    mem_bytes: int,
    *,
    floorplan: str | None = None,
    make_vars: Mapping[str, str] | None = None,
    name: str | None = None,
    log_file: os.PathLike | str | None = None,
    on_build: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Build the job top (or find it built) without running a job; returns seconds spent on
    the Verilog and on the rest (the Verilator build when it was not cached). ``log_file`` and
    ``on_build``: as for :func:`run_job`."""
    from tandem.sim import runner

    t0 = time.monotonic()
    text, _ = _top(geom, mem_bytes, floorplan)
    t1 = time.monotonic()
    runner.run(
        text,
        TB_MODULE,
        name=name or build_name(geom, mem_bytes, floorplan),
        sim="verilator",
        toplevel=TOPLEVEL,
        build_args=BUILD_ARGS,
        verilog_sources=_support_files(runner.build_root() / "verilog"),
        make_vars=make_vars,
        waves=False,
        output_to_stderr=True,
        log_file=log_file,
        on_build=on_build,
        testcase="build_only",
    )
    return {"verilog": t1 - t0, "build": time.monotonic() - t1}


@dataclass
class JobResult:
    """What one job gave back.

    ``status``: the s_axi_control status registers (:class:`tandem.driver.KernelStatus`);
    ``record``: the status record in channel 0 (from the dumped memory); ``memory``: uint8
    [channels, n] of the dumped range, ``dumps``: every requested ``(offset, nbytes)`` range;
    ``events``: one dict per token (``kind`` "token") and the final status store (``kind``
    "status"), each with the token ``value`` and every counter of :data:`COUNTERS` at the cycle
    the controller issued the store; ``counters`` at ``done``; ``timings`` in seconds;
    ``hbm`` the memory model's parameters (:meth:`tandem.sim.hbm_model.HBMTiming.as_dict`);
    ``profile`` (with ``run_job(profile=n)``): for each pc below ``n``, a dict of
    :data:`PROFILE_FIELDS` (cycles Exec held it, of which no R beat on any channel; the MPU's
    tiles and starved cycles meanwhile).
    """

    status: object
    record: StatusRecord
    memory: np.ndarray | None
    dumps: dict[tuple[int, int], np.ndarray]
    events: list[dict]
    counters: dict[str, int]
    timings: dict[str, float]
    mem_bytes: int
    hbm: dict
    extra: dict = field(default_factory=dict)
    profile: list[dict] = field(default_factory=list)

    @property
    def cycles(self) -> int:
        """Cycles from ``start`` to ``done`` as the core counted them (CYCLES registers)."""
        return self.status.cycles

    @property
    def tokens(self) -> list[int]:
        return [e["value"] for e in self.events if e["kind"] == "token"]

    @property
    def token_cycles(self) -> list[int]:
        """Cycle (from start) at which each output token's STW was issued."""
        return [e["cycles"] for e in self.events if e["kind"] == "token"]


def _log_default(msg: str) -> None:
    print(f"[rtljob] {msg}", file=sys.stderr, flush=True)


def run_job(
    geom: CoreGeometry,
    image: HBMImage,
    scalars: Mapping[str, int],
    *,
    dump: str | Sequence[tuple[int, int]] = "all",
    mem_bytes: int | None = None,
    hbm: str | HBMTiming = "ideal",
    floorplan: str | None = None,
    max_cycles: int = 5_000_000,
    poll_cycles: int | None = None,
    progress_s: float = 30.0,
    log: Callable[[str], None] | None = _log_default,
    name: str | None = None,
    make_vars: Mapping[str, str] | None = None,
    log_file: os.PathLike | str | None = None,
    on_build: Callable[[], None] | None = None,
    profile: int = 0,
) -> JobResult:
    """Run one job: load ``image``, set ``scalars`` (``tandem.regmap.SCALAR_ARGS`` names; channel
    pointers are the harness's), start, wait for ``ap_done``, dump memory.

    Parameters
    ----------
    dump : "all", or (offset, nbytes) ranges of every channel to read back after the run
        (the status record, ``[0, 64)`` of channel 0, is always read).
    mem_bytes : per-channel memory of the simulated HBM (a build parameter); default
        :func:`memory_class` of the image.
    hbm : the simulated HBM's timing: a name (``ideal``, ``calibrated``: see
        :func:`tandem.sim.hbm_model.hbm_timing`) or an :class:`HBMTiming`. Set at run time:
        one build serves every model.
    floorplan : the core's floorplan by name (:mod:`tandem.floorplan`; a build parameter);
        default the geometry's own (``u55c``: every SLR crossing staged).
    max_cycles : a run still going after this many cycles raises :class:`RtlJobError`.
    poll_cycles : cycles between polls of ``CTRL`` (default 200 for small jobs, scaled up).
    progress_s : the testbench logs progress this often (seconds of wall time).
    make_vars : make variables for the Verilator C++ build (e.g. ``{"OPT_FAST": "-O1"}``).
    log_file : a quiet run: the Verilator build's and the simulation's output go to this file
        (appended; :func:`tandem.sim.runner.run`) instead of stderr, and a failure's
        :class:`RtlJobError` names it. Default: on stderr, as before. ``log`` is separate.
    on_build : called before the Verilog is converted or the model built, when either is not
        cached (the slow first use).
    profile : read the profile by pc (:class:`JobTop`) for pcs ``0 .. profile - 1`` after the
        run into :attr:`JobResult.profile` (0: none).
    """
    from tandem.sim import runner

    if image.geom.channels != geom.channels:
        raise ValueError(f"image has {image.geom.channels} channels, geometry {geom.channels}")
    mem = memory_class(image.nbytes) if mem_bytes is None else int(mem_bytes)
    if image.nbytes > mem:
        raise ValueError(
            f"the image needs {image.nbytes:,} bytes per channel, the simulated HBM holds {mem:,}"
        )
    if mem % geom.beat_bytes:
        raise ValueError(f"mem_bytes {mem} is not a multiple of the {geom.beat_bytes}-byte beat")
    log = log or (lambda msg: None)
    logs = "" if log_file is None else f" (build and simulation log: {log_file})"
    timing = hbm_timing(hbm, geom)
    name = name or build_name(geom, mem, floorplan)
    folder = runner.build_root() / f"{name}-verilator"
    t0 = time.monotonic()
    if on_build is not None and not _verilog_cache(geom, mem, floorplan).is_file():
        on_build()
        on_build = None  # once per job: the Verilator build that follows is part of it
    text, top = _top(geom, mem, floorplan)
    t1 = time.monotonic()

    if dump == "all":
        ranges = [(0, image.nbytes)]
    else:
        ranges = [(int(o), int(n)) for o, n in dump]
    for off, n in ranges:
        if off < 0 or n <= 0 or off + n > mem:
            raise ValueError(f"dump range ({off:#x}, {n}) is outside the {mem}-byte memory")
    ranges.append((0, STATUS_BYTES))

    from tandem.sim.hbm_model import write_hex

    job_dir = folder / "jobs" / uuid.uuid4().hex[:12]
    job_dir.mkdir(parents=True)
    try:
        for ch in range(geom.channels):
            write_hex(job_dir / f"hbm{ch}.hex", image.data[ch], geom.beat_bytes)
        t2 = time.monotonic()
        if poll_cycles is None:
            poll_cycles = 200 if image.nbytes < (4 << 20) else 5000
        params = {
            "job_dir": str(job_dir),
            "geometry": geom.name,
            "geom": _geom_dict(geom),
            "channels": geom.channels,
            "mem_bytes": mem,
            "beat_bytes": geom.beat_bytes,
            "scalars": {k: int(v) for k, v in scalars.items()},
            "pointers": {str(ch): top.base(ch) for ch in range(geom.channels)},
            "dumps": ranges,
            "hbm_cfg": timing.pack(geom),
            "max_cycles": int(max_cycles),
            "poll_cycles": int(poll_cycles),
            "progress_s": float(progress_s),
            "clock_ns": CLOCK_NS,
            "profile": int(profile),
        }
        log(
            f"{name}: Verilog {t1 - t0:.1f} s, image {image.nbytes:,} B x {geom.channels} "
            f"channels written in {t2 - t1:.1f} s; building (cached if unchanged) and running"
        )
        try:
            runner.run(
                text,
                TB_MODULE,
                name=name,
                sim="verilator",
                toplevel=TOPLEVEL,
                params=params,
                extra_env={"PYTHONUNBUFFERED": "1"},
                build_args=BUILD_ARGS,
                verilog_sources=_support_files(runner.build_root() / "verilog"),
                make_vars=make_vars,
                waves=False,
                output_to_stderr=True,
                log_file=log_file,
                on_build=on_build,
                testcase="rtl_job",
            )
        except AssertionError as err:
            detail = ""
            res = job_dir / "result.json"
            if res.is_file():
                detail = json.loads(res.read_text()).get("error", "")
            raise RtlJobError(f"RTL job on {name} failed: {detail or err}{logs}") from err
        t3 = time.monotonic()
        res = json.loads((job_dir / "result.json").read_text())
        if res.get("error"):
            raise RtlJobError(f"RTL job on {name} failed: {res['error']}{logs}")
        arrays = np.load(job_dir / "dumps.npz")
        dumps = {tuple(r): arrays[f"d{k}"] for k, r in enumerate(ranges)}
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    from tandem.driver import KernelStatus

    st = KernelStatus(**res["status"])
    record = StatusRecord.unpack(dumps[(0, STATUS_BYTES)][0])
    memory = dumps[(0, image.nbytes)] if dump == "all" else None
    timings = {"verilog": t1 - t0, "write_hex": t2 - t1, "simulate": t3 - t2, **res["timings"]}
    log(
        f"{name}: {st.cycles:,} cycles, status {st.status:#x}, {st.tokens} tokens; simulation "
        f"process {t3 - t2:.1f} s"
    )
    return JobResult(
        status=st,
        record=record,
        memory=memory,
        dumps=dumps,
        events=res["events"],
        counters=res["counters"],
        timings=timings,
        mem_bytes=mem,
        profile=res.get("profile", []),
        hbm=timing.as_dict(geom),
        extra={"runs": res.get("runs")},
    )


def _geom_dict(geom: CoreGeometry) -> dict:
    import dataclasses

    return dataclasses.asdict(geom)
