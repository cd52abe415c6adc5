"""Bad and edge inputs to ``tandem generate`` and ``tandem bench`` (issue 13, the CLI half).

Each case runs through ``tandem.host.cli.main`` and checks the exit code and that stderr is one
line, ``tandem <command>: error: ...``, naming the flag or file; request cases run on every
placement (fpga, hybrid, gpu, auto) and the reference backend and must give the same line, and
nothing may have run before the error (the prefill, compilation and decode entry points are
booby-trapped). Checkpoint folders are hashed before and after: no input modifies them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import thesis_cpu_times
from test_backends import card  # noqa: F401  (the fake Alveo card fixture)

from tandem.checkpoint import random_weights, save_checkpoint
from tandem.config import preset
from tandem.host import cli
from tandem.host.cli import main

TINY = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2", "--no-progress"]

PLACEMENTS = {
    "fpga": [],
    "hybrid": ["--placement", "hybrid", "--prefill-device", "cpu"],
    "gpu": ["--placement", "gpu", "--prefill-device", "cpu"],
    "auto": ["--placement", "auto", "--prefill-device", "cpu"],
    "reference": ["--backend", "reference"],
}
"""Every placement, and the reference backend (placement fpga, no device)."""


def one_line(capsys, argv, code: int, *needles: str) -> tuple[str, str]:
    """Run ``tandem argv``; expect ``code`` and stderr of exactly one error line holding every
    needle. Returns (stdout, the line)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"tandem {argv[0]}: error: ") or line.startswith("tandem: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in line, line
    return out, line


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a prefill, a compilation, a decode or a timing starts."""

    def trap(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    import tandem.gpu.decode
    import tandem.gpu.prefill
    import tandem.host.hybrid
    import tandem.host.runtime
    import tandem.host.thesis

    monkeypatch.setattr(tandem.gpu.prefill, "prefill", trap)
    monkeypatch.setattr(tandem.gpu.decode, "prefill", trap)
    monkeypatch.setattr(tandem.host.hybrid, "prefill", trap)
    monkeypatch.setattr(tandem.host.runtime, "compile_model", trap)
    monkeypatch.setattr(tandem.host.thesis, "thesis_table", trap)
    monkeypatch.setattr(tandem.host.thesis.CpuTimes, "prefill", trap)
    import tandem.golden.reference

    monkeypatch.setattr(tandem.golden.reference, "generate_greedy", trap)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Checkpoint folders of test-tiny: good, one NaN weight, one Inf, all-NaN ln_f, a shard
    index naming a missing shard, an absurd n_layer."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = preset("test-tiny")
    w = random_weights(cfg, seed=3)
    made = {"good": save_checkpoint(root / "good", cfg, w)}
    nan = dict(w)
    nan["h.1.mlp.c_fc.weight"] = w["h.1.mlp.c_fc.weight"].copy()
    nan["h.1.mlp.c_fc.weight"][3, 5] = np.nan
    made["nan"] = save_checkpoint(root / "nan", cfg, nan)
    inf = dict(w)
    inf["wpe.weight"] = w["wpe.weight"].copy()
    inf["wpe.weight"][0, 0] = -np.inf
    made["inf"] = save_checkpoint(root / "inf", cfg, inf)
    lnf = dict(w)
    lnf["ln_f.weight"] = np.full_like(w["ln_f.weight"], np.nan)
    made["lnf"] = save_checkpoint(root / "lnf", cfg, lnf)
    shard = save_checkpoint(root / "shard", cfg, w)
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    keys = {f"transformer.{k}": "model-00001-of-00002.safetensors" for k in list(w)[:5]}
    keys["transformer.ln_f.weight"] = "model-00002-of-00002.safetensors"
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": keys}))
    made["shard"] = shard
    layers = save_checkpoint(root / "layers", cfg, w)
    conf = json.loads((layers / "config.json").read_text())
    (layers / "config.json").write_text(json.dumps({**conf, "n_layer": 100_000_000}))
    made["layers"] = layers
    return made


@pytest.fixture
def ckpt(folders):
    """The checkpoint folders, each checked unmodified after the test."""
    before = {k: _digest(p) for k, p in folders.items()}
    yield folders
    assert {k: _digest(p) for k, p in folders.items()} == before


# --------------------------------------------------------------------------------------------
# 1. non-finite weights and 6. checkpoint structure: one line, exit 2, every placement


@pytest.mark.parametrize("where", PLACEMENTS)
@pytest.mark.parametrize(
    "folder,needle",
    [
        ("nan", "weight 'h.1.mlp.c_fc.weight'"),
        ("inf", "weight 'wpe.weight'"),
        ("lnf", "weight 'ln_f.weight'"),
        ("shard", "model-00002-of-00002.safetensors"),
        ("layers", "n_layer = 100000000"),
    ],
)
def test_bad_checkpoint_is_one_line_on_every_placement(
    capsys, ckpt, nothing_runs, where, folder, needle
):
    argv = ["generate", "--checkpoint", str(ckpt[folder]), "--prompt-ids", "1,2"]
    _, line = one_line(capsys, [*argv, *PLACEMENTS[where]], 2, needle, str(ckpt[folder]))
    if folder in ("nan", "inf", "lnf"):
        assert "--allow-nonfinite" in line


def test_allow_nonfinite_runs_and_only_applies_to_checkpoints(capsys, ckpt):
    argv = ["generate", "--checkpoint", str(ckpt["inf"]), "--prompt-ids", "1,2"]
    argv += ["--max-new-tokens", "2", "--backend", "reference", "--allow-nonfinite"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("1,2,")
    one_line(capsys, [*TINY, "--allow-nonfinite"], 2, "--allow-nonfinite", "--checkpoint")
    one_line(capsys, ["generate", "--allow-nonfinite"], 2, "--allow-nonfinite")


def test_good_checkpoint_runs_on_every_placement(capsys, ckpt):
    """The same folder and request, each placement: exit 0, the same tokens (gpu/hybrid/fpga
    share the core's numerics; auto picks one of them)."""
    outs = {}
    for where in ("fpga", "hybrid", "gpu", "auto"):
        argv = ["generate", "--checkpoint", str(ckpt["good"]), "--prompt-ids", "1,2"]
        assert main([*argv, "--max-new-tokens", "3", *PLACEMENTS[where]]) == 0
        outs[where] = capsys.readouterr().out
    assert len(set(outs.values())) == 1, outs


# --------------------------------------------------------------------------------------------
# 2. request checks: the same line on every placement, before anything runs


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--max-new-tokens", "-3"], ["--max-new-tokens", "'-3'"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "positive"]),
        (["--max-new-tokens", "2.5"], ["--max-new-tokens"]),
        (["--max-new-tokens", "70"], ["exceeds the context of 64", "--max-new-tokens", "63"]),
        (["--prompt-ids", "1,256"], ["token id 256", "[0, 256)"]),
        (["--prompt-ids", ","], ["at least one token"]),
        (["--prompt-ids", "1,x"], ["token ids must be integers"]),
    ],
)
def test_request_errors_are_the_same_on_every_placement(capsys, nothing_runs, extra, needles):
    lines = set()
    for where, flags in PLACEMENTS.items():
        _, line = one_line(capsys, [*TINY, *flags, *extra], 2, *needles)
        lines.add(line)
        assert "n_new" not in line, where  # the flag, not the parameter
    assert len(lines) == 1, lines


def test_long_prompt_names_the_prompt(capsys, nothing_runs):
    ids = ",".join(["1"] * 65)
    for flags in PLACEMENTS.values():
        one_line(capsys, [*TINY, "--prompt-ids", ids, *flags], 2, "shorten the prompt", "64")


def test_geometry_too_small_is_refused_before_compiling(capsys, monkeypatch, nothing_runs):
    """gpt2 on the tiny core (its random weights are not made: the check needs none)."""
    monkeypatch.setattr(cli, "random_weights", lambda cfg, seed: {})
    argv = ["generate", "--preset", "gpt2", "--prompt-ids", "1", "--geometry", "tiny"]
    lines = {
        one_line(capsys, [*argv, *PLACEMENTS[w]], 2, "does not fit the tiny", "--geometry")[1]
        for w in ("fpga", "hybrid", "auto")
    }
    assert len(lines) == 1


# --------------------------------------------------------------------------------------------
# 3. flags that do not apply


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--backend", "fpga", "--placement", "gpu"], ["--backend fpga", "--placement gpu"]),
        (["--backend", "model", "--placement", "gpu"], ["--backend model", "--placement gpu"]),
        (["--backend", "reference", "--xclbin", "x.xclbin"], ["--xclbin", "--backend reference"]),
        (["--backend", "model", "--xclbin", "x.xclbin"], ["--xclbin", "--backend model"]),
        (["--backend", "rtl", "--xclbin", "x.xclbin"], ["--xclbin", "--backend rtl"]),
        (["--placement", "gpu", "--xclbin", "x.xclbin"], ["--xclbin", "--placement gpu"]),
        (["--placement", "hybrid", "--xclbin", "x.xclbin"], ["--xclbin", "--backend fpga"]),
        (["--placement", "auto", "--xclbin", "x.xclbin"], ["--xclbin", "--backend fpga"]),
        (["--placement", "gpu", "--timeout", "5"], ["--timeout", "--placement gpu"]),
        (["--placement", "gpu", "--geometry", "tiny"], ["--geometry", "--placement gpu"]),
        (["--backend", "reference", "--timeout", "5"], ["--timeout", "--backend reference"]),
        (["--backend", "reference", "--geometry", "tiny"], ["--geometry", "--backend reference"]),
        (["--backend", "reference", "--placement", "hybrid"], ["device --backend"]),
        (["--backend", "reference", "--placement", "auto"], ["device --backend"]),
        (["--backend", "reference", "--prefill-device", "cpu"], ["--prefill-device"]),
        (["--prefill-device", "cpu"], ["--prefill-device", "--placement fpga"]),
        (["--backend", "fpga"], ["--backend fpga needs --xclbin"]),
        (["--backend", "fpga", "--xclbin", "/nonexistent/x.xclbin"], ["--xclbin", "no such file"]),
        (["--backend", "fpga", "--xclbin", "/tmp"], ["--xclbin /tmp is a folder"]),
    ],
)
def test_flags_that_do_not_apply_are_refused(capsys, nothing_runs, extra, needles):
    one_line(capsys, [*TINY, *extra], 2, *needles)


def test_weights_seed_only_with_preset(capsys, ckpt, nothing_runs):
    argv = ["generate", "--checkpoint", str(ckpt["good"]), "--prompt-ids", "1"]
    one_line(capsys, [*argv, "--weights-seed", "3"], 2, "--weights-seed", "--preset")
    one_line(capsys, ["generate", "--weights-seed", "3"], 2, "--weights-seed", "built-in")
    one_line(capsys, [*TINY, "--weights-seed", "-1"], 2, "--weights-seed", "'-1'")
    # --seed is the sampling stream's: alone it is refused (tests/test_sampling.py has the rest)
    one_line(capsys, [*TINY, "--seed", "1"], 2, "--seed applies to sampling")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--load-times", "x.json"], ["--load-times is for --thesis"]),
        (["--save-times", "x.json"], ["--save-times is for --thesis"]),
        (["--plot", "x.png"], ["--plot is for --thesis"]),
        (["--measure-model", "gpt2"], ["--measure-model is for --thesis"]),
        (["--thesis", "--tokens", "3"], ["--tokens does not apply to --thesis"]),
        (["--thesis", "--model", "gpt2"], ["--model does not apply to --thesis"]),
        (["--thesis", "--geometry", "tiny"], ["--geometry does not apply to --thesis"]),
        (["--thesis", "--load-times", "x", "--measure-model", "gpt2"], ["--measure-model"]),
    ],
)
def test_bench_flags_that_do_not_apply_are_refused(capsys, nothing_runs, argv, needles):
    one_line(capsys, ["bench", *argv], 2, *needles)


def test_unknown_and_bad_choice_flags_are_one_line(capsys):
    one_line(capsys, [*TINY, "--bogus"], 2, "--bogus")
    one_line(capsys, [*TINY, "--placement", "moon"], 2, "--placement", "moon")


# --------------------------------------------------------------------------------------------
# 4. numbers


@pytest.mark.parametrize("value", ["-5", "0", "inf", "nan", "1e10", "abc", "-inf"])
def test_timeout_is_checked_on_every_placement(capsys, nothing_runs, value):
    for where in ("fpga", "hybrid", "auto"):
        argv = [*TINY, *PLACEMENTS[where], f"--timeout={value}"]
        one_line(capsys, argv, 2, "--timeout", value)


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--tokens", "0"], ["--tokens", "'0'"]),
        (["--tokens", "-1"], ["--tokens"]),
        (["--prompt-len", "0"], ["--prompt-len"]),
        (["--seed", "-2"], ["--seed"]),
        (["--model", "test-tiny", "--geometry", "tiny", "--prompt-len", "60", "--tokens", "10"],
         ["exceeds the context of 64", "--tokens"]),
        (["--model", "test-tiny", "--geometry", "tiny", "--prompt-len", "70"],
         ["shorten --prompt-len"]),
        (["--model", "gpt2", "--geometry", "tiny"], ["does not fit the tiny", "--geometry"]),
    ],
)  # fmt: skip
def test_bench_numbers(capsys, nothing_runs, argv, needles):
    one_line(capsys, ["bench", *argv], 2, *needles)


# --------------------------------------------------------------------------------------------
# 5. bench input and output files


BAD_TIMES = {
    "list": [1, 2],
    "no-key": thesis_cpu_times(decode_s=None),
    "wrong-type": thesis_cpu_times(prefill_s=[1.0, 2.0]),
    "strings": thesis_cpu_times(decode_s={"64": "0.5", "256": "0.6", "512": "0.7"}),
    "negative": thesis_cpu_times(prefill_s={"64": -1.0, "256": 4.0, "512": 9.0}),
    "nan": thesis_cpu_times(decode_s={"64": math.nan, "256": 0.6, "512": 0.7}),
    "incomplete": thesis_cpu_times(prefill_s={"64": 1.0, "256": 4.0}),
    "layers": thesis_cpu_times(layer_s={"64": [0.1], "256": [0.1], "512": [0.1]}),
    "model": thesis_cpu_times(model="gpt5"),
    "threads": thesis_cpu_times(threads="1"),
}


@pytest.mark.parametrize("case", [*BAD_TIMES, "missing", "folder", "not-json"])
def test_bad_load_times_file_is_one_line(capsys, nothing_runs, tmp_path, case):
    path = tmp_path / "cpu.json"
    if case == "folder":
        path.mkdir()
    elif case == "not-json":
        path.write_text("{nope")
    elif case != "missing":
        path.write_text(json.dumps(BAD_TIMES[case]))
    argv = ["bench", "--thesis", "--load-times", str(path), "--plot", str(tmp_path / "t.png")]
    one_line(capsys, argv, 2, f"--load-times {path}")
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize(
    "flag,target,needle",
    [
        ("--save-times", "folder", "is a folder"),
        ("--save-times", "under-file", "is a file, not a folder"),
        ("--plot", "folder.png", "is a folder"),
        ("--plot", "plot", "ending in .png"),
        ("--plot", "under-file", "ending in .png"),
        ("--plot", "under-file.png", "is a file, not a folder"),
    ],
)
def test_bench_output_paths_checked_before_the_work(
    capsys, nothing_runs, tmp_path, flag, target, needle
):
    saved = tmp_path / "cpu.json"
    saved.write_text(json.dumps(thesis_cpu_times()))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    path = {
        "under-file": tmp_path / "file" / "x.json",
        "under-file.png": tmp_path / "file" / "x.png",
    }
    path = path.get(target, tmp_path / target)
    argv = ["bench", "--thesis", "--load-times", str(saved)]
    if flag != "--plot":
        argv += ["--plot", str(tmp_path / "t.png")]
    one_line(capsys, [*argv, flag, str(path)], 2, flag, needle)


def test_bench_thesis_from_saved_times_writes_where_told(capsys, tmp_path):
    saved = tmp_path / "cpu.json"
    saved.write_text(json.dumps(thesis_cpu_times()))
    png, again = tmp_path / "new" / "t.png", tmp_path / "again.json"
    argv = ["bench", "--thesis", "--load-times", str(saved), "--plot", str(png)]
    assert main([*argv, "--save-times", str(again)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"timeline (prompt 512, output 64): {png}") and png.is_file()
    assert json.loads(again.read_text())["prefill_s"] == {"64": 1.0, "256": 4.0, "512": 9.0}


# --------------------------------------------------------------------------------------------
# 7. finished work is not lost


def test_ids_the_tokenizer_cannot_decode_are_printed(capsys, tmp_path):
    """A checkpoint whose tokenizer (vocab.json, merges.txt) knows 3 ids while the model has 256:
    the run decodes, the text cannot be made; the ids go to stdout, one error line, exit 1."""
    cfg = preset("test-tiny")
    folder = save_checkpoint(tmp_path / "ck", cfg, random_weights(cfg, seed=2))
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    before = _digest(folder)
    argv = ["generate", "--checkpoint", str(folder), "--prompt", "abc", "--max-new-tokens", "4"]
    for where in ("fpga", "gpu"):
        out, _ = one_line(capsys, [*argv, *PLACEMENTS[where]], 1, "could not be turned into text")
        ids = [int(i) for i in out.strip().split(",")]
        assert ids[:3] == [0, 1, 2] and len(ids) == 7 and max(ids[3:]) >= 3
    assert _digest(folder) == before


class _Full(io.TextIOBase):
    """A stdout on a full disk (or a closed pipe)."""

    def __init__(self, exc):
        self.exc = exc

    def write(self, text):
        raise self.exc

    def flush(self):
        pass


@pytest.mark.parametrize(
    "exc,needle",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "Broken pipe"),
    ],
)
@pytest.mark.parametrize("where", PLACEMENTS)
def test_stdout_that_fails_keeps_the_ids(capsys, monkeypatch, where, exc, needle):
    monkeypatch.setattr(sys, "stdout", _Full(exc))
    rc = main([*TINY, "--max-new-tokens", "2", *PLACEMENTS[where]])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if not x.startswith(("placement", "  "))]
    assert rc == 1 and len(lines) == 1, err
    assert needle in lines[0] and "stdout" in lines[0] and "1,2 | " in lines[0], lines[0]


def test_stdout_closed_is_refused(capsys, monkeypatch, nothing_runs):
    monkeypatch.setattr(sys, "stdout", None)
    one_line(capsys, [*TINY], 2, "stdout is closed")
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(cli, "cmd_generate", lambda args: cli.write_stdout("1,2\n", [1], [2]) or 0)
    one_line(capsys, [*TINY], 1, "cannot write the output to stdout")


def test_stdout_closed_in_a_real_process():
    """``tandem generate ... >&-``: non-zero, one line on stderr."""
    code = "import sys; from tandem.host.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, *TINY, "--max-new-tokens", "1"]
    proc = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *argv], capture_output=False, stderr=subprocess.PIPE
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.strip().splitlines() == [
        "tandem generate: error: stdout is closed; redirect it to a file (> FILE) or to /dev/null"
    ], err


# --------------------------------------------------------------------------------------------
# the fpga backend on the fake card (tests/test_backends.py): the same errors, the ids kept


@pytest.fixture
def fake_fpga(request, tmp_path):
    from test_backends import write_xclbin

    from tandem.geometry import geometry

    request.getfixturevalue("card")
    xclbin = write_xclbin(tmp_path / "tandem.xclbin", geometry("tiny"))
    return ["--backend", "fpga", "--xclbin", str(xclbin), "--geometry", "tiny"]


def test_fake_card_gives_the_same_errors(capsys, monkeypatch, nothing_runs, fake_fpga):
    base = [*TINY, "--geometry", "tiny", "--max-new-tokens", "70"]
    _, want = one_line(capsys, [*base, "--backend", "model"], 2, "exceeds the context")
    for flags in ([], PLACEMENTS["hybrid"], PLACEMENTS["auto"]):
        assert one_line(capsys, [*TINY, *fake_fpga, *flags, "--max-new-tokens", "70"], 2)[1] == want
    one_line(capsys, [*TINY, *fake_fpga, "--timeout", "inf"], 2, "--timeout")


def test_fake_card_full_stdout_keeps_the_ids(capsys, monkeypatch, fake_fpga):
    monkeypatch.setattr(sys, "stdout", _Full(OSError(errno.ENOSPC, "No space left on device")))
    for flags in ([], PLACEMENTS["hybrid"]):
        assert main([*TINY, *fake_fpga, *flags, "--max-new-tokens", "2"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "1,2 | " in lines[0]


# --------------------------------------------------------------------------------------------
# 8. Ctrl-C


@pytest.mark.parametrize("where", PLACEMENTS)
def test_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, where):
    import tandem.golden.reference
    import tandem.gpu.decode
    import tandem.host.placement
    import tandem.host.runtime

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tandem.host.runtime.Session, "generate", interrupt)
    monkeypatch.setattr(tandem.gpu.decode, "generate", interrupt)
    monkeypatch.setattr(tandem.host.placement, "choose", interrupt)
    monkeypatch.setattr(tandem.golden.reference, "generate_greedy", interrupt)
    one_line(capsys, [*TINY, *PLACEMENTS[where]], 130, "interrupted")


# --------------------------------------------------------------------------------------------
# 9. the rtl backend shows progress, not build logs


@pytest.mark.core
def test_rtl_backend_prints_progress_not_logs(capsys):
    from tandem.host.rtldevice import default_log_file
    from tandem.sim import runner

    if "verilator" not in runner.simulators():
        pytest.skip("the rtl backend runs on Verilator; SIM selects another simulator")
    argv = [*TINY, "--max-new-tokens", "2", "--geometry", "tiny"]
    assert main([*argv, "--backend", "model"]) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--backend", "rtl"]) == 0
    out, err = capsys.readouterr()
    assert out == want
    lines = err.strip().splitlines()
    progress = [x for x in lines if x.startswith("[rtl] ") and "model test-tiny" not in x]
    assert 1 <= len(progress) <= 2 and "running on the RTL core" in progress[0], err
    assert len(lines) == len(progress) + 2, err  # + timings and the summary line
    assert lines[-1].startswith("[rtl] model test-tiny on tiny: 2 prompt + 2 new tokens")
    log = default_log_file().read_text()
    assert "cocotb" in log and "[rtljob]" in log
