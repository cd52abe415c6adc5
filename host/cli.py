"""The ``tandem`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tandem.checkpoint import load_weights, random_weights
from tandem.config import PRESETS, preset
from tandem.tokenizer import parse_prompt, parse_token_ids, tokenizer_for


def _generate_reference(weights, cfg, ids: list[int], n_new: int) -> list[int]:
    from tandem.sim.reference import generate_greedy

    return generate_greedy(weights, cfg, ids, n_new)


# Backend name -> function(weights, cfg, prompt ids, n_new) -> new ids.
GENERATE_BACKENDS = {"reference": _generate_reference}


def _load_model(args: argparse.Namespace):
    if args.preset is not None:
        cfg = preset(args.preset)
        return cfg, random_weights(cfg, seed=args.seed)
    cfg, weights = load_weights(args.checkpoint)
    if args.checkpoint is None:
        print(
            "note: no --checkpoint given, using the built-in 'embedded' model with random "
            "weights (its text is gibberish)",
            file=sys.stderr,
        )
    return cfg, weights


def cmd_generate(args: argparse.Namespace) -> int:
    cfg, weights = _load_model(args)
    if args.prompt_ids is not None:
        ids = parse_prompt(parse_token_ids(args.prompt_ids), cfg.n_vocab)
        tokenizer = None
    else:
        tokenizer = tokenizer_for(args.checkpoint, cfg)
        ids = parse_prompt(args.prompt, cfg.n_vocab, tokenizer)
    t0 = time.perf_counter()
    new = GENERATE_BACKENDS[args.backend](weights, cfg, ids, args.max_new_tokens)
    elapsed = time.perf_counter() - t0
    if tokenizer is None:
        print(",".join(str(i) for i in ids + new))
    else:
        print(tokenizer.decode(ids + new))
    print(
        f"[{args.backend}] model {cfg.name}: {len(ids)} prompt + {len(new)} new tokens "
        f"in {elapsed:.2f} s",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="GPT-2 inference: prefill on a GPU, decode on an FPGA core."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy text generation")
    model = gen.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint", metavar="DIR", help="Hugging Face GPT-2 folder (default: built-in model)"
    )
    model.add_argument(
        "--preset", choices=sorted(PRESETS), help="a preset shape with random weights"
    )
    gen.add_argument("--seed", type=int, default=0, help="random-weight seed for --preset")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Hello, my name is", help="prompt text")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=16, metavar="N")
    gen.add_argument("--backend", choices=sorted(GENERATE_BACKENDS), default="reference")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        # Checkpoint, config, tokenizer and range errors carry a message made for users.
        print(f"tandem {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
