"""``tandem eval`` on quantized checkpoints, and scripts/measure_quant_perplexity.py's table.

A tiny model with its own byte-level BPE is quantized by ``tandem quantize`` (round to nearest,
W4 in groups of 64 and W8 per channel, LM head included) and scored by ``tandem eval``: on
``--placement gpu`` the perplexity must be the one the hardware-faithful model's binary16 logits
give, to the last bit; on ``--backend reference`` (the dequantized float model) close to it and
not the float model's.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import byte_level_bpe

from tandem.checkpoint import lively_weights, load_checkpoint, save_checkpoint
from tandem.config import GPT2Config
from tandem.golden.faithful import FaithfulModel
from tandem.host.cli import main
from tandem.host.evaluate import evaluate, gpu_scorer, reference_scorer
from tandem.numerics import from_bits
from tandem.qweights import QuantizedMatrix
from tandem.tokenizer import tokenizer_for

TEXT = """\
When in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possessed,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
"""

CFG = GPT2Config(300, 40, 128, 2, 1, name="sonnet29")
"""Byte-level BPE vocabulary (256 bytes, <|endoftext|>, 43 merges); two heads of 64 (one
layer), so that a W4 row has two groups of 64; a context of 40, so that the text spans several
windows."""
N_TOKENS = 90
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_quant_perplexity.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The float folder (with tokenizer.json and the text) and its W4 g64 and W8 RTN copies."""
    d = tmp_path_factory.mktemp("sonnet29")
    tok = byte_level_bpe([TEXT], CFG.n_vocab)
    src = d / "float"
    src.mkdir()
    tok.save(str(src / "tokenizer.json"))
    save_checkpoint(src, CFG, lively_weights(CFG, seed=5))
    (d / "text.txt").write_text(TEXT)
    out = {"float": src}
    for name, flags in {"w4g64": ["4", "--group", "64"], "w8": ["8"]}.items():
        out[name] = d / name
        argv = ["quantize", "--checkpoint", str(src), "--bits", *flags, "--method", "rtn"]
        assert main([*argv, "--out", str(out[name])]) == 0
    return d, out


def _eval(capsys, *argv) -> str:
    rc = main(["eval", *map(str, argv), "--no-progress", "--max-tokens", str(N_TOKENS)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _faithful_nll(cfg, weights, ids) -> float:
    """The loss ``tandem eval`` computes, from FaithfulModel's binary16 logits step by step."""
    fm = FaithfulModel(cfg, weights)

    def logits(window):
        cache = fm.new_cache()
        steps = [fm.step(t, p, cache) for p, t in enumerate(window)]
        return from_bits(np.stack([s.logits16 for s in steps])).astype(np.float64)

    return evaluate(cfg, ids, logits, "faithful")


@pytest.mark.parametrize("name", ["w4g64", "w8"])
def test_eval_gpu_equals_the_faithful_model(capsys, folders, name):
    d, f = folders
    cfg, w = load_checkpoint(f[name])
    assert isinstance(w["h.0.mlp.c_fc.weight"], QuantizedMatrix)
    assert isinstance(w["lm_head.weight"], QuantizedMatrix)
    ids = tokenizer_for(f[name], cfg).encode(TEXT)[:N_TOKENS]
    want = _faithful_nll(cfg, w, ids)
    assert want.tokens == N_TOKENS - 1 and want.windows == 3
    assert evaluate(cfg, ids, gpu_scorer(cfg, w, "cpu")).nll == want.nll  # bit for bit
    out = _eval(capsys, d / "text.txt", "--checkpoint", f[name], "--placement", "gpu")
    assert out == (
        f"perplexity {want.perplexity:.4f} (loss {want.loss:.6f} nats/token) over "
        f"{N_TOKENS - 1} tokens in 3 windows of up to 40 [gpu on cpu]\n"
    )


def test_eval_reference_runs_the_dequantized_model(capsys, folders):
    """``--backend reference`` on a quantized folder: the dequantized float model (it raised a
    TypeError on a QuantizedMatrix before), near the contract's figure, and not the float
    model's."""
    d, f = folders
    text = d / "text.txt"
    ppl = {}
    for name in ("float", "w4g64"):
        out = _eval(capsys, text, "--checkpoint", f[name], "--backend", "reference")
        assert out.endswith(f"over {N_TOKENS - 1} tokens in 3 windows of up to 40 [reference]\n")
        ppl[name] = float(out.split()[1])
    cfg, w = load_checkpoint(f["w4g64"])
    ids = tokenizer_for(f["w4g64"], cfg).encode(TEXT)[:N_TOKENS]
    want = evaluate(cfg, ids, reference_scorer(cfg, w))
    assert ppl["w4g64"] == float(f"{want.perplexity:.4f}")
    gpu = float(_eval(capsys, text, "--checkpoint", f["w4g64"], "--placement", "gpu").split()[1])
    assert math.isclose(ppl["w4g64"], gpu, rel_tol=1e-2)
    assert ppl["w4g64"] != ppl["float"]


@pytest.fixture(scope="module")
def script():
    return _load_script("measure_quant_perplexity")


def test_script_formats(script):
    assert script.parse_format("fp16") is None
    assert script.parse_format("w8") == (8, -1)
    assert script.parse_format("w4") == (4, 128)
    assert script.parse_format("w4g64") == (4, 64)
    with pytest.raises(SystemExit, match="--formats: 'w3' is not fp16, w8, w4"):
        script.parse_format("w3")


def test_script_table_on_given_rows(script):
    Row = script.Row
    rows = [
        Row("fp16", "", "", "gpu", 100, 400.0, 3.2),
        Row("w4g64", "gptq", "training split", "gpu", 100, 401.0, 4.7),
        Row("w8", "rtn", "", "reference", 100, 300.0, 1.0),  # no FP16 row on this backend
    ]
    assert script.table(rows).splitlines() == [
        "| weights | method | calibration | backend | tokens scored | perplexity | "
        "loss (nats/token) | vs FP16 | time |",
        "|---|---|---|---|---|---|---|---|---|",
        "| FP16 | — | — | gpu | 100 | 54.5982 | 4.000000 |  | 3 s |",
        "| W4G64 | GPTQ | training split | gpu | 100 | 55.1469 | 4.010000 | +1.01% | 5 s |",
        "| W8 | RTN | — | reference | 100 | 20.0855 | 3.000000 |  | 1 s |",
    ]
    with pytest.raises(ValueError, match="w4g64 gptq scored 99 tokens, FP16 100"):
        script.table([rows[0], Row("w4g64", "gptq", "", "gpu", 99, 1.0, 0.0)])


def test_script_measures_what_tandem_eval_measures(script, folders):
    """The script's quantizing and scoring on the tiny model: its W4 g64 RTN gpu row is the
    faithful model's loss on the folder ``tandem quantize`` wrote, its FP16 row the float
    model's."""
    _, f = folders
    cfg, w = load_checkpoint(f["float"])
    ids = tokenizer_for(f["float"], cfg).encode(TEXT)[:N_TOKENS]
    models = script.quantized_models(cfg, w, ["fp16", "w4g64"], ["rtn"], None, None, lambda m: None)
    assert [(m.fmt, m.method) for m in models] == [("fp16", ""), ("w4g64", "rtn")]
    rows = script.measure(cfg, models, {"text": ids}, ["gpu"])
    _, qw = load_checkpoint(f["w4g64"])
    assert rows[0].nll == _faithful_nll(cfg, w, ids).nll
    assert rows[1].nll == _faithful_nll(cfg, qw, ids).nll
    assert [r.tokens for r in rows] == [N_TOKENS - 1] * 2
    gap = (math.exp(rows[1].loss - rows[0].loss) - 1) * 100
    assert f"| W4G64 | RTN | — | gpu | {N_TOKENS - 1} |" in script.table(rows)
    assert f"| {gap:+.2f}% |" in script.table(rows)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_measure_numerics_quantized(capsys):
    """scripts/measure_numerics.py --bits: the reference's logits come from the quantized LM
    head (``measure`` checks ``reference_states`` against ``reference.forward``, which raises
    if they differ), and the faithful model runs the quantized contract."""
    from tandem.checkpoint import random_weights
    from tandem.config import preset
    from tandem.golden import reference
    from tandem.qweights import quantize_weights

    mn = _load_script("measure_numerics")
    cfg = preset("test-tiny")
    qw = quantize_weights(random_weights(cfg, seed=0), cfg, bits=4, group=64)
    logits, _ = mn.reference_states(qw, cfg, [1, 2, 3])
    head = qw["lm_head.weight"].dequantize().astype(np.float64)
    assert not np.allclose(head, np.asarray(qw["wte.weight"], dtype=np.float64), atol=1e-6)
    np.testing.assert_allclose(
        logits, reference.forward(qw, cfg, [1, 2, 3], dtype=np.float64), rtol=1e-12, atol=1e-12
    )
    assert mn.main(["--preset", "test-tiny", "--steps", "4", "--bits", "4", "--group", "64"]) == 0
    out = capsys.readouterr().out
    assert "random_weights(seed=0), W4 group 64 RTN (LM head quantized)" in out
    assert "logits " in out and "(4/4)" in out
    with pytest.raises(SystemExit):
        mn.main(["--preset", "test-tiny", "--group", "64"])
    assert "--group, --method and --calib quantize: give --bits too" in capsys.readouterr().err


def test_torch_decode_runs_on_one_cpu_thread(folders):
    """``--placement gpu`` on the CPU decodes with ``CPU_THREADS`` torch threads (it was 5x
    slower with torch's default of 2 on this busy 2-core machine) and restores the setting."""
    import torch

    from tandem.gpu.cuda import CPU_THREADS, cpu_threads
    from tandem.gpu.decode import generate
    from tandem.gpu.prefill import PreparedModel

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads(torch.device("cpu")):
            assert torch.get_num_threads() == CPU_THREADS == 1
        assert torch.get_num_threads() == 2
        with cpu_threads(torch.device("cuda")):  # not the CPU: unchanged
            assert torch.get_num_threads() == 2
        _, f = folders
        cfg, w = load_checkpoint(f["w4g64"])
        seen = []
        r = generate(cfg, PreparedModel(cfg, w, "cpu"), [1, 2, 3], 3, lambda i, t: seen.append(
            torch.get_num_threads()))  # fmt: skip
        assert len(r.tokens) == 3 and seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
