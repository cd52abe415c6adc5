"""The ``tandem`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tandem.checkpoint import load_weights, random_weights
from tandem.config import PRESETS, preset
from tandem.geometry import GEOMETRIES
from tandem.tokenizer import parse_prompt, parse_token_ids, tokenizer_for


def _generate_reference(weights, cfg, ids: list[int], n_new: int, args) -> dict:
    from tandem.golden.reference import generate_greedy

    t0 = time.perf_counter()
    tokens = generate_greedy(weights, cfg, ids, n_new)
    return {"tokens": tokens, "timings": {"decode": time.perf_counter() - t0}, "where": ""}


def _device_options(args) -> dict:
    """Backend options from the command line: ``--xclbin`` for the ``fpga`` backend."""
    if args.xclbin is None:
        return {}
    if args.backend != "fpga":
        raise ValueError(f"--xclbin is for --backend fpga, not --backend {args.backend}")
    if not Path(args.xclbin).is_file():
        raise ValueError(f"--xclbin {args.xclbin}: no such file (make bitstream writes one)")
    return {"xclbin": args.xclbin}


def _generate_on_device(backend: str):
    def run(weights, cfg, ids: list[int], n_new: int, args) -> dict:
        from tandem.host.runtime import generate, resolve_geometry

        geom = resolve_geometry(cfg, args.geometry)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = _Progress(n_new) if show else None
        result = generate(
            cfg,
            weights,
            ids,
            n_new,
            geom,
            backend=backend,
            progress=progress,
            timeout=args.timeout,
            device_options=_device_options(args),
        )
        if progress is not None:
            progress.finish()
        stats = result.stats
        extra = ""
        if "instructions" in stats:
            extra = (
                f"; {stats['instructions']:,} instructions, "
                f"{(stats['hbm_read'] + stats['hbm_written']) / 1e6:,.1f} MB HBM traffic"
            )
        return {
            "tokens": result.tokens,
            "timings": result.timings,
            "where": f" on {geom.name}",
            "extra": extra,
        }

    return run


def _generate_hybrid(weights, cfg, ids: list[int], n_new: int, args) -> dict:
    """GPU prefill (torch; the CPU without CUDA), KV handoff, decode on ``args.backend``."""
    from tandem.host.hybrid import HybridSession
    from tandem.host.runtime import resolve_geometry

    geom = resolve_geometry(cfg, args.geometry)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _Progress(n_new) if show else None
    with HybridSession(
        cfg, weights, geom, args.backend, args.prefill_device, device_options=_device_options(args)
    ) as hs:
        result = hs.generate(ids, n_new, progress=progress, timeout=args.timeout)
        where = f" on {geom.name}, prefill on {hs.model.device}"
    if progress is not None:
        progress.finish()
    return {
        "tokens": result.tokens,
        "timings": result.timings,
        "where": where,
        "extra": f"; KV moved {result.kv_bytes / 1e6:,.3f} MB",
    }


def _generate_gpu(weights, cfg, ids: list[int], n_new: int, args) -> dict:
    """Torch prefill and torch decode under the core's contract (CUDA, or the CPU without)."""
    from tandem.gpu.decode import generate
    from tandem.gpu.prefill import PreparedModel

    model = PreparedModel(cfg, weights, args.prefill_device)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _Progress(n_new) if show else None
    result = generate(cfg, model, ids, n_new, progress)
    if progress is not None:
        progress.finish()
    return {"tokens": result.tokens, "timings": result.timings, "where": f" on {model.device}"}


def _choose_placement(weights, cfg, ids: list[int], n_new: int, args) -> str:
    from tandem.gpu.prefill import PreparedModel
    from tandem.host.placement import choose
    from tandem.host.runtime import check_fits, resolve_geometry

    check_fits(cfg, ids, n_new)
    geom = resolve_geometry(cfg, args.geometry)
    choice = choose(cfg, geom, PreparedModel(cfg, weights, args.prefill_device), ids, n_new)
    print(choice.explain(), file=sys.stderr)
    return choice.placement


class _Progress:
    """Per-token progress on stderr: one rewritten line on a terminal, else a line per token."""

    def __init__(self, total: int):
        self.total = total
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, i: int, token: int) -> None:
        dt = time.perf_counter() - self.t0
        text = f"token {i + 1}/{self.total}: id {token} ({dt:.2f} s since start)"
        if self.tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _backends() -> dict:
    """Backend name -> function(weights, cfg, prompt ids, n_new, args) -> result dict."""
    from tandem.host.backends import BACKENDS

    return {"reference": _generate_reference} | {n: _generate_on_device(n) for n in BACKENDS}


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
    placement = args.placement
    if placement == "auto":
        placement = _choose_placement(weights, cfg, ids, args.max_new_tokens, args)
        if placement != "gpu" and args.backend == "reference":
            args.backend = "model"
    if placement == "gpu":
        out = _generate_gpu(weights, cfg, ids, args.max_new_tokens, args)
    elif placement == "hybrid":
        if args.backend == "reference":
            raise ValueError("--placement hybrid decodes on a device: choose a device --backend")
        out = _generate_hybrid(weights, cfg, ids, args.max_new_tokens, args)
    else:
        out = _backends()[args.backend](weights, cfg, ids, args.max_new_tokens, args)
    elapsed = time.perf_counter() - t0
    new = out["tokens"]
    if tokenizer is None:
        print(",".join(str(i) for i in ids + new))
    else:
        print(tokenizer.decode(ids + new))
        print(
            f"token ids: {','.join(str(i) for i in ids)} | {','.join(str(i) for i in new)}",
            file=sys.stderr,
        )
    timings = ", ".join(f"{k} {v:.3f} s" for k, v in out["timings"].items())
    print(f"timings: {timings}{out.get('extra', '')}", file=sys.stderr)
    print(
        f"[{args.backend}] model {cfg.name}{out['where']}: {len(ids)} prompt + {len(new)} new "
        f"tokens in {elapsed:.2f} s",
        file=sys.stderr,
    )
    return 0


def cmd_bench_thesis(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tandem.host.thesis import CpuTimes, format_thesis, plot_timeline, thesis_table

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cpu = None
    if args.load_times:
        cpu = CpuTimes.load(Path(args.load_times), log)
        log(f"CPU times from {args.load_times} ({cpu.cfg.name}), not timed again")
    cells, sources, cpu, fpga, cfg, g = thesis_table(args.measure_model, log=log, cpu=cpu)
    if args.save_times:
        cpu.save(Path(args.save_times))
        log(f"CPU times written to {args.save_times}")
    print(format_thesis(cells, sources, cfg, g))
    P, N = max(cells)[0], min(cells)[1]
    png = plot_timeline(Path(args.plot), cpu, fpga, cfg, g, P, N)
    print(f"timeline (prompt {P}, output {N}): {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tandem.host.bench import bench_decode, format_table

    if args.thesis:
        return cmd_bench_thesis(args)

    rows = [
        bench_decode(
            args.model,
            geom,
            prompt_len=args.prompt_len,
            n_new=args.tokens,
            seed=args.seed,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        for geom in args.geometry
    ]
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tandem.host.backends import BACKENDS

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
    gen.add_argument(
        "--backend",
        choices=sorted({"reference", *BACKENDS}),
        default="model",
        help="model: the compiled program on the ISA simulator (bit-exact with the core); "
        "reference: the float NumPy model; rtl: the core's RTL in Verilator (small models such "
        "as test-tiny on --geometry tiny; builds the core on first use); fpga: an Alveo card",
    )
    gen.add_argument(
        "--xclbin",
        metavar="FILE",
        help="--backend fpga: the FPGA image to load (build/u55c/tandem.xclbin from make "
        "bitstream); the --geometry must be the one it was built for",
    )
    gen.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        help="core geometry for device backends (default: the smallest the model fits)",
    )
    gen.add_argument(
        "--placement",
        choices=["gpu", "fpga", "hybrid", "auto"],
        default="fpga",
        help="fpga: the core consumes the prompt too; hybrid: prefill in PyTorch (GPU, or the "
        "CPU without CUDA) under the core's numerics, KV handed to the core, which decodes; "
        "gpu: torch prefill and torch decode under the same numerics; auto: the thesis's cost "
        "model picks one and prints the numbers and their sources",
    )
    gen.add_argument(
        "--prefill-device",
        choices=["cpu", "cuda"],
        default=None,
        help="where --placement hybrid runs the prefill (default: CUDA when available)",
    )
    gen.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="device backends: give up if the decode has not finished after this many seconds "
        "(default: wait until done)",
    )
    gen.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-token progress on stderr (default: when stderr is a terminal)",
    )
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="ISA-simulator decode speed (random weights)")
    bench.add_argument("--model", choices=sorted(PRESETS), default="gpt2")
    bench.add_argument(
        "--geometry", choices=sorted(GEOMETRIES), nargs="+", default=["u55c"], metavar="GEOM"
    )
    bench.add_argument("--prompt-len", type=int, default=1, metavar="N")
    bench.add_argument("--tokens", type=int, default=32, metavar="N")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--thesis",
        action="store_true",
        help="the thesis's 3x3 table (prompt 64/256/512 x output 64/256/512, gpt2-medium "
        "dimensions) with GPU-only, FPGA-only and hybrid columns, each labelled by source",
    )
    bench.add_argument(
        "--measure-model",
        choices=sorted(PRESETS),
        default="gpt2-medium",
        help="--thesis: the model whose torch prefill/decode is timed on this CPU (labelled)",
    )
    bench.add_argument("--plot", default="build/thesis_timeline.png", help="--thesis: PNG path")
    bench.add_argument(
        "--save-times",
        metavar="JSON",
        help="--thesis: write the CPU prefill/decode times (and load averages) to this file",
    )
    bench.add_argument(
        "--load-times",
        metavar="JSON",
        help="--thesis: use CPU times saved by --save-times instead of timing again "
        "(--measure-model is then the saved one)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


EXIT_RUN_FAILED = 1
"""The device ran the request and it failed (``RunError``: error bits in the status record, or a
run that failed without one)."""
EXIT_BAD_REQUEST = 2
"""The request or the setup was refused before anything ran: ``ValueError`` (checkpoint, config,
tokenizer, prompt and range checks) and ``DeviceError`` (a device that cannot do what was asked:
no card or xclbin, a model too large for the backend). argparse also exits 2 for bad options."""
EXIT_TIMEOUT = 3
"""``DecodeTimeout``: the device did not finish within ``--timeout``."""


def _error(command: str, err: BaseException, hint: str = "") -> None:
    """One line on stderr: ``tandem <command>: error: <message>``."""
    text = " ".join(f"{err}{hint}".split())
    print(f"tandem {command}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from tandem.host.device import DeviceError
    from tandem.host.runtime import DecodeTimeout, RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunError as err:
        _error(args.command, err)
        return EXIT_RUN_FAILED
    except (ValueError, DeviceError) as err:
        # Checkpoint, config, tokenizer, range and device errors carry a message made for users.
        _error(args.command, err)
        return EXIT_BAD_REQUEST
    except DecodeTimeout as err:
        _error(args.command, err, " (rerun with a larger --timeout, or without one)")
        return EXIT_TIMEOUT


if __name__ == "__main__":
    sys.exit(main())
