"""--placement gpu|auto: the thesis's conditions, and gpu tokens equal the golden tokens."""

from __future__ import annotations

from tandem.golden.faithful import FaithfulModel
from tandem.host.cli import main
from tandem.host.placement import decide


def test_decide_follows_the_thesis_conditions():
    # decode gain (10 - 2 > 1) and prefill gain (5 - 0.5 > 1): hybrid
    assert decide(0.5, 10.0, 5.0, 2.0, 1.0) == "hybrid"
    # no decode gain, GPU cheaper overall: gpu
    assert decide(0.5, 1.0, 5.0, 2.0, 1.0) == "gpu"
    # decode gain but the FPGA prefill is no worse than GPU prefill + transfer: fpga
    assert decide(0.5, 10.0, 1.0, 2.0, 1.0) == "fpga"


def test_cli_gpu_and_auto_placement_tokens_equal_golden(capsys, lively_checkpoint):
    cfg, weights, folder = lively_checkpoint("test-tiny")
    ids = [3, 1, 4, 1, 5]
    want = FaithfulModel(cfg, weights).generate(ids, 4)
    assert len(set(want)) > 1  # lively weights: not one token repeated
    for placement in ("gpu", "auto"):
        argv = ["generate", "--checkpoint", str(folder), "--prompt-ids", "3,1,4,1,5"]
        argv += ["--max-new-tokens", "4", "--placement", placement, "--prefill-device", "cpu"]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out.strip() == ",".join(map(str, ids + want))
        if placement == "auto":
            assert "placement auto ->" in err and "measured" in err and "modelled" in err
