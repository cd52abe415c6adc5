"""Held-out perplexity of a checkpoint on every backend: the table in docs/numerics.md.

    python scripts/measure_perplexity.py                       # the built-in model
    python scripts/measure_perplexity.py --slice 2048 --rtl 64 # the same, stated
    python scripts/measure_perplexity.py --checkpoint DIR --text a.txt --text b.txt

The texts default to the held-out plays ``scripts/train_demo.py`` writes
(``build/shakespeare/heldout/*.txt``). Each text is scored as ``tandem eval`` scores it
(``tandem.host.evaluate``: windows of the context sharing one token). Three groups of rows:

- the whole texts on the float reference and on the torch contract (``--placement gpu``);
- the first ``--slice`` tokens of each text on the reference, ``model`` (ISA simulator), ``gpu``
  and ``hybrid`` (those three are bit-exact with each other: the script checks it);
- with ``--rtl N``, the first ``N`` tokens of the first text on the reference, ``model`` and
  ``rtl`` (the RTL in Verilator; builds it on first use).

Prints a Markdown table (perplexity, loss, distance from the reference on the same tokens, wall
time) and the time each row took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "build" / "shakespeare" / "heldout"


def main(argv=None) -> int:
    from tandem.checkpoint import builtin_checkpoint, load_weights
    from tandem.host.evaluate import DeviceScorer, evaluate, gpu_scorer, reference_scorer
    from tandem.host.rtldevice import DEFAULT_MAX_BYTES
    from tandem.host.runtime import resolve_geometry
    from tandem.layout import HBMLayout
    from tandem.tokenizer import tokenizer_for

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--text", type=Path, action="append", default=None)
    p.add_argument("--slice", type=int, default=2048, help="tokens per text for the device rows")
    p.add_argument("--rtl", type=int, default=0, help="tokens for the rtl rows (0: none)")
    p.add_argument("--geometry", default=None)
    p.add_argument("--skip-full", action="store_true", help="no rows on the whole texts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)

    folder = a.checkpoint or builtin_checkpoint()
    cfg, weights = load_weights(folder)
    tok = tokenizer_for(folder, cfg)
    texts = a.text or sorted(HELDOUT.glob("*.txt"))
    if not texts:
        raise SystemExit(f"no texts: run scripts/train_demo.py (it writes {HELDOUT}) or --text")
    ids = {t.stem: tok.encode(t.read_text()) for t in texts}
    geom = resolve_geometry(cfg, a.geometry)
    rows = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def run(what, label, make, parts):
        """Score every text's ``parts`` slice with a fresh scorer from ``make``; one row."""
        nll = tokens = 0
        t0 = time.perf_counter()
        for name, seq in parts.items():
            scorer = make()
            try:
                r = evaluate(cfg, seq, scorer, label)
            finally:
                if hasattr(scorer, "close"):
                    scorer.close()
            nll, tokens = nll + r.nll, tokens + r.tokens
            log(f"  {what} {label} {name}: {r.tokens:,} tokens, ppl {r.perplexity:.4f}")
        dt = time.perf_counter() - t0
        rows.append((what, label, tokens, nll, dt))
        log(f"{what} {label}: {tokens:,} tokens in {dt:.1f} s")
        return nll

    ref = lambda: reference_scorer(cfg, weights)  # noqa: E731
    gpu = lambda: gpu_scorer(cfg, weights, "cpu")  # noqa: E731
    model = lambda: DeviceScorer(cfg, weights, geom, "model")  # noqa: E731
    hybrid = lambda: DeviceScorer(cfg, weights, geom, "model", hybrid=True, prefill_device="cpu")  # noqa: E731
    # the rtl backend as the command line opens it: an HBM of the image's size class
    need = HBMLayout(cfg, geom, logits=True).channel_bytes
    rtl_options = {"max_bytes": max(DEFAULT_MAX_BYTES, need)}
    rtl = lambda: DeviceScorer(cfg, weights, geom, "rtl", device_options=rtl_options)  # noqa: E731

    names = ", ".join(ids)
    if not a.skip_full:
        what = f"whole texts ({names})"
        run(what, "reference", ref, ids)
        run(what, "gpu", gpu, ids)
    sliced = {k: v[: a.slice] for k, v in ids.items()}
    what = f"first {a.slice:,} tokens of each"
    exact = [
        run(what, "reference", ref, sliced),
        run(what, f"model ({geom.name})", model, sliced),
        run(what, "gpu", gpu, sliced),
        run(what, f"hybrid (model, {geom.name})", hybrid, sliced),
    ][1:]
    if len(set(exact)) != 1:
        raise SystemExit(f"model, gpu and hybrid differ: {exact}")
    if a.rtl:
        first = next(iter(ids))
        part = {first: ids[first][: a.rtl]}
        what = f"first {a.rtl} tokens of {first}"
        r = [
            run(what, "reference", ref, part),
            run(what, f"model ({geom.name})", model, part),
            run(what, f"rtl ({geom.name})", rtl, part),
        ]
        if r[1] != r[2]:
            raise SystemExit(f"model and rtl differ: {r[1]} != {r[2]}")

    import math

    refs = {what: nll / tokens for what, label, tokens, nll, _ in rows if label == "reference"}
    print(
        "| text | backend | tokens scored | perplexity | loss (nats/token) | vs reference | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for what, label, tokens, nll, dt in rows:
        loss = nll / tokens
        gap = math.exp(loss - refs[what]) - 1
        vs = "" if label == "reference" else f"{gap * 100:+.3f}%"
        print(
            f"| {what} | {label} | {tokens:,} | {math.exp(loss):.4f} | {loss:.6f} | {vs} | "
            f"{dt:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
