"""The ``tandem`` command line, run in-process."""

from __future__ import annotations

from tandem.host.cli import main


def test_generate_text_with_builtin_model(capsys):
    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")
    assert "random weights" in err and "1 prompt + 4 new tokens" in err


def test_generate_ids_with_preset(capsys):
    args = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]
    assert main(args) == 0
    ids = [int(i) for i in capsys.readouterr().out.strip().split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 8


def test_errors_are_reported_not_raised(capsys):
    assert main(["generate", "--preset", "test-tiny", "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--preset", "test-tiny", "--prompt-ids", "1", "--max-new-tokens",
                 "64"]) == 2
    assert "exceeds the context of 64" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", "/nonexistent/ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err
