"""Quantized weights on the ISA simulator (issue 17): the compiled program equals the faithful
model bit for bit.

Every generated token, every position's binary16 logits (the ``logits=True`` program stores
them), the LM head's accumulators of the last step and the KV cache the program left in HBM, on
test-tiny and test-odd at W8 per channel, W4 g64 and W4 g128 (geometry tiny); a quantized LM head
read in several logits chunks; and ``tandem generate`` on a quantized checkpoint folder on the
model and fpga backends (the fake cards) and the hybrid and auto placements."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from fake_cards import write_xclbin
from fake_opencl import card_fixture  # noqa: F401
from fake_xrt import xrt_card_fixture  # noqa: F401
from test_isasim import check_kv

from tandem import isa
from tandem.checkpoint import lively_weights, load_checkpoint, save_quantized
from tandem.compiler import compile_model, logits_chunks
from tandem.config import GPT2Config, preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.golden.isasim import IsaSim
from tandem.host.cli import main
from tandem.layout import quant_stream_bytes
from tandem.qweights import PER_CHANNEL, quantize_weights

CASES = [  # (model, bits, group)
    ("test-tiny", 8, PER_CHANNEL),
    ("test-tiny", 4, 64),
    ("test-odd", 8, PER_CHANNEL),
    ("test-odd", 4, 64),
    ("test-odd", 4, 128),
]
PROMPT = [5, 17, 3, 9, 21, 2]
N_NEW = 4


@functools.cache
def quantized(name: str, bits: int, group: int):
    cfg = preset(name)
    return cfg, quantize_weights(lively_weights(cfg, seed=7), cfg, bits=bits, group=group)


def faithful_steps(fm: FaithfulModel, prompt, n_new):
    """Every position's StepResult of greedy decoding, and the cache."""
    cache = fm.new_cache()
    steps = [fm.step(t, p, cache) for p, t in enumerate(prompt)]
    while len(steps) < len(prompt) + n_new - 1:
        steps.append(fm.step(steps[-1].token, cache.n_tokens, cache))
    return steps, cache


@pytest.mark.parametrize("name, bits, group", CASES)
def test_isasim_equals_faithful(name, bits, group):
    cfg, w = quantized(name, bits, group)
    g = geometry("tiny")
    c = compile_model(cfg, w, g, logits=True)
    wfmt = isa.WFmt.INT8 if bits == 8 else isa.WFmt.INT4
    mats = [i for i in c.program if i.op is isa.Op.MATVEC and i["wfmt"]]
    # four per layer, and the LM head (its logits chunk, then its argmax)
    assert len(mats) == 4 * cfg.n_layer + 2 and {i["wfmt"] for i in mats} == {wfmt}
    c.write_prompt(c.image, PROMPT)
    sim = IsaSim(g, c.image)
    r = sim.run(c.args(len(PROMPT), N_NEW))
    assert r.ok, r.message
    fm = FaithfulModel(cfg, w)
    steps, cache = faithful_steps(fm, PROMPT, N_NEW)
    tokens = [s.token for s in steps[len(PROMPT) - 1 :]]
    assert c.read_output(c.image, N_NEW) == tokens == fm.generate(PROMPT, N_NEW)
    assert len(set(tokens + [s.token for s in steps])) > 3  # lively, not one repeated token
    got = c.read_logits(c.image, 0, len(steps))
    np.testing.assert_array_equal(got, np.stack([s.logits16 for s in steps]))
    acc, lam = sim.last_argmax
    assert lam == steps[-1].lam and np.array_equal(acc, steps[-1].acc)
    check_kv(c, c.image, cache)
    # HBM bytes: each position streams every quantized matrix's tiles and scale beats once
    lay = c.layout
    per_pos = sum(
        sum(quant_stream_bytes(g, reg.rows, reg.cols, bits, reg.wgroup))
        for n, reg in lay.regions.items()
        if reg.wfmt
    )
    assert r.hbm_read >= len(steps) * per_pos
    # the same program one instruction at a time (no batched heads, no cached matrices)
    c2 = compile_model(cfg, w, g)
    c2.write_prompt(c2.image, PROMPT)
    r2 = IsaSim(g, c2.image, batch_heads=False).run(c2.args(len(PROMPT), N_NEW))
    assert r2.ok and c2.read_output(c2.image, N_NEW) == tokens


def test_quantized_lm_head_in_logits_chunks():
    """A wide vocabulary: the LM head's logits come in four chunks, each starting on a scale
    beat of the quantized head."""
    cfg = GPT2Config(5000, 64, 128, 2, 1, name="wide-vocab")
    g = geometry("tiny")
    w = quantize_weights(lively_weights(cfg, seed=3), cfg, bits=4, group=64)
    c = compile_model(cfg, w, g, logits=True)
    head = c.layout["lm_head"]
    assert (head.wfmt, head.wgroup) == (isa.WFmt.INT4, 0)  # e = 4 entries per tile, K = 8
    chunks = logits_chunks(cfg, g, c.vbuf_map, head)
    assert len(chunks) == 4
    for r0, _, _, head_line, _ in chunks:  # 32 tiles per 64 rows; runs of 8 tiles in 9 beats
        assert r0 // 64 * 32 % 8 == 0 and head_line == r0 // 64 * 32 // 8 * 9
    prompt = [7, 4000, 123]
    c.write_prompt(c.image, prompt)
    assert IsaSim(g, c.image).run(c.args(len(prompt), 2)).ok
    steps, _ = faithful_steps(FaithfulModel(cfg, w), prompt, 2)
    np.testing.assert_array_equal(
        c.read_logits(c.image, 0, len(steps)), np.stack([s.logits16 for s in steps])
    )
    assert c.read_output(c.image, 2) == [s.token for s in steps[2:]]


def test_cli_generate_on_a_quantized_checkpoint(tmp_path, capsys, request):
    """``tandem generate --checkpoint QDIR`` runs the quantized folder on every backend and
    placement that does not need the RTL simulator: the ISA simulator (``--backend model``), the
    card (``--backend fpga`` on the fake pyxrt and the fake OpenCL card, which run the same ISA
    simulator on the HBM image the host loaded), the hybrid placement (torch prefill on the CPU,
    the KV cache handed to the core) and ``--placement auto``: the faithful model's tokens on
    each. ``--backend rtl`` runs it in tests/rtl/test_core_quant.py (the Verilator build)."""
    cfg, w = quantized("test-odd", 4, 128)
    folder = save_quantized(tmp_path / "w4", cfg, w, bits=4, group=128)
    _, loaded = load_checkpoint(folder)
    want = FaithfulModel(cfg, loaded).generate([1, 2, 3], 8)
    assert len(set(want)) > 2
    line = ",".join(map(str, [1, 2, 3, *want])) + "\n"
    cmd = ["generate", "--checkpoint", str(folder), "--prompt-ids", "1,2,3", "--no-progress"]
    cmd += ["--max-new-tokens", "8", "--geometry", "tiny"]
    assert main([*cmd, "--backend", "model"]) == 0
    assert capsys.readouterr().out == line
    for extra in (
        ["--placement", "hybrid", "--prefill-device", "cpu"],
        ["--placement", "auto", "--prefill-device", "cpu"],
    ):
        assert main([*cmd, *extra]) == 0, extra
        out, err = capsys.readouterr()
        assert out == line, (extra, err)
    xclbin = write_xclbin(tmp_path / "k.xclbin", geometry("tiny"))
    for fake in ("xrt_card", "card"):
        card = request.getfixturevalue(fake)
        assert main([*cmd, "--backend", "fpga", "--xclbin", str(xclbin)]) == 0, fake
        out, err = capsys.readouterr()
        assert out == line, (fake, err)
        hybrid = ["--placement", "hybrid", "--prefill-device", "cpu"]
        assert main([*cmd, "--backend", "fpga", "--xclbin", str(xclbin), *hybrid]) == 0, fake
        out, err = capsys.readouterr()
        assert out == line and "KV moved" in err, (fake, err)
        assert [run["n_new"] for run in card.launches] == [8, 7]  # this card ran both
