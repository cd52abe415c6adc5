"""``tandem eval``: teacher-forced perplexity on every backend and placement.

A small model with its own byte-level BPE (``tokenizer.json``, trained here in well under a
second) and random weights scores a short text. The device backends, the torch prefill (``gpu``)
and the hybrid handoff all compute the core's numeric contract, so their losses must be equal to
the last bit; the float reference only close. The ``logits=True`` program the device runs is
checked against the faithful model's ``logits16``, position by position.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from helpers import byte_level_bpe

from tandem.checkpoint import lively_weights, save_checkpoint
from tandem.compiler import compile_model, fits, logits_chunks, vbuf_plan
from tandem.config import GPT2Config, preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.golden.isasim import IsaSim
from tandem.host.cli import main
from tandem.host.evaluate import (
    DeviceScorer,
    evaluate,
    gpu_scorer,
    nll,
    reference_scorer,
    windows,
)
from tandem.tokenizer import tokenizer_for

SONNET = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""

CFG = GPT2Config(300, 40, 64, 1, 2, name="sonnet")
"""A vocabulary a byte-level BPE can have (256 bytes, <|endoftext|>, 43 merges), one head of
64, a context of 40 so that the text spans several windows."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A Hugging Face GPT-2 folder with its own tokenizer.json; random (lively) weights."""
    d = tmp_path_factory.mktemp("sonnet")
    tok = byte_level_bpe([SONNET], CFG.n_vocab)
    assert tok.get_vocab_size() == CFG.n_vocab
    tok.save(str(d / "tokenizer.json"))
    save_checkpoint(d, CFG, lively_weights(CFG, seed=3))
    (d / "sonnet.txt").write_text(SONNET)
    return d


N_TOKENS = 100
"""Tokens of the sonnet the placements score (three windows of the context of 40)."""


@pytest.fixture(scope="module")
def ids(ckpt):
    return tokenizer_for(ckpt, CFG).encode(SONNET)[:N_TOKENS]


def test_windows_score_every_token_once():
    for n, n_ctx in [(2, 2), (2, 64), (64, 64), (65, 64), (200, 40), (1000, 7)]:
        wins = windows(n, n_ctx)
        assert wins[0][0] == 0 and wins[-1][1] == n
        assert all(2 <= b - a <= n_ctx for a, b in wins)
        assert all(b1 - 1 == a2 for (_, b1), (a2, _) in itertools.pairwise(wins))
        assert sum(b - a - 1 for a, b in wins) == n - 1  # every token after the first, once
    assert windows(1, 8) == [] and windows(0, 8) == []
    with pytest.raises(ValueError, match="n_ctx must be at least 2"):
        windows(10, 1)


def test_nll_is_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(0, 30, (7, 50))
    t = rng.integers(0, 50, 7)
    want = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(t), reduction="sum")
    assert nll(x, t) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize(
    "cfg,geom",
    [
        (preset("test-tiny"), "tiny"),
        (preset("test-odd"), "small"),
        (GPT2Config(5000, 64, 64, 2, 1, name="wide-vocab"), "tiny"),  # three logits chunks
    ],
    ids=["test-tiny-tiny", "test-odd-small", "wide-vocab-tiny"],
)
def test_logits_program_stores_faithful_logits(cfg, geom):
    """Every position's stored logits equal ``FaithfulModel``'s ``logits16``; the generated
    tokens equal the plain program's and the faithful model's."""
    g = geometry(geom)
    w = lively_weights(cfg)
    assert fits(cfg, g, logits=True) is None
    if cfg.name == "wide-vocab":
        assert len(logits_chunks(cfg, g, vbuf_plan(cfg, g))) == 3
    rng = np.random.default_rng(1)
    prompt = [int(i) for i in rng.integers(0, cfg.n_vocab, 12)]
    c = compile_model(cfg, w, g, logits=True)
    plain = compile_model(cfg, w, g)
    assert c.layout["h.0.k"] == plain.layout["h.0.k"]  # the logits region comes after the rest
    for comp in (c, plain):
        comp.write_prompt(comp.image, prompt)
        assert IsaSim(g, comp.image).run(comp.args(len(prompt), 3)).status == 0
    fm = FaithfulModel(cfg, w)
    cache = fm.new_cache()
    want = [fm.step(t, p, cache) for p, t in enumerate(prompt)]
    for k in range(2):
        want.append(fm.step(want[-1].token, len(prompt) + k, cache))
    got = c.read_logits(c.image, 0, len(prompt) + 2)
    np.testing.assert_array_equal(got, np.stack([r.logits16 for r in want]))
    assert c.read_output(c.image, 3) == plain.read_output(plain.image, 3)
    assert c.read_output(c.image, 3) == fm.generate(prompt, 3)
    with pytest.raises(ValueError, match="compiled without logits"):
        plain.read_logits(plain.image, 0, 1)


def test_prefill_logits_are_faithful():
    from tandem.gpu.contract import bits_to_numpy
    from tandem.gpu.prefill import prefill

    cfg = preset("test-odd")
    w = lively_weights(cfg)
    ids = [int(i) for i in np.random.default_rng(2).integers(0, cfg.n_vocab, cfg.n_ctx)]
    pre = prefill(cfg, w, ids, logits=True)
    fm = FaithfulModel(cfg, w)
    cache = fm.new_cache()
    steps = [fm.step(t, p, cache) for p, t in enumerate(ids)]
    np.testing.assert_array_equal(bits_to_numpy(pre.logits16), [s.logits16 for s in steps])
    assert pre.first_token == steps[-1].token == prefill(cfg, w, ids).first_token
    assert prefill(cfg, w, ids).logits16 is None


def test_every_placement_gives_the_same_loss(ckpt, ids):
    """model (ISA simulator), gpu (torch prefill) and hybrid (torch + device) are bit-exact;
    the float reference is close."""
    from tandem.checkpoint import load_checkpoint

    cfg, w = load_checkpoint(ckpt)
    assert len(windows(len(ids), cfg.n_ctx)) >= 3
    ref = evaluate(cfg, ids, reference_scorer(cfg, w), "reference")
    gpu = evaluate(cfg, ids, gpu_scorer(cfg, w, "cpu"), "gpu")
    with DeviceScorer(cfg, w, geometry("tiny")) as scorer:
        model = evaluate(cfg, ids, scorer, "model")
    with DeviceScorer(cfg, w, geometry("tiny"), hybrid=True, prefill_device="cpu") as scorer:
        hybrid = evaluate(cfg, ids, scorer, "hybrid")
    assert model.tokens == gpu.tokens == hybrid.tokens == ref.tokens == len(ids) - 1
    assert model.nll == gpu.nll == hybrid.nll  # exactly: the same binary16 logits
    assert model.perplexity == pytest.approx(ref.perplexity, rel=1e-2)
    assert 1 < ref.perplexity < 5 * cfg.n_vocab


def _eval(capsys, *argv):
    rc = main(["eval", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def test_cli_eval_on_every_placement(capsys, ckpt):
    text = ckpt / "sonnet.txt"
    base = [text, "--checkpoint", ckpt, "--geometry", "tiny", "--max-tokens", N_TOKENS]
    outs = {}
    for name, extra in {
        "model": [],
        "hybrid": ["--placement", "hybrid", "--prefill-device", "cpu"],
    }.items():
        outs[name], _ = _eval(capsys, *base, *extra)
    outs["gpu"], _ = _eval(*[capsys, *base[:3], "--placement", "gpu", *base[5:]])
    outs["reference"], err = _eval(*[capsys, *base[:3], "--backend", "reference", *base[5:]])
    ppl = {k: float(v.split()[1]) for k, v in outs.items()}
    assert ppl["model"] == ppl["gpu"] == ppl["hybrid"]
    assert math.isclose(ppl["model"], ppl["reference"], rel_tol=1e-2)
    assert (
        "[model on tiny]" in outs["model"]
        and "[hybrid, model on tiny, prefill on cpu]" in (outs["hybrid"])
    )
    assert f"over {N_TOKENS - 1} tokens in 3 windows of up to 40 [reference]" in outs["reference"]
    assert "[reference] model sonnet" in err and "tokens/s" in err
    # --max-tokens: a slice of the text
    out, _ = _eval(capsys, text, "--checkpoint", ckpt, "--backend", "reference", "--max-tokens", 5)
    assert "over 4 tokens in 1 window of" in out


def test_cli_eval_progress(capsys, ckpt):
    argv = [str(ckpt / "sonnet.txt"), "--checkpoint", str(ckpt), "--backend", "reference"]
    assert main(["eval", *argv, "--progress"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("window ")]
    assert len(lines) >= 10 and lines[0].startswith("window 1/") and "perplexity" in lines[-1]
    assert main(["eval", *argv]) == 0  # stderr is not a terminal here: no progress by default
    assert "window 1/" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "make,argv,needles",
    [
        (None, ["missing.txt"], ["missing.txt: no such file"]),
        ("dir", ["folder"], ["is a folder"]),
        ("empty", ["empty.txt"], ["empty.txt is empty"]),
        ("blank", ["blank.txt"], ["blank.txt is empty"]),
        ("latin1", ["latin1.txt"], ["latin1.txt is not UTF-8 text"]),
        ("one", ["one.txt"], ["is 1 token long", "at least 2"]),
        ("ok", ["ok.txt", "--max-tokens", "1"], ["--max-tokens", "'1'"]),
        ("ok", ["ok.txt", "--backend", "nosuch"], ["--backend", "nosuch"]),
        ("ok", ["ok.txt", "--placement", "auto"], ["--placement", "auto"]),
        ("ok", ["ok.txt", "--placement", "gpu", "--geometry", "tiny"], ["--geometry"]),
        ("ok", ["ok.txt", "--weights-seed", "2"], ["--weights-seed", "--preset"]),
    ],
)
def test_cli_eval_bad_input(capsys, ckpt, tmp_path, make, argv, needles):
    files = {
        "empty": b"",
        "blank": b" \n\n\t",
        "latin1": "caf\u00e9 ol\u00e9".encode("latin-1"),
        "one": b"a",
        "ok": SONNET.encode(),
    }
    if make == "dir":
        (tmp_path / "folder").mkdir()
    elif make is not None:
        (tmp_path / argv[0]).write_bytes(files[make])
    argv = [str(tmp_path / argv[0]), *argv[1:], "--checkpoint", str(ckpt)]
    rc = main(["eval", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(("tandem eval: error: ", "tandem: error: ")), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_eval_preset_without_text_vocabulary(capsys, ckpt):
    rc = main(["eval", str(ckpt / "sonnet.txt"), "--preset", "test-tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "--preset test-tiny has a vocabulary of 256 tokens" in err


@pytest.mark.core
def test_cli_eval_rtl_equals_model(capsys, ckpt):
    """The RTL core stores the same logits as the ISA simulator: the same loss, to the bit."""
    from tandem.sim import runner

    if "verilator" not in runner.simulators():
        pytest.skip("the rtl backend runs on Verilator; SIM selects another simulator")
    base = [ckpt / "sonnet.txt", "--checkpoint", ckpt, "--geometry", "tiny"]
    model, _ = _eval(capsys, *base, "--max-tokens", 24)
    rtl, _ = _eval(capsys, *base, "--backend", "rtl", "--max-tokens", 24)
    assert rtl.replace("[rtl on tiny]", "[model on tiny]") == model
    assert "over 23 tokens in 1 window" in rtl
