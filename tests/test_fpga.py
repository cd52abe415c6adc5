"""The ``fpga`` backend's OpenCL path: its buffer, queue and event code, run for real on PoCL
(OpenCL on the CPU).

Only the xclbin load needs the card: :class:`PoclDevice` replaces ``_program`` with a tiny OpenCL
C kernel that has the RTL kernel's argument list (tandem.regmap) and writes a status record and
tokens. The launch, argument binding, non-blocking copies, events, flush, reads and time-out
handling are the backend's own code (host/fpga.py, ``OpenClDevice``, and the ``FpgaDevice`` it
shares with the XRT path).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.checkpoint import random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.gpu.prefill import PreparedModel, prefill
from tandem.gpu.transfer import KVTransfer
from tandem.host.device import DeviceError
from tandem.host.fpga import (
    KERNEL_NAME,
    DeviceTimeoutError,
    FpgaDevice,
    OpenClDevice,
    find_platform,
)
from tandem.host.model import ModelDevice
from tandem.layout import STATUS_BYTES
from tandem.regmap import SCALAR_ARGS, Status, describe_status

cl = pytest.importorskip("pyopencl")


def _opencl_available() -> str | None:
    try:
        find_platform(None)
    except DeviceError as err:
        return str(err)
    return None


_why = _opencl_available()
pytestmark = pytest.mark.skipif(
    _why is not None, reason=f"no OpenCL platform (install pocl-opencl-icd): {_why}"
)


def stand_in_source(channels: int, prompt_base: int, output_base: int) -> str:
    """An OpenCL C kernel with the core's arguments: echoes prompt[i] + 1 into the output area,
    writes a status record (STATUS_BITS, pc 7, tokens = n_new) and stamps each channel's last word
    with its channel number, which shows every buffer is bound to its own argument."""
    scalars = ", ".join(f"uint {n}" for n, _ in SCALAR_ARGS)
    ptrs = ", ".join(f"__global uint *hbm{c}" for c in range(channels))
    stamps = "\n".join(f"    hbm{c}[hbm_bytes / 4 - 1] = {c};" for c in range(channels))
    return f"""
__kernel void {KERNEL_NAME}({scalars}, {ptrs}) {{
    for (uint i = 0; i < n_new; i++)
        hbm0[{output_base // 4} + i] = hbm0[{prompt_base // 4} + i] + 1;
    hbm0[0] = STATUS_BITS; hbm0[1] = 7; hbm0[2] = n_new; hbm0[3] = 0; hbm0[4] = 0; hbm0[5] = 0;
{stamps}
}}
"""


class PoclDevice(OpenClDevice):
    """The OpenCL path on PoCL: the stand-in kernel instead of the xclbin."""

    name = "fpga-pocl"  # not registered

    def __init__(self, geom, layout, status_bits: int = 0):
        self.layout, self.status_bits = layout, status_bits
        super().__init__(geom, platform=None)

    def _program(self):
        src = stand_in_source(
            self.geom.channels, self.layout["prompt"].base, self.layout["output"].base
        )
        prog = cl.Program(self.ctx, src).build(options=[f"-DSTATUS_BITS={self.status_bits}u"])
        return cl.Kernel(prog, self.kernel_name)


@pytest.fixture(scope="module")
def model():
    cfg = preset("test-tiny")
    weights = random_weights(cfg, seed=3)
    return cfg, weights, compile_model(cfg, weights, geometry("small"))


def test_buffers_one_per_channel_bound_before_migration(model):
    _, _, compiled = model
    dev = PoclDevice(compiled.geom, compiled.layout)
    calls = []
    bind, copy_in = dev._bind, dev._copy_in
    dev._bind = lambda i, v: (calls.append(("bind", i, v)), bind(i, v))[1]
    dev._copy_in = lambda b, h, o: (calls.append(("copy", b, o)), copy_in(b, h, o))[1]
    dev.load(compiled.image)
    g = compiled.geom
    assert len(dev.buffers) == g.channels
    assert len({id(b) for b in dev.buffers}) == g.channels
    assert all(b.size == compiled.image.nbytes for b in dev.buffers)
    binds = [c for c in calls if c[0] == "bind"]
    copies = [c for c in calls if c[0] == "copy"]
    first_copy = calls.index(copies[0])
    assert all(calls.index(b) < first_copy for b in binds), "a buffer migrated before binding"
    # buffer of channel ch bound to argument hbm<ch> (after the scalars)
    assert [(i, v) for _, i, v in binds] == [
        (len(SCALAR_ARGS) + ch, dev.buffers[ch]) for ch in range(g.channels)
    ]
    assert [c[1] for c in copies] == dev.buffers
    dev.close()


def test_image_round_trips_through_device_buffers(model):
    _, _, compiled = model
    with PoclDevice(compiled.geom, compiled.layout) as dev:
        dev.load(compiled.image)
        back = dev.read_striped(0, compiled.image.nbytes)
        assert np.array_equal(back, compiled.image.data)
        raw = bytes(range(37))
        dev.write_channel(3, 1000, raw)
        assert dev.read_channel(3, 1000, 37) == raw
        with pytest.raises(DeviceError, match="outside"):
            dev.read_channel(0, compiled.image.nbytes - 4, 8)


def test_per_layer_kv_writes_match_model_backend(model):
    cfg, weights, compiled = model
    pm = PreparedModel(cfg, weights, "cpu")
    ids = np.random.default_rng(1).integers(0, cfg.n_vocab, 11).tolist()
    images = []
    for dev in (PoclDevice(compiled.geom, compiled.layout), ModelDevice(compiled.geom)):
        with dev:
            dev.load(compiled.image)
            transfer = KVTransfer(dev, compiled.layout, torch.device("cpu"))
            prefill(cfg, pm, ids, on_layer=transfer.on_layer)
            transfer.finish()
            images.append(dev.read_striped(0, compiled.image.nbytes))
    fpga_img, model_img = images
    for i in range(cfg.n_layer):
        for part in ("k", "v"):
            r = compiled.layout[f"h.{i}.{part}"]
            assert np.any(model_img[:, r.base : r.end]), f"h.{i}.{part} not written"
            assert np.array_equal(fpga_img[:, r.base : r.end], model_img[:, r.base : r.end])
    assert np.array_equal(fpga_img, model_img)


def test_run_through_stand_in_kernel(model):
    _, _, compiled = model
    with PoclDevice(compiled.geom, compiled.layout) as dev:
        dev.load(compiled.image)
        dev.write_tokens(compiled.layout, "prompt", [5, 6, 7])
        dev.set_args(**compiled.args(prompt_len=3, n_new=3))
        record = dev.run(timeout=30)
        assert (record.status, record.pc, record.tokens) == (0, 7, 3)
        assert dev.read_tokens(compiled.layout, record.tokens) == [6, 7, 8]
        n = compiled.image.nbytes
        for ch in range(compiled.geom.channels):
            assert dev.read_channel(ch, n - 4, 4) == ch.to_bytes(4, "little")


def test_bad_status_is_returned_as_the_record(model):
    """Error bits come back in the status record, as from every backend (the runtime raises)."""
    _, _, compiled = model
    bits = int(Status.WATCHDOG | Status.AXI_ERROR)
    with PoclDevice(compiled.geom, compiled.layout, status_bits=bits) as dev:
        dev.load(compiled.image)
        dev.set_args(**compiled.args(prompt_len=1, n_new=1))
        record = dev.run(timeout=30)
        assert (record.status, record.pc, record.tokens) == (bits, 7, 1)
        assert "WATCHDOG" in describe_status(bits, 7, 0, 1)
        assert dev.read_channel(0, 0, STATUS_BYTES)[:4] == bits.to_bytes(4, "little")


def test_device_timeout_raises_cleanly(model):
    _, _, compiled = model
    dev = PoclDevice(compiled.geom, compiled.layout)
    dev.load(compiled.image)
    hang = cl.UserEvent(dev.ctx)  # a kernel that never finishes
    dev._launch = lambda wait_for: hang  # the launch is flushed, then polled
    dev.set_args(**compiled.args(prompt_len=1, n_new=1))
    dev.start()
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.05 s") as err:
        dev.wait(timeout=0.05)
    assert isinstance(err.value, DeviceTimeoutError)
    assert dev.cl_device.name in str(err.value)
    with pytest.raises(DeviceError, match="running"):
        dev.write_channel(0, 0, b"x")
    hang.set_status(cl.command_execution_status.COMPLETE)
    dev.wait(timeout=5)  # the stand-in status record is zero: clean
    dev.close()


def test_missing_xclbin_and_platform_are_named(tmp_path):
    g = geometry("small")
    with pytest.raises(DeviceError, match="no OpenCL platform matching 'NoSuchVendor'"):
        FpgaDevice(g, tmp_path / "x.xclbin", api="opencl", platform="NoSuchVendor")
    dev = FpgaDevice(g, tmp_path / "x.xclbin", api="opencl", platform=None)
    assert isinstance(dev, OpenClDevice)
    with pytest.raises(DeviceError, match="make bitstream"):
        dev._program()
