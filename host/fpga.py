"""The ``fpga`` backend: the decode core on an Alveo card, through XRT.

One backend, two host paths
---------------------------
``FpgaDevice(geom, xclbin, api=...)`` (``open_device("fpga", ...)``) opens one of:

- ``api="xrt"``: :class:`tandem.host.xrt.XrtDevice`, XRT's native Python binding ``pyxrt``.
  It is installed with XRT (``/opt/xilinx/xrt/python``), not on PyPI, and the vendor's current
  examples use it. Buffers are placed by ``kernel.group_id(arg)``, and every transfer is an
  explicit ``bo.sync`` in a named direction. This is the preferred path.
- ``api="opencl"``: :class:`OpenClDevice` (this module), pyopencl over XRT's OpenCL. This is the
  fallback. pyopencl is a plain wheel, so the same buffer, queue and event code also runs on PoCL
  (Debian ``pocl-opencl-icd``) on any CPU; tests/test_fpga.py runs it there.
- ``api="auto"`` is the default, and what ``tandem generate --backend fpga`` uses: ``xrt`` when
  ``import pyxrt`` works, ``opencl`` otherwise.

:class:`FpgaDevice` holds what the two paths share: the checks, the buffer bookkeeping, the reads
and writes on top of two copy primitives, starting with the scalar arguments, and waiting with
a time-out. Each path supplies the primitives (``_program``, ``_alloc``, ``_copy_in``,
``_copy_out``, ``_start``, ``_poll``, ``_release``, ``_errors``). Constructing ``FpgaDevice``
returns the chosen path's class (``__new__``), so there is one backend name and one class in
:data:`tandem.host.backends.BACKENDS`.

Errors: ``wait`` returns the status record, error bits or not (the backend contract in
:mod:`tandem.host.device`). An error from the runtime (OpenCL or XRT) in any call becomes a
one-line :class:`DeviceError` that names the step, with a hint where the cause is known: no
card, an xclbin built for another core or platform, a card in use.

Bank placement
--------------
Each kernel argument ``hbm<ch>`` (port ``m_axi_hbm<ch>``) is wired to pseudo-channel ``HBM[ch]``
by ``make bitstream``'s link.cfg. Channel ``ch``'s buffer must live in that bank before any data
reaches it. The XRT path allocates it there (``pyxrt.bo(..., kernel.group_id(arg))``) and first
checks that the xclbin really connects ``hbm<ch>`` to ``HBM[ch]``. XRT's OpenCL has no bank flag:
it places a buffer in the bank of the argument the buffer is bound to when the buffer first
migrates. So :meth:`OpenClDevice._alloc` binds each buffer with ``kernel.set_arg`` before any
``enqueue_copy`` touches it. A buffer bound later would land in a default bank, where the
kernel's port could not reach it, or would reach it across the HBM switch at a fraction of the
bandwidth.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

from tandem.geometry import GEOMETRIES, CoreGeometry
from tandem.layout import HBMImage, StatusRecord
from tandem.regmap import SCALAR_ARGS, arguments

from .device import Device, DeviceError, TokenCallback, check_access

KERNEL_NAME = "tandem_decode_core"
"""The RTL kernel's name in the xclbin (the top level, see rtl/)."""

APIS = ("auto", "xrt", "opencl")
"""The ``api`` option of the ``fpga`` backend."""

PLATFORM = "xilinx_u55c_gen3x16_xdma_3_202210_1"
"""The platform ``make bitstream`` links for (scripts/bitstream.py)."""
SHELL = "xilinx_u55c_gen3x16_xdma_base_3"
"""The shell a U55C runs that platform on, as ``xbutil examine`` names it."""

CARD_IN_USE = (
    "the card is in use: another process holds a different xclbin on it; wait for that process "
    "to finish (`xbutil examine` shows what is loaded)"
)
WRONG_SHELL = (
    f"the xclbin was linked for another platform than the card's shell: make bitstream links "
    f"for {PLATFORM}, which needs the shell {SHELL} on the card (`xbutil examine`)"
)
FIRST_RUN = "docs/host.md, First run on a card"

Hints = Sequence[tuple[str, str]]
"""(text in the runtime's message, what it means): the first match is added to the error."""


def card_error(runtime: str, step: str, where: str, err: BaseException, hints: Hints = ()):
    """The one-line :class:`DeviceError` for a runtime error raised while doing ``step``."""
    text = " ".join(str(err).split()) or type(err).__name__
    hint = next((h for key, h in hints if key.lower() in text.lower()), "")
    return DeviceError(
        f"{runtime} error while {step}{where}: {text}" + (f" ({hint})" if hint else "")
    )


class DeviceTimeoutError(TimeoutError):
    """The kernel did not signal completion within the time-out."""


def path_class(api: str) -> type[FpgaDevice]:
    """The device class of an ``api`` (:data:`APIS`); ``auto`` is ``xrt`` if pyxrt imports."""
    from . import xrt

    if api == "auto":
        api = "xrt" if xrt.load_pyxrt(required=False) is not None else "opencl"
    if api == "xrt":
        return xrt.XrtDevice
    if api == "opencl":
        return OpenClDevice
    raise DeviceError(f"unknown fpga api {api!r}; choose one of {', '.join(APIS)}")


class FpgaDevice(Device):
    """The decode core on an Alveo card: what the XRT and OpenCL paths share.

    ``FpgaDevice(...)`` returns the class of the chosen path (``api``); the paths' classes take
    the same parameters plus their own.

    Parameters
    ----------
    geom : CoreGeometry
        Must match the xclbin's core (one ``hbm<ch>`` argument per channel).
    xclbin : path, optional
        The bitstream container (``make bitstream``); needed unless a subclass overrides
        :meth:`_program`.
    api : {"auto", "xrt", "opencl"}
        The host path (module docstring).
    device_index : int
        Which card (XRT's device index; the OpenCL platform's device).
    kernel_name : str
    """

    name = "fpga"
    api: ClassVar[str] = ""
    """The path a subclass implements: ``xrt`` or ``opencl``."""

    def __new__(cls, geom: CoreGeometry, *args, api: str = "auto", **options):
        if cls is FpgaDevice:
            cls = path_class(api)
        return super().__new__(cls)

    def __init__(
        self,
        geom: CoreGeometry,
        xclbin: str | Path | None = None,
        *,
        api: str = "auto",
        device_index: int = 0,
        kernel_name: str = KERNEL_NAME,
    ):
        super().__init__(geom)
        if api not in ("auto", self.api):
            raise DeviceError(f"{type(self).__name__} is the fpga backend's {self.api!r} path")
        self.xclbin = Path(xclbin) if xclbin is not None else None
        self.device_index = device_index
        self.kernel_name = kernel_name
        self.where = f"card {device_index}"
        """The card, for messages (each path names it more precisely)."""
        self.kernel = None
        self.buffers: list = []
        self.nbytes = 0
        self.last_record: StatusRecord | None = None
        self._run = None
        self._arg_index = {a.name: i for i, a in enumerate(arguments(geom.channels))}

    # the path's primitives --------------------------------------------------------------------

    @abc.abstractmethod
    def _errors(self, step: str, where: str = "", hints: Hints = ()):
        """Context manager: runtime errors raised inside become a :func:`card_error`."""

    @abc.abstractmethod
    def _program(self):
        """Load the xclbin; return the kernel (after :meth:`check_arguments`)."""

    @abc.abstractmethod
    def _alloc(self, ch: int, nbytes: int):
        """A buffer of ``nbytes`` in the bank of argument ``hbm<ch>``, before any data moves."""

    @abc.abstractmethod
    def _copy_in(self, buf, host: np.ndarray, offset: int) -> None:
        """Host bytes to the device buffer at ``offset``, visible to the next run."""

    @abc.abstractmethod
    def _copy_out(self, buf, out: np.ndarray, offset: int) -> None:
        """Device buffer bytes at ``offset`` into ``out``, after every earlier write and run."""

    @abc.abstractmethod
    def _start(self, scalars: dict[str, int]):
        """Set every argument in register-map order and start one run; return its handle."""

    @abc.abstractmethod
    def _poll(self, run, seconds: float) -> bool:
        """True once ``run`` completed; False after waiting up to about ``seconds``. Raises
        DeviceError if it failed."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the channel buffers (no run uses them)."""

    # shared checks ----------------------------------------------------------------------------

    def xclbin_file(self) -> Path:
        if self.xclbin is None:
            raise DeviceError("the fpga backend needs xclbin=<path to the .xclbin>")
        if not self.xclbin.is_file():
            raise DeviceError(f"xclbin {self.xclbin} not found; build it with `make bitstream`")
        return self.xclbin

    def check_arguments(self, n_args: int) -> None:
        """Refuse a kernel whose argument count is not this core's (5 scalars + one pointer a
        channel): the xclbin was built for another geometry."""
        want = len(self._arg_index)
        if n_args == want:
            return
        channels = n_args - len(SCALAR_ARGS)
        fits = [g.name for g in GEOMETRIES.values() if g.channels == channels]
        built = (
            f"a core with {channels} HBM channels"
            + (f" (--geometry {' or '.join(fits)})" if fits else "")
            if channels > 0
            else "something else"
        )
        raise DeviceError(
            f"xclbin {self.xclbin} does not match the {self.geom.name} core: its kernel "
            f"{self.kernel_name} has {n_args} arguments, the {self.geom.name} core has {want} "
            f"({len(SCALAR_ARGS)} scalars and {self.geom.channels} HBM channels); it was built "
            f"for {built}: pass the --geometry it was built for, or rebuild it with "
            f"`make bitstream GEOMETRY={self.geom.name}`"
        )

    def _loaded(self):
        if not self.buffers:
            raise DeviceError("no image loaded: call load(image) first")

    def _idle(self):
        self._loaded()
        if self._run is not None:
            raise DeviceError("the kernel is running; wait() for it first")

    def _range(self, base: int, n: int, ch: int = 0) -> None:
        check_access(self.geom, self.nbytes, ch, base, n)

    # Device -----------------------------------------------------------------------------------

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
        with self._errors("loading the image", f" ({image.nbytes:,} bytes per channel)"):
            self.nbytes = image.nbytes
            # Every buffer is in its argument's bank before any data moves (module docstring).
            self.buffers = [self._alloc(ch, self.nbytes) for ch in range(self.geom.channels)]
            for ch, buf in enumerate(self.buffers):
                self._copy_in(buf, image.data[ch], 0)

    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        self._idle()
        chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
        if chunk.ndim != 2 or chunk.shape[0] != self.geom.channels:
            raise DeviceError(f"need uint8 [{self.geom.channels}, n], got {chunk.shape}")
        self._range(base, chunk.shape[1])
        with self._errors("writing HBM"):
            for ch, buf in enumerate(self.buffers):
                self._copy_in(buf, chunk[ch], base)

    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        self._idle()
        data = np.frombuffer(bytes(raw), np.uint8) if not isinstance(raw, np.ndarray) else raw
        data = np.ascontiguousarray(data).view(np.uint8).ravel()
        self._range(base, data.size, ch)
        with self._errors("writing HBM"):
            self._copy_in(self.buffers[ch], data, base)

    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        return self.read_into(ch, base, np.empty(n, np.uint8)).tobytes()

    def read_striped(self, base: int, n: int) -> np.ndarray:
        out = np.empty((self.geom.channels, n), np.uint8)
        for ch in range(self.geom.channels):
            self.read_into(ch, base, out[ch])
        return out

    def read_into(self, ch: int, base: int, out: np.ndarray) -> np.ndarray:
        """Blocking device-to-host read, after every earlier write and run."""
        self._idle()
        self._range(base, out.nbytes, ch)
        if out.nbytes:
            with self._errors("reading HBM"):
                self._copy_out(self.buffers[ch], out, base)
        return out

    def start(self, on_token: TokenCallback | None = None) -> None:
        """Set the arguments (tandem.regmap order) and start after the pending writes.
        ``on_token`` is not called: the card reports tokens only when it stops."""
        self._idle()
        self.last_record = None
        scalars = {name: self.args[name] for name, _ in SCALAR_ARGS}
        with self._errors("starting the kernel", f" on {self.where}"):
            self._run = self._start(scalars)

    def wait(self, timeout: float | None = None) -> StatusRecord:
        """Wait for the kernel and return the status record it wrote (error bits or not: the
        runtime judges it, as for every backend).

        Raises
        ------
        DeviceTimeoutError
            (a TimeoutError) still running after ``timeout`` seconds; the run goes on and a
            later ``wait`` picks it up.
        DeviceError
            the run failed (a failed OpenCL command, an XRT error state): no status record.
        """
        if self._run is None:
            raise DeviceError("the kernel was not started")
        t0, delay = time.monotonic(), 1e-4
        while True:
            try:
                with self._errors("waiting for the kernel", f" on {self.where}"):
                    if self._poll(self._run, delay):
                        break
            except DeviceError:
                self._run = None
                raise
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise DeviceTimeoutError(
                    f"the {self.name} device {self.where} did not finish within {timeout} s "
                    f"(kernel {self.kernel_name}, args {self.args})"
                )
            delay = min(2 * delay, 0.01)
        self._run = None
        self.last_record = self.read_status()
        return self.last_record

    def run_stats(self) -> dict:
        r = self.last_record
        return {} if r is None or not r.cycles else {"cycles": r.cycles}

    def close_buffers(self) -> None:
        self._release()
        self.buffers = []

    def close(self) -> None:
        if self._run is not None:
            return  # a run still owns the buffers; releasing them under it is unsafe
        if self.buffers:
            self.close_buffers()


# --------------------------------------------------------------------------------------------
# The OpenCL path


def _cl():
    try:
        import pyopencl
    except ImportError as err:  # pragma: no cover - pyopencl is a project dependency
        raise DeviceError(f"the fpga backend needs pyopencl ({err})") from err
    return pyopencl


@contextmanager
def _cl_errors(step: str, where: str = "", hints: Hints = ()) -> Iterator:
    """OpenCL errors (``pyopencl.Error``: LogicError, MemoryError, RuntimeError) raised by
    ``step`` become a DeviceError naming it; the message stays one line."""
    cl = _cl()
    try:
        yield cl
    except cl.Error as err:
        raise card_error("OpenCL", step, where, err, hints) from err


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


def platform_devices(platform) -> list:
    """The platform's devices; none (not an error) where OpenCL says DEVICE_NOT_FOUND."""
    cl = _cl()
    try:
        return list(platform.get_devices())
    except cl.Error as err:
        if "DEVICE_NOT_FOUND" in str(err):
            return []
        raise card_error("OpenCL", "listing the devices of", f" {platform.name!r}", err) from err


LOAD_HINTS_OPENCL: Hints = (
    ("OUT_OF_RESOURCES", CARD_IN_USE),
    ("INVALID_BINARY", f"not an xclbin for this card, or {WRONG_SHELL}"),
    ("INVALID_KERNEL_NAME", "the xclbin has no tandem decode core; build one with make bitstream"),
)


class OpenClDevice(FpgaDevice):
    """The ``fpga`` backend through XRT's OpenCL (pyopencl): the fallback path.

    Two methods need the card and are kept apart for that reason: :meth:`_program` turns the
    xclbin into a kernel (``cl.Program(ctx, [dev], [xclbin]).build()`` only works on XRT), and
    :meth:`_launch` enqueues the RTL kernel. tests/test_fpga.py replaces ``_program`` with an
    OpenCL C stand-in on PoCL; tests/test_backends.py runs everything against a fake of the
    pyopencl calls made here (tests/fake_opencl.py).

    Parameters
    ----------
    platform : str or None
        Substring of the OpenCL platform name ("Xilinx" for XRT; None: any).
    options
        as :class:`FpgaDevice`.
    """

    api = "opencl"

    def __init__(
        self,
        geom: CoreGeometry,
        xclbin: str | Path | None = None,
        *,
        platform: str | None = "Xilinx",
        **options,
    ):
        super().__init__(geom, xclbin, **options)
        device_index = self.device_index
        plat = find_platform(platform)
        devices = platform_devices(plat)
        if not devices:
            raise DeviceError(
                f"OpenCL platform {plat.name!r} has no devices: no Alveo card found (is it "
                f"installed, and its driver loaded? `xbutil examine` lists the cards; {FIRST_RUN})"
            )
        if not 0 <= device_index < len(devices):
            raise DeviceError(
                f"device index {device_index} out of range: platform {plat.name!r} has "
                f"{len(devices)} devices"
            )
        self.cl_device = devices[device_index]
        self.where = repr(self.cl_device.name)
        with self._errors("opening", f" {self.where}") as cl:
            self.ctx = cl.Context([self.cl_device])
            self.queue = cl.CommandQueue(self.ctx, self.cl_device)
        self._pending: list[tuple[object, object]] = []  # (event, host array kept alive)

    def _errors(self, step: str, where: str = "", hints: Hints = ()):
        return _cl_errors(step, where, hints)

    # the two card-only steps ----------------------------------------------------------------

    def _program(self):
        """The kernel from the xclbin. Only XRT accepts an xclbin as an OpenCL 'binary'."""
        path = self.xclbin_file()
        where = f" {path} onto {self.where}"
        with self._errors("loading", where, LOAD_HINTS_OPENCL) as cl:
            prog = cl.Program(self.ctx, [self.cl_device], [path.read_bytes()]).build()
            kernel = cl.Kernel(prog, self.kernel_name)
            n_args = kernel.num_args
        self.check_arguments(n_args)
        return kernel

    def _launch(self, wait_for: list):
        """Enqueue one run of the kernel after ``wait_for``; returns its event.

        An RTL kernel is a single work item (``ap_ctrl_hs``): XRT turns this into ap_start.
        """
        cl = _cl()
        return cl.enqueue_nd_range_kernel(self.queue, self.kernel, (1,), (1,), wait_for=wait_for)

    # recorded primitives (the tests check their order) ----------------------------------------

    def _bind(self, index: int, value) -> None:
        self.kernel.set_arg(index, value)

    def _alloc(self, ch: int, nbytes: int):
        """A READ_WRITE buffer bound to argument ``hbm<ch>`` at once: XRT places it in that
        argument's bank at its first migration."""
        cl = _cl()
        buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, nbytes)
        self._bind(self._arg_index[f"hbm{ch}"], buf)
        return buf

    def _copy_in(self, buf, host: np.ndarray, offset: int):
        """Non-blocking host-to-device copy; returns the event. ``host`` stays alive until the
        event completes (kept in ``_pending``)."""
        cl = _cl()
        ev = cl.enqueue_copy(self.queue, buf, host, dst_offset=offset, is_blocking=False)
        self._pending.append((ev, host))
        return ev

    def _copy_out(self, buf, out: np.ndarray, offset: int) -> None:
        """Blocking read, ordered after every pending write."""
        cl = _cl()
        cl.enqueue_copy(
            self.queue, out, buf, src_offset=offset, is_blocking=True, wait_for=self._events()
        )
        self._retire()

    def _start(self, scalars: dict[str, int]):
        """Bind the scalars (np.uint32, their register-map indices), launch after the pending
        writes, and flush the queue: an event on an unflushed queue may never advance, so
        polling it could wait forever."""
        for name, value in scalars.items():
            self._bind(self._arg_index[name], np.uint32(value))
        run = self._launch(self._events())
        self.queue.flush()
        return run

    def _poll(self, run, seconds: float) -> bool:
        cl = _cl()
        state = run.command_execution_status
        if state == cl.command_execution_status.COMPLETE:
            return True
        if state < 0:
            raise DeviceError(f"the kernel run failed on {self.where}: OpenCL status {state}")
        time.sleep(seconds)
        return False

    def _events(self) -> list:
        return [ev for ev, _ in self._pending]

    def _retire(self) -> None:
        """Drop host arrays whose copies completed."""
        cl = _cl()
        done = cl.command_execution_status.COMPLETE
        self._pending = [(e, h) for e, h in self._pending if e.command_execution_status != done]

    def _release(self) -> None:
        self.queue.finish()
        self._pending.clear()
        for buf in self.buffers:
            buf.release()
