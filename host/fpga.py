"""The ``fpga`` backend: the decode core on an Alveo card, through XRT's OpenCL with pyopencl.

Why pyopencl rather than pyxrt
------------------------------
pyxrt (``xrt.device``, ``xrt.bo``, ``xrt.kernel``) names HBM bank groups explicitly, but it only
exists where XRT is installed, so none of its code can run on a machine without a card. XRT also
implements OpenCL, and pyopencl is a plain wheel: the same buffer, queue and event code runs on
XRT with the card and on PoCL (Debian ``pocl-opencl-icd``) on any CPU. tests/test_fpga.py runs
this module for real on PoCL; only two methods need the card and are isolated for that reason:

- :meth:`FpgaDevice._program` turns the xclbin into a kernel (``cl.Program(ctx, [dev],
  [xclbin]).build()`` only works on XRT);
- :meth:`FpgaDevice._launch` enqueues the RTL kernel and returns its event.

The PoCL test substitutes a tiny OpenCL C kernel with the same argument list for ``_program`` and
keeps the real ``_launch`` (or a never-completing user event, to test the time-out).
tests/test_backends.py runs the whole module, ``_program`` and ``_launch`` included, against a
fake of the pyopencl surface used here that enforces XRT's rules and runs the ISA simulator as
the kernel.

Errors: ``wait`` returns the status record, error bits or not (the backend contract in
:mod:`tandem.host.device`); an OpenCL error from any call becomes a :class:`DeviceError` naming
the step.

Bank placement
--------------
XRT's OpenCL has no bank flag: it places a buffer in the HBM bank wired to the kernel argument it
is first bound to, and it decides at the buffer's first migration. So every channel buffer is bound
with ``kernel.set_arg`` *before* any ``enqueue_copy`` touches it (:meth:`FpgaDevice.load`). Bound
later, XRT would put it in a default bank and the kernel's ``m_axi_hbm<ch>`` port could not reach
it (or would reach it across the HBM switch at a fraction of the bandwidth).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tandem.geometry import CoreGeometry
from tandem.layout import HBMImage, StatusRecord
from tandem.regmap import SCALAR_ARGS, arguments

from .device import Device, DeviceError, TokenCallback, check_access

KERNEL_NAME = "tandem_decode_core"
"""The RTL kernel's name in the xclbin (the top level, see rtl/)."""


class DeviceTimeoutError(TimeoutError):
    """The kernel did not signal completion within the time-out."""


def _cl():
    try:
        import pyopencl
    except ImportError as err:  # pragma: no cover - pyopencl is a project dependency
        raise DeviceError(f"the fpga backend needs pyopencl ({err})") from err
    return pyopencl


@contextmanager
def _cl_errors(step: str, where: str = ""):
    """OpenCL errors (``pyopencl.Error``: LogicError, MemoryError, RuntimeError) raised by
    ``step`` become a DeviceError naming it; the message stays one line."""
    cl = _cl()
    try:
        yield cl
    except cl.Error as err:
        text = " ".join(str(err).split())
        raise DeviceError(f"OpenCL error while {step}{where}: {text}") from err


def find_platform(name: str | None = "Xilinx"):
    """The first OpenCL platform whose name contains ``name`` (any platform if None)."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.LogicError:  # no ICD at all
        platforms = []
    for p in platforms:
        if name is None or name.lower() in p.name.lower():
            return p
    found = ", ".join(p.name for p in platforms) or "none"
    raise DeviceError(
        f"no OpenCL platform matching {name!r} (found: {found}); the fpga backend needs XRT's "
        "OpenCL and an Alveo card (source /opt/xilinx/xrt/setup.sh)"
    )


class FpgaDevice(Device):
    """The decode core on an Alveo card through XRT's OpenCL.

    Parameters
    ----------
    geom : CoreGeometry
        Must match the xclbin's core (one ``hbm<ch>`` argument per channel).
    xclbin : path, optional
        The bitstream container (``make bitstream``); needed unless a subclass overrides
        :meth:`_program`.
    platform : str or None
        Substring of the OpenCL platform name ("Xilinx" for XRT).
    device_index : int
        Which device of the platform.
    kernel_name : str
    """

    name = "fpga"

    def __init__(
        self,
        geom: CoreGeometry,
        xclbin: str | Path | None = None,
        platform: str | None = "Xilinx",
        device_index: int = 0,
        kernel_name: str = KERNEL_NAME,
    ):
        super().__init__(geom)
        self.xclbin = Path(xclbin) if xclbin is not None else None
        self.kernel_name = kernel_name
        plat = find_platform(platform)
        devices = plat.get_devices()
        if not 0 <= device_index < len(devices):
            raise DeviceError(
                f"device index {device_index} out of range: platform {plat.name!r} has "
                f"{len(devices)} devices"
            )
        self.cl_device = devices[device_index]
        with _cl_errors("opening", f" {self.cl_device.name!r}") as cl:
            self.ctx = cl.Context([self.cl_device])
            self.queue = cl.CommandQueue(self.ctx, self.cl_device)
        self.kernel = None
        self.last_record: StatusRecord | None = None
        self.buffers: list = []
        self.nbytes = 0
        self._pending: list[tuple[object, object]] = []  # (event, host array kept alive)
        self._run_event = None
        self._arg_index = {a.name: i for i, a in enumerate(arguments(geom.channels))}

    # the two card-only steps ----------------------------------------------------------------

    def _program(self):
        """The kernel from the xclbin. Only XRT accepts an xclbin as an OpenCL 'binary'."""
        if self.xclbin is None:
            raise DeviceError("the fpga backend needs xclbin=<path to the .xclbin>")
        if not self.xclbin.is_file():
            raise DeviceError(f"xclbin {self.xclbin} not found; build it with `make bitstream`")
        with _cl_errors("loading", f" {self.xclbin} onto {self.cl_device.name!r}") as cl:
            prog = cl.Program(self.ctx, [self.cl_device], [self.xclbin.read_bytes()]).build()
            return cl.Kernel(prog, self.kernel_name)

    def _launch(self, wait_for: list):
        """Enqueue one run of the kernel after ``wait_for``; returns its event.

        An RTL kernel is a single work item (``ap_ctrl_hs``): XRT turns this into ap_start.
        """
        cl = _cl()
        return cl.enqueue_nd_range_kernel(self.queue, self.kernel, (1,), (1,), wait_for=wait_for)

    # recorded primitives (the test checks their order) ----------------------------------------

    def _bind(self, index: int, value) -> None:
        self.kernel.set_arg(index, value)

    def _copy_in(self, buf, host: np.ndarray, offset: int):
        """Non-blocking host-to-device copy; returns the event. ``host`` stays alive until the
        event completes (kept in ``_pending``)."""
        cl = _cl()
        ev = cl.enqueue_copy(self.queue, buf, host, dst_offset=offset, is_blocking=False)
        self._pending.append((ev, host))
        return ev

    # Device primitives ------------------------------------------------------------------------

    def _loaded(self):
        if not self.buffers:
            raise DeviceError("no image loaded: call load(image) first")

    def _idle(self):
        self._loaded()
        if self._run_event is not None:
            raise DeviceError("the kernel is running; wait() for it first")

    def _range(self, base: int, n: int, ch: int = 0) -> None:
        check_access(self.geom, self.nbytes, ch, base, n)

    def load(self, image: HBMImage) -> None:
        if image.geom.channels != self.geom.channels:
            raise DeviceError(
                f"image has {image.geom.channels} channels, the {self.geom.name} core "
                f"{self.geom.channels}"
            )
        if self.buffers:
            self._idle()
            self.close_buffers()
        if self.kernel is None:
            self.kernel = self._program()
        with _cl_errors("loading the image", f" ({image.nbytes:,} bytes per channel)") as cl:
            self.nbytes = image.nbytes
            self.buffers = [
                cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, self.nbytes)
                for _ in range(self.geom.channels)
            ]
            # Bind first, migrate second: XRT picks the bank at the first migration, from the
            # argument the buffer is bound to (module docstring).
            for ch, buf in enumerate(self.buffers):
                self._bind(self._arg_index[f"hbm{ch}"], buf)
            for ch, buf in enumerate(self.buffers):
                self._copy_in(buf, image.data[ch], 0)

    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        self._idle()
        chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
        if chunk.ndim != 2 or chunk.shape[0] != self.geom.channels:
            raise DeviceError(f"need uint8 [{self.geom.channels}, n], got {chunk.shape}")
        self._range(base, chunk.shape[1])
        with _cl_errors("writing HBM"):
            for ch, buf in enumerate(self.buffers):
                self._copy_in(buf, chunk[ch], base)

    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        self._idle()
        data = np.frombuffer(bytes(raw), np.uint8) if not isinstance(raw, np.ndarray) else raw
        data = np.ascontiguousarray(data).view(np.uint8).ravel()
        self._range(base, data.size, ch)
        with _cl_errors("writing HBM"):
            self._copy_in(self.buffers[ch], data, base)

    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        return self.read_into(ch, base, np.empty(n, np.uint8)).tobytes()

    def read_striped(self, base: int, n: int) -> np.ndarray:
        out = np.empty((self.geom.channels, n), np.uint8)
        for ch in range(self.geom.channels):
            self.read_into(ch, base, out[ch])
        return out

    def read_into(self, ch: int, base: int, out: np.ndarray) -> np.ndarray:
        """Blocking device-to-host read, ordered after every pending write."""
        self._idle()
        self._range(base, out.nbytes, ch)
        if out.nbytes:
            with _cl_errors("reading HBM") as cl:
                cl.enqueue_copy(
                    self.queue,
                    out,
                    self.buffers[ch],
                    src_offset=base,
                    is_blocking=True,
                    wait_for=self._events(),
                )
        self._retire()
        return out

    def _events(self) -> list:
        return [ev for ev, _ in self._pending]

    def _retire(self) -> None:
        """Drop host arrays whose copies completed."""
        cl = _cl()
        done = cl.command_execution_status.COMPLETE
        self._pending = [(e, h) for e, h in self._pending if e.command_execution_status != done]

    def start(self, on_token: TokenCallback | None = None) -> None:
        """Set the scalar arguments (tandem.regmap order) and launch after the pending writes.
        ``on_token`` is not called: the card reports tokens only when it stops."""
        self._idle()
        self.last_record = None
        with _cl_errors("starting the kernel", f" on {self.cl_device.name!r}"):
            for name, _ in SCALAR_ARGS:
                self._bind(self._arg_index[name], np.uint32(self.args[name]))
            self._run_event = self._launch(self._events())

    def wait(self, timeout: float | None = None) -> StatusRecord:
        """Wait for the kernel and return the status record it wrote (error bits or not: the
        runtime judges it, as for every backend).

        Raises
        ------
        DeviceTimeoutError
            (a TimeoutError) still running after ``timeout`` seconds; the run goes on and a
            later ``wait`` picks it up.
        DeviceError
            the launch command failed (a negative OpenCL execution status): no status record.
        """
        if self._run_event is None:
            raise DeviceError("the kernel was not started")
        cl = _cl()
        ev, t0 = self._run_event, time.monotonic()
        delay = 1e-4
        while True:
            state = ev.command_execution_status
            if state == cl.command_execution_status.COMPLETE:
                break
            if state < 0:
                self._run_event = None
                raise DeviceError(
                    f"the kernel run failed on {self.cl_device.name!r}: OpenCL status {state}"
                )
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise DeviceTimeoutError(
                    f"the {self.name} device {self.cl_device.name!r} did not finish within "
                    f"{timeout} s (kernel {self.kernel_name}, args {self.args})"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.01)
        self._run_event = None
        self.last_record = self.read_status()
        return self.last_record

    def run_stats(self) -> dict:
        r = self.last_record
        return {} if r is None or not r.cycles else {"cycles": r.cycles}

    def close_buffers(self) -> None:
        self.queue.finish()
        self._pending.clear()
        for buf in self.buffers:
            buf.release()
        self.buffers = []

    def close(self) -> None:
        if self._run_event is not None:
            return  # a run still owns the buffers; releasing them under it is unsafe
        if self.buffers:
            self.close_buffers()
