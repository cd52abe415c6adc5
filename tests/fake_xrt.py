"""A fake ``pyxrt`` module (XRT's Python binding) over fake Alveo cards, for host/xrt.py.

The names and signatures are XRT's (src/python/pybind11/src/pyxrt.cpp): ``enumerate_devices``,
``device(index)`` with ``load_xclbin``/``get_info``, ``xclbin(path)`` with ``get_kernels``/
``get_mems``/``get_xsa_name``/``get_uuid``, ``kernel(device, uuid, name)`` with ``group_id``,
``bo(device, size, flags, group)`` with ``write``/``read``/``sync``/``size``, ``run(kernel)``
with ``set_arg``/``start``/``wait``/``state``, and the enums ``xclBOSyncDirection``,
``ert_cmd_state``, ``xrt_info_device``. The kernel is the ISA simulator on the card's memories
(tests/fake_cards.py), so results are checked bit for bit.

The pytest fixture ``xrt_card`` (import ``xrt_card_fixture``) installs it as ``pyxrt``
(``sys.modules``).
"""

from __future__ import annotations

import enum
import operator
import sys
import threading

import numpy as np
import pytest
from fake_cards import BANK_BYTES, HBM_BANKS, read_xclbin, run_kernel

from tandem.geometry import geometry
from tandem.host.fpga import PLATFORM, SHELL
from tandem.regmap import arguments


class xclBOSyncDirection(enum.Enum):
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1
    XCL_BO_SYNC_BO_GMIO_TO_AIE = 2
    XCL_BO_SYNC_BO_AIE_TO_GMIO = 3


class ert_cmd_state(enum.Enum):
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9
    ERT_CMD_STATE_SKERROR = 10
    ERT_CMD_STATE_SKCRASHED = 11


class xrt_info_device(enum.Enum):
    bdf = "bdf"
    name = "name"


class flags(enum.Enum):
    normal = 0
    cacheable = 1
    device_only = 2
    host_only = 3
    p2p = 4
    svm = 5


S = ert_cmd_state
TO_DEVICE = xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
FROM_DEVICE = xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE
C_INT = (-(1 << 31), 1 << 31)

MEMS = [f"PLRAM[{i}]" for i in range(6)] + [f"HBM[{b}]" for b in range(HBM_BANKS)] + ["HOST[0]"]
"""The fake xclbin's memory topology: PLRAM first, so a bank's memory index is not its HBM
number (a host that used the channel number as the group would be caught)."""


def mem_index(bank: int) -> int:
    return MEMS.index(f"HBM[{bank}]")


def _ranges(mask: np.ndarray) -> str:
    """The first run of True in ``mask``, as ``[lo, hi)``."""
    idx = np.flatnonzero(mask)
    lo = int(idx[0])
    gaps = np.flatnonzero(np.diff(idx) != 1)
    hi = int(idx[gaps[0]] if gaps.size else idx[-1]) + 1
    return f"[{lo:#x}, {hi:#x})"


class FakeXrt:
    """The ``pyxrt`` module over ``cards`` fake Alveo cards (index 0 is the one used).

    Rules it enforces, each an exception with a message saying which (XRT raises
    ``RuntimeError`` through pybind11; bad argument types are ``TypeError`` as pybind11 gives):

    - ``device(i)`` exists (``i < cards``); ``load_xclbin`` takes an xclbin linked for the card's
      platform (else "Operation not supported", as XRT refuses an xclbin for another shell) and
      fails with "Device or resource busy" while another process holds a different xclbin on
      the card (``busy``);
    - ``kernel(device, uuid, name)``: the xclbin of ``uuid`` is loaded, ``name`` is its kernel;
      ``group_id(i)`` is the memory index of the bank argument ``i`` is connected to (pointer
      arguments only);
    - ``bo(device, size, flags, group)``: ``flags`` is ``bo.normal`` (the core's channel buffers
      have a host copy and a device copy), ``group`` a memory of the loaded xclbin, 0 < size <=
      one HBM bank;
    - ``bo.write`` and ``bo.read`` touch the host copy only; ``bo.write`` takes a contiguous
      buffer (pyxrt copies ``itemsize * size`` bytes from its start); ``bo.sync(TO_DEVICE)``
      copies host to device, ``bo.sync(FROM_DEVICE)`` device to host. So a read without a sync
      from the device returns stale host bytes. A sync from the device over host writes not
      yet synced to the device is refused (it would lose them), and so is any sync of a buffer
      a started run uses;
    - ``run.set_arg(i, v)``: a pointer argument takes a bo allocated in the group the argument is
      connected to (XRT would only warn and copy the buffer into a connected bank for the run,
      so the kernel's writes would not reach it: the fake refuses); a scalar takes an int that
      fits a C int (pybind11's caster: else TypeError);
    - ``run.start()``: every argument set; no argument's bo has host writes not synced to the
      device; the run not already running. ``run.wait(ms)``: ``ms`` >= 0 (0 blocks until done, so
      it is refused while ``gate`` holds the run; every ``ms`` is recorded in ``waits``);
      returns the state, or ``ERT_CMD_STATE_TIMEOUT``.

    The kernel runs :class:`IsaSim` on the device copies on a thread, after ``gate`` is set;
    the run ends ``ERT_CMD_STATE_COMPLETED``, or ``ERT_CMD_STATE_ERROR`` if the simulator raised.
    """

    xclBOSyncDirection = xclBOSyncDirection
    ert_cmd_state = ert_cmd_state
    xrt_info_device = xrt_info_device

    def __init__(self, cards: int = 1):
        self.cards = cards
        self.platform = PLATFORM
        self.busy = False
        self.gate = threading.Event()
        self.gate.set()
        self.launches: list[dict] = []
        self.waits: list[int] = []
        self.runs: list[_Run] = []
        self.device = type("device", (_Device,), {"fake": self})
        self.xclbin = type("xclbin", (_Xclbin,), {"fake": self})
        self.kernel = type("kernel", (_Kernel,), {"fake": self})
        self.bo = type("bo", (_Bo,), {"fake": self})
        self.run = type("run", (_Run,), {"fake": self})

    def enumerate_devices(self) -> int:
        return self.cards

    def in_flight(self, bo) -> bool:
        return any(bo in r.bos for r in self.runs if r._state == S.ERT_CMD_STATE_SUBMITTED)


class _Uuid:
    def __init__(self, text):
        self.text = text

    def to_string(self):
        return self.text


class _Device:
    fake: FakeXrt

    def __init__(self, index: int):
        if not 0 <= operator.index(index) < self.fake.cards:
            raise RuntimeError(f"Could not open device with index '{index}'")
        self.index, self.loaded = index, None

    def get_info(self, key):
        return {xrt_info_device.name: SHELL, xrt_info_device.bdf: "0000:3b:00.1"}[key]

    def load_xclbin(self, xclbin):
        if not isinstance(xclbin, _Xclbin):
            xclbin = self.fake.xclbin(xclbin)
        if xclbin.meta["platform"] != self.fake.platform:
            raise RuntimeError("load_axlf: Operation not supported")
        if self.fake.busy:
            raise RuntimeError("load_axlf: Device or resource busy")
        self.loaded = xclbin
        return xclbin.get_uuid()

    def get_xclbin_uuid(self):
        return self.loaded.get_uuid() if self.loaded else _Uuid("0" * 32)


class _XclbinKernel:
    def __init__(self, name, n_args):
        self.name, self.n_args = name, n_args

    def get_name(self):
        return self.name

    def get_num_args(self):
        return self.n_args


class _Mem:
    def __init__(self, index, tag):
        self.index, self.tag = index, tag

    def get_index(self):
        return self.index

    def get_tag(self):
        return self.tag


class _Xclbin:
    fake: FakeXrt

    def __init__(self, path: str):
        with open(path, "rb") as f:
            meta = read_xclbin(f.read())
        if meta is None:
            raise RuntimeError(f"Invalid xclbin file: {path}: bad magic")
        self.meta, self.path = meta, path
        self.geom = geometry(meta["geometry"])
        self.uuid = _Uuid(f"{abs(hash((path, str(meta)))):032x}"[:32])

    def get_kernels(self):
        return [_XclbinKernel(self.meta["kernel"], len(arguments(self.geom.channels)))]

    def get_mems(self):
        return [_Mem(i, tag) for i, tag in enumerate(MEMS)]

    def get_xsa_name(self):
        return self.meta["platform"]

    def get_uuid(self):
        return self.uuid


class _Kernel:
    fake: FakeXrt

    def __init__(self, device, uuid, name):
        xb = device.loaded
        if xb is None or uuid.to_string() != xb.uuid.to_string():
            raise RuntimeError("xclbin id mismatch: load the xclbin before opening its kernel")
        if name != xb.meta["kernel"]:
            raise RuntimeError(f"No compute units matching '{name}'")
        self.device, self.name, self.geom = device, name, xb.geom
        self.args = arguments(xb.geom.channels)
        self.banks = xb.meta["banks"]

    def group_id(self, argno: int) -> int:
        arg = self.args[argno]
        if arg.kind != "pointer":
            raise RuntimeError(f"kernel argument {argno} ({arg.name}) has no memory connection")
        return mem_index(self.banks[int(arg.name[3:])])


class _Bo:
    fake: FakeXrt
    flags = flags
    normal, cacheable, device_only, host_only, p2p, svm = flags

    def __init__(self, device, size, bo_flags, group):
        if not isinstance(device, _Device):
            raise TypeError("bo(): incompatible function arguments (device)")
        if bo_flags is not flags.normal:
            raise RuntimeError(
                f"bo flags {bo_flags}: the core's channel buffers need a host copy and a "
                "device copy (bo.normal)"
            )
        if device.loaded is None or not 0 <= group < len(MEMS):
            raise RuntimeError(f"bo: memory group {group} does not exist in the loaded xclbin")
        if not 0 < size <= BANK_BYTES:
            raise RuntimeError(f"bo: cannot allocate {size} bytes in one HBM bank ({BANK_BYTES})")
        self.device, self.group, self._size = device, group, int(size)
        self.host = np.full(self._size, 0xEE, np.uint8)  # XRT does not clear either copy
        self.dev = np.full(self._size, 0xDD, np.uint8)
        self.unsynced = np.zeros(self._size, bool)  # host bytes written, not synced to device

    def size(self):
        return self._size

    def address(self):
        return 0x4000000000 + 0x20000000 * self.group

    def _span(self, size, offset, what):
        size, offset = operator.index(size), operator.index(offset)
        if size < 0 or offset < 0 or offset + size > self._size:
            raise RuntimeError(f"{what}: {size} bytes at {offset} outside the {self._size}-byte bo")
        return slice(offset, offset + size)

    def write(self, data, seek):
        view = memoryview(data)
        if not view.c_contiguous:
            raise RuntimeError(
                "bo.write of a non-contiguous buffer: pyxrt copies itemsize * size bytes from "
                "its start, not the buffer's elements"
            )
        raw = np.frombuffer(view.cast("B"), np.uint8)
        span = self._span(raw.size, seek, "bo.write")
        self.host[span] = raw
        self.unsynced[span] = True

    def read(self, size, skip):
        return self.host[self._span(size, skip, "bo.read")].view(np.int8).copy()

    def sync(self, direction, size=None, offset=0):
        if not isinstance(direction, xclBOSyncDirection):
            raise TypeError("sync(): incompatible function arguments (direction)")
        if direction not in (TO_DEVICE, FROM_DEVICE):
            raise RuntimeError(f"{direction.name} is for AIE GMIO buffers, not a PL kernel's")
        span = self._span(self._size if size is None else size, offset, "bo.sync")
        if self.fake.in_flight(self):
            raise RuntimeError(
                f"bo.sync({direction.name}) of a buffer a running kernel uses: wait for the run"
            )
        if direction is TO_DEVICE:
            self.dev[span] = self.host[span]
            self.unsynced[span] = False
        else:
            if self.unsynced[span].any():
                raise RuntimeError(
                    "bo.sync(XCL_BO_SYNC_BO_FROM_DEVICE) over host writes at "
                    f"{_ranges(self.unsynced[span])} not yet synced to the device: they "
                    "would be lost"
                )
            self.host[span] = self.dev[span]


class _Run:
    fake: FakeXrt

    def __init__(self, kernel):
        if not isinstance(kernel, _Kernel):
            raise TypeError("run(): incompatible function arguments (kernel)")
        self.kernel = kernel
        self.values: dict[int, object] = {}
        self._state = S.ERT_CMD_STATE_NEW
        self.done = threading.Event()
        self.bos: list[_Bo] = []

    def set_arg(self, index, value):
        args = self.kernel.args
        if not 0 <= operator.index(index) < len(args):
            raise RuntimeError(f"set_arg: kernel {self.kernel.name} has no argument {index}")
        arg = args[index]
        if isinstance(value, _Bo):
            if arg.kind != "pointer":
                raise RuntimeError(
                    f"set_arg({index}): argument {arg.name} is a scalar, not a global buffer"
                )
            want = self.kernel.group_id(index)
            if value.group != want:
                raise RuntimeError(
                    f"Kernel {self.kernel.name} has no compute units with connectivity required "
                    f"for global argument at index {index}. The argument is allocated in bank "
                    f"{value.group}, the compute unit is connected to bank {want} (XRT would copy "
                    "it into that bank for the run, and the kernel's writes would not reach it)"
                )
            self.values[index] = value
            return
        if arg.kind == "pointer":
            raise RuntimeError(f"set_arg({index}): argument {arg.name} is a global buffer: a bo")
        v = operator.index(value)  # TypeError for a non-integer, as pybind11
        if not C_INT[0] <= v < C_INT[1]:
            raise TypeError(
                f"set_arg(): incompatible function arguments: {v} for argument {arg.name} does "
                "not fit a C int (-2**31 <= v < 2**31)"
            )
        self.values[index] = v & 0xFFFFFFFF

    def start(self):
        if self._state == S.ERT_CMD_STATE_SUBMITTED:
            raise RuntimeError("run.start(): the run is already running")
        args = self.kernel.args
        unset = [a.name for i, a in enumerate(args) if i not in self.values]
        if unset:
            raise RuntimeError(f"run.start(): arguments not set: {unset}")
        bos = [self.values[i] for i, a in enumerate(args) if a.kind == "pointer"]
        for ch, bo in enumerate(bos):
            if bo.unsynced.any():
                raise RuntimeError(
                    f"run.start(): the bo of argument hbm{ch} has host writes at "
                    f"{_ranges(bo.unsynced)} not synced to the device: "
                    "bo.sync(XCL_BO_SYNC_BO_TO_DEVICE) before starting the run"
                )
        if len({bo.size() for bo in bos}) != 1:
            raise RuntimeError("the channel buffers differ in size")
        scalars = {a.name: self.values[i] for i, a in enumerate(args) if a.kind == "scalar"}
        self.bos, self._state = bos, S.ERT_CMD_STATE_SUBMITTED
        self.done.clear()
        self.fake.launches.append(scalars)
        self.fake.runs.append(self)

        def done(ok):
            self._state = S.ERT_CMD_STATE_COMPLETED if ok else S.ERT_CMD_STATE_ERROR
            self.done.set()

        run_kernel(self.kernel.geom, [bo.dev for bo in bos], scalars, self.fake.gate, done)

    def wait(self, timeout_ms=0):
        ms = operator.index(timeout_ms)
        if ms < 0:
            raise TypeError("wait(): incompatible function arguments (timeout_ms is unsigned)")
        if self._state == S.ERT_CMD_STATE_NEW:
            raise RuntimeError("run.wait(): the run was not started")
        self.fake.waits.append(ms)
        if ms == 0 and not self.fake.gate.is_set() and not self.done.is_set():
            raise RuntimeError(
                "run.wait(0) on a run that is held: 0 ms means no time-out in XRT, so this "
                "would block until the run ends and the caller's time-out could never fire"
            )
        if not self.done.wait(None if ms == 0 else ms / 1000):
            return S.ERT_CMD_STATE_TIMEOUT
        return self._state

    def state(self):
        return self._state


@pytest.fixture(name="xrt_card")
def xrt_card_fixture(monkeypatch):
    """A fake pyxrt with one card, importable as ``pyxrt`` (``api="auto"`` picks it)."""
    fake = FakeXrt()
    monkeypatch.setitem(sys.modules, "pyxrt", fake)
    yield fake
    fake.gate.set()
