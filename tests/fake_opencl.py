"""A fake of the pyopencl calls host/fpga.py's OpenCL path makes, over one fake Alveo card that
enforces XRT's rules and runs the kernel with the ISA simulator (tests/fake_cards.py).

The pytest fixture ``card`` (import ``card_fixture``) puts it in place of pyopencl and hides
pyxrt, so that ``api="auto"`` picks the OpenCL path.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from fake_cards import BANK_BYTES, read_xclbin, run_kernel

from tandem.geometry import geometry
from tandem.host import fpga as fpga_module
from tandem.host.fpga import PLATFORM, SHELL
from tandem.regmap import SCALAR_ARGS, arguments


class Error(Exception):
    """pyopencl.Error"""


class LogicError(Error):
    """pyopencl.LogicError (invalid use of the API)"""


class MemoryError_(Error):
    """pyopencl.MemoryError"""


class RuntimeError_(Error):
    """pyopencl.RuntimeError"""


class ExecStatus:
    COMPLETE, RUNNING, SUBMITTED, QUEUED = 0, 1, 2, 3


class MemFlags:
    READ_WRITE, WRITE_ONLY, READ_ONLY = 1, 2, 4


CL_EXEC_FAILED = -14  # CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST, as XRT reports a dead kernel


class _Device:
    def __init__(self, card, name):
        self.card, self.name = card, name


class _Platform:
    def __init__(self, card):
        self.card, self.name = card, "Xilinx"

    def get_devices(self):
        if not self.card.present:
            raise RuntimeError_("clGetDeviceIDs failed: DEVICE_NOT_FOUND")
        return [self.card.device]


class _Event:
    """A command's event. Its status may be read only once its queue has been flushed: an
    OpenCL implementation need not submit a command before clFlush, so polling an unflushed
    event can wait forever (the fake says so instead)."""

    def __init__(self, ctx, what: str):
        self.ctx, self.what = ctx, what
        self._status = ExecStatus.QUEUED
        self.submitted = False
        self.done = threading.Event()

    @property
    def command_execution_status(self):
        if not self.submitted:
            raise LogicError(
                f"status of a {self.what} polled before its queue was flushed: the command may "
                "never be submitted; call queue.flush() (or finish()) before polling"
            )
        return self._status

    def _finish(self, status=ExecStatus.COMPLETE):
        self.submitted = True
        self._status = status
        self.done.set()

    def wait(self):
        self.done.wait()


class FakeCard:
    """The pyopencl module as host/fpga.py sees it, over one fake Alveo card.

    Rules it enforces (each a ``LogicError`` / ``MemoryError`` / ``RuntimeError`` as pyopencl
    would raise, or, for the bank rule, a refused launch where XRT would silently place the
    buffer in the wrong bank):

    - the card is there (``present``; else DEVICE_NOT_FOUND), not held by another process with
      another xclbin (``busy``; else OUT_OF_RESOURCES, as XRT reports it);
    - a program is built from an xclbin (the magic) linked for the card's platform; the kernel
      name must be the xclbin's; the kernel's arguments are the xclbin's core's (``num_args``);
    - buffers are READ_WRITE, 0 < size <= one HBM bank (512 MiB), and not used after release;
    - a buffer's bank is fixed at its first migration: the bank the xclbin connects the
      argument it is bound to (``banks``), else "default"; at launch, the buffer bound to
      ``hbm<ch>`` must sit in that argument's bank;
    - scalar arguments are sized NumPy scalars (``np.uint32``), pointer arguments live buffers of
      the same context; every argument is set before the launch; the launch is one work item;
    - commands are submitted when their queue is flushed (``flush``, ``finish`` or a blocking
      call); an event's status may not be polled before that;
    - copies stay inside the buffer, host arrays are contiguous (and writable for reads);
      non-blocking writes take their data from the host array when the queue is flushed, so the
      host must keep the array unchanged until the copy's event completes;
    - no host read or write of a buffer while a kernel that uses it is queued or running;
    - events in ``wait_for`` belong to the same context.

    The kernel runs :class:`IsaSim` on the channel buffers on a thread, like the card, after
    ``gate`` is set (set by default; clear it to hold a run). An exception in the simulator ends
    the launch event with a negative status, as a failed kernel command.
    """

    Error, LogicError, MemoryError, RuntimeError = Error, LogicError, MemoryError_, RuntimeError_
    command_execution_status = ExecStatus
    mem_flags = MemFlags

    def __init__(self):
        self.device = _Device(self, f"{SHELL} (fake)")
        self.platform = PLATFORM
        self.present = True
        self.busy = False
        self.gate = threading.Event()
        self.gate.set()
        self.launches: list[dict] = []

    # module functions -------------------------------------------------------------------------

    def get_platforms(self):
        return [_Platform(self)]

    def Context(self, devices):
        if list(devices) != [self.device]:
            raise LogicError("Context: unknown device")
        return _Context(self)

    def CommandQueue(self, ctx, device):
        if device is not self.device or ctx.card is not self:
            raise LogicError("CommandQueue: device not in context")
        return _Queue(ctx)

    def Program(self, ctx, devices, binaries):
        return _Program(ctx, devices, binaries)

    def Kernel(self, program, name):
        return _Kernel(program, name)

    def Buffer(self, ctx, flags, size):
        return _Buffer(ctx, flags, size)

    def enqueue_copy(
        self, queue, dst, src, *, dst_offset=0, src_offset=0, is_blocking=True, wait_for=None
    ):
        queue._check_wait_for(wait_for)
        if isinstance(dst, _Buffer) and isinstance(src, np.ndarray):
            buf, host, offset, to_device = dst, src, dst_offset, True
        elif isinstance(src, _Buffer) and isinstance(dst, np.ndarray):
            buf, host, offset, to_device = src, dst, src_offset, False
        else:
            raise LogicError("enqueue_copy: need one buffer and one host array")
        buf._usable(queue.ctx)
        if not host.flags.c_contiguous:
            raise LogicError("enqueue_copy: host array is not contiguous")
        if not to_device and not host.flags.writeable:
            raise LogicError("enqueue_copy: host array for a read is not writable")
        if offset < 0 or offset + host.nbytes > buf.size:
            raise LogicError(
                f"CL_INVALID_VALUE: copy of {host.nbytes} bytes at {offset} outside the "
                f"{buf.size}-byte buffer"
            )
        if any(buf in r.buffers for r in queue.unfinished()):
            raise LogicError(
                "host access to a buffer while a kernel using it runs; wait for its event first"
            )
        buf._migrate()
        ev = _Event(queue.ctx, "copy")
        if to_device:
            queue.pending.append(("copy", ev, buf, host, offset))
            if is_blocking:
                queue.flush()
        else:
            queue.flush()
            host.view(np.uint8).reshape(-1)[:] = buf.data[offset : offset + host.nbytes]
            ev._finish()
        return ev

    def enqueue_nd_range_kernel(self, queue, kernel, global_size, local_size, wait_for=None):
        queue._check_wait_for(wait_for)
        if tuple(global_size) != (1,) or local_size not in (None, (1,)):
            raise LogicError("CL_INVALID_WORK_GROUP_SIZE: an RTL kernel is one work item")
        unset = [a.name for i, a in enumerate(kernel.args) if i not in kernel.values]
        if unset:
            raise LogicError(f"CL_INVALID_KERNEL_ARGS: arguments not set: {unset}")
        buffers = []
        for ch in range(kernel.geom.channels):
            buf = kernel.values[kernel.index[f"hbm{ch}"]]
            buf._usable(queue.ctx)
            buf._migrate()
            bank = f"HBM[{kernel.banks[ch]}]"
            if buf.bank != bank:
                raise LogicError(
                    f"buffer bound to hbm{ch} sits in bank {buf.bank!r}: it migrated before it "
                    f"was bound, so XRT placed it by default; port m_axi_hbm{ch} reaches {bank}"
                )
            buffers.append(buf)
        if len({b.size for b in buffers}) != 1:
            raise LogicError("the channel buffers differ in size")
        scalars = {n: int(kernel.values[kernel.index[n]]) for n, _ in SCALAR_ARGS}
        run = _Run(queue.ctx, kernel.geom, buffers, scalars, self.gate)
        self.launches.append(scalars)
        queue.pending.append(("run", run))
        return run.event


class _Context:
    def __init__(self, card):
        self.card = card


class _Queue:
    def __init__(self, ctx):
        self.ctx = ctx
        self.pending: list = []  # commands not yet submitted (in order)
        self.runs: list[_Run] = []

    def _check_wait_for(self, wait_for):
        for ev in wait_for or ():
            if not isinstance(ev, _Event) or ev.ctx is not self.ctx:
                raise LogicError("wait_for: an event of another context")

    def flush(self):
        """Submit the queued commands in order: writes read their host arrays now, runs start."""
        for command in self.pending:
            if command[0] == "copy":
                _, ev, buf, host, offset = command
                buf._usable(self.ctx)
                buf.data[offset : offset + host.nbytes] = host.view(np.uint8).reshape(-1)
                ev._finish()
            else:
                run = command[1]
                self.runs.append(run)
                run.start()
        self.pending = []

    def unfinished(self):
        queued = [c[1] for c in self.pending if c[0] == "run"]
        return queued + [r for r in self.runs if not r.event.done.is_set()]

    def finish(self):
        self.flush()
        for r in self.runs:
            r.event.wait()


class _Program:
    def __init__(self, ctx, devices, binaries):
        if not isinstance(binaries, list | tuple) or len(binaries) != 1:
            raise LogicError("Program: one binary per device")
        card = ctx.card
        if list(devices) != [card.device]:
            raise LogicError("Program: device not in context")
        meta = read_xclbin(binaries[0])
        if meta is None:
            raise LogicError("clCreateProgramWithBinary failed: INVALID_BINARY (not an xclbin)")
        if meta["platform"] != card.platform:
            raise LogicError(
                f"clCreateProgramWithBinary failed: INVALID_BINARY (xclbin for {meta['platform']})"
            )
        if card.busy:
            raise RuntimeError_("clCreateProgramWithBinary failed: OUT_OF_RESOURCES")
        self.meta = meta
        self.ctx, self.built = ctx, False

    def build(self):
        self.built = True
        return self


class _Kernel:
    def __init__(self, program, name):
        if not program.built:
            raise LogicError("CL_INVALID_PROGRAM_EXECUTABLE: build() the program first")
        if name != program.meta["kernel"]:
            raise LogicError(f"CL_INVALID_KERNEL_NAME: {name!r} is not in the xclbin")
        self.ctx = program.ctx
        self.geom = geometry(program.meta["geometry"])
        self.banks = program.meta["banks"]
        self.args = arguments(self.geom.channels)
        self.index = {a.name: i for i, a in enumerate(self.args)}
        self.values: dict[int, object] = {}

    @property
    def num_args(self):
        return len(self.args)

    def set_arg(self, i, value):
        if not 0 <= i < len(self.args):
            raise LogicError(f"CL_INVALID_ARG_INDEX: {i}")
        arg = self.args[i]
        if arg.kind == "scalar":
            if not isinstance(value, np.uint32):
                raise LogicError(
                    f"when processing argument {arg.name}: scalar arguments must be sized numpy "
                    f"scalars (np.uint32), not {type(value).__name__}"
                )
        else:
            if not isinstance(value, _Buffer):
                raise LogicError(f"argument {arg.name} needs a buffer")
            value._usable(self.ctx)
            value.bound_bank = f"HBM[{self.banks[int(arg.name[3:])]}]"
        self.values[i] = value


class _Buffer:
    def __init__(self, ctx, flags, size):
        if flags != MemFlags.READ_WRITE:
            raise LogicError("the core reads and writes its channel buffers: READ_WRITE")
        if size <= 0:
            raise LogicError("CL_INVALID_BUFFER_SIZE: 0")
        if size > BANK_BYTES:
            raise MemoryError_(
                f"CL_MEM_OBJECT_ALLOCATION_FAILURE: {size} bytes exceed an HBM bank ({BANK_BYTES})"
            )
        self.ctx, self.size = ctx, int(size)
        self.data = np.zeros(self.size, np.uint8)
        self.bound_bank: str | None = None  # the bank of the argument it is bound to
        self.bank: str | None = None  # fixed at the first migration
        self.released = False

    def _usable(self, ctx):
        if self.released:
            raise LogicError("CL_INVALID_MEM_OBJECT: buffer used after release()")
        if ctx is not self.ctx:
            raise LogicError("buffer of another context")

    def _migrate(self):
        if self.bank is None:
            self.bank = self.bound_bank or "default"

    def release(self):
        self._usable(self.ctx)
        self.released = True


class _Run:
    def __init__(self, ctx, geom, buffers, scalars, gate):
        self.geom, self.buffers, self.scalars, self.gate = geom, buffers, scalars, gate
        self.event = _Event(ctx, "kernel launch")

    def start(self):
        self.event.submitted = True
        self.event._status = ExecStatus.RUNNING

        def done(ok):
            self.event._finish(ExecStatus.COMPLETE if ok else CL_EXEC_FAILED)

        run_kernel(self.geom, [b.data for b in self.buffers], self.scalars, self.gate, done)


@pytest.fixture(name="card")
def card_fixture(monkeypatch):
    """The fake card in place of pyopencl for host/fpga.py; pyxrt hidden (``api="auto"`` then
    picks the OpenCL path, as on a machine without XRT's Python binding)."""
    fake = FakeCard()
    monkeypatch.setattr(fpga_module, "_cl", lambda: fake)
    monkeypatch.setitem(sys.modules, "pyxrt", None)
    yield fake
    fake.gate.set()
