# amaranth: UnusedElaboratable=no
"""The ``rtl`` device backend (host/rtldevice.py): hybrid generation (torch prefill on the CPU,
KV handoff, decode on the RTL core in Verilator) and ``tandem generate --backend rtl`` give the
same tokens as the ``model`` backend (the ISA simulator). Uses the same Verilator build as
test_rtljob.py (``rtljob-tiny-1m``)."""

from __future__ import annotations

import pytest

from tandem.checkpoint import lively_weights
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.host.backends import BACKENDS, open_device
from tandem.host.cli import main
from tandem.host.device import DeviceError
from tandem.layout import HBMImage
from tandem.sim import runner


def _verilator_only():
    if "verilator" not in runner.simulators():
        pytest.skip("the rtl backend runs on Verilator; SIM selects another simulator")


def test_registered():
    assert BACKENDS["rtl"].name == "rtl"


def test_refuses_large_images_and_cores(capsys):
    dev = open_device("rtl", geometry("tiny"))
    with pytest.raises(DeviceError, match=r"2,097,152 bytes per channel .* at most 1,048,576"):
        dev.load(HBMImage(geometry("tiny"), 2 << 20))
    with pytest.raises(DeviceError, match="16,384 bits per cycle"):
        open_device("rtl", geometry("u55c"))
    with pytest.raises(DeviceError, match="no image loaded"):
        dev.read_channel(0, 0, 4)
    # the CLI reports it as a user error (exit 2), not a traceback
    args = ["generate", "--preset", "test-tiny", "--prompt-ids", "1", "--max-new-tokens", "1"]
    assert main([*args, "--backend", "rtl", "--geometry", "u55c"]) == 2
    assert "too large for that" in capsys.readouterr().err


@pytest.mark.core
def test_hybrid_on_rtl_equals_model():
    """Prompt of 3 through the torch prefill, KV prefix written into the device, then 3 tokens
    (the first from the prefill, two decoded by the RTL core); tokens equal the model backend's,
    and the core's status record carries its cycle count."""
    _verilator_only()
    from tandem.host.hybrid import HybridSession

    cfg = preset("test-tiny")
    weights = lively_weights(cfg, seed=5)
    ids = [11, 200, 3]
    runs = {}
    for backend in ("model", "rtl"):
        with HybridSession(cfg, weights, "tiny", backend, "cpu") as hs:
            res = hs.generate(ids, 3)
            runs[backend] = res.tokens
            if backend == "rtl":
                job = hs.session.device.last_job
                assert job is not None and job.status.ok and job.status.tokens == 2
                assert job.tokens == res.tokens[1:]
                # the record the core wrote (a few cycles before done) is the device's status
                assert hs.session.device.read_status() == job.record
                assert 0 < job.record.cycles <= job.cycles
    assert runs["rtl"] == runs["model"], runs
    assert len(runs["rtl"]) == 3
    golden = FaithfulModel(cfg, weights).generate(ids, 3)
    assert runs["rtl"] == golden and len(set(golden)) > 1  # lively: not one token repeated


@pytest.mark.core
def test_cli_generate_backend_rtl(capsys, lively_checkpoint):
    _verilator_only()
    cfg, weights, folder = lively_checkpoint("test-tiny")
    base = ["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6", "--max-new-tokens", "3"]
    assert main([*base, "--backend", "model"]) == 0
    model = capsys.readouterr().out.strip()
    assert main([*base, "--backend", "rtl", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == model
    assert model == ",".join(map(str, [5, 6, *FaithfulModel(cfg, weights).generate([5, 6], 3)]))
    assert len(set(model.split(",")[2:])) > 1
    assert "[rtl] model" in err and "token 3/3" in err
