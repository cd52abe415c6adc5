"""The ``tandem`` command line, run in-process."""

from __future__ import annotations

from tandem.host.cli import main


def test_generate_text_with_builtin_model(capsys):
    """No flag: the built-in model (trained on Shakespeare), its own tokenizer, prompt ROMEO:."""
    assert main(["generate", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:")
    assert "trained on Shakespeare" in err and "model shakespeare on small" in err
    assert "prompt + 4 new tokens" in err


def test_generate_ids_with_preset(capsys):
    args = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]
    assert main(args) == 0
    ids = [int(i) for i in capsys.readouterr().out.strip().split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 8


def test_errors_are_reported_not_raised(capsys):
    assert main(["generate", "--preset", "test-tiny", "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    # The core never feeds the last token back: 1 prompt + 64 new tokens fit n_ctx = 64, 65 don't.
    assert (
        main(["generate", "--preset", "test-tiny", "--prompt-ids", "1", "--max-new-tokens", "65"])
        == 2
    )
    assert "exceeds the context of 64" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", "/nonexistent/ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_xclbin_option_is_checked(capsys, tmp_path):
    base = ["generate", "--preset", "test-tiny", "--prompt-ids", "1", "--max-new-tokens", "2"]
    assert main([*base, "--backend", "model", "--xclbin", str(tmp_path / "x.xclbin")]) == 2
    assert "--xclbin is for --backend fpga" in capsys.readouterr().err
    assert main([*base, "--backend", "fpga", "--xclbin", str(tmp_path / "x.xclbin")]) == 2
    assert "no such file (make bitstream writes one)" in capsys.readouterr().err


def test_generate_backends_agree(capsys):
    base = ["generate", "--preset", "test-odd", "--prompt-ids", "5,6", "--max-new-tokens", "6"]
    assert main([*base, "--backend", "reference"]) == 0
    reference = capsys.readouterr().out
    assert main([*base, "--backend", "model", "--geometry", "small", "--progress"]) == 0
    out, err = capsys.readouterr()
    # binary16 decoding may part from the float reference, but not on the first token
    assert out.split(",")[:3] == reference.split(",")[:3]
    assert "token 6/6" in err and "decode" in err and "on small" in err


def test_bench_table(capsys):
    args = ["bench", "--model", "test-tiny", "--geometry", "tiny", "small", "--tokens", "3"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | geometry |") and "tokens/s" in lines[0]
    assert len(lines) == 4 and lines[2].startswith("| test-tiny | tiny | model | 1 | 3 |")
