"""The ``tandem`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tandem.checkpoint import builtin_checkpoint, load_weights, random_weights
from tandem.config import PRESETS, preset
from tandem.geometry import GEOMETRIES
from tandem.sampling import SEED_MAX, TOP_K_MAX
from tandem.tokenizer import GPT2_N_VOCAB, parse_prompt, parse_token_ids, tokenizer_for

BUILTIN_NOTE = (
    "note: no --checkpoint given: the built-in model, a small GPT-2 trained on Shakespeare "
    "(tandem/data/shakespeare)"
)


DEFAULT_PROMPT = "ROMEO:"


class UsageError(ValueError):
    """A flag that does not apply to this run, or a bad file named by a flag: one line for
    users, exit 2."""


class OutputError(RuntimeError):
    """The run finished but its output could not be written (stdout closed or full, a text the
    tokenizer cannot make): one line that keeps the generated ids, exit 1."""


# --------------------------------------------------------------------------------------------
# argparse types: numbers are checked where they are parsed, and the message names the flag
# (argparse prefixes "argument --flag: ").


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def _temperature(text: str) -> float:
    from tandem.sampling import TEMP_FRAC_BITS, temperature_q

    try:
        value = float(text)
        temperature_q(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number greater than 0 and below 16 (in steps of 1/{1 << TEMP_FRAC_BITS}, "
            f"at least 1/{1 << TEMP_FRAC_BITS}), not {text!r}; leave it out for greedy decoding"
        ) from None
    return value


def _bounded(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {lo} to {hi} ({what}), not {text!r}"
            )
        return value

    parse.__name__ = "whole number"
    return parse


def _seconds(text: str) -> float:
    from tandem.host.request import MAX_TIMEOUT_S, check_timeout

    try:
        return check_timeout(float(text), "")  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:.0e}, not {text!r} "
            "(leave --timeout out to wait until the decode is done)"
        ) from None


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line (``tandem <command>: error: ...``), no usage block."""

    def error(self, message: str):
        text = " ".join(message.split())
        if "must be" not in text:  # not one of this module's checks, which say what to give
            text += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {text}\n")


# --------------------------------------------------------------------------------------------
# Which flags apply (docs/host.md, "Flags that apply"): a flag that does nothing in this run is
# an error, never silently ignored.

DEVICE_FLAGS = (("xclbin", "--xclbin"), ("timeout", "--timeout"), ("geometry", "--geometry"))
"""Flags of the decode device; a run without one (``--placement gpu``, ``--backend reference``)
refuses them."""


def _given(args, flags) -> list[str]:
    return [flag for attr, flag in flags if getattr(args, attr) not in (None, False)]


def check_generate_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do not apply to this ``tandem generate`` (or ``tandem eval``) run
    (UsageError, one line); then set ``args.backend`` (default ``model``). Files are checked
    here too (``--xclbin``), before the model loads."""
    check_model_flags(args)
    check_device_flags(args)
    check_sampling_flags(args)


SAMPLING_FLAGS = (("top_k", "--top-k"), ("seed", "--seed"))
"""Flags that only mean something with ``--temperature``."""


def check_sampling_flags(args: argparse.Namespace):
    """``args.sampling`` from ``--temperature``, ``--top-k`` and ``--seed``
    (:class:`tandem.sampling.Sampling`; None: greedy). ``--top-k``/``--seed`` without
    ``--temperature``, and sampling on the float reference, are UsageErrors."""
    from tandem.sampling import Sampling

    temperature = getattr(args, "temperature", None)
    if temperature is None:
        given = [flag for attr, flag in SAMPLING_FLAGS if getattr(args, attr, None) is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to sampling: "
                "give --temperature T too "
                "(without it decoding is greedy)"
            )
        args.sampling = None
        return None
    if args.backend == "reference":
        raise UsageError(
            "--temperature samples from the core's binary16 logits (tandem.sampling); the float "
            "--backend reference decodes greedily only: drop --temperature or use another backend"
        )
    args.sampling = Sampling.make(temperature, args.top_k, args.seed or 0)
    return args.sampling


def check_model_flags(args: argparse.Namespace) -> None:
    """The flags that choose the model: ``--weights-seed`` needs ``--preset``,
    ``--allow-nonfinite`` needs ``--checkpoint``."""
    if args.weights_seed is not None and args.preset is None:
        raise UsageError(
            "--weights-seed sets the random weights of --preset; it does not apply to "
            "--checkpoint or the built-in model: drop it, or give --preset"
        )
    if args.allow_nonfinite and args.checkpoint is None:
        raise UsageError(
            "--allow-nonfinite is for --checkpoint (a folder whose weights hold NaN or Inf); "
            "--preset and the built-in model have finite weights: drop it"
        )


def check_device_flags(args: argparse.Namespace) -> None:
    """The flags of where the model runs: ``--placement``, ``--backend`` and the device flags
    that go with them (module comment above); sets ``args.backend`` (default ``model``)."""
    from tandem.host.backends import BACKENDS

    placement, backend = args.placement, args.backend
    devices = ", ".join(sorted(BACKENDS))
    if args.xclbin is not None and backend != "fpga":
        what = f"--backend {backend}" if backend else "--placement gpu"
        if not backend and placement != "gpu":
            what = "the default --backend model"
        raise UsageError(
            f"--xclbin is for --backend fpga (the FPGA image to load), not {what}: drop it, or "
            "add --backend fpga"
        )
    if placement == "gpu":
        if backend is not None:
            raise UsageError(
                f"--backend {backend} does not apply to --placement gpu, which runs the prefill "
                "and the decode in torch (on --prefill-device): drop --backend, or use "
                f"--placement fpga or hybrid to decode on the {backend} backend"
            )
        for flag in _given(args, DEVICE_FLAGS):
            raise UsageError(
                f"{flag} does not apply to --placement gpu, which runs no decode device (the "
                "prefill and the decode run in torch): drop it, or use --placement fpga or hybrid"
            )
    elif backend == "reference":
        if placement != "fpga":
            raise UsageError(
                f"--backend reference is the float NumPy model, not a decode device, and "
                f"--placement {placement} decodes on a device: choose a device --backend "
                f"({devices}), or drop --placement"
            )
        for flag in _given(args, (*DEVICE_FLAGS, ("prefill_device", "--prefill-device"))):
            raise UsageError(
                f"{flag} does not apply to --backend reference (the float NumPy model runs no "
                f"device): drop it, or choose a device --backend ({devices})"
            )
    if placement == "fpga" and args.prefill_device is not None:
        raise UsageError(
            "--prefill-device is for the torch prefill of --placement hybrid, gpu or auto; "
            "--placement fpga runs the prompt on the core: drop it, or choose one of those"
        )
    if backend == "fpga":
        if args.xclbin is None:
            raise UsageError(
                "--backend fpga needs --xclbin FILE, the FPGA image to load (make bitstream "
                "writes build/u55c/tandem.xclbin)"
            )
        path = Path(args.xclbin)
        if path.is_dir():
            raise UsageError(f"--xclbin {args.xclbin} is a folder: give the .xclbin file in it")
        if not path.is_file():
            raise UsageError(f"--xclbin {args.xclbin}: no such file (make bitstream writes one)")
    args.backend = backend or "model"


BENCH_TABLE_FLAGS = (
    ("model", "--model"),
    ("geometry", "--geometry"),
    ("prompt_len", "--prompt-len"),
    ("tokens", "--tokens"),
    ("seed", "--seed"),
)
THESIS_FLAGS = (
    ("measure_model", "--measure-model"),
    ("plot", "--plot"),
    ("save_times", "--save-times"),
    ("load_times", "--load-times"),
)


def check_bench_flags(args: argparse.Namespace) -> None:
    """Refuse ``tandem bench`` flags that do not apply (UsageError), then fill the defaults."""
    if args.thesis:
        for flag in _given(args, BENCH_TABLE_FLAGS):
            raise UsageError(
                f"{flag} does not apply to --thesis, whose table has fixed prompts, outputs and "
                "geometry (u55c): drop it, or drop --thesis"
            )
        if args.load_times is not None and args.measure_model is not None:
            raise UsageError(
                "--measure-model does not apply with --load-times: the saved file names the "
                "model it timed; drop one of them"
            )
        args.measure_model = args.measure_model or "gpt2-medium"
        args.plot = args.plot or DEFAULT_PLOT
        return
    for flag in _given(args, THESIS_FLAGS):
        raise UsageError(f"{flag} is for --thesis: add --thesis, or drop {flag}")
    args.model = args.model or "gpt2"
    args.geometry = args.geometry or ["u55c"]
    args.prompt_len = 1 if args.prompt_len is None else args.prompt_len
    args.tokens = 32 if args.tokens is None else args.tokens
    args.seed = 0 if args.seed is None else args.seed


DEFAULT_PLOT = "build/thesis_timeline.png"


def check_output_file(flag: str, path: Path, suffix: str | None = None) -> None:
    """A file the run will write: not a folder, in a folder that exists or can be made and is
    writable, with ``suffix`` if given. Checked before the long work; UsageError naming
    ``flag``."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: give a file name ending in {suffix}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file path (e.g. {path / 'x'})")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: cannot write there (permission denied)")


# --------------------------------------------------------------------------------------------
# Running a request


def _generate_reference(weights, cfg, ids: list[int], n_new: int, args) -> dict:
    from tandem.golden.reference import generate_greedy

    t0 = time.perf_counter()
    tokens = generate_greedy(weights, cfg, ids, n_new)
    return {"tokens": tokens, "timings": {"decode": time.perf_counter() - t0}, "where": ""}


RTL_CLI_MAX_BYTES = 4 << 20
"""The largest image per channel the command line lets the ``rtl`` backend simulate (the
backend's own default is 1 MiB, :data:`tandem.host.rtldevice.DEFAULT_MAX_BYTES`): room for the
built-in model on ``small`` (1.0 MiB per channel, 1.3 MiB with ``tandem eval``'s logits), which
makes the simulated HBM 2 MiB per channel (one Verilator build, cached)."""


def _device_options(args, cfg=None, logits: bool = False) -> dict:
    """Backend options from the command line: ``--xclbin`` for the ``fpga`` backend; the ``rtl``
    backend is quiet (its build and simulation log goes to a file, named on failure) and takes
    images up to :data:`RTL_CLI_MAX_BYTES` per channel."""
    if args.backend == "fpga":
        return {"xclbin": args.xclbin}
    if args.backend == "rtl":
        from tandem.host.rtldevice import DEFAULT_MAX_BYTES, default_log_file

        options = {"log_file": default_log_file()}
        if cfg is not None and args.geom is not None:
            from tandem.layout import HBMLayout

            need = HBMLayout(cfg, args.geom, logits=logits).channel_bytes
            if DEFAULT_MAX_BYTES < need <= RTL_CLI_MAX_BYTES:
                options["max_bytes"] = need
        return options
    return {}


def _progress(args, n_new: int):
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    return _Progress(n_new) if show else None


def _generate_on_device(backend: str):
    def run(weights, cfg, ids: list[int], n_new: int, args) -> dict:
        from tandem.host.runtime import generate

        progress = _progress(args, n_new)
        result = generate(
            cfg,
            weights,
            ids,
            n_new,
            args.geom,
            backend=backend,
            progress=progress,
            timeout=args.timeout,
            device_options=_device_options(args, cfg),
            sampling=args.sampling,
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
            "where": f" on {args.geom.name}",
            "extra": extra,
        }

    return run


def _generate_hybrid(weights, cfg, ids: list[int], n_new: int, args) -> dict:
    """GPU prefill (torch; the CPU without CUDA), KV handoff, decode on ``args.backend``."""
    from tandem.host.hybrid import HybridSession

    progress = _progress(args, n_new)
    with HybridSession(
        cfg,
        weights,
        args.geom,
        args.backend,
        args.prefill_device,
        device_options=_device_options(args, cfg),
    ) as hs:
        result = hs.generate(
            ids, n_new, progress=progress, timeout=args.timeout, sampling=args.sampling
        )
        where = f" on {args.geom.name}, prefill on {hs.model.device}"
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
    from tandem.gpu.prefill import PreparedModel
    from tandem.host.placement import generate_gpu

    model = PreparedModel(cfg, weights, args.prefill_device)
    progress = _progress(args, n_new)
    result = generate_gpu(cfg, model, ids, n_new, progress, sampling=args.sampling)
    if progress is not None:
        progress.finish()
    return {"tokens": result.tokens, "timings": result.timings, "where": f" on {model.device}"}


def _choose_placement(weights, cfg, ids: list[int], n_new: int, args) -> str:
    from tandem.gpu.prefill import PreparedModel
    from tandem.host.placement import choose
    from tandem.layout import core_tensors
    from tandem.qweights import QuantizedMatrix

    formats = None
    if any(isinstance(w, QuantizedMatrix) for w in weights.values()):
        formats = core_tensors(cfg, weights)[1]  # the FPGA streams the quantized layout
    model = PreparedModel(cfg, weights, args.prefill_device)
    choice = choose(cfg, args.geom, model, ids, n_new, formats=formats)
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
    """(config, weights, folder): ``--preset`` (random weights, no folder), ``--checkpoint``,
    or the built-in model (its folder in the package). The folder's tokenizer is the model's."""
    if args.preset is not None:
        cfg = preset(args.preset)
        return cfg, random_weights(cfg, seed=args.weights_seed or 0), None
    folder = args.checkpoint if args.checkpoint is not None else builtin_checkpoint()
    cfg, weights = load_weights(folder, allow_nonfinite=args.allow_nonfinite)
    return cfg, weights, folder


def cmd_generate(args: argparse.Namespace) -> int:
    """Flags, then the model, then the request (:func:`tandem.host.request.check_request`, the
    same for every placement and backend), then the geometry; only then any prefill or decode."""
    from tandem.host.request import CLI, check_geometry, check_request
    from tandem.host.runtime import resolve_geometry

    check_generate_flags(args)
    cfg, weights, folder = _load_model(args)
    if args.prompt_ids is not None:
        ids = parse_prompt(parse_token_ids(args.prompt_ids), cfg.n_vocab)
        tokenizer = None
    else:
        tokenizer = tokenizer_for(folder, cfg)
        ids = parse_prompt(args.prompt, cfg.n_vocab, tokenizer)
    n_new = args.max_new_tokens
    ids = check_request(cfg, ids, n_new, timeout=args.timeout, names=CLI, min_new=1)
    args.geom = None
    if args.placement != "gpu" and args.backend != "reference":
        args.geom = resolve_geometry(cfg, args.geometry)
        check_geometry(cfg, args.geom, CLI)
    t0 = time.perf_counter()
    placement = args.placement
    if placement == "auto":
        placement = _choose_placement(weights, cfg, ids, n_new, args)
    if placement == "gpu":
        out, label = _generate_gpu(weights, cfg, ids, n_new, args), "torch"
    elif placement == "hybrid":
        out, label = _generate_hybrid(weights, cfg, ids, n_new, args), args.backend
    else:
        out, label = _backends()[args.backend](weights, cfg, ids, n_new, args), args.backend
    elapsed = time.perf_counter() - t0
    new = out["tokens"]
    emit_tokens(ids, new, tokenizer)
    if args.checkpoint is None and args.preset is None:
        print(BUILTIN_NOTE, file=sys.stderr)
    timings = ", ".join(f"{k} {v:.3f} s" for k, v in out["timings"].items())
    print(f"timings: {timings}{out.get('extra', '')}", file=sys.stderr)
    print(
        f"[{label}] model {cfg.name}{out['where']}: {len(ids)} prompt + {len(new)} new "
        f"tokens in {elapsed:.2f} s ({args.sampling.describe() if args.sampling else 'greedy'})",
        file=sys.stderr,
    )
    return 0


RTL_EVAL_TOKENS = 64
"""``tandem eval --backend rtl`` scores this many tokens unless ``--max-tokens`` says otherwise
(a short slice: the RTL simulation runs a few positions per second)."""


def read_text(name: str) -> str:
    """The text ``tandem eval`` scores: a UTF-8 file, or standard input for ``-``; UsageError
    naming the file if it is missing, a folder, unreadable, not UTF-8 or empty."""
    if name == "-":
        text = sys.stdin.read()
    else:
        path = Path(name)
        if path.is_dir():
            raise UsageError(f"{name} is a folder: give a text file")
        if not path.exists():
            raise UsageError(f"{name}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"{name} is not UTF-8 text (byte {err.start}: {err.reason})") from None
        except OSError as err:
            raise UsageError(f"{name}: cannot read it ({err.strerror or err})") from None
    if not text.strip():
        raise UsageError(f"{name} is empty: there is no text to score")
    return text


class _EvalProgress:
    """Per-window progress on stderr: one rewritten line on a terminal, else a line per window."""

    def __init__(self):
        self.tty = sys.stderr.isatty()

    def __call__(self, r, total: int) -> None:
        text = (
            f"window {r.windows}/{total}: {r.tokens:,} tokens, loss {r.loss:.4f} "
            f"(perplexity {r.perplexity:.2f}) so far, {r.seconds:.1f} s"
        )
        print(
            ("\r" + text) if self.tty else text,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    """Flags, the text file, the model and its tokenizer, the geometry; then the windows."""
    from tandem.compiler import fits
    from tandem.host.evaluate import DeviceScorer, evaluate, gpu_scorer, reference_scorer
    from tandem.host.request import CLI, check_geometry
    from tandem.host.runtime import resolve_geometry

    check_generate_flags(args)
    text = read_text(args.text)
    cfg, weights, folder = _load_model(args)
    if folder is None and cfg.n_vocab < GPT2_N_VOCAB:
        raise UsageError(
            f"--preset {args.preset} has a vocabulary of {cfg.n_vocab} tokens, so no text "
            "tokenizer fits it: score text with --checkpoint DIR, the built-in model, or a "
            "preset with GPT-2's vocabulary (embedded, gpt2, ...)"
        )
    ids = tokenizer_for(folder, cfg).encode(text)
    limit = args.max_tokens
    if limit is None and args.backend == "rtl" and args.placement != "gpu":
        limit = RTL_EVAL_TOKENS
        print(
            f"note: --backend rtl scores the first {limit} tokens (--max-tokens N for more)",
            file=sys.stderr,
        )
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < 2:
        raise UsageError(
            f"{args.text} is {len(ids)} token long: perplexity needs at least 2 (one to predict "
            "from, one to predict)"
        )
    args.geom = None
    if args.placement != "gpu" and args.backend != "reference":
        args.geom = resolve_geometry(cfg, args.geometry)
        check_geometry(cfg, args.geom, CLI)
        why = fits(cfg, args.geom, logits=True)
        if why is not None:
            raise UsageError(
                f"{cfg.name} on {args.geom.name} cannot store its logits for tandem eval: {why}; "
                "choose a larger --geometry"
            )
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _EvalProgress() if show else None
    t0 = time.perf_counter()
    if args.backend == "reference":
        label, result = (
            "reference",
            evaluate(cfg, ids, reference_scorer(cfg, weights), "reference", progress),
        )
    elif args.placement == "gpu":
        scorer = gpu_scorer(cfg, weights, args.prefill_device)
        label = f"gpu{scorer.where}"
        result = evaluate(cfg, ids, scorer, "gpu", progress)
    else:
        hybrid = args.placement == "hybrid"
        with DeviceScorer(
            cfg,
            weights,
            args.geom,
            args.backend,
            hybrid=hybrid,
            prefill_device=args.prefill_device,
            device_options=_device_options(args, cfg, logits=True),
            timeout=args.timeout,
        ) as scorer:
            name = f"hybrid, {args.backend}" if hybrid else args.backend
            label = f"{name}{scorer.where}"
            result = evaluate(cfg, ids, scorer, name, progress)
    if progress is not None:
        progress.finish()
    elapsed = time.perf_counter() - t0
    write_stdout(
        f"perplexity {result.perplexity:.4f} (loss {result.loss:.6f} nats/token) over "
        f"{result.tokens:,} tokens in {result.windows} window{'s' if result.windows != 1 else ''} "
        f"of up to {cfg.n_ctx} [{label}]\n"
    )
    if args.checkpoint is None and args.preset is None:
        print(BUILTIN_NOTE, file=sys.stderr)
    print(
        f"[{label}] model {cfg.name}: {result.tokens + 1:,} tokens of {args.text} scored in "
        f"{elapsed:.2f} s ({_rate(result.tokens, elapsed)} tokens/s)",
        file=sys.stderr,
    )
    return 0


TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""The tokenizer files ``tandem quantize`` copies from the source folder, when it has them."""


def _group(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not (value == -1 or (value > 0 and value % 64 == 0)):
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 64 (the core's block: 64, 128, ...) or -1 (one group per "
            f"output channel), not {text!r}"
        )
    return value


def check_out_dir(flag: str, path: Path, source: Path | None) -> None:
    """A folder the run will fill: new, or empty; not the source checkpoint. UsageError."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file: give a folder to write the checkpoint into")
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise UsageError(f"{flag} {path} is the checkpoint being quantized: give a new folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{flag} {path} is not empty: give a new or empty folder")
    check_output_file(flag, path / "config.json")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Flags, the output folder, the model (float), the calibration text; then the quantizer,
    then the folder (:func:`tandem.checkpoint.save_quantized`) and its tokenizer files."""
    import shutil

    from tandem.checkpoint import save_quantized
    from tandem.host.quantize import (
        calibration_segments,
        default_group,
        quantize_model,
        sample_calibration,
        stderr_progress,
    )
    from tandem.qweights import QuantizedMatrix
    from tandem.tokenizer import EOT_TEXT

    if args.group is None:
        args.group = default_group(args.bits)
    if args.calib is not None and args.method != "gptq":
        raise UsageError(
            f"--calib is GPTQ's calibration text; --method {args.method} uses none: drop it, or "
            "add --method gptq"
        )
    out = Path(args.out)
    folder = Path(args.checkpoint) if args.checkpoint is not None else builtin_checkpoint()
    check_out_dir("--out", out, folder)
    text = read_text(args.calib) if args.calib is not None else None
    cfg, weights = load_weights(folder)
    if any(isinstance(w, QuantizedMatrix) for w in weights.values()):
        raise UsageError(f"{folder} is already quantized: give the float checkpoint")
    calib = None
    if args.method == "gptq":
        if text is not None:
            calib = calibration_segments(tokenizer_for(folder, cfg).encode(text), cfg)
            where = f"{args.calib}"
        else:
            try:
                start = tokenizer_for(folder, cfg).encode(EOT_TEXT, allow_special=True)[0]
            except Exception:  # no tokenizer fits the model, or it has no end-of-text token
                start = 0
            stderr_progress("no --calib: sampling calibration text from the float model")
            calib = sample_calibration(weights, cfg, start=start)
            where = "text sampled from the model"
        stderr_progress(
            f"calibration: {calib.shape[0]} sequences of {calib.shape[1]} tokens from {where}"
        )
    t0 = time.perf_counter()
    qweights = quantize_model(
        weights,
        cfg,
        bits=args.bits,
        group=args.group,
        method=args.method,
        calib=calib,
        lm_head=args.lm_head,
        sym=args.sym,
        progress=stderr_progress if args.method == "gptq" else None,
    )
    save_quantized(
        out,
        cfg,
        qweights,
        bits=args.bits,
        group=args.group,
        sym=args.sym,
        method=args.method,
        checkpoint_format=args.format,
    )
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    n = sum(isinstance(w, QuantizedMatrix) for w in qweights.values())
    size = (out / "model.safetensors").stat().st_size
    group = "per channel" if args.group == -1 else f"groups of {args.group}"
    write_stdout(
        f"wrote {out}: {cfg.name} W{args.bits} {group}, {args.method.upper()}, {n} matrices "
        f"quantized{'' if args.lm_head else ' (LM head float)'}, {size / 1e6:,.2f} MB "
        f"({args.format}), in {time.perf_counter() - t0:.1f} s\n"
    )
    if args.checkpoint is None:
        print(BUILTIN_NOTE, file=sys.stderr)
    return 0


def _rate(n: int, seconds: float) -> str:
    r = n / max(seconds, 1e-9)
    return f"{r:,.0f}" if r >= 10 else f"{r:.2g}"


def _ids_text(ids: list[int], new: list[int]) -> str:
    return f"{','.join(map(str, ids))} | {','.join(map(str, new))}"


def write_stdout(text: str, ids: list[int] | None = None, new: list[int] | None = None) -> None:
    """Write ``text`` and flush; a failure (closed or full stdout, a broken pipe) is an
    OutputError that carries the generated ids, so that they reach stderr."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as err:  # ValueError: write to a closed file
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        keep = f"; the generated token ids (prompt | new): {_ids_text(ids, new)}" if new else ""
        raise OutputError(f"cannot write the output to stdout ({why}){keep}") from err


def emit_tokens(ids: list[int], new: list[int], tokenizer) -> None:
    """The answer on stdout: text with a tokenizer (the ids on stderr), else the ids. The ids
    are never lost: if the text cannot be made they go to stdout instead and the run fails
    (OutputError); if stdout cannot be written they go into the error line."""
    id_line = ",".join(str(i) for i in ids + new) + "\n"
    if tokenizer is None:
        write_stdout(id_line, ids, new)
        return
    try:
        text = tokenizer.decode(ids + new)
    except Exception as err:  # TokenizerError, or whatever a tokenizer raises on an id
        write_stdout(id_line, ids, new)
        raise OutputError(
            f"the generated ids could not be turned into text ({err}); they are on stdout "
            "instead (prompt and new ids, comma-separated)"
        ) from err
    write_stdout(text + "\n", ids, new)
    print(f"token ids: {_ids_text(ids, new)}", file=sys.stderr)


def cmd_bench_thesis(args: argparse.Namespace) -> int:
    from tandem.host.thesis import CpuTimes, format_thesis, plot_timeline, thesis_table

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cpu = None
    if args.load_times:
        try:
            cpu = CpuTimes.load(Path(args.load_times), log)
        except ValueError as err:
            raise UsageError(f"--load-times {err}") from err
    plot = Path(args.plot)
    check_output_file("--plot", plot, suffix=".png")
    if args.save_times:
        check_output_file("--save-times", Path(args.save_times))
    if cpu is not None:
        log(f"CPU times from {args.load_times} ({cpu.cfg.name}), not timed again")
    cells, sources, cpu, fpga, cfg, g = thesis_table(args.measure_model, log=log, cpu=cpu)
    write_stdout(format_thesis(cells, sources, cfg, g) + "\n")
    if args.save_times:
        try:
            cpu.save(Path(args.save_times))
        except OSError as err:
            raise UsageError(f"--save-times {args.save_times}: cannot write it ({err})") from err
        log(f"CPU times written to {args.save_times}")
    P, N = max(cells)[0], min(cells)[1]
    try:
        png = plot_timeline(plot, cpu, fpga, cfg, g, P, N)
    except OSError as err:
        raise UsageError(f"--plot {plot}: cannot write it ({err})") from err
    write_stdout(f"timeline (prompt {P}, output {N}): {png}\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tandem.geometry import geometry
    from tandem.host.bench import bench_decode, format_table
    from tandem.host.request import Names, check_geometry, check_request

    check_bench_flags(args)
    if args.thesis:
        return cmd_bench_thesis(args)
    cfg = preset(args.model)
    names = Names(n_new="--tokens", prompt="--prompt-len", geometry="--geometry")
    check_request(cfg, [0] * args.prompt_len, args.tokens, names=names, min_new=1)
    for name in args.geometry:
        check_geometry(cfg, geometry(name), names)
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
    write_stdout(format_table(rows) + "\n")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose the model (``generate`` and ``eval``)."""
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="Hugging Face GPT-2 folder; its tokenizer (vocab.json and merges.txt, or "
        "tokenizer.json) is used, else GPT-2's (default: the built-in model, a small GPT-2 "
        "trained on Shakespeare)",
    )
    model.add_argument(
        "--preset", choices=sorted(PRESETS), help="a preset shape with random weights"
    )
    p.add_argument(
        "--weights-seed",
        type=_whole(0),
        default=None,
        help="random-weight seed for --preset (default 0)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="--checkpoint: run weights that hold NaN or Inf (refused by default, by tensor name)",
    )


def _device_args(p: argparse.ArgumentParser, placements: Sequence[str], what: str) -> None:
    """The flags of where the model runs (``generate`` and ``eval``); ``what`` is the work the
    device does (for help texts)."""
    from tandem.host.backends import BACKENDS

    p.add_argument(
        "--backend",
        choices=sorted({"reference", *BACKENDS}),
        default=None,
        help=f"where --placement fpga or hybrid {what} (default model). model: the compiled "
        "program on the ISA simulator (bit-exact with the core); reference: the float NumPy model "
        "(no device; --placement fpga only); rtl: the core's RTL in Verilator (small models such "
        "as the built-in one on --geometry small; builds the core on first use); fpga: an Alveo "
        "card (needs --xclbin)",
    )
    p.add_argument(
        "--xclbin",
        metavar="FILE",
        help="--backend fpga: the FPGA image to load (build/u55c/tandem.xclbin from make "
        "bitstream); the --geometry must be the one it was built for",
    )
    p.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        help="core geometry for device backends (default: the smallest the model fits)",
    )
    helps = {
        "fpga": "fpga: the core consumes the prompt too",
        "hybrid": "hybrid: prefill in PyTorch (GPU, or the CPU without CUDA) under the core's "
        "numerics, KV handed to the core, which decodes",
        "gpu": "gpu: torch prefill and torch decode under the same numerics (no device: "
        "--backend, --xclbin, --geometry and --timeout do not apply)",
        "auto": "auto: the thesis's cost model picks one and prints the numbers and their sources",
    }
    p.add_argument(
        "--placement",
        choices=list(placements),
        default="fpga",
        help="; ".join(helps[k] for k in helps if k in placements),
    )
    p.add_argument(
        "--prefill-device",
        choices=["cpu", "cuda"],
        default=None,
        help="where --placement hybrid, gpu or auto runs torch (default: CUDA when available)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="device backends: give up if a run has not finished after this many seconds, "
        "> 0 (default: wait until done)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tandem", description="GPT-2 inference: prefill on a GPU, decode on an FPGA core."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="text generation (greedy, or sampled on the core with --temperature)"
    )
    _model_args(gen)
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default {DEFAULT_PROMPT!r})"
    )
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    gen.add_argument(
        "--max-new-tokens",
        type=_whole(1),
        default=16,
        metavar="N",
        help="tokens to generate, >= 1 (prompt + N - 1 must fit the model's context)",
    )
    # Greedy unless --temperature: then the core samples (tandem.sampling, docs/numerics.md).
    gen.add_argument(
        "--temperature",
        type=_temperature,
        default=None,
        metavar="T",
        help="sample on the core with temperature T (0 < T < 16, in steps of 1/4096) by "
        "Gumbel-max over the top-k logits; default: greedy",
    )
    gen.add_argument(
        "--top-k",
        type=_bounded(1, TOP_K_MAX, "the core keeps at most 64 candidates"),
        default=None,
        metavar="K",
        help=f"with --temperature: sample among the K most likely tokens, 1 <= K <= "
        f"{TOP_K_MAX} (default {TOP_K_MAX})",
    )
    gen.add_argument(
        "--seed",
        type=_bounded(0, SEED_MAX, "32 bits"),
        default=None,
        metavar="S",
        help="with --temperature: seed of the core's random stream, 0 <= S < 2**32 (default 0); "
        "the same seed gives the same tokens on every backend",
    )
    _device_args(gen, ["gpu", "fpga", "hybrid", "auto"], "decodes")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "eval", help="perplexity of a model on a text file (teacher-forced, any backend)"
    )
    ev.add_argument("text", metavar="FILE", help="UTF-8 text file to score ('-': standard input)")
    _model_args(ev)
    ev.add_argument(
        "--max-tokens",
        type=_whole(2),
        default=None,
        metavar="N",
        help=f"score only the first N tokens of the text, >= 2 (default: all of it; "
        f"{RTL_EVAL_TOKENS} with --backend rtl, whose RTL simulation is slow)",
    )
    _device_args(ev, ["gpu", "fpga", "hybrid"], "runs the model")
    ev.set_defaults(func=cmd_eval)

    qz = sub.add_parser(
        "quantize",
        help="weight-only quantization of a checkpoint (INT8/INT4, RTN or GPTQ) into a GPTQ "
        "safetensors folder",
    )
    qz.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="the float Hugging Face GPT-2 folder to quantize (default: the built-in model)",
    )
    qz.add_argument("--bits", type=int, choices=[4, 8], required=True, help="4 or 8")
    qz.add_argument(
        "--group",
        type=_group,
        default=None,
        metavar="G",
        help="inputs per scale: a multiple of 64, or -1 for one scale per output channel "
        "(default: -1 at 8 bits, 128 at 4)",
    )
    qz.add_argument(
        "--method",
        choices=["rtn", "gptq"],
        default="gptq",
        help="gptq (default): GPTQ on calibration text; rtn: round to nearest",
    )
    qz.add_argument(
        "--calib",
        metavar="FILE",
        help="--method gptq: UTF-8 calibration text (default: text sampled from the model "
        "itself); never a held-out text you will evaluate on",
    )
    qz.add_argument(
        "--no-lm-head",
        dest="lm_head",
        action="store_false",
        help="keep the LM head float (tied to the embedding); by default it is quantized too",
    )
    qz.add_argument(
        "--sym",
        action="store_true",
        help="symmetric quantization (zero point 2**(bits-1)); default asymmetric",
    )
    qz.add_argument(
        "--format",
        choices=["gptq_v2", "gptq"],
        default="gptq_v2",
        help="checkpoint_format: gptq_v2 (default) stores zero points; gptq (v1) stores "
        "zero - 1 and cannot hold a zero point of 0",
    )
    qz.add_argument("--out", metavar="DIR", required=True, help="new (or empty) folder to write")
    qz.set_defaults(func=cmd_quantize)

    bench = sub.add_parser("bench", help="ISA-simulator decode speed (random weights)")
    bench.add_argument("--model", choices=sorted(PRESETS), default=None, help="default gpt2")
    bench.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        nargs="+",
        default=None,
        metavar="GEOM",
        help="default u55c",
    )
    bench.add_argument("--prompt-len", type=_whole(1), default=None, metavar="N", help="default 1")
    bench.add_argument("--tokens", type=_whole(1), default=None, metavar="N", help="default 32")
    bench.add_argument("--seed", type=_whole(0), default=None, help="default 0")
    bench.add_argument(
        "--thesis",
        action="store_true",
        help="the thesis's 3x3 table (prompt 64/256/512 x output 64/256/512, gpt2-medium "
        "dimensions): CPU-only (timed here), A10-only (measured in the thesis), FPGA-only and "
        "hybrid columns, each labelled by source, and the hybrid's speed-ups over the A10 and "
        "the thesis's hybrid (--model, --geometry, --prompt-len, --tokens and --seed do not "
        "apply)",
    )
    bench.add_argument(
        "--measure-model",
        choices=sorted(PRESETS),
        default=None,
        help="--thesis: the model whose torch prefill/decode is timed on this CPU (labelled; "
        "default gpt2-medium)",
    )
    bench.add_argument(
        "--plot", metavar="PNG", default=None, help=f"--thesis: PNG path (default {DEFAULT_PLOT})"
    )
    bench.add_argument(
        "--save-times",
        metavar="JSON",
        help="--thesis: write the CPU prefill/decode times (and load averages) to this file",
    )
    bench.add_argument(
        "--load-times",
        metavar="JSON",
        help="--thesis: use CPU times saved by --save-times instead of timing again (the file "
        "names the model it timed, so --measure-model does not apply)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


EXIT_RUN_FAILED = 1
"""The run failed: the device ran the request and it failed (``RunError``: error bits in the
status record, or a run that failed without one), or a step after decoding failed
(``OutputError``: the text of an id, writing stdout; the generated ids are printed anyway)."""
EXIT_BAD_REQUEST = 2
"""The request or the setup was refused before anything ran: ``ValueError`` (flags that do not
apply, numbers, files named by flags, checkpoint, config, tokenizer, prompt and range checks),
``DeviceError`` (a device that cannot do what was asked: no card or xclbin, a model too large
for the backend) and ``OSError``/``MemoryError`` while reading the input. argparse's bad options
also exit 2, with the same one-line form."""
EXIT_TIMEOUT = 3
"""``DecodeTimeout``: the device did not finish within ``--timeout``."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): 128 + 2, as shells report it; one line, no traceback."""


def _error(command: str, err: BaseException | str, hint: str = "") -> None:
    """One line on stderr: ``tandem <command>: error: <message>``."""
    text = " ".join(f"{err}{hint}".split())
    with contextlib.suppress(OSError, ValueError):  # stderr gone too: the exit code remains
        print(f"tandem {command}: error: {text}", file=sys.stderr, flush=True)


def _drop_stdout() -> None:
    """After stdout failed: point its descriptor at /dev/null, so that the interpreter's final
    flush of what is still buffered does not fail again (Python's advice for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (AttributeError, OSError, ValueError):
        pass


def _tokens_note(tokens) -> str:
    tokens = list(tokens or [])
    return f" (tokens before it: {','.join(map(str, tokens))})" if tokens else ""


def main(argv: Sequence[str] | None = None) -> int:
    from tandem.host.device import DeviceError
    from tandem.host.runtime import DecodeTimeout, RunError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad option: one line printed, exit 2
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_REQUEST
    command = args.command
    if sys.stdout is None:  # started with stdout closed (>&-): nowhere to put the answer
        _error(command, "stdout is closed; redirect it to a file (> FILE) or to /dev/null")
        return EXIT_BAD_REQUEST
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _error(command, "interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except RunError as err:
        _error(command, err, _tokens_note(err.tokens))
        return EXIT_RUN_FAILED
    except OutputError as err:
        if isinstance(err.__cause__, OSError | ValueError) and "stdout" in str(err):
            _drop_stdout()
        _error(command, err)
        return EXIT_RUN_FAILED
    except (ValueError, DeviceError) as err:
        # Flags, numbers, files, checkpoint, config, tokenizer, range and device errors carry a
        # message made for users.
        _error(command, err)
        return EXIT_BAD_REQUEST
    except DecodeTimeout as err:
        hint = " (rerun with a larger --timeout, or without one)" + _tokens_note(err.tokens)
        _error(command, err, hint)
        return EXIT_TIMEOUT
    except MemoryError:
        _error(command, "out of memory: the model is too large for this machine")
        return EXIT_BAD_REQUEST
    except OSError as err:  # a file the run reads (checkpoint, tokenizer, ...)
        name = f": {err.filename}" if err.filename else ""
        _error(command, f"{err.strerror or err}{name}")
        return EXIT_BAD_REQUEST


if __name__ == "__main__":
    sys.exit(main())
