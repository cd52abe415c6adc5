"""Decode speed of the hardware-faithful model (random weights; a timing, not a test).

    python scripts/time_faithful.py                  # preset gpt2, 32 steps after position 0
    python scripts/time_faithful.py --start 900      # steps at long context (cache filled first)

Prints weight preparation time, tokens/s over the timed steps, and how much of a step the
static-weight matvecs (``numerics.matvec`` on the prepared layer matrices and LM head) take.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tandem import numerics as nm
from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.golden.faithful import FaithfulCache, FaithfulModel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--start", type=int, default=0, help="position of the first timed step")
    args = ap.parse_args(argv)

    cfg = preset(args.preset)
    t0 = time.perf_counter()
    model = FaithfulModel(cfg, random_weights(cfg, seed=0))
    print(f"{cfg.name}: weights rounded and prepared in {time.perf_counter() - t0:.1f} s")

    cache = model.new_cache()
    if args.start:
        # Fill the cache directly: only the attention length matters for the timing.
        rng = np.random.default_rng(0)
        shape = (args.start, cfg.n_embd)
        kv = [nm.to_bits(rng.normal(0, 1, shape)) for _ in range(cfg.n_layer)]
        cache = FaithfulCache.from_heads(cfg, kv, kv)
    steps = min(args.steps, cfg.n_ctx - args.start)
    tok = 0
    model.step(tok, args.start, cache)  # warm-up: tables, first touch of the weights
    t0 = time.perf_counter()
    for pos in range(args.start, args.start + steps):
        tok = model.step(tok, pos, cache).token
    dt = (time.perf_counter() - t0) / steps
    print(
        f"{steps} steps at positions {args.start}..{args.start + steps - 1}: "
        f"{1e3 * dt:.1f} ms/step, {1 / dt:.1f} tokens/s"
    )

    w = model.weights
    x = nm.to_bits(np.random.default_rng(1).normal(0, 1, cfg.n_embd))
    x4 = nm.to_bits(np.random.default_rng(2).normal(0, 1, cfg.n_inner))
    xp = nm.to_bits(np.random.default_rng(3).normal(0, 1, cfg.n_head * nm.BLOCK))
    t0 = time.perf_counter()
    for lw in w.layers:
        nm.matvec_fp16(lw.c_attn, x, lw.c_attn_b)
        nm.matvec_fp16(lw.attn_proj, xp, lw.attn_proj_b)
        nm.matvec_fp16(lw.c_fc, x, lw.c_fc_b)
        nm.matvec_fp16(lw.mlp_proj, x4, lw.mlp_proj_b)
    nm.matvec(w.lm_head, x)
    mv = time.perf_counter() - t0
    print(f"static-weight matvecs alone: {1e3 * mv:.1f} ms/step ({1 / mv:.1f} tokens/s ceiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
