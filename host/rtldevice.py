"""The ``rtl`` backend: the decode core's RTL in Verilator, over the simulated HBM.

The device keeps every channel's buffer in NumPy. ``start`` runs the whole job on a worker
thread through :func:`tandem.sim.rtljob.run_job` -- the image loaded into the simulated HBM,
the kernel driven through its ``s_axi_control`` registers by
:class:`tandem.host.driver.KernelDriver` -- and copies the memory the core left back into the
buffers, so later writes and runs (a KV prefix, the next request) see what the core wrote.

It is for small models on the small geometries: every run starts a simulator process, the first
run of a process converts the core to Verilog (about 25 s for ``tiny``) and the first run on a
machine builds it (about 10 minutes for ``tiny``; cached under ``build/sim``). ``load`` refuses
images larger than ``max_bytes`` per channel and cores wider than ``tiny``/``small`` with a
:class:`~tandem.host.device.DeviceError` that gives the sizes. Token callbacks come after the
run (the simulator reports each token with the cycle its STW was issued).
"""

from __future__ import annotations

import threading

import numpy as np

from tandem.geometry import CoreGeometry
from tandem.layout import HBMImage, StatusRecord

from .device import Device, DeviceError, TokenCallback, register

DEFAULT_MAX_BYTES = 1 << 20
"""Largest image per channel the backend accepts by default (test-tiny is 0.14 MiB, test-odd
0.37 MiB on ``tiny``); one build of the core serves every image up to this size."""

MAX_CORE_BITS = 2048
"""Widest core (channels x port bits) the backend builds by default: ``tiny`` and ``small``. The
u55c core (16,384 bits) takes well over an hour to build in Verilator."""


@register
class RtlDevice(Device):
    """The RTL decode core in Verilator as a device.

    Parameters
    ----------
    geom : CoreGeometry
    max_bytes : int
        Largest image per channel accepted by ``load`` (also the simulated HBM's size, rounded
        up to a power of two; see :func:`tandem.sim.rtljob.memory_class`).
    max_cycles : int
        Cycle budget of one run (a run still going then fails with DeviceError).
    read_latency : int
        Simulated HBM read latency in cycles.
    allow_large_core : bool
        Build cores wider than :data:`MAX_CORE_BITS` anyway.
    log : callable or None
        Progress messages of the harness (default: stderr).

    ``last_job`` keeps the :class:`tandem.sim.rtljob.JobResult` of the last run (cycles,
    per-token cycles, HBM beats moved).
    """

    name = "rtl"

    def __init__(
        self,
        geom: CoreGeometry,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_cycles: int = 20_000_000,
        read_latency: int = 80,
        allow_large_core: bool = False,
        log=...,
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
        self.read_latency = int(read_latency)
        self._log = log
        self.image: HBMImage | None = None
        self.last_job = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _loaded(self) -> HBMImage:
        if self.image is None:
            raise DeviceError("no image loaded: call load(image) first")
        return self.image

    def _idle(self) -> HBMImage:
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError("the device is running; wait() for it first")
        return self._loaded()

    def load(self, image: HBMImage) -> None:
        if image.geom.channels != self.geom.channels:
            raise DeviceError(
                f"image has {image.geom.channels} channels, the {self.geom.name} core "
                f"{self.geom.channels}"
            )
        if image.nbytes > self.max_bytes:
            raise DeviceError(
                f"the image needs {image.nbytes:,} bytes per channel ({image.nbytes / 2**20:.1f} "
                f"MiB, {image.nbytes * image.geom.channels / 2**20:.1f} MiB over "
                f"{image.geom.channels} channels); the rtl backend simulates at most "
                f"{self.max_bytes:,} bytes ({self.max_bytes / 2**20:.1f} MiB) per channel, for "
                f"small models: a bigger one takes hours per token in RTL simulation. Use the "
                f"model backend, or pass max_bytes"
            )
        if self.image is not None:
            self._idle()
        self.image = HBMImage(self.geom, image.nbytes)
        self.image.data[:] = image.data

    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        self._idle().write_striped(base, chunk)

    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        self._idle().write_channel(ch, base, raw)

    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        return self._idle().read_channel(ch, base, n)

    def read_striped(self, base: int, n: int) -> np.ndarray:
        return self._idle().read_striped(base, n).copy()

    def start(self, on_token: TokenCallback | None = None) -> None:
        from tandem.sim.rtljob import memory_class, run_job

        image = self._idle()
        args = dict(self.args)
        self._error = None
        self.last_job = None
        kwargs = {} if self._log is ... else {"log": self._log}

        def work():
            try:
                job = run_job(
                    self.geom,
                    image,
                    args,
                    mem_bytes=memory_class(self.max_bytes),
                    read_latency=self.read_latency,
                    max_cycles=self.max_cycles,
                    **kwargs,
                )
                image.data[:] = job.memory
                self.last_job = job
                if on_token is not None:
                    for i, tok in enumerate(job.tokens):
                        on_token(i, tok)
            except BaseException as err:  # reported by wait()
                self._error = err

        self._thread = threading.Thread(target=work, name="tandem-rtl", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> StatusRecord:
        if self._thread is None:
            raise DeviceError("the device was not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the {self.name} device is still running after {timeout} s")
        if self._error is not None:
            raise DeviceError(f"the RTL simulation failed: {self._error}") from self._error
        return self.read_status()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.image = None
