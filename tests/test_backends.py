"""One backend contract, the same cases on every registered backend (tandem.host.backends).

- a good run: the tokens equal the ``model`` backend's, ``wait`` returns a clean status record;
- each error status bit, made by what the core really runs (a short program written over the
  compiled one, or the ``hbm_bytes`` argument): ``wait`` returns the record with that bit, the
  runtime alone raises ``RunError`` naming it, in one line;
- a run that fails without a status record: ``RunError`` too;
- a time-out: ``DecodeTimeout``, and the retry gives the full answer;
- bad arguments: ValueError before any device work, DeviceError from the device;
- the CLI: the same one-line error and exit code 1 whichever backend failed.

``fpga`` runs host/fpga.py unchanged (``_program`` and ``_launch`` included) against
:class:`FakeCard`, a fake of the pyopencl surface it calls that enforces XRT's rules and runs the
kernel with the ISA simulator on the channel buffers. ``rtl`` runs the whole core in Verilator:
those cases are in the ``core`` tier.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from tandem import isa
from tandem.checkpoint import random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.host import fpga as fpga_module
from tandem.host.backends import BACKENDS, open_device
from tandem.host.cli import main
from tandem.host.device import DeviceError
from tandem.host.runtime import DecodeTimeout, RunError, Session
from tandem.isa import Op, make
from tandem.layout import PROGRAM_BASE, HBMImage
from tandem.regmap import SCALAR_ARGS, Status, arguments

# --------------------------------------------------------------------------------------------
# A fake of the card's runtime API (the pyopencl calls host/fpga.py makes), with XRT's rules.
# --------------------------------------------------------------------------------------------

XCLBIN_MAGIC = b"xclbin2\0"
"""The first bytes of every xclbin (axlf header magic)."""
BANK_BYTES = 512 << 20
"""One U55C HBM pseudo-channel: 16 GiB over 32 banks."""


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


def write_xclbin(path, geom, kernel=fpga_module.KERNEL_NAME):
    """A stand-in xclbin: the magic, then what the fake needs (kernel name, core geometry)."""
    path.write_bytes(XCLBIN_MAGIC + json.dumps({"kernel": kernel, "geometry": geom.name}).encode())
    return path


class _Device:
    def __init__(self, card, name):
        self.card, self.name = card, name


class _Platform:
    def __init__(self, card):
        self.card, self.name = card, "Xilinx"

    def get_devices(self):
        return [self.card.device]


class _Event:
    def __init__(self, ctx, status=ExecStatus.QUEUED):
        self.ctx = ctx
        self._status = status
        self.done = threading.Event()

    @property
    def command_execution_status(self):
        return self._status

    def _finish(self, status=ExecStatus.COMPLETE):
        self._status = status
        self.done.set()

    def wait(self):
        self.done.wait()


class FakeCard:
    """The pyopencl module as host/fpga.py sees it, over one fake Alveo card.

    Rules it enforces (each a ``LogicError`` / ``MemoryError`` as pyopencl would raise, or, for
    the bank rule, a refused launch where XRT would silently place the buffer in the wrong bank):

    - a program is built from an xclbin (the magic), the kernel name must be the xclbin's;
    - buffers are READ_WRITE, 0 < size <= one HBM bank (512 MiB), and not used after release;
    - a buffer's bank is fixed at its first migration from the kernel argument it is bound to;
      at launch, the buffer bound to ``hbm<ch>`` must sit in bank ``ch``;
    - scalar arguments are sized NumPy scalars (``np.uint32``), pointer arguments live buffers of
      the same context; every argument is set before the launch; the launch is one work item;
    - copies stay inside the buffer, host arrays are contiguous (and writable for reads);
      non-blocking writes take their data from the host array when the queue reaches them (the
      next blocking call, launch or finish), so the host must keep the array unchanged until the
      copy's event completes;
    - no host read or write of a buffer while a kernel that uses it has not completed;
    - events in ``wait_for`` belong to the same context.

    The kernel runs :class:`IsaSim` on the channel buffers on a thread, like the card, after
    ``gate`` is set (set by default; clear it to hold a run). The ``watchdog`` argument, when
    non-zero, is the instruction budget (the card counts cycles without progress). An exception
    in the simulator ends the launch event with a negative status, as a failed kernel command.
    """

    Error, LogicError, MemoryError, RuntimeError = Error, LogicError, MemoryError_, RuntimeError_
    command_execution_status = ExecStatus
    mem_flags = MemFlags

    def __init__(self):
        self.device = _Device(self, "xilinx_u55c_gen3x16_xdma_base_3 (fake)")
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
        busy = [k for k in queue.running() if buf in k.buffers]
        if busy:
            raise LogicError(
                "host access to a buffer while a kernel using it runs; wait for its event first"
            )
        buf._migrate()
        ev = _Event(queue.ctx)
        if to_device:
            queue.pending.append((ev, buf, host, offset))
            if is_blocking:
                queue._flush()
        else:
            queue._flush()
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
            if buf.bank != ch:
                raise LogicError(
                    f"buffer bound to hbm{ch} sits in bank {buf.bank!r}: it migrated before it "
                    f"was bound, so XRT placed it by default; port m_axi_hbm{ch} reaches bank {ch}"
                )
            buffers.append(buf)
        if len({b.size for b in buffers}) != 1:
            raise LogicError("the channel buffers differ in size")
        queue._flush()
        scalars = {n: int(kernel.values[kernel.index[n]]) for n, _ in SCALAR_ARGS}
        run = _Run(queue.ctx, kernel.geom, buffers, scalars)
        self.launches.append(scalars)
        queue.runs.append(run)
        run.start(self.gate)
        return run.event


class _Context:
    def __init__(self, card):
        self.card = card


class _Queue:
    def __init__(self, ctx):
        self.ctx = ctx
        self.pending: list = []  # non-blocking writes not yet performed
        self.runs: list[_Run] = []

    def _check_wait_for(self, wait_for):
        for ev in wait_for or ():
            if not isinstance(ev, _Event) or ev.ctx is not self.ctx:
                raise LogicError("wait_for: an event of another context")

    def _flush(self):
        for ev, buf, host, offset in self.pending:
            buf._usable(self.ctx)
            buf.data[offset : offset + host.nbytes] = host.view(np.uint8).reshape(-1)
            ev._finish()
        self.pending = []

    def running(self):
        return [r for r in self.runs if not r.event.done.is_set()]

    def finish(self):
        self._flush()
        for r in self.runs:
            r.event.wait()


class _Program:
    def __init__(self, ctx, devices, binaries):
        if not isinstance(binaries, list | tuple) or len(binaries) != 1:
            raise LogicError("Program: one binary per device")
        if list(devices) != [ctx.card.device]:
            raise LogicError("Program: device not in context")
        raw = binaries[0]
        if not isinstance(raw, bytes) or not raw.startswith(XCLBIN_MAGIC):
            raise LogicError("CL_INVALID_BINARY: not an xclbin")
        self.meta = json.loads(raw[len(XCLBIN_MAGIC) :])
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
        self.args = arguments(self.geom.channels)
        self.index = {a.name: i for i, a in enumerate(self.args)}
        self.values: dict[int, object] = {}

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
            value.bound = int(arg.name[3:])
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
        self.bound: int | None = None  # the hbm<ch> argument it is bound to
        self.bank: int | str | None = None  # fixed at the first migration
        self.released = False

    def _usable(self, ctx):
        if self.released:
            raise LogicError("CL_INVALID_MEM_OBJECT: buffer used after release()")
        if ctx is not self.ctx:
            raise LogicError("buffer of another context")

    def _migrate(self):
        if self.bank is None:
            self.bank = self.bound if self.bound is not None else "default"

    def release(self):
        self._usable(self.ctx)
        self.released = True


class _Run:
    def __init__(self, ctx, geom, buffers, scalars):
        self.geom, self.buffers, self.scalars = geom, buffers, scalars
        self.event = _Event(ctx, ExecStatus.SUBMITTED)

    def start(self, gate):
        threading.Thread(target=self._work, args=(gate,), daemon=True).start()

    def _work(self, gate):
        self.event._status = ExecStatus.RUNNING
        gate.wait()
        try:
            image = HBMImage(self.geom, self.buffers[0].size)
            for ch, buf in enumerate(self.buffers):
                image.data[ch] = buf.data
            steps = self.scalars["watchdog"] or (1 << 26)
            IsaSim(self.geom, image, max_steps=steps).run(self.scalars)
            for ch, buf in enumerate(self.buffers):
                buf.data[:] = image.data[ch]
        except Exception:
            self.event._finish(CL_EXEC_FAILED)
        else:
            self.event._finish()


@pytest.fixture
def card(monkeypatch):
    """The fake card in place of pyopencl for host/fpga.py."""
    fake = FakeCard()
    monkeypatch.setattr(fpga_module, "_cl", lambda: fake)
    yield fake
    fake.gate.set()


# --------------------------------------------------------------------------------------------
# The backends and the cases
# --------------------------------------------------------------------------------------------

GEOM = "tiny"
WATCHDOG_STEPS = 1000


@pytest.fixture(scope="module")
def model():
    cfg = preset("test-tiny")
    weights = random_weights(cfg, seed=7)
    return cfg, compile_model(cfg, weights, geometry(GEOM))


def _verilator():
    from tandem.sim import runner

    if "verilator" not in runner.simulators():
        pytest.skip("the rtl backend runs on Verilator; SIM selects another simulator")


BACKEND_PARAMS = [
    pytest.param("model", id="model"),
    pytest.param("fpga", id="fpga"),
    pytest.param("rtl", id="rtl", marks=pytest.mark.core),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, tmp_path):
    """(name, device options) of one backend, ready to open (the fake card for fpga)."""
    name = request.param
    if name == "fpga":
        request.getfixturevalue("card")
        return name, {"xclbin": write_xclbin(tmp_path / "tandem.xclbin", geometry(GEOM))}
    if name == "rtl":
        _verilator()
    return name, {}


def test_every_backend_is_covered():
    assert {p.id for p in BACKEND_PARAMS} == set(BACKENDS)


def _session(backend, compiled, **extra):
    name, options = backend
    return Session(compiled.cfg, None, compiled=compiled, backend=name,
                   device_options={**options, **extra})  # fmt: skip


def test_good_run(backend, model):
    _, c = model
    ids = [3, 1, 4]
    with _session(("model", {}), c) as s:
        want = s.generate(ids, 4).tokens
    with _session(backend, c) as s:
        res = s.generate(ids, 4, timeout=600)
        assert res.tokens == want
        assert res.status.status == 0 and res.status.tokens == 4
        assert isinstance(s.device.run_stats(), dict)
        # the device itself: a clean record, the tokens in the output area
        s.device.set_args(**c.args(prompt_len=3, n_new=4))
        record = s.device.run(timeout=600)
        assert (record.status, record.tokens) == (0, 4)
        assert s.device.read_tokens(c.layout, 4) == want


def _program(*instrs) -> bytes:
    return b"".join(
        i if isinstance(i, bytes) else isa.encode(i).to_bytes(isa.WORD_BYTES, "little")
        for i in instrs
    )


def _error_cases(g):
    """bit -> (program written at PROGRAM_BASE, argument overrides, error pc)."""
    far = (64 << 20) // 64  # a line at 64 MiB: past any buffer here, even the rtl's 1 MiB
    return {
        "ILLEGAL_INSTRUCTION": (
            _program(make(Op.SETI, rd=1, imm=0), bytes(isa.WORD_BYTES)), {}, 1
        ),
        "HBM_RANGE": (_program(make(Op.SYNC), make(Op.LDW, rd=1, line=far), make(Op.HALT)),
                      {}, 1),
        "VBUF_RANGE": (
            _program(make(Op.VEXP, dst=g.vbuf_elems - 64, a=0, len=65), make(Op.HALT)), {}, 0
        ),
        "WATCHDOG": (_program(make(Op.JMP, target=0)), {"watchdog": WATCHDOG_STEPS}, None),
        "PROGRAM_ERROR": (_program(make(Op.SYNC), make(Op.HALT, code=2)), {}, 1),
        "AXI_ERROR": (
            _program(make(Op.LDW, rd=1, line=far), make(Op.HALT)), {"hbm_bytes": 0xFFFFFFC0}, 0
        ),
    }  # fmt: skip


@pytest.mark.parametrize("bit", [s.name for s in Status])
def test_error_status_bit(backend, model, bit, monkeypatch):
    """The device reports the bit in its record; the runtime raises RunError naming it."""
    name, _ = backend
    _cfg, c = model
    if name == "rtl" and bit == "WATCHDOG":
        pytest.skip("the RTL watchdog needs a unit that stops making progress (a hung unit, "
                    "tests/rtl/test_controller.py); a program cannot make one")  # fmt: skip
    program, overrides, pc = _error_cases(c.geom)[bit]
    extra = {"max_steps": WATCHDOG_STEPS} if name == "model" and bit == "WATCHDOG" else {}
    args = type(c).args
    monkeypatch.setattr(type(c), "args", lambda *a, **kw: {**args(*a, **kw), **overrides})
    with _session(backend, c, **extra) as s:
        s.device.write_channel(0, PROGRAM_BASE, program)
        # the device returns the record
        s.device.set_args(**c.args(prompt_len=1, n_new=1))
        record = s.device.run(timeout=600)
        assert record.status == Status[bit], record
        if pc is not None:
            assert record.pc == pc
        # the runtime raises, once, in one line
        with pytest.raises(RunError) as err:
            s.generate([1], 2, timeout=600)
    e = err.value
    assert e.record.status == Status[bit] and e.backend == name
    assert bit in str(e) and f"on the {name} device" in str(e) and "\n" not in str(e)
    if bit == "PROGRAM_ERROR":
        assert "HALT code BAD_ARGS" in str(e)


def test_run_failing_without_a_record(backend, model, monkeypatch):
    """The simulation (or the card's kernel command) fails: RunError without a record."""
    name, _ = backend
    _cfg, c = model

    def broken(*a, **kw):
        raise RuntimeError("simulated failure")

    if name == "rtl":
        from tandem.sim import rtljob

        monkeypatch.setattr(rtljob, "run_job", broken)
    else:
        monkeypatch.setattr(IsaSim, "run", broken)
    with _session(backend, c) as s, pytest.raises(RunError) as err:
        s.generate([1, 2], 2, timeout=600)
    assert err.value.record is None and err.value.tokens == []
    assert f"decode failed on the {name} device" in str(err.value)
    assert "\n" not in str(err.value)


def test_timeout(backend, model, monkeypatch):
    """A run over the time-out: DecodeTimeout; the retry waits for it and gives the full answer."""
    name, _ = backend
    _cfg, c = model
    with _session(("model", {}), c) as s:
        want = s.generate([5, 6], 3).tokens
    gate = threading.Event()
    if name != "rtl":  # hold the simulator (the fake card's kernel runs it too)
        run = IsaSim.run
        monkeypatch.setattr(IsaSim, "run", lambda *a, **kw: gate.wait() and run(*a, **kw))
    else:
        gate.set()  # a Verilator run takes far longer than the time-out
    with _session(backend, c) as s:
        with pytest.raises(DecodeTimeout, match=f"the {name} device did not finish") as err:
            s.generate([5, 6], 3, timeout=0.001)
        assert isinstance(err.value, TimeoutError) and s.running
        gate.set()
        assert s.generate([5, 6], 3, timeout=600).tokens == want
        assert not s.running
    gate.set()


def test_bad_arguments(backend, model):
    name, options = backend
    cfg, c = model
    dev = open_device(name, c.geom, **options)
    with pytest.raises(DeviceError, match="no image loaded"):
        dev.read_channel(0, 0, 4)
    with pytest.raises(DeviceError, match="not started"):
        dev.load(c.image) or dev.wait(1)
    with pytest.raises(DeviceError, match="no scalar argument 'nope'"):
        dev.set_args(nope=1)
    with pytest.raises(DeviceError, match="does not fit 32 bits"):
        dev.set_args(n_new=1 << 32)
    with pytest.raises(DeviceError, match=r"outside|past|beyond|out of"):
        dev.read_channel(0, c.image.nbytes - 4, 8)
    with pytest.raises(DeviceError, match="overflow the prompt area"):
        dev.write_tokens(c.layout, "prompt", [1] * (c.layout["prompt"].nbytes // 4 + 1))
    with pytest.raises(DeviceError, match="channels"):
        dev.load(HBMImage(geometry("small"), c.image.nbytes))
    dev.close()
    with _session(backend, c) as s:
        for ids, n, msg in [
            ([], 2, "at least one token"),
            ([1], 65, "exceeds the context of 64"),
            ([cfg.n_vocab], 1, "out of range"),
        ]:
            with pytest.raises(ValueError, match=msg):
                s.generate(ids, n)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------

CLI = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2", "--max-new-tokens", "3",
       "--geometry", GEOM, "--no-progress"]  # fmt: skip


def _cli_backend(backend):
    name, options = backend
    return ["--backend", name] + (
        ["--xclbin", str(options["xclbin"])] if "xclbin" in options else []
    )


def test_cli_good_run_equals_model(backend, capsys):
    assert main([*CLI, "--backend", "model"]) == 0
    want = capsys.readouterr().out
    assert main([*CLI, *_cli_backend(backend)]) == 0
    assert capsys.readouterr().out == want


def test_cli_error_status_is_one_line_exit_1(backend, capsys, monkeypatch):
    """``tandem generate`` on a device that reports an error status (HBM_RANGE: the program
    fetch is past ``hbm_bytes``): one line naming the error, exit 1, the same line on every
    backend but for its name."""
    from tandem.compiler import Compiled

    args = Compiled.args
    monkeypatch.setattr(Compiled, "args", lambda *a, **kw: {**args(*a, **kw), "hbm_bytes": 64})
    assert main([*CLI, *_cli_backend(backend)]) == 1
    out, err = capsys.readouterr()
    # the error is the last line, alone; the rtl backend's harness logs its progress before it
    *log, last = err.strip().splitlines()
    assert out == "" and all(line.startswith("[") for line in log), err
    name = backend[0]
    assert last.startswith(
        f"tandem generate: error: decode stopped on the {name} device: HBM_RANGE (an HBM access "
        "fell outside the hbm_bytes buffer) at instruction 0, after 0 tokens"
    ), last
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# The fake card's rules hold against host/fpga.py, and catch code that breaks them
# --------------------------------------------------------------------------------------------


def _fpga(card, tmp_path, c):
    dev = fpga_module.FpgaDevice(c.geom, write_xclbin(tmp_path / "k.xclbin", c.geom))
    dev.load(c.image)
    return dev


def test_fake_card_places_buffers_by_binding(card, tmp_path, model):
    _, c = model
    dev = _fpga(card, tmp_path, c)
    buffers = list(dev.buffers)
    assert [b.bank for b in buffers] == list(range(c.geom.channels))
    assert all(b.size == c.image.nbytes for b in buffers)
    dev.close()
    assert all(b.released for b in buffers)


def test_fake_card_refuses_what_xrt_refuses(card, tmp_path, model):
    _, c = model
    # migrating before binding: the buffer lands in the default bank and the launch is refused
    dev = fpga_module.FpgaDevice(c.geom, write_xclbin(tmp_path / "k.xclbin", c.geom))
    bind = dev._bind
    dev._bind = lambda i, v: None  # load binds nothing
    dev.load(c.image)
    dev._bind = bind
    for ch, buf in enumerate(dev.buffers):
        bind(dev._arg_index[f"hbm{ch}"], buf)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    with pytest.raises(DeviceError, match="sits in bank 'default'"):
        dev.start()
    # not an xclbin; a kernel name the xclbin lacks; a buffer larger than an HBM bank
    bad = tmp_path / "bad.xclbin"
    bad.write_bytes(b"ELF")
    with pytest.raises(DeviceError, match="not an xclbin"):
        fpga_module.FpgaDevice(c.geom, bad).load(c.image)
    other = write_xclbin(tmp_path / "o.xclbin", c.geom, kernel="other")
    with pytest.raises(DeviceError, match="CL_INVALID_KERNEL_NAME"):
        fpga_module.FpgaDevice(c.geom, other).load(c.image)
    huge = SimpleNamespace(geom=c.geom, nbytes=BANK_BYTES + 64, data=None)
    with pytest.raises(DeviceError, match="exceed an HBM bank"):
        fpga_module.FpgaDevice(c.geom, other.with_name("k.xclbin")).load(huge)
    # a Python int as a scalar argument; a launch with arguments unset
    dev = _fpga(card, tmp_path, c)
    with pytest.raises(LogicError, match=r"np\.uint32"):
        dev.kernel.set_arg(0, 5)
    k = write_xclbin(tmp_path / "k2.xclbin", c.geom, kernel="k2")
    kernel = card.Kernel(card.Program(dev.ctx, [card.device], [k.read_bytes()]).build(), "k2")
    with pytest.raises(LogicError, match="arguments not set"):
        card.enqueue_nd_range_kernel(dev.queue, kernel, (1,), (1,))
    # a host read while the kernel runs
    card.gate.clear()
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    dev.start()
    with pytest.raises(LogicError, match="while a kernel using it runs"):
        card.enqueue_copy(dev.queue, np.empty(4, np.uint8), dev.buffers[0], src_offset=0)
    with pytest.raises(DeviceError, match="running"):
        dev.read_channel(0, 0, 4)  # the backend's own guard comes first
    card.gate.set()
    assert dev.wait(60).status == 0
    dev.close()
    # a released buffer
    buf = card.Buffer(dev.ctx, MemFlags.READ_WRITE, 64)
    buf.release()
    with pytest.raises(LogicError, match="after release"):
        card.enqueue_copy(dev.queue, np.empty(4, np.uint8), buf, src_offset=0)
