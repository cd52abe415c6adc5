"""``tandem generate --placement hybrid`` prints the same tokens as the core-only placement."""

from __future__ import annotations

from tandem.host.cli import main


def _ids(capsys, *extra):
    argv = [
        "generate",
        "--preset",
        "test-odd",
        "--prompt-ids",
        "3,1,4,1,5",
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


def test_hybrid_placement_matches_fpga(capsys):
    fpga, _ = _ids(capsys)
    hybrid, err = _ids(capsys, "--placement", "hybrid", "--prefill-device", "cpu")
    assert hybrid == fpga
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
