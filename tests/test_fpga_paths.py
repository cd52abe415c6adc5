"""The ``fpga`` backend's two host paths against their fakes: which path ``api`` picks, each rule
the fakes enforce (kept by the backend, and failing with its message when broken), and the
one-line errors of ``tandem generate --backend fpga`` for a bad xclbin, no card, or a card in
use.

The fakes: tests/fake_xrt.py (``pyxrt``, fixture ``xrt_card``) and tests/fake_opencl.py
(pyopencl, fixture ``card``). tests/test_backends.py runs the backend contract on both.
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from fake_cards import BANK_BYTES, write_xclbin
from fake_opencl import LogicError, MemFlags, card_fixture  # noqa: F401
from fake_xrt import FROM_DEVICE, TO_DEVICE, FakeXrt, mem_index, xrt_card_fixture  # noqa: F401

from tandem.checkpoint import random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.host import xrt as xrt_module
from tandem.host.backends import open_device
from tandem.host.cli import main
from tandem.host.device import DeviceError
from tandem.host.fpga import DeviceTimeoutError, FpgaDevice, OpenClDevice
from tandem.host.xrt import XrtDevice
from tandem.regmap import SCALAR_ARGS

GEOM = "tiny"


@pytest.fixture(scope="module")
def model():
    cfg = preset("test-tiny")
    return compile_model(cfg, random_weights(cfg, seed=5), geometry(GEOM))


def _xclbin(tmp_path, geom=GEOM, **kw):
    return write_xclbin(tmp_path / "k.xclbin", geometry(geom), **kw)


def _loaded(tmp_path, c, **options) -> FpgaDevice:
    dev = FpgaDevice(c.geom, _xclbin(tmp_path), **options)
    dev.load(c.image)
    return dev


def _want(c, ids=(3, 1, 4), n=4):
    """The tokens the model backend gives (the fakes run the same ISA simulator)."""
    dev = open_device("model", c.geom)
    dev.load(c.image)
    dev.write_tokens(c.layout, "prompt", list(ids))
    dev.set_args(**c.args(prompt_len=len(ids), n_new=n))
    dev.run(timeout=600)
    return dev.read_tokens(c.layout, n)


def _decode(dev, c, ids=(3, 1, 4), n=4):
    dev.write_tokens(c.layout, "prompt", list(ids))
    dev.set_args(**c.args(prompt_len=len(ids), n_new=n))
    record = dev.run(timeout=600)
    return record, dev.read_tokens(c.layout, min(n, record.tokens))


N_SCALARS = len(SCALAR_ARGS)
"""The first HBM pointer's argument index."""

# --------------------------------------------------------------------------------------------
# Which path


def test_api_picks_the_path(card, model, tmp_path, monkeypatch):
    c, x = model, _xclbin(tmp_path)
    assert type(FpgaDevice(c.geom, x)) is OpenClDevice  # pyxrt does not import: the fallback
    with pytest.raises(DeviceError, match=r"needs XRT's Python binding pyxrt .*setup\.sh"):
        FpgaDevice(c.geom, x, api="xrt")
    monkeypatch.setitem(sys.modules, "pyxrt", FakeXrt())
    assert type(FpgaDevice(c.geom, x)) is XrtDevice  # preferred when it imports
    assert type(open_device("fpga", c.geom, xclbin=x, api="opencl")) is OpenClDevice
    with pytest.raises(DeviceError, match="unknown fpga api 'pyxrt'; choose one of auto, xrt"):
        FpgaDevice(c.geom, x, api="pyxrt")
    with pytest.raises(TypeError, match="unexpected keyword argument 'platform'"):
        FpgaDevice(c.geom, x, platform="Xilinx")  # an OpenCL platform: for api="opencl" only
    with pytest.raises(DeviceError, match="is the fpga backend's 'opencl' path"):
        OpenClDevice(c.geom, x, api="xrt")


# --------------------------------------------------------------------------------------------
# The XRT path: each rule of the fake pyxrt, kept, and broken


def test_xrt_good_run_is_bit_exact(xrt_card, model, tmp_path):
    c = model
    dev = _loaded(tmp_path, c)
    record, tokens = _decode(dev, c)
    assert (record.status, record.tokens) == (0, 4) and tokens == _want(c)
    assert xrt_card.launches[-1]["n_new"] == 4
    assert all(ms >= 1 for ms in xrt_card.waits)  # never run.wait(0), which blocks
    dev.close()


def test_xrt_buffers_sit_in_their_arguments_banks(xrt_card, model, tmp_path):
    c = model
    dev = _loaded(tmp_path, c)
    for ch, bo in enumerate(dev.buffers):
        arg = dev._arg_index[f"hbm{ch}"]
        assert bo.group == dev.kernel.group_id(arg) == mem_index(ch) != ch  # by tag, not number
        assert bo.size() == c.image.nbytes


def test_xrt_buffer_in_another_bank_is_refused(xrt_card, model, tmp_path, monkeypatch):
    """The channel number used as the memory group (PLRAM comes first in the xclbin)."""
    c = model
    monkeypatch.setattr(
        XrtDevice, "_alloc", lambda self, ch, n: self.xrt.bo(self.device, n, self.xrt.bo.normal, ch)
    )
    dev = _loaded(tmp_path, c)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    with pytest.raises(
        DeviceError,
        match=r"XRT error while starting the kernel on card 0 \(.*\): Kernel tandem_decode_core "
        r"has no compute units with connectivity required for global argument at index "
        rf"{N_SCALARS}\. The "
        r"argument is allocated in bank 0, the compute unit is connected to bank 6",
    ):
        dev.start()


def test_xrt_write_must_be_synced_to_the_device(xrt_card, model, tmp_path, monkeypatch):
    c = model
    monkeypatch.setattr(XrtDevice, "_copy_in", lambda self, bo, host, off: bo.write(host, off))
    dev = _loaded(tmp_path, c)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    with pytest.raises(
        DeviceError,
        match=r"the bo of argument hbm0 has host writes at \[0x0, 0x[0-9a-f]+\) not synced to the "
        r"device: bo\.sync\(XCL_BO_SYNC_BO_TO_DEVICE\) before starting the run",
    ):
        dev.start()
    with pytest.raises(DeviceError, match=r"over host writes at .* not yet synced to the device"):
        dev.read_channel(0, 0, 4)  # the sync from the device would lose them


def test_xrt_read_without_sync_from_the_device_is_stale(xrt_card, model, tmp_path, monkeypatch):
    """What the kernel wrote reaches the host copy only through a sync from the device: without
    it the status record and tokens are the stale host bytes, and the decode check fails."""
    c = model
    want = _want(c)
    dev = _loaded(tmp_path, c)
    good = dev.read_channel(0, 0, 64)
    monkeypatch.setattr(
        XrtDevice,
        "_copy_out",
        lambda self, bo, out, off: out.__setitem__(
            slice(None), bo.read(out.nbytes, off).view(np.uint8)
        ),
    )
    assert dev.read_channel(0, 0, 64) == good  # nothing ran yet: the host copy is current
    record, tokens = _decode(dev, c)
    assert (record.status, record.tokens) != (0, 4) or tokens != want


def test_xrt_arguments_go_in_register_map_order(xrt_card, model, tmp_path, monkeypatch):
    c = model
    dev = _loaded(tmp_path, c)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    swapped = dict(dev._arg_index, start_pos=dev._arg_index["hbm0"], hbm0=0)
    monkeypatch.setattr(dev, "_arg_index", swapped)
    with pytest.raises(
        DeviceError, match=rf"set_arg\({N_SCALARS}\): argument hbm0 is a global buffer: a bo"
    ):
        dev.start()
    monkeypatch.undo()
    skipped = dict(dev._arg_index, watchdog=dev._arg_index["n_new"])
    monkeypatch.setattr(dev, "_arg_index", skipped)
    with pytest.raises(DeviceError, match=r"arguments not set: \['watchdog'\]"):
        dev.start()


def test_xrt_scalars_are_c_ints(xrt_card, model, tmp_path, monkeypatch):
    """hbm_bytes = 0xFFFFFFC0 goes in as the int with the same 32 bits; as a plain int it fits
    no C int (pybind11 refuses it)."""
    c = model
    dev = _loaded(tmp_path, c)
    dev.set_args(**{**c.args(prompt_len=1, n_new=1), "hbm_bytes": 0xFFFFFFC0})
    dev.run(timeout=600)
    assert xrt_card.launches[-1]["hbm_bytes"] == 0xFFFFFFC0
    monkeypatch.setattr(xrt_module, "as_c_int", int)
    with pytest.raises(DeviceError, match="4294967232 for argument hbm_bytes does not fit a C int"):
        dev.start()


def test_xrt_waits_never_block_and_busy_buffers_are_left_alone(xrt_card, model, tmp_path):
    c = model
    dev = _loaded(tmp_path, c)
    xrt_card.gate.clear()  # hold the run
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    dev.start()
    with pytest.raises(DeviceTimeoutError, match=r"did not finish within 0\.05 s"):
        dev.wait(timeout=0.05)
    assert xrt_card.waits and all(ms >= 1 for ms in xrt_card.waits)
    with pytest.raises(DeviceError, match="running"):
        dev.read_channel(0, 0, 4)  # the backend's guard
    with pytest.raises(RuntimeError, match="of a buffer a running kernel uses"):
        dev.buffers[0].sync(FROM_DEVICE, 4, 0)  # the fake's rules, broken directly
    with pytest.raises(RuntimeError, match=r"run\.wait\(0\) on a run that is held"):
        dev._run.wait(0)
    xrt_card.gate.set()
    assert dev.wait(60).status == 0
    dev.close()


def test_fake_pyxrt_refuses_what_xrt_refuses(xrt_card, model, tmp_path):
    c = model
    dev = _loaded(tmp_path, c)
    fake, bo, g = xrt_card, dev.buffers[0], dev.groups[0]
    with pytest.raises(RuntimeError, match="need a host copy and a device copy"):
        fake.bo(dev.device, 64, fake.bo.host_only, g)
    with pytest.raises(RuntimeError, match="memory group 99 does not exist"):
        fake.bo(dev.device, 64, fake.bo.normal, 99)
    with pytest.raises(RuntimeError, match="cannot allocate"):
        fake.bo(dev.device, BANK_BYTES + 1, fake.bo.normal, g)
    with pytest.raises(RuntimeError, match="non-contiguous buffer"):
        bo.write(np.arange(16, dtype=np.uint8)[::2], 0)
    with pytest.raises(RuntimeError, match="outside the"):
        bo.read(8, bo.size() - 4)
    bo.write(b"\1\2\3\4", 0)
    with pytest.raises(RuntimeError, match="not yet synced to the device: they would be lost"):
        bo.sync(FROM_DEVICE, 4, 0)
    bo.sync(TO_DEVICE, 4, 0)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        bo.sync("to device", 4, 0)
    with pytest.raises(RuntimeError, match="has no memory connection"):
        dev.kernel.group_id(0)
    run = fake.run(dev.kernel)
    with pytest.raises(RuntimeError, match="was not started"):
        run.wait(5)
    with pytest.raises(RuntimeError, match="is a global buffer: a bo"):
        run.set_arg(dev._arg_index["hbm1"], 5)
    # the backend's own non-contiguous chunk is made contiguous before bo.write
    chunk = np.arange(c.geom.channels * 32, dtype=np.uint8).reshape(-1, c.geom.channels).T
    dev.write_striped(256, chunk)
    assert np.array_equal(dev.read_striped(256, 32), chunk)


# --------------------------------------------------------------------------------------------
# The OpenCL path: the rules of the fake pyopencl, kept, and broken


def test_opencl_buffers_are_bound_before_they_migrate(card, model, tmp_path):
    c = model
    dev = _loaded(tmp_path, c)
    assert [b.bank for b in dev.buffers] == [f"HBM[{ch}]" for ch in range(c.geom.channels)]
    assert all(b.size == c.image.nbytes for b in dev.buffers)
    buffers = list(dev.buffers)
    dev.close()
    assert all(b.released for b in buffers)
    # a buffer that migrates before it is bound lands in the default bank: refused at launch
    dev = FpgaDevice(c.geom, _xclbin(tmp_path))
    bind = dev._bind
    dev._bind = lambda i, v: None
    dev.load(c.image)
    dev._bind = bind
    for ch, buf in enumerate(dev.buffers):
        bind(dev._arg_index[f"hbm{ch}"], buf)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    with pytest.raises(
        DeviceError, match="sits in bank 'default': it migrated before it was bound"
    ):
        dev.start()


def test_opencl_queue_is_flushed_before_polling(card, model, tmp_path, monkeypatch):
    c = model
    dev = _loaded(tmp_path, c)
    record, tokens = _decode(dev, c)
    assert (record.status, tokens) == (0, _want(c))
    monkeypatch.setattr(dev.queue, "flush", lambda: None)
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    dev.start()
    with pytest.raises(
        DeviceError,
        match=r"OpenCL error while waiting for the kernel on '.*': status of a kernel launch "
        r"polled before its queue was flushed",
    ):
        dev.wait(60)


def test_opencl_arguments_go_in_register_map_order(card, model, tmp_path):
    c = model
    dev = FpgaDevice(c.geom, _xclbin(tmp_path))
    dev._arg_index = dict(dev._arg_index, start_pos=dev._arg_index["hbm0"], hbm0=0)
    with pytest.raises(DeviceError, match="argument start_pos: scalar arguments must be sized"):
        dev.load(c.image)


def test_fake_opencl_refuses_what_xrt_refuses(card, model, tmp_path):
    c = model
    huge = SimpleNamespace(geom=c.geom, nbytes=BANK_BYTES + 64, data=None)
    with pytest.raises(DeviceError, match="exceed an HBM bank"):
        FpgaDevice(c.geom, _xclbin(tmp_path)).load(huge)
    dev = _loaded(tmp_path, c)
    with pytest.raises(LogicError, match=r"np\.uint32"):
        dev.kernel.set_arg(0, 5)
    other = write_xclbin(tmp_path / "k2.xclbin", c.geom, kernel="k2")
    program = card.Program(dev.ctx, [card.device], [other.read_bytes()]).build()
    with pytest.raises(LogicError, match="arguments not set"):
        card.enqueue_nd_range_kernel(dev.queue, card.Kernel(program, "k2"), (1,), (1,))
    card.gate.clear()  # a host read while the kernel runs
    dev.set_args(**c.args(prompt_len=1, n_new=1))
    dev.start()
    with pytest.raises(LogicError, match="while a kernel using it runs"):
        card.enqueue_copy(dev.queue, np.empty(4, np.uint8), dev.buffers[0], src_offset=0)
    with pytest.raises(DeviceError, match="running"):
        dev.read_channel(0, 0, 4)  # the backend's own guard comes first
    card.gate.set()
    assert dev.wait(60).status == 0
    dev.close()
    buf = card.Buffer(dev.ctx, MemFlags.READ_WRITE, 64)
    buf.release()
    with pytest.raises(LogicError, match="after release"):
        card.enqueue_copy(dev.queue, np.empty(4, np.uint8), buf, src_offset=0)


# --------------------------------------------------------------------------------------------
# tandem generate --backend fpga: a bad xclbin, no card, a card in use: one line, exit 2

OTHER_PLATFORM = "xilinx_u250_gen3x16_xdma_4_1_202210_1"

CASES = {
    # name: (xclbin options, fake change, {path: what the line says})
    "not an xclbin": (
        None,
        None,
        {
            "xrt": r"XRT error while reading xclbin .*k\.xclbin: Invalid xclbin file: .* bad magic",
            "opencl": r"OpenCL error while loading .*: .*INVALID_BINARY \(not an xclbin\) \(not "
            r"an xclbin for this card",
        },
    ),
    "wrong kernel": (
        {"kernel": "vadd"},
        None,
        {
            "xrt": r"xclbin .* has no kernel 'tandem_decode_core' \(it has vadd\): it is not a "
            r"tandem decode core",
            "opencl": r"CL_INVALID_KERNEL_NAME: 'tandem_decode_core' is not in the xclbin \(the "
            r"xclbin has no tandem decode core",
        },
    ),
    "other geometry": (
        {"geom": "small"},
        None,
        dict.fromkeys(
            ("xrt", "opencl"),
            rf"does not match the tiny core: its kernel tandem_decode_core has {N_SCALARS + 8} "
            rf"arguments, the tiny core has {N_SCALARS + 4} \({N_SCALARS} scalars and 4 HBM "
            r"channels\); it was built for a core with 8 "
            r"HBM channels \(--geometry small\)",
        ),
    ),
    "other platform": (
        {"platform": OTHER_PLATFORM},
        None,
        {
            "xrt": r"XRT error while loading .* onto card 0 \(xilinx_u55c_gen3x16_xdma_base_3, "
            r"0000:3b:00\.1\): load_axlf: Operation not supported \(the xclbin was linked for "
            r"another platform than the card's shell",
            "opencl": r"INVALID_BINARY \(xclbin for xilinx_u250.*\) \(not an xclbin for this "
            r"card, or the xclbin was linked for another platform",
        },
    ),
    "wrong bank": (
        {"banks": {1: 5}},
        None,
        {
            "xrt": r"connects kernel argument hbm1 \(port m_axi_hbm1\) to bank HBM\[5\], not "
            r"HBM\[1\]: each port needs its own pseudo-channel",
        },
    ),
    "no card": (
        {},
        {"xrt": ("cards", 0), "opencl": ("present", False)},
        {
            "xrt": r"XRT finds no Alveo card \(pyxrt\.enumerate_devices\(\) is 0\)",
            "opencl": r"OpenCL platform 'Xilinx' has no devices: no Alveo card found",
        },
    ),
    "card in use": (
        {},
        {"xrt": ("busy", True), "opencl": ("busy", True)},
        {
            "xrt": r"load_axlf: Device or resource busy \(the card is in use: another process",
            "opencl": r"OUT_OF_RESOURCES \(the card is in use: another process",
        },
    ),
}
CLI = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2", "--max-new-tokens", "2",
       "--geometry", GEOM, "--no-progress", "--backend", "fpga"]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "path"), [(case, path) for case, (_, _, want) in CASES.items() for path in want]
)
def test_cli_card_errors_are_one_line_exit_2(request, tmp_path, capsys, case, path):
    """Each case on each path (the wrong bank only on xrt: XRT's OpenCL cannot see the xclbin's
    connectivity, and places the buffer where the port is connected, below)."""
    options, change, want = CASES[case]
    fake = request.getfixturevalue("xrt_card" if path == "xrt" else "card")
    if change:
        setattr(fake, *change[path])
    if options is None:
        xclbin = tmp_path / "k.xclbin"
        xclbin.write_bytes(b"\x7fELF not an xclbin")
    else:
        options = dict(options)
        xclbin = _xclbin(tmp_path, options.pop("geom", GEOM), **options)
    assert main([*CLI, "--xclbin", str(xclbin)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tandem generate: error: "), lines[0]
    assert re.search(want[path], lines[0]), lines[0]


def test_cli_wrong_bank_on_opencl_still_decodes(card, tmp_path, capsys):
    """XRT's OpenCL places each buffer where its argument's port is connected, whichever bank
    that is: the run is right (only slower across the HBM switch); the xrt path refuses."""
    xclbin = _xclbin(tmp_path, banks={1: 5})
    assert main([*CLI, "--xclbin", str(xclbin)]) == 0
    assert main([*CLI[:-2], "--backend", "model"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second


@pytest.mark.parametrize("fake", ["xrt_card", "card"])
def test_cli_missing_xclbin_and_hybrid_errors_are_one_line(request, tmp_path, capsys, fake):
    """A missing xclbin is refused before the model loads; the hybrid placement opens the card
    the same way and fails with the same line."""
    request.getfixturevalue(fake).busy = True
    assert main([*CLI, "--xclbin", str(tmp_path / "none.xclbin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tandem generate: error: --xclbin {tmp_path}/none.xclbin: no such file (make "
                   "bitstream writes one)"]  # fmt: skip
    xclbin = str(_xclbin(tmp_path))
    assert main([*CLI, "--xclbin", xclbin, "--placement", "hybrid", "--prefill-device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "(the card is in use: another process holds" in lines[0], lines
