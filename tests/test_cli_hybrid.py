"""``tandem generate --placement hybrid`` prints the same tokens as the core-only placement and
the golden model, on a checkpoint folder whose weights decode many different tokens (so a broken
KV handoff changes the answer)."""

from __future__ import annotations

from tandem.golden.faithful import FaithfulModel
from tandem.host.cli import main


def _ids(capsys, folder, *extra):
    argv = [
        "generate",
        "--checkpoint",
        str(folder),
        "--prompt-ids",
        "10,20,30",
        "--max-new-tokens",
        "5",
        "--geometry",
        "small",
        "--no-progress",
        *extra,
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    return out.out.strip(), out.err


def test_hybrid_placement_matches_fpga_and_golden(capsys, lively_checkpoint):
    cfg, weights, folder = lively_checkpoint("test-odd")
    # a prompt whose continuation depends on the cached K and V (scripts/mutants.py checks that
    # zeroed or misplaced KV changes it), and is not one token repeated
    want = [10, 20, 30, *FaithfulModel(cfg, weights).generate([10, 20, 30], 5)]
    assert len(set(want[3:])) > 2
    fpga, _ = _ids(capsys, folder)
    hybrid, err = _ids(capsys, folder, "--placement", "hybrid", "--prefill-device", "cpu")
    assert hybrid == fpga == ",".join(map(str, want))
    assert "transfer_exposed" in err and "KV moved" in err


def test_hybrid_placement_rejects_reference(capsys):
    argv = [
        "generate",
        "--preset",
        "test-odd",
        "--prompt-ids",
        "1",
        "--placement",
        "hybrid",
        "--backend",
        "reference",
    ]
    assert main(argv) == 2
    assert "device --backend" in capsys.readouterr().err
