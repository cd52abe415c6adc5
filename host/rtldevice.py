"""The ``rtl`` backend: the decode core's RTL in Verilator, over the simulated HBM.

The device keeps every channel's buffer in NumPy. ``start`` runs the whole job on a worker
thread through :func:`tandem.sim.rtljob.run_job` -- the image loaded into the simulated HBM,
the kernel driven through its ``s_axi_control`` registers by
:class:`tandem.driver.KernelDriver` -- and copies the memory the core left back into the
buffers, so later writes and runs (a KV prefix, the next request) see what the core wrote.

It is for small models on the small geometries: every run starts a simulator process, the first
run of a process converts the core to Verilog (about 25 s for ``tiny``) and the first run on a
machine builds it (about 10 minutes for ``tiny``; cached under ``build/sim``). ``load`` refuses
images larger than ``max_bytes`` per channel and cores wider than ``tiny``/``small`` with a
:class:`~tandem.host.device.DeviceError` that gives the sizes. Token callbacks come after the
run (the simulator reports each token with the cycle its STW was issued).

Output: by default the harness's progress, the Verilator build and the cocotb run print on
stderr. With ``log_file`` (what ``tandem generate --backend rtl`` passes: :func:`default_log_file`)
the device is quiet: all of that goes to the file (rewritten each run), the user sees a progress
line or two on stderr (``[rtl] running on the RTL core ...``, and ``[rtl] building the RTL
model ...`` when the build is not cached), and a failure's message names the file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tandem.geometry import CoreGeometry
from tandem.layout import HBMImage

from .device import DeviceError, HostImageDevice, TokenCallback

DEFAULT_MAX_BYTES = 1 << 20
"""Largest image per channel the backend accepts by default (test-tiny is 0.14 MiB, test-odd
0.37 MiB on ``tiny``); one build of the core serves every image up to this size."""

MAX_CORE_BITS = 2048
"""Widest core (channels x port bits) the backend builds by default: ``tiny`` and ``small``. The
u55c core (16,384 bits) takes well over an hour to build in Verilator."""


class RtlDevice(HostImageDevice):
    """The RTL decode core in Verilator as a device.

    Parameters
    ----------
    geom : CoreGeometry
    max_bytes : int
        Largest image per channel accepted by ``load`` (also the simulated HBM's size, rounded
        up to a power of two; see :func:`tandem.sim.rtljob.memory_class`).
    max_cycles : int
        Cycle budget of one run (a run still going then fails with DeviceError).
    hbm : str
        The simulated HBM's timing (:func:`tandem.sim.hbm_model.hbm_timing`: ``ideal``, the
        default, or ``calibrated``); tokens do not depend on it, cycles do.
    allow_large_core : bool
        Build cores wider than :data:`MAX_CORE_BITS` anyway.
    log : callable or None
        Progress messages of the harness (default: stderr; with ``log_file``, the file).
    log_file : path or None
        A quiet device: the build's and the simulation's output and the harness's messages go
        to this file (rewritten at each run) instead of stderr; failures name it.
    progress : callable or None
        With ``log_file``: the one-line progress messages for users (default: stderr).

    ``last_job`` keeps the :class:`tandem.sim.rtljob.JobResult` of the last run (cycles,
    per-token cycles, HBM beats moved).
    """

    name = "rtl"
    what = "the RTL simulation"

    def __init__(
        self,
        geom: CoreGeometry,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_cycles: int = 20_000_000,
        hbm: str = "ideal",
        allow_large_core: bool = False,
        log=...,
        log_file: str | os.PathLike | None = None,
        progress=None,
    ):
        super().__init__(geom)
        bits = geom.channels * geom.port_bits
        if bits > MAX_CORE_BITS and not allow_large_core:
            raise DeviceError(
                f"the rtl backend simulates the whole core in Verilator; the {geom.name} core "
                f"({geom.channels} channels x {geom.port_bits} bits = {bits:,} bits per cycle) is "
                f"too large for that (the limit is {MAX_CORE_BITS:,}: tiny or small). Use "
                f"--geometry tiny or small, or the model backend"
            )
        self.max_bytes = int(max_bytes)
        self.max_cycles = int(max_cycles)
        self.hbm = hbm
        self._log = log
        self.log_file = None if log_file is None else Path(log_file)
        self._progress = progress or _stderr
        self.last_job = None

    def _check(self, image: HBMImage) -> None:
        if image.nbytes > self.max_bytes:
            raise DeviceError(
                f"the image needs {image.nbytes:,} bytes per channel ({image.nbytes / 2**20:.1f} "
                f"MiB, {image.nbytes * image.geom.channels / 2**20:.1f} MiB over "
                f"{image.geom.channels} channels); the rtl backend simulates at most "
                f"{self.max_bytes:,} bytes ({self.max_bytes / 2**20:.1f} MiB) per channel, for "
                f"small models: a bigger one takes hours per token in RTL simulation. Use the "
                f"model backend, or pass max_bytes"
            )

    def start(self, on_token: TokenCallback | None = None) -> None:
        self.last_job = None
        super().start(on_token)

    def _run(self, image: HBMImage, args: dict, on_token: TokenCallback | None) -> None:
        from tandem.sim.rtljob import memory_class, run_job

        kwargs = {} if self._log is ... else {"log": self._log}
        path = self.log_file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            if self._log is ...:
                kwargs["log"] = lambda msg: _append(path, f"[rtljob] {msg}")
            kwargs["log_file"] = path
            kwargs["on_build"] = lambda: self._progress(
                "[rtl] building the RTL model in Verilator first (first use on this machine, a "
                "few minutes) ..."
            )
            self._progress("[rtl] running on the RTL core (Verilator) ...")
        try:
            job = run_job(
                self.geom,
                image,
                args,
                mem_bytes=memory_class(self.max_bytes),
                hbm=self.hbm,
                max_cycles=self.max_cycles,
                **kwargs,
            )
        except Exception as err:
            if path is None or str(path) in str(err):
                raise
            raise DeviceError(
                f"{' '.join(str(err).split())} (build and simulation log: {path})"
            ) from err
        image.data[:] = job.memory
        self.last_job = job
        if on_token is not None:
            for i, tok in enumerate(job.tokens):
                on_token(i, tok)

    def run_stats(self) -> dict:
        job = self.last_job
        return {} if job is None else {"cycles": job.cycles}


def default_log_file() -> Path:
    """Where ``tandem generate --backend rtl`` keeps the last run's build and simulation log:
    ``rtl-backend.log`` in the simulator build root (``build/sim`` of the repository, or
    ``TANDEM_SIM_BUILD``)."""
    from tandem.sim import runner

    return runner.build_root() / "rtl-backend.log"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        print(line, file=f)
