"""One backend contract, the same cases on every registered backend (tandem.host.backends).

- a good run: the tokens equal the ``model`` backend's, ``wait`` returns a clean status record;
- each error status bit, made by what the core really runs (a short program written over the
  compiled one, or the ``hbm_bytes`` argument): ``wait`` returns the record with that bit, the
  runtime alone raises ``RunError`` naming it, in one line;
- a run that fails without a status record: ``RunError`` too;
- a time-out: ``DecodeTimeout``, and the retry gives the full answer;
- bad arguments: ValueError before any device work, DeviceError from the device;
- the CLI: the same one-line error and exit code 1 whichever backend failed.

``fpga`` runs on both of its host paths, unchanged: ``fpga-xrt`` through host/xrt.py against
a fake ``pyxrt`` (tests/fake_xrt.py), ``fpga-opencl`` through host/fpga.py's OpenCL path
(``_program`` and ``_launch`` included) against a fake of the pyopencl calls it makes
(tests/fake_opencl.py). Both fakes enforce XRT's rules and run the kernel with the ISA simulator
on the card's memories, and both are picked by ``api="auto"`` (pyxrt importable or not), as
``tandem generate --backend fpga`` picks them. tests/test_fpga_paths.py shows each rule failing.
``rtl`` runs the whole core in Verilator: those cases are in the ``core`` tier.
"""

from __future__ import annotations

import threading

import pytest
from fake_cards import write_xclbin
from fake_opencl import card_fixture as card  # noqa: F401  (tests/test_cli_inputs.py takes it)
from fake_xrt import xrt_card_fixture  # noqa: F401

from tandem import isa
from tandem.checkpoint import random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.isasim import IsaSim
from tandem.host.backends import BACKENDS, open_device
from tandem.host.cli import main
from tandem.host.device import DeviceError
from tandem.host.runtime import DecodeTimeout, RunError, Session
from tandem.isa import Op, make
from tandem.layout import PROGRAM_BASE, HBMImage
from tandem.regmap import Status

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
    pytest.param(("model", None), id="model"),
    pytest.param(("fpga", "xrt_card"), id="fpga-xrt"),
    pytest.param(("fpga", "card"), id="fpga-opencl"),
    pytest.param(("rtl", None), id="rtl", marks=pytest.mark.core),
]
"""(backend, the fake runtime it runs on): ``api="auto"`` picks the fpga path from the fake."""


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, tmp_path):
    """(name, device options) of one backend, ready to open (a fake card for fpga)."""
    name, fake = request.param
    if fake is not None:
        request.getfixturevalue(fake)
        return name, {"xclbin": write_xclbin(tmp_path / "tandem.xclbin", geometry(GEOM))}
    if name == "rtl":
        _verilator()
    return name, {}


def test_every_backend_is_covered():
    assert {p.values[0][0] for p in BACKEND_PARAMS} == set(BACKENDS)
    assert {p.values[0][1] for p in BACKEND_PARAMS if p.values[0][0] == "fpga"} == {
        "xrt_card",
        "card",
    }


@pytest.mark.parametrize(("fake", "api"), [("xrt_card", "xrt"), ("card", "opencl")])
def test_each_fpga_case_runs_its_path(request, tmp_path, model, fake, api):
    """``api="auto"`` (what the cases and the CLI use) takes pyxrt when it imports."""
    request.getfixturevalue(fake)
    _, c = model
    xclbin = write_xclbin(tmp_path / "tandem.xclbin", c.geom)
    dev = open_device("fpga", c.geom, xclbin=xclbin)
    assert dev.api == api and isinstance(dev, BACKENDS["fpga"])
    dev.close()


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
