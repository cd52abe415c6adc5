"""Measure how far the hardware-faithful model is from the float reference.

Both models see the same context: the prompt, then the float64 reference's own greedy tokens
(teacher forcing). At every decode step the faithful logits (its exact accumulators,
``acc * 2**lam``) and final hidden state (the ``ln_f`` output the LM head reads) are compared
with the float64 reference's. Errors per step are ``max|a - b|`` and ``max|a - b| / max|b|``;
the table gives the maximum and mean over the steps, and how often the faithful argmax picks
the reference's top-1 token. Until the first disagreement the faithful model's own greedy
decoding produces exactly the reference's tokens, so that step is reported too.

    python scripts/measure_numerics.py                    # preset 'embedded', random weights
    python scripts/measure_numerics.py --preset gpt2      # any preset, random weights
    python scripts/measure_numerics.py --checkpoint DIR   # a Hugging Face GPT-2 folder
    python scripts/measure_numerics.py --checkpoint DIR --bits 4 --group 64 --method rtn

With ``--bits`` the weights are quantized first (``tandem.host.quantize.quantize_model``, what
``tandem quantize`` runs; LM head included): the faithful model computes the quantized contract
and the reference runs on the dequantized weights, its logits from the quantized LM head
(``lm_head.weight``), so the table measures the contract, not the quantization. ``--method
gptq`` calibrates on ``--calib FILE`` (tokenized with the checkpoint's tokenizer) or, without
one, on text sampled from the float model, as ``tandem quantize`` does. A ``--checkpoint``
folder that is already quantized is measured as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tandem import checkpoint
from tandem.config import GPT2Config, preset
from tandem.golden import reference
from tandem.golden.faithful import FaithfulModel
from tandem.numerics import from_bits
from tandem.qweights import LM_HEAD

# "The quick brown fox" in GPT-2's vocabulary; reduced modulo n_vocab for the test presets.
DEFAULT_PROMPT = (464, 2068, 7586, 21831)


def reference_states(
    weights: reference.Weights, cfg: GPT2Config, ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 forward over ``ids``: ([n, n_vocab] logits, [n, n_embd] ln_f output).

    The reference's own blocks in its own order; only the final hidden state is kept as well.
    Quantized matrices are dequantized, and a quantized LM head (``lm_head.weight``) gives the
    logits in place of ``wte``, as in ``reference.forward``.
    """
    w = reference.float_weights(weights, np.float64)
    x = w["wte.weight"][list(ids)] + w["wpe.weight"][: len(ids)]  # [n, n_embd]
    for i in range(cfg.n_layer):
        x, _, _ = reference.block(x, reference.layer_params(w, i, np.float64), cfg)
    hidden = reference.layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], cfg.layer_norm_epsilon)
    return hidden @ w.get(LM_HEAD, w["wte.weight"]).T, hidden


def measure(
    cfg: GPT2Config,
    weights: reference.Weights,
    prompt: Sequence[int],
    steps: int,
    model: FaithfulModel | None = None,
) -> dict:
    """Teacher-forced comparison over ``steps`` decode steps (clamped to the context).

    Step ``j`` is position ``len(prompt) - 1 + j``; it predicts generated token ``j``. Returns
    per-step arrays (``logits_abs``, ``logits_rel``, ``hidden_abs``, ``hidden_rel``, ``top1``)
    and ``steps``, ``first_divergence`` (the first step whose argmax differs, or None).
    """
    prompt = list(prompt)
    steps = min(steps, cfg.n_ctx - len(prompt) + 1)
    if steps < 1:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no step in n_ctx {cfg.n_ctx}")
    w64 = reference.float_weights(weights, np.float64)
    gen = reference.generate_greedy(w64, cfg, prompt, steps - 1, dtype=np.float64)
    ids = prompt + gen
    ref_logits, ref_hidden = reference_states(w64, cfg, ids)
    check = reference.forward(w64, cfg, ids, dtype=np.float64)
    if not np.allclose(ref_logits, check, rtol=1e-9, atol=1e-9):
        raise AssertionError("reference_states disagrees with reference.forward")

    model = model if model is not None else FaithfulModel(cfg, weights)
    cache = model.new_cache()
    first = len(prompt) - 1
    if first:
        model.prefill(prompt[:-1], cache)
    out = {k: np.empty(steps) for k in ("logits_abs", "logits_rel", "hidden_abs", "hidden_rel")}
    out["top1"] = np.empty(steps, bool)
    for j in range(steps):
        pos = first + j
        r = model.step(ids[pos], pos, cache)
        a, b = r.logits(), ref_logits[pos]
        out["logits_abs"][j] = np.max(np.abs(a - b))
        out["logits_rel"][j] = out["logits_abs"][j] / np.max(np.abs(b))
        h, hb = from_bits(r.hidden16).astype(np.float64), ref_hidden[pos]
        out["hidden_abs"][j] = np.max(np.abs(h - hb))
        out["hidden_rel"][j] = out["hidden_abs"][j] / np.max(np.abs(hb))
        out["top1"][j] = r.token == int(np.argmax(b))
    miss = np.flatnonzero(~out["top1"])
    out["steps"] = steps
    out["first_divergence"] = int(miss[0]) if miss.size else None
    return out


def format_table(m: dict) -> str:
    rows = [
        ("quantity", "max abs", "max rel", "mean rel", "top-1 agreement"),
        (
            "logits",
            f"{m['logits_abs'].max():.3e}",
            f"{m['logits_rel'].max():.3e}",
            f"{m['logits_rel'].mean():.3e}",
            f"{m['top1'].mean():.1%} ({int(m['top1'].sum())}/{m['steps']})",
        ),
        (
            "final hidden",
            f"{m['hidden_abs'].max():.3e}",
            f"{m['hidden_rel'].max():.3e}",
            f"{m['hidden_rel'].mean():.3e}",
            "-",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    div = m["first_divergence"]
    lines.append(
        "free-running greedy: identical to the reference for all steps"
        if div is None
        else f"free-running greedy: identical to the reference for the first {div} steps"
    )
    return "\n".join(lines)


def quantized(cfg: GPT2Config, weights, args) -> tuple[dict, str]:
    """The weights quantized as ``args`` say (``--bits``, ``--group``, ``--method``,
    ``--calib``), and a label."""
    from tandem.host.quantize import (
        calibration_segments,
        default_group,
        quantize_model,
        sample_calibration,
    )
    from tandem.qweights import QuantizedMatrix
    from tandem.tokenizer import EOT_TEXT, tokenizer_for

    if any(isinstance(w, QuantizedMatrix) for w in weights.values()):
        raise SystemExit(f"{args.checkpoint} is already quantized: drop --bits")
    group = args.group if args.group is not None else default_group(args.bits)
    calib, how = None, ""
    if args.method == "gptq":
        if args.calib:
            if not args.checkpoint:
                raise SystemExit("--calib needs --checkpoint DIR (its tokenizer reads the text)")
            text = Path(args.calib).read_text(encoding="utf-8")
            calib = calibration_segments(tokenizer_for(args.checkpoint, cfg).encode(text), cfg)
            how = f", calibrated on {args.calib}"
        else:
            try:
                start = tokenizer_for(args.checkpoint, cfg).encode(EOT_TEXT, allow_special=True)[0]
            except Exception:  # a preset: no tokenizer fits its vocabulary
                start = 0
            calib = sample_calibration(weights, cfg, start=start)
            how = ", calibrated on text sampled from the model"
    q = quantize_model(weights, cfg, bits=args.bits, group=group, method=args.method, calib=calib)
    size = "per channel" if group == -1 else f"group {group}"
    return q, f"W{args.bits} {size} {args.method.upper()}{how} (LM head quantized)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="embedded", help="preset with random weights")
    src.add_argument("--checkpoint", metavar="DIR", help="Hugging Face GPT-2 folder")
    ap.add_argument("--seed", type=int, default=0, help="random-weight seed (presets)")
    ap.add_argument("--steps", type=int, default=256, help="decode steps, clamped to n_ctx")
    ap.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    ap.add_argument("--bits", type=int, choices=(4, 8), help="quantize the weights first")
    ap.add_argument("--group", type=int, help="inputs per scale (-1: per channel; default: "
                    "tandem quantize's, -1 at 8 bits, 128 at 4)")  # fmt: skip
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="with --bits")
    ap.add_argument("--calib", metavar="FILE", help="--method gptq: calibration text")
    args = ap.parse_args(argv)
    if args.bits is None and (args.group is not None or args.calib or args.method != "rtn"):
        ap.error("--group, --method and --calib quantize: give --bits too")
    if args.calib and args.method != "gptq":
        ap.error("--calib is GPTQ's calibration text: add --method gptq")

    if args.checkpoint:
        cfg, weights = checkpoint.load_checkpoint(args.checkpoint)
        what = f"checkpoint {args.checkpoint}"
    else:
        cfg = preset(args.preset)
        weights = checkpoint.random_weights(cfg, seed=args.seed)
        what = f"preset {cfg.name!r}, random_weights(seed={args.seed})"
    if args.bits is not None:
        weights, how = quantized(cfg, weights, args)
        what += f", {how}"
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
    else:
        prompt = [t % cfg.n_vocab for t in DEFAULT_PROMPT]

    t0 = time.perf_counter()
    m = measure(cfg, weights, prompt, args.steps)
    secs = time.perf_counter() - t0
    first = len(prompt) - 1
    print(
        f"model: {what}\nprompt ids: {prompt}\n"
        f"{m['steps']} teacher-forced decode steps (positions {first}..{first + m['steps'] - 1}"
        f" of n_ctx {cfg.n_ctx}); reference: float64; faithful logits: acc * 2**lam\n"
    )
    print(format_table(m))
    print(f"\n({secs:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
