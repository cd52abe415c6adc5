"""The ``fpga`` backend's preferred path: XRT's native Python binding, ``pyxrt``.

pyxrt comes with XRT (``/opt/xilinx/xrt/python``, on ``PYTHONPATH`` after
``source /opt/xilinx/xrt/setup.sh``); it is not on PyPI. :class:`XrtDevice` uses only calls that
XRT's binding defines (XRT ``src/python/pybind11/src/pyxrt.cpp``) and that the vendor's own
Python tests and examples make (XRT ``tests/python/22_verify``, ``23_bandwidth``;
Vitis_Accel_Examples ``hello_world_py``)::

    n = pyxrt.enumerate_devices()                   # cards XRT sees
    d = pyxrt.device(index)
    xb = pyxrt.xclbin(path)                         # get_kernels(), get_mems(), get_xsa_name()
    uuid = d.load_xclbin(xb)
    k = pyxrt.kernel(d, uuid, name)                 # its compute unit, shared access
    bo = pyxrt.bo(d, size, pyxrt.bo.normal, k.group_id(arg))    # in the argument's bank
    bo.write(data, offset); bo.sync(XCL_BO_SYNC_BO_TO_DEVICE, size, offset)
    run = pyxrt.run(k); run.set_arg(i, bo_or_int); run.start()
    run.wait(ms)                                    # the state, or ERT_CMD_STATE_TIMEOUT
    run.state()                                     # ERT_CMD_STATE_COMPLETED, ..._ERROR, ...
    bo.sync(XCL_BO_SYNC_BO_FROM_DEVICE, size, offset); bo.read(size, offset)

The rules those calls carry, and how this module keeps them:

- **Bank.** ``kernel.group_id(i)`` is the memory bank (or group) the xclbin connects argument
  ``i`` to, and a buffer must be allocated there. XRT itself only warns about a buffer in
  another bank and copies it into a connected bank for the run, so the kernel's writes would
  not reach the host's buffer. Before allocating, :meth:`XrtDevice._program` checks that the
  xclbin connects ``hbm<ch>`` to ``HBM[ch]`` (``xclbin.get_mems()`` tags), as
  ``make bitstream``'s link.cfg does.
- **Sync directions.** ``bo.write``/``bo.read`` touch only the host copy; a write reaches the
  card with ``sync(XCL_BO_SYNC_BO_TO_DEVICE)`` before the run, and what the kernel wrote reaches
  the host with ``sync(XCL_BO_SYNC_BO_FROM_DEVICE)`` before ``bo.read``.
- **Arguments** go by index, in the kernel's order: :func:`tandem.regmap.arguments`. A scalar
  goes in as a Python ``int`` that fits a C ``int`` (pybind11's caster for
  ``run.set_arg(int, int&)``); XRT copies its 4 bytes into the 32-bit argument, so an unsigned
  value >= 2**31 is passed as the int with the same bits (:func:`as_c_int`).
- **Waiting.** ``run.wait(0)`` blocks until the run ends. A time-out is a number of
  milliseconds >= 1, and completing does not mean succeeding: ``run.state()`` says which.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tandem.geometry import CoreGeometry

from .device import DeviceError
from .fpga import (
    CARD_IN_USE,
    FIRST_RUN,
    WRONG_SHELL,
    FpgaDevice,
    Hints,
    card_error,
)

FAILED_STATES = frozenset(
    {
        "ERT_CMD_STATE_ERROR",
        "ERT_CMD_STATE_ABORT",
        "ERT_CMD_STATE_TIMEOUT",
        "ERT_CMD_STATE_NORESPONSE",
        "ERT_CMD_STATE_SKERROR",
        "ERT_CMD_STATE_SKCRASHED",
    }
)
"""Run states (``pyxrt.ert_cmd_state``) that end a run without success."""

XRT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, OverflowError, MemoryError, OSError)
"""What pybind11 turns XRT's C++ exceptions (and bad arguments) into."""

LOAD_HINTS: Hints = (
    ("busy", CARD_IN_USE),
    ("not supported", WRONG_SHELL),
    ("does not match", WRONG_SHELL),
    ("not permitted", f"no permission to use the card: see `xbutil examine` ({FIRST_RUN})"),
)


def load_pyxrt(required: bool = True):
    """The ``pyxrt`` module; None if it does not import and not ``required``."""
    try:
        import pyxrt
    except ImportError as err:
        if not required:
            return None
        raise DeviceError(
            f"the fpga backend's xrt path needs XRT's Python binding pyxrt ({err}); it is "
            "installed with XRT in /opt/xilinx/xrt/python, not on PyPI: source "
            "/opt/xilinx/xrt/setup.sh, or use api='opencl'"
        ) from err
    return pyxrt


def as_c_int(value: int) -> int:
    """A 32-bit argument value as the C ``int`` with the same bits (what ``run.set_arg`` takes)."""
    value = int(value) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@contextmanager
def xrt_errors(step: str, where: str = "", hints: Hints = ()) -> Iterator:
    """Errors from pyxrt raised by ``step`` become one-line DeviceErrors naming it."""
    try:
        yield
    except (DeviceError, TimeoutError):
        raise
    except XRT_ERRORS as err:
        raise card_error("XRT", step, where, err, hints) from err


class XrtDevice(FpgaDevice):
    """The ``fpga`` backend through pyxrt: the preferred path. Parameters as
    :class:`~tandem.host.fpga.FpgaDevice`."""

    api = "xrt"

    def __init__(self, geom: CoreGeometry, xclbin: str | Path | None = None, **options):
        super().__init__(geom, xclbin, **options)
        device_index = self.device_index
        self.xrt = xrt = load_pyxrt()
        with self._errors("looking for Alveo cards"):
            count = xrt.enumerate_devices()
        if count == 0:
            raise DeviceError(
                "XRT finds no Alveo card (pyxrt.enumerate_devices() is 0): is it installed, and "
                f"XRT's driver loaded? `xbutil examine` lists the cards ({FIRST_RUN})"
            )
        if not 0 <= device_index < count:
            raise DeviceError(
                f"device index {device_index} out of range: XRT finds {count} card(s)"
            )
        with self._errors("opening", f" card {device_index}", LOAD_HINTS):
            self.device = xrt.device(device_index)
            info = xrt.xrt_info_device
            name, bdf = (self.device.get_info(k) for k in (info.name, info.bdf))
        self.where = f"card {device_index} ({name}, {bdf})"
        self.groups: list[int] = []
        """Memory group of each channel's argument (``kernel.group_id``)."""
        self.xclbin_info = None

    def _errors(self, step: str, where: str = "", hints: Hints = ()):
        return xrt_errors(step, where, hints)

    def _program(self):
        """Read the xclbin, check it is this core (kernel name, argument count), load it, open
        the kernel, and check that argument ``hbm<ch>`` is connected to ``HBM[ch]``."""
        path, xrt, c = self.xclbin_file(), self.xrt, self.geom.channels
        with self._errors("reading", f" xclbin {path}"):
            xb = xrt.xclbin(str(path))
            kernels = {k.get_name(): k.get_num_args() for k in xb.get_kernels()}
            tags = {m.get_index(): m.get_tag() for m in xb.get_mems()}
        if self.kernel_name not in kernels:
            raise DeviceError(
                f"xclbin {path} has no kernel {self.kernel_name!r} (it has "
                f"{', '.join(sorted(kernels)) or 'none'}): it is not a tandem decode core; build "
                "one with `make bitstream`"
            )
        self.check_arguments(kernels[self.kernel_name])
        with self._errors("loading", f" {path} onto {self.where}", LOAD_HINTS):
            uuid = self.device.load_xclbin(xb)
        with self._errors("opening the kernel", f" {self.kernel_name} on {self.where}"):
            kernel = xrt.kernel(self.device, uuid, self.kernel_name)
            groups = [kernel.group_id(self._arg_index[f"hbm{ch}"]) for ch in range(c)]
        for ch, group in enumerate(groups):
            # the bank is the low 16 bits (the rest name a context slot in newer XRT)
            tag = tags.get(group & 0xFFFF)
            if tag != f"HBM[{ch}]":
                what = f"bank {tag}" if tag else f"memory group {group}, not one bank"
                raise DeviceError(
                    f"xclbin {path} connects kernel argument hbm{ch} (port m_axi_hbm{ch}) to "
                    f"{what}, not HBM[{ch}]: each port needs its own pseudo-channel "
                    f"(link.cfg: sp=<cu>.m_axi_hbm{ch}:HBM[{ch}]); rebuild it with "
                    "`make bitstream`"
                )
        self.groups, self.xclbin_info = groups, xb
        return kernel

    def _alloc(self, ch: int, nbytes: int):
        """A host-and-device buffer (``bo.normal``) in argument ``hbm<ch>``'s bank."""
        return self.xrt.bo(self.device, nbytes, self.xrt.bo.normal, self.groups[ch])

    def _copy_in(self, buf, host: np.ndarray, offset: int) -> None:
        """Write the host copy, then sync those bytes to the card (XRT copies at once)."""
        host = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        buf.write(host, offset)
        buf.sync(self.xrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, host.size, offset)

    def _copy_out(self, buf, out: np.ndarray, offset: int) -> None:
        """Sync the bytes from the card, then read the host copy."""
        n = out.nbytes
        buf.sync(self.xrt.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE, n, offset)
        out.view(np.uint8).reshape(-1)[:] = np.asarray(buf.read(n, offset)).view(np.uint8)

    def _start(self, scalars: dict[str, int]):
        """A new run with every argument set by its register-map index, started."""
        run = self.xrt.run(self.kernel)
        for name, value in scalars.items():
            run.set_arg(self._arg_index[name], as_c_int(value))
        for ch, buf in enumerate(self.buffers):
            run.set_arg(self._arg_index[f"hbm{ch}"], buf)
        run.start()
        return run

    def _poll(self, run, seconds: float) -> bool:
        run.wait(max(1, round(seconds * 1000)))  # 0 would block until the run ends
        state = run.state()
        name = getattr(state, "name", str(state))
        if name == "ERT_CMD_STATE_COMPLETED":
            return True
        if name in FAILED_STATES:
            raise DeviceError(f"the kernel run failed on {self.where}: {name}")
        return False

    def _release(self) -> None:
        """pyxrt frees a buffer with its last reference (FpgaDevice.close_buffers drops them)."""
