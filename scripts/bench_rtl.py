"""`make bench-rtl`: decode-core cycles per token from RTL simulation (issue 4).

gpt2 (124M, ``tandem.checkpoint.random_weights``) compiled for the u55c geometry (32 channels x
512 bits, 16 lanes, 250 MHz) runs on the whole RTL core (rtl/core.py) in Verilator over the
simulated HBM (sim/hbm_model.py: the calibrated U55C model by default), through
:mod:`tandem.sim.rtljob`: a prompt of a few tokens, then a few decode tokens. The harness's
monitors give the cycle at which each output token was issued and the HBM beats read up to it,
so each decode token's cycles and bytes are measured, not computed. The generated tokens must
equal the ISA simulator's for the same image and arguments (checked after the run, a few
seconds), or the benchmark stops.

Printed and written to ``build/bench-rtl.json``. ``--record`` also writes it, with a
``provenance`` field (the command, the RTL commit), to the package data the placement cost model
reads (``host/data/bench-rtl.json``, :data:`tandem.host.thesis.RTL_RESULT`) and the same bytes to
``docs/bench-rtl.json``:

- cycles per decode token (the mean over the decode tokens, each the cycles between two
  consecutive output tokens: one whole forward pass and the LM head);
- HBM bytes read per decode token (R-channel beats x 64 bytes, counted in the simulation), and
  what the layout says a token streams, for comparison;
- achieved bandwidth: bytes / (cycles x 1,840 B/cycle), as a fraction of the 460 GB/s peak;
- ms per token for gpt2, and for gpt2-medium projected from the measured efficiency and
  gpt2-medium's bytes per token (from its layout). Every time is a **projection (simulated
  cycles / 250 MHz)**: no FPGA ran;
- where the cycles went (monitor counters): cycles with HBM data moving, with the VPU busy and
  no data moving, and with no unit busy.

The simulated HBM is the calibrated model by default (``--hbm ideal`` for the ideal one;
``--read-latency``, ``--refresh on|off`` override; sim/hbm_model.py, docs/hbm-sources.md), set
at run time, so one build serves every model; ``--sweep`` adds the sensitivity table.

Options make shorter runs (``--layers``, ``--tokens``); the default is the honest gpt2. With
``--layers`` the model is named e.g. ``gpt2-2L`` so host/thesis.py will not take it for gpt2.

Quantized weights (issue 17): ``--weights int8`` (per output channel) or ``--weights int4``
(groups of 128; ``--group G`` for another size) quantizes the random weights by round to nearest
(:func:`tandem.qweights.quantize_weights`, what ``tandem quantize --method rtn`` runs, LM head
included) and compiles them as a quantized checkpoint is compiled. The table then gives that
format's cycles, bytes (measured, and the quantized layout's), % of the peak and of the
calibrated figure, and the projected gpt2 and gpt2-medium ms/token and tokens/s, gpt2-medium's
from its own quantized layout's bytes per token. A quantized run writes
``build/bench-rtl-int4.json`` (``-int8``, ``-int4-g64``, ...), and ``--record`` writes
``docs/bench-rtl-int4.json`` (...) only: the FP16 result the cost model reads
(``host/data/bench-rtl.json``) stays the FP16 one. ``--dry-run`` quantizes and compiles, runs the
job on the ISA simulator instead of the RTL (the tokens the RTL must give) and prints the
layout's bytes per token: a check of everything but the simulation, in seconds on ``tiny``.
``--summary`` prints the recorded FP16, W8 and W4 results side by side (no simulation).
``--profile`` also prints where the run waits, by instruction site: the monitor's cycles per
pc in Exec and, of those, the cycles with no HBM read beat (:func:`profile_sites`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "bench-rtl.json"
PACKAGED = REPO / "host" / "data" / "bench-rtl.json"
"""The recorded result shipped in the package (tandem.host.thesis.RTL_RESULT)."""
DOC = REPO / "docs" / "bench-rtl.json"
"""Its copy for readers of docs/ (the same bytes)."""


def raw_path(json_path: Path) -> Path:
    """The raw record beside the result (``build/bench-rtl-raw.json``)."""
    return json_path.with_name(json_path.stem + "-raw.json")


LABEL = "projection (simulated cycles / 250 MHz)"

WEIGHTS = ("fp16", "int8", "int4")
"""``--weights``: the weight format of the benchmarked model."""
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP = {"int8": -1, "int4": 128}
"""``--group`` by default: INT8 per output channel (``tandem.qweights.PER_CHANNEL``), INT4 in
groups of 128 (the common GPTQ checkpoint's)."""


def weights_suffix(weights: str = "fp16", group: int | None = None) -> str:
    """The file-name suffix of a format's results: ``""`` for FP16, ``-int4`` for INT4 in its
    default group, ``-int4-g64`` in another, ``-int8-g128`` for INT8 in groups."""
    if weights == "fp16":
        return ""
    if group is None or group == DEFAULT_GROUP[weights]:
        return f"-{weights}"
    return f"-{weights}-g{group}"


def weights_spec(raw_args: dict) -> dict:
    """The weight format of a run from its arguments (records from before ``--weights``: FP16):
    ``{"format", "bits", "group", "label"}``; ``group`` -1 is per channel."""
    fmt = raw_args.get("weights") or "fp16"
    if fmt == "fp16":
        return {"format": "fp16", "bits": 16, "group": None, "label": "FP16"}
    group = raw_args.get("group")
    group = DEFAULT_GROUP[fmt] if group is None else int(group)
    how = "per channel" if group == -1 else f"groups of {group}"
    return {
        "format": fmt,
        "bits": BITS[fmt],
        "group": group,
        "label": f"W{BITS[fmt]} {how} (RTN, LM head quantized)",
    }


def quant_formats(cfg, g, bits: int, group: int) -> dict:
    """The ``formats`` of :class:`tandem.layout.HBMLayout` for ``cfg`` with every quantizable
    matrix (:func:`tandem.qweights.quantized_keys`, LM head included) at ``bits`` in groups of
    ``group``: what :func:`tandem.layout.core_tensors` gives for such weights, without
    quantizing any (gpt2-medium's 350M). Models whose heads are padded (``head_dim`` not 64)
    quantize random weights to learn it (small models only)."""
    from tandem.layout import HBMLayout, core_tensors, quant_region, quant_wgroup, wfmt_for
    from tandem.numerics import BLOCK
    from tandem.qweights import group_for, quantized_keys

    if cfg.head_dim != BLOCK:
        from tandem.checkpoint import random_weights
        from tandem.qweights import quantize_weights

        qw = quantize_weights(random_weights(cfg, seed=0), cfg, bits=bits, group=group)
        return core_tensors(cfg, qw)[1]
    fp16 = HBMLayout(cfg, g)
    formats = {}
    for key in quantized_keys(cfg.n_layer):
        name = quant_region(key)
        cols = fp16[name].cols
        formats[name] = (wfmt_for(bits), quant_wgroup(bits, group_for(group, cols), cols))
    return formats


def spec_formats(cfg, g, spec: dict) -> dict:
    """:func:`quant_formats` of a :func:`weights_spec` (``{}`` for FP16)."""
    if spec["format"] == "fp16":
        return {}
    return quant_formats(cfg, g, spec["bits"], spec["group"])


def log(msg: str) -> None:
    print(f"[bench-rtl] {msg}", file=sys.stderr, flush=True)


def core_revision() -> str:
    """The commit the RTL came from, and whether tracked files in rtl/ or tandem/ had
    uncommitted changes (untracked files, such as a worktree's links, change no RTL)."""
    import subprocess

    def git(*args):
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "rtl", "tandem")
    return rev + (" + uncommitted changes in rtl/ or tandem/" if dirty else "")


def peak_child_gb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def layout_bytes(cfg, g, ctx: int, formats=None) -> int:
    """What one generated token streams according to the layout: every MPU matrix and vector
    once (quantized matrices, by ``formats``, with their scale beats), and the KV prefix of
    ``ctx`` positions (host/thesis.py's formula)."""
    from tandem.host.thesis import kv_read_bytes, streamed_bytes
    from tandem.layout import HBMLayout

    return streamed_bytes(HBMLayout(cfg, g, formats=formats or {})) + kv_read_bytes(cfg, g, ctx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--geometry", default="u55c")
    ap.add_argument(
        "--prompt-len", type=int, default=None, metavar="N", help="default 3 (sweep points: 1)"
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate: default 4 (--sweep: 2)",
    )
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a shorter run)")
    ap.add_argument(
        "--start-pos",
        type=int,
        default=0,
        metavar="S",
        help="start the core at position S (as the hybrid handoff does) to measure a longer "
        "context: positions below S keep an all-zero KV cache (no prefill ran; the core's "
        "cycles do not depend on the values), labelled in the output",
    )
    ap.add_argument(
        "--hbm",
        default="calibrated",
        choices=("calibrated", "ideal"),
        help="the simulated HBM's timing (sim/hbm_model.py, docs/hbm-sources.md): calibrated "
        "(default: 12.77 GB/s sustained per channel with refresh, 150-175 cycles of read "
        "latency) or ideal (14.375 GB/s, 80 cycles, no refresh); set at run time, one build",
    )
    ap.add_argument(
        "--read-latency", type=int, default=None, help="override the model's read latency"
    )
    ap.add_argument(
        "--refresh",
        choices=("on", "off"),
        default=None,
        help="override the model's refresh (on: 350 ns of every 3.9 us, at independent phases)",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="after the default run (over the same build), the sensitivity table: read latency "
        "80/150/250 x link rate ideal/calibrated x refresh off/on, each a short run "
        "(--prompt-len 1 --tokens 2 unless given); prints the table and writes <json> with "
        "-sweep in its name",
    )
    ap.add_argument("--sweep-only", action="store_true", help="--sweep without the default run")
    ap.add_argument(
        "--floorplan",
        default=None,
        help="the core's floorplan (tandem.floorplan: u55c or flat; default the geometry's "
        "own, u55c for the u55c geometry: every SLR crossing staged). flat measures the core "
        "without stages; part of the build key",
    )
    ap.add_argument(
        "--opt",
        default="-O1",
        help="C++ optimisation of the Verilator model (OPT_FAST; Verilator's default -Os). "
        "-O1 builds the u55c core faster; part of the build key",
    )
    ap.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="fp16",
        help="the weight format (issue 17): fp16 (default), int8 (per output channel) or int4 "
        "(groups of 128): the random weights quantized by round to nearest, LM head included",
    )
    ap.add_argument(
        "--group",
        type=int,
        default=None,
        metavar="G",
        help="with --weights int8/int4: the group size (a multiple of 64, or -1 per channel; "
        "default int8 -1, int4 128)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cycles", type=int, default=50_000_000)
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where the result goes (default build/bench-rtl.json; quantized "
        "build/bench-rtl-int4.json, -int8, -int4-g64, ...)",
    )
    ap.add_argument(
        "--record",
        action="store_true",
        help="also write the result with its provenance to the package data the cost model "
        "reads (host/data/bench-rtl.json) and to docs/bench-rtl.json; a quantized run to "
        "docs/bench-rtl-int4.json (-int8, ...) only",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also read the monitor's profile by pc and print where Exec waits and the memory "
        "idles: cycles per position by instruction site (a layer's instruction summed over the "
        "layers), largest idle first",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no RTL: quantize and compile, run the job on the ISA simulator (the tokens the "
        "RTL must give) and print the layout's bytes per token",
    )
    ap.add_argument(
        "--summary",
        action="store_true",
        help="no simulation: print the recorded FP16, W8 and W4 results (docs/bench-rtl*.json) "
        "side by side",
    )
    ap.add_argument(
        "--reanalyse",
        action="store_true",
        help="no simulation: redo the table and JSON from the last run's raw record "
        "(<json>-raw.json)",
    )
    args = ap.parse_args(argv)
    if args.weights == "fp16" and args.group is not None:
        ap.error("--group applies to --weights int8 or int4")
    if args.weights != "fp16" and args.group is None:
        args.group = DEFAULT_GROUP[args.weights]
    if args.group is not None and args.group != -1 and (args.group <= 0 or args.group % 64):
        ap.error(f"--group {args.group}: a multiple of 64, or -1 (per channel)")
    if args.json is None:
        args.json = OUT.with_name(OUT.stem + weights_suffix(args.weights, args.group) + ".json")
    if args.summary:
        print(format_summary(read_recorded()))
        return 0
    if args.dry_run:
        return dry_run(args, ap)
    args.sweep = args.sweep or args.sweep_only
    if args.reanalyse:
        return finish(json.loads(raw_path(args.json).read_text()), args)
    short = args.sweep and not args.sweep_only
    full = (args.prompt_len is None, args.tokens is None)
    if args.prompt_len is None:
        args.prompt_len = 3
    if args.tokens is None:
        args.tokens = 4
    if short:
        # first the default measurement, over the same build (so both come from one RTL)
        raw = measure(args, ap, timing_of(args))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw_path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
        finish(raw, args)
    if args.sweep:
        if full[0]:
            args.prompt_len = 1
        if full[1]:
            args.tokens = 2
        return sweep(args, ap)
    raw = measure(args, ap, timing_of(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    raw_path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
    return finish(raw, args)


SWEEP_LATENCIES = (80, 150, 250)
SWEEP_OUT = "-sweep"


def sweep(args, ap) -> int:
    """The sensitivity table: read latency x link rate (ideal, calibrated) x refresh (off, on),
    one short run each over the same build."""
    from tandem.geometry import geometry
    from tandem.sim.hbm_model import hbm_timing

    g = geometry(args.geometry)
    points = []
    for rate in ("ideal", "calibrated"):
        for refresh in (False, True):
            for lat in SWEEP_LATENCIES:
                points.append(
                    (rate, refresh, lat, hbm_timing(rate, g, refresh=refresh, read_latency=lat))
                )
    out = args.json.with_name(args.json.stem + SWEEP_OUT + ".json")
    rows = []
    for k, (rate, refresh, lat, timing) in enumerate(points):
        log(f"sweep point {k + 1}/{len(points)}: {timing.describe(g)}")
        raw = measure(args, ap, timing)
        r = analyse(raw, args)
        rows.append(
            {
                "rate": rate,
                "refresh": refresh,
                "read_latency": lat,
                "hbm": r["hbm"],
                "cycles_per_token": r["cycles_per_token"],
                "hbm_efficiency": r["hbm_efficiency"],
                "of_model_sustained": r["of_model_sustained"],
                "of_calibrated_achievable": r["of_calibrated_achievable"],
                "projection": r["projection"],
                "model": r["model"],
                "ctx": r["ctx"],
                "floorplan": r["floorplan"],
                "build": r["build"],
            }
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows},
                                  indent=2) + "\n")  # fmt: skip
        print(format_sweep(rows), flush=True)
    log(f"wrote {out}")
    return 0


def format_sweep(rows: list[dict]) -> str:
    """The sensitivity table (docs/performance.md)."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"HBM sensitivity: {r0['model']} on the u55c core, floorplan {r0['floorplan']}, one "
        f"decode token at ctx ~{r0['ctx']} per point; {LABEL}",
        "",
        "| link rate | refresh | read latency | cycles per token | % of 460 GB/s "
        "| % of the model's sustained | gpt2-medium ms/token |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        med = r["projection"].get("gpt2-medium", {}).get("ms_per_token")
        h = r["hbm"]
        lat = f"{h['read_latency']}" + (
            f"-{h['read_latency'] + h['read_jitter']}" if h.get("read_jitter") else ""
        )
        lines.append(
            f"| {r['rate']} ({h['link_gbps']:.2f} GB/s) | "
            f"{'on' if r['refresh'] else 'off'} | {lat} | {r['cycles_per_token']:,} | "
            f"{r['hbm_efficiency']:.1%} | {r['of_model_sustained']:.1%} | "
            f"{'' if med is None else f'{med:.3f}'} |"
        )
    return "\n".join(lines)


def timing_of(args, **overrides):
    """The HBM model the options name, at the geometry's clock."""
    from tandem.geometry import geometry
    from tandem.sim.hbm_model import hbm_timing

    g = geometry(args.geometry)
    if args.read_latency is not None:
        overrides.setdefault("read_latency", args.read_latency)
    if args.refresh is not None:
        overrides.setdefault("refresh", args.refresh == "on")
    return hbm_timing(args.hbm, g, **overrides)


def bench_model(args, ap):
    """(config, geometry) of the run: ``--model`` with ``--layers``, on ``--geometry``."""
    from tandem.config import preset
    from tandem.geometry import geometry

    g = geometry(args.geometry)
    cfg = preset(args.model)
    if args.layers is not None and args.layers != cfg.n_layer:
        cfg = dataclasses.replace(cfg, n_layer=args.layers, name=f"{cfg.name}-{args.layers}L")
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (a decode token is the gap between two tokens)")
    return cfg, g


def compiled(cfg, g, args):
    """(Compiled, prompt ids): the random weights (seed ``--seed``), quantized as ``--weights``
    says (round to nearest, LM head included: ``tandem quantize --method rtn``), compiled for
    ``g``; the prompt drawn from the same seed."""
    from tandem.checkpoint import random_weights
    from tandem.compiler import compile_model
    from tandem.qweights import quantize_weights

    spec = weights_spec(vars(args))
    log(f"{cfg.name}: random weights (seed {args.seed}) ...")
    weights = random_weights(cfg, seed=args.seed)
    if spec["format"] != "fp16":
        t0 = time.monotonic()
        weights = quantize_weights(weights, cfg, bits=spec["bits"], group=spec["group"])
        log(f"quantized to {spec['label']} in {time.monotonic() - t0:.0f} s")
    log(f"compiling for {g.name} ...")
    c = compile_model(cfg, weights, g)
    del weights
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.n_vocab, args.start_pos + args.prompt_len).tolist()
    return c, prompt


def job_image(g, c, prompt):
    """A copy of the compiled image (``c.image`` stays as compiled) with ``prompt`` written:
    what a job starts from, on the RTL or the ISA simulator."""
    from tandem import layout as L

    image = L.HBMImage(g, c.image.nbytes)
    image.data[:] = c.image.data
    c.write_prompt(image, prompt)
    return image


def reference_tokens(g, c, prompt, args):
    """The tokens the RTL must give, bit-exact: the job on the ISA simulator, over its own
    :func:`job_image`. Returns them and the simulator's result; stops the benchmark if the
    simulator does not finish."""
    from tandem.golden.isasim import IsaSim

    image = job_image(g, c, prompt)
    r = IsaSim(g, image).run(c.args(len(prompt), args.tokens, start_pos=args.start_pos))
    if not r.ok:
        raise SystemExit(f"the ISA simulator stopped: {r.message}")
    return c.read_output(image, args.tokens), r


def dry_run(args, ap) -> int:
    """``--dry-run``: everything but the RTL. The job on the ISA simulator (its tokens are the
    ones the RTL must give, bit-exact), and the layout's bytes per token of the model and of
    gpt2-medium in this format."""
    from tandem.host.thesis import kv_read_bytes, streamed_bytes
    from tandem.layout import LayoutError

    if args.prompt_len is None:
        args.prompt_len = 3
    if args.tokens is None:
        args.tokens = 4
    cfg, g = bench_model(args, ap)
    spec = weights_spec(vars(args))
    c, prompt = compiled(cfg, g, args)
    t0 = time.monotonic()
    tokens, r = reference_tokens(g, c, prompt, args)
    ctx = len(prompt) + args.tokens // 2
    lines = [
        f"dry run (no RTL): {cfg.name} {spec['label']} on {g.name}: the ISA simulator ran "
        f"prompt {len(prompt)} + {args.tokens} tokens in {time.monotonic() - t0:.1f} s: "
        f"{tokens} (the RTL must give these); {r.hbm_read:,} HBM bytes read",
        f"layout bytes per token at ctx {ctx} (weights and scale beats + KV):",
    ]
    mine = streamed_bytes(c.layout) + kv_read_bytes(cfg, g, ctx)
    lines.append(f"  {cfg.name} (compiled): {mine:,}")
    for name in sorted({args.model, "gpt2-medium"}):
        from tandem.config import preset

        pc = preset(name)
        try:
            lb = layout_bytes(pc, g, ctx, spec_formats(pc, g, spec))
        except LayoutError as err:
            lines.append(f"  {name}: no layout on {g.name} ({err})")
            continue
        floor = lb / (g.peak_gbps * 1e9) * 1e3
        lines.append(
            f"  {name}, {spec['label']}: {lb:,} bytes; at 100% of {g.peak_gbps:.0f} GB/s "
            f"{floor:.3f} ms/token ({1e3 / floor:,.0f} tokens/s), the bandwidth floor"
        )
    print("\n".join(lines))
    return 0


def measure(args, ap, timing) -> dict:
    """Compile, build (cached), run one job over the HBM model ``timing``; the raw record."""

    from tandem import layout as L
    from tandem.isa import disassemble_one
    from tandem.sim import rtljob

    cfg, g = bench_model(args, ap)
    t_all = time.monotonic()

    t0 = time.monotonic()
    c, prompt = compiled(cfg, g, args)
    image = job_image(g, c, prompt)
    scalars = c.args(len(prompt), args.tokens, start_pos=args.start_pos)
    t_compile = time.monotonic() - t0
    mem = rtljob.memory_class(image.nbytes)
    log(
        f"compiled in {t_compile:.0f} s: {image.nbytes:,} bytes per channel x {g.channels}; "
        f"simulated HBM {mem >> 20} MiB per channel"
    )

    make_vars = {"OPT_FAST": args.opt} if args.opt else None
    log(
        f"Verilog and Verilator build of the {g.name} core, cached under build/sim when "
        f"unchanged (the first u55c run: about 7 minutes converting to Verilog, no output, then "
        f"about 8 minutes of Verilator and make output, 7 GB of memory) ..."
    )
    core_rev = core_revision()
    tb = rtljob.build(g, mem, floorplan=args.floorplan, make_vars=make_vars)
    build_rss = peak_child_gb()
    log(
        f"Verilog {tb['verilog']:.0f} s, build {tb['build']:.0f} s, peak child RSS so far "
        f"{build_rss:.1f} GB"
    )

    log(
        f"running prompt {len(prompt)} + {args.tokens} tokens from position {args.start_pos} "
        f"({len(prompt) + args.tokens - 1 - args.start_pos} positions) over the "
        f"{timing.describe(g)}; a line per token"
    )
    res = rtljob.run_job(
        g,
        image,
        scalars,
        dump=[(c.layout["output"].base, c.layout["output"].nbytes)],
        mem_bytes=mem,
        hbm=timing,
        floorplan=args.floorplan,
        max_cycles=args.max_cycles,
        make_vars=make_vars,
        progress_s=60.0,
        log=log,
        profile=len(c.program) if args.profile else 0,
    )
    res.status.check()
    out_region = res.dumps[(c.layout["output"].base, c.layout["output"].nbytes)]
    mem_tokens = L.unpack_tokens(out_region[0, : 4 * res.status.tokens])
    if mem_tokens != res.tokens or len(res.tokens) != args.tokens:
        raise SystemExit(f"token mismatch: monitor {res.tokens}, memory {mem_tokens}")
    t0 = time.monotonic()
    want, _ = reference_tokens(g, c, prompt, args)
    if res.tokens != want:
        raise SystemExit(f"the RTL gave {res.tokens}, the ISA simulator {want}")
    log(f"tokens {res.tokens} equal the ISA simulator's ({time.monotonic() - t0:.0f} s)")

    raw = {
        "args": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "model": cfg.name,
        "n_layer": cfg.n_layer,
        "geometry": g.name,
        "floorplan": rtljob.resolve_floorplan(g, args.floorplan).name,
        "prompt": prompt,
        "tokens": res.tokens,
        "cycles": res.cycles,
        "events": res.events,
        "counters": res.counters,
        "hbm": res.hbm,
        "profile": profile_sites(c, res.profile) if args.profile else None,
        "profile_pcs": (
            [
                {"pc": pc, "asm": disassemble_one(ins), **e}
                for pc, (ins, e) in enumerate(zip(c.program, res.profile, strict=False))
            ]
            if args.profile
            else None
        ),
        "build": {
            "core": core_rev,
            "opt_fast": args.opt,
            "verilog_s": round(tb["verilog"], 1),
            "build_s": round(tb["build"], 1),
            "peak_child_rss_gb_build": round(build_rss, 2),
            "peak_child_rss_gb": round(peak_child_gb(), 2),
            "simulation_s": round(res.timings["run"], 1),
            "load_s": round(res.timings["load"], 1),
            "total_s": round(time.monotonic() - t_all, 1),
            "cycles_per_s": round(res.cycles / max(res.timings["run"], 1e-9)),
        },
    }
    return raw


_LAYER = re.compile(r"^h\.\d+\.")


def instruction_site(c, ins) -> str:
    """What an instruction does, the same for every layer: the op and the HBM region it reads
    or writes (``h.N.`` dropped) or the VBUF operand it writes (the compiler's slot names)."""
    from tandem.isa import LINE

    f = dict(ins.fields)
    name = ins.op.name
    if "line" in f:
        at = f["line"] * LINE
        for r in c.layout.regions.values():
            if r.base <= at < r.base + max(r.nbytes, 1):
                return f"{name} {_LAYER.sub('h.*.', r.name)}"
    if "dst" in f:
        for slot, v in c.vbuf_map.items():
            if v.addr <= f["dst"] < v.end:
                return f"{name} -> {slot}"
    return name


def profile_sites(c, prof: list[dict]) -> list[dict]:
    """The profile by pc summed by :func:`instruction_site`, in program order of each site's
    first pc."""
    sites: dict[str, dict] = {}
    for pc, (ins, e) in enumerate(zip(c.program, prof, strict=False)):
        site = instruction_site(c, ins)
        row = sites.setdefault(site, {"site": site, "pcs": 0, "first": pc})
        row["pcs"] += 1
        for k, v in e.items():
            row[k] = row.get(k, 0) + v
    return list(sites.values())


def format_profile(rows: list[dict], positions: int, top: int = 30) -> str:
    """The largest ``top`` sites by idle cycles, per position."""
    total = sum(r["cycles"] for r in rows)
    idle = sum(r["idle"] for r in rows)
    per = f"{total / positions:,.0f} cycles, {idle / positions:,.0f} with no HBM read beat"
    mpu = "tiles" in (rows[0] if rows else {})  # records before the MPU columns lack them
    head = "| site | first pc | pcs | cycles / position | of which HBM idle | share of idle |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if mpu:
        head += " MPU tiles | MPU waiting for a tile |"
        rule += "---:|---:|"
    out = [
        f"Profile by instruction site ({positions} positions; per position: {per}): where "
        "Exec waits",
        head,
        rule,
    ]
    for r in sorted(rows, key=lambda r: -r["idle"])[:top]:
        line = (
            f"| {r['site']} | {r['first']} | {r['pcs']} | {r['cycles'] / positions:,.0f} | "
            f"{r['idle'] / positions:,.0f} | {r['idle'] / max(idle, 1):.1%} |"
        )
        if mpu:
            line += f" {r['tiles'] / positions:,.0f} | {r['starved'] / positions:,.0f} |"
        out.append(line)
    return "\n".join(out)


def finish(raw: dict, args) -> int:
    report = analyse(raw, args)
    print(format_report(report))
    if raw.get("profile"):
        positions = sum(t["positions"] for t in report["per_token"])  # every position run
        print()
        print(format_profile(raw["profile"], positions))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    if args.record:
        for path in record(report, raw["args"], record_paths(raw["args"])):
            log(f"recorded {path}")
    return 0


def record_paths(raw_args: dict) -> tuple[Path, ...]:
    """Where ``--record`` writes: FP16 the package data the cost model reads and its docs copy;
    a quantized format only its own docs file (``docs/bench-rtl-int4.json``, ...), so the FP16
    result stays what :data:`tandem.host.thesis.RTL_RESULT` holds."""
    spec = weights_spec(raw_args)
    if spec["format"] == "fp16":
        return (PACKAGED, DOC)
    return (DOC.with_name(DOC.stem + weights_suffix(spec["format"], spec["group"]) + ".json"),)


SUMMARY_FILES = (
    ("FP16", ""),
    ("W8 per channel", "-int8"),
    ("W4 groups of 128", "-int4"),
    ("W4 groups of 64", "-int4-g64"),
)
"""The recorded results :func:`read_recorded` looks for beside :data:`DOC`, in table order."""


def read_recorded(doc: Path = DOC) -> list[tuple[str, Path, dict | None]]:
    """(format, path, the recorded result or None) of each of :data:`SUMMARY_FILES`."""
    out = []
    for label, suffix in SUMMARY_FILES:
        path = doc.with_name(doc.stem + suffix + ".json")
        out.append((label, path, json.loads(path.read_text()) if path.is_file() else None))
    return out


def format_summary(recorded) -> str:
    """``--summary``: one row per recorded format: cycles, bytes (measured and the layout's),
    % of the peak and of the calibrated figure, and the projected ms/token and tokens/s of the
    simulated model and gpt2-medium."""
    lines = [
        f"Recorded make bench-rtl results by weight format; times are {LABEL}",
        "",
        "| weights | model | cycles per token | MB read per token | layout MB | % of peak "
        "| % of calibrated | ms/token | tokens/s | gpt2-medium ms/token | gpt2-medium tokens/s "
        "| RTL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, path, r in recorded:
        if r is None:
            lines.append(f"| {label} | not recorded ({path.name}) |" + " |" * 10)
            continue
        med = r["projection"].get("gpt2-medium")
        ms = r["ms_per_token"]
        core = r.get("provenance", {}).get("core_commit", r.get("build", {}).get("core", "?"))
        lines.append(
            f"| {r.get('weights', {}).get('label', label)} | {r['model']} | "
            f"{r['cycles_per_token']:,} | {r['bytes_per_token'] / 1e6:,.2f} | "
            f"{r['layout_bytes_per_token'] / 1e6:,.2f} | {r['hbm_efficiency']:.1%} | "
            f"{r['of_calibrated_achievable']:.1%} | {ms:.3f} | {1e3 / ms:,.0f} | "
            + (f"{med['ms_per_token']:.3f} | {1e3 / med['ms_per_token']:,.0f}" if med else " | ")
            + f" | {core} |"
        )
    return "\n".join(lines)


USED_BY = (
    "tandem.host.thesis.FpgaDecodeModel (tandem bench --thesis, tandem generate --placement auto)"
)
USED_BY_QUANT = "docs/performance.md (quantized weights; the cost model reads the FP16 result)"


def provenance(report: dict, run_args: dict) -> dict:
    """Where a recorded result came from: what was measured, the command, the RTL commit."""
    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in run_args.items()
        if k not in ("record", "reanalyse") and v is not None and v is not False
    )
    weights = report.get("weights", {"format": "fp16"})
    quantized = weights["format"] != "fp16"
    what = f"{weights['label']} " if quantized else ""
    return {
        "what": f"decode-core cycles per token measured in RTL simulation: {report['model']} "
        f"({what}random weights) on the {report['geometry']} core in Verilator over the "
        f"simulated HBM ({report['hbm']['name']} model: {report['read_latency']}-cycle read "
        f"latency, {report['hbm']['sustained_gbps']:.0f} GB/s sustained); times are {LABEL}, "
        "no FPGA ran",
        "command": f"python scripts/bench_rtl.py --record (make bench-rtl "
        f"BENCH_RTL_ARGS=--record): {flags}",
        "core_commit": report["build"].get("core", "unknown"),
        "recorded_in_commit": "the commit that adds this file",
        "used_by": USED_BY_QUANT if quantized else USED_BY,
    }


def record(report: dict, run_args: dict, paths=(PACKAGED, DOC)) -> list[Path]:
    """Write the report with its provenance to the package data and its docs copy."""
    text = json.dumps({"provenance": provenance(report, run_args), **report}, indent=2) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(paths)


def matvecs_per_position(cfg, g, formats=None) -> int:
    """MATVEC instructions the compiled program runs per generated token (the program has no
    loop inside a position; the prologue has none); ``formats``: quantized matrices'
    (:func:`quant_formats`), whose LM head may be read in other chunks."""
    from tandem.compiler import program
    from tandem.isa import Op

    return sum(i.op == Op.MATVEC for i in program(cfg, g, formats=formats))


def project(pc, g, ctx: int, spec: dict, read_ratio: float, cycles, eff: float) -> dict | None:
    """One row of the projection: model ``pc`` in the run's weight format (``spec``) at context
    ``ctx``: its layout's bytes per token (the quantized layout's for a quantized run: weight
    tiles and scale beats), the bytes the core would read (``read_ratio`` of them: the measured
    bytes over the measured model's layout bytes), and the cycles: ``cycles`` when the model is
    the one simulated, else those bytes at the measured HBM efficiency ``eff`` of the
    geometry's peak. None (logged) when the model has no layout on ``g``."""
    from tandem.layout import LayoutError

    clock = g.clock_mhz * 1e6
    peak_bpc = g.peak_gbps * 1e9 / clock
    try:
        lb = layout_bytes(pc, g, ctx, spec_formats(pc, g, spec))
    except LayoutError as err:  # e.g. gpt2-medium on a test geometry
        log(f"no projection for {pc.name}: {err}")
        return None
    # bytes the core reads scale with the layout's (same read pattern per matrix)
    b = lb * read_ratio
    measured = cycles is not None
    if not measured:
        cycles = b / (eff * peak_bpc)
    return {
        "weights": spec["label"],
        "layout_bytes_per_token": lb,
        "bytes_per_token": round(b),
        "cycles_per_token": round(cycles),
        "ms_per_token": cycles / clock * 1e3,
        "tokens_per_s": clock / cycles,
        "source": "measured in RTL simulation"
        if measured
        else "projected from the measured HBM efficiency and its layout's bytes per token",
    }


def hbm_record(raw: dict, g) -> dict:
    """The memory model a raw record ran over (records from before the calibrated model ran
    over the ideal one at ``--read-latency``)."""
    if "hbm" in raw:
        return raw["hbm"]
    from tandem.sim.hbm_model import hbm_timing

    lat = raw["args"].get("read_latency") or 80
    return hbm_timing("ideal", g, read_latency=lat).as_dict(g)


def analyse(raw: dict, args) -> dict:
    from tandem.config import preset
    from tandem.geometry import geometry
    from tandem.sim.hbm_model import hbm_timing

    g = geometry(raw["geometry"])
    hbm = hbm_record(raw, g)
    calibrated = hbm_timing("calibrated", g)
    cfg = preset(raw["args"]["model"])
    if raw["n_layer"] != cfg.n_layer:
        cfg = dataclasses.replace(cfg, n_layer=raw["n_layer"], name=raw["model"])
    prompt = raw["prompt"]
    base_name = raw["args"]["model"]
    spec = weights_spec(raw["args"])

    beat = g.beat_bytes
    peak_bpc = g.peak_gbps * 1e9 / (g.clock_mhz * 1e6)  # 1,840 B/cycle on u55c
    clock = g.clock_mhz * 1e6
    toks = [e for e in raw["events"] if e["kind"] == "token"]
    P = len(prompt)
    S = int(raw["args"].get("start_pos", 0))
    rows = []
    for i, e in enumerate(toks):
        prev = toks[i - 1] if i else dict.fromkeys(e, 0)
        d = {k: e[k] - prev[k] for k in e if k not in ("kind", "value")}
        rows.append(
            {
                "token": i,
                "id": e["value"],
                # token i is generated at position P - 1 + i; token 0's interval is the fetch
                # and every prompt position
                "positions": P - S if i == 0 else 1,
                "ctx": P + i,
                "at_cycle": e["cycles"],
                "cycles": d["cycles"],
                "bytes_read": d["r_beats"] * beat,
                "hbm_efficiency": d["r_beats"] * beat / (d["cycles"] * peak_bpc),
                "r_cycles": d["r_cycles"],
                "vpu_no_read": d["vpu_no_read"],
                "idle_no_read": d["idle_no_read"],
                "idle_read_wait": d.get("idle_read_wait", 0),
                "idle_write_wait": d.get("idle_write_wait", 0),
                "mpu_no_read": d["cycles"] - d["r_cycles"] - d["vpu_no_read"] - d["idle_no_read"],
                "tiles": d["tiles"],
            }
        )
    dec = rows[1:]
    cyc = float(np.mean([r["cycles"] for r in dec]))
    nbytes = float(np.mean([r["bytes_read"] for r in dec]))
    eff = nbytes / (cyc * peak_bpc)
    # token i comes from position P - 1 + i, which attends over P + i positions: the decode
    # tokens' mean context
    ctx_i = round(float(np.mean([r["ctx"] for r in dec])))
    lay = layout_bytes(cfg, g, ctx_i, spec_formats(cfg, g, spec))

    def share(key):
        return float(np.sum([r[key] for r in dec]) / np.sum([r["cycles"] for r in dec]))

    # Cycles lost against the memory model: its link passes `beat_rate` of a beat per cycle
    # per channel (115/128 for the ideal model) in whole beats, and the channels move in step
    # (one tile a cycle), so even a stream at the full link rate has cycles with no R beat:
    # about r_cycles * (1 / beat_rate - 1) of them. The cycles with no R beat beyond those are
    # the loss (refresh gaps among them). The ideal cycles are the bytes at the model's
    # sustained rate (refresh included).
    sum_dec = {k: int(np.sum([r[k] for r in dec])) for k in dec[0] if isinstance(dec[0][k], int)}
    beat_rate = min(1.0, hbm["link_gbps"] * 1e9 / clock / beat)
    model_bpc = hbm["sustained_gbps"] * 1e9 / clock  # bytes per cycle over every channel
    calibrated_bpc = calibrated.sustained_gbps(g) * g.channels * 1e9 / clock
    ideal = sum_dec["bytes_read"] / model_bpc
    link_gaps = sum_dec["r_cycles"] * (1 / beat_rate - 1)
    lost = sum_dec["cycles"] - ideal
    n_mv = matvecs_per_position(cfg, g, spec_formats(cfg, g, spec))
    n = len(dec)
    loss = {
        "ideal_cycles_at_model_rate": ideal / n,
        "lost_cycles": lost / n,
        "vpu_busy_no_read": sum_dec["vpu_no_read"] / n,
        "mpu_busy_no_read_beyond_link_gaps": (sum_dec["mpu_no_read"] - link_gaps) / n,
        "nothing_busy_dma_read_in_flight": sum_dec["idle_read_wait"] / n,
        "nothing_busy_hbm_write_pending": sum_dec["idle_write_wait"] / n,
        "nothing_busy_controller_only": (
            sum_dec["idle_no_read"] - sum_dec["idle_read_wait"] - sum_dec["idle_write_wait"]
        )
        / n,
        "matvecs_per_token": n_mv,
    }
    if hbm.get("refresh_cycles"):
        # Under refresh the channels move out of step: a cycle with an R beat on some channel
        # may bring no tile, so the link-gap estimate above does not hold. The MPU's share is
        # then what the other parts leave of the lost cycles.
        others = sum(
            loss[k]
            for k in (
                "vpu_busy_no_read",
                "nothing_busy_dma_read_in_flight",
                "nothing_busy_hbm_write_pending",
                "nothing_busy_controller_only",
            )
        )
        loss["mpu_busy_no_read_beyond_link_gaps"] = loss["lost_cycles"] - others
        loss["mpu_share_by_difference"] = True
    loss["mpu_no_read_per_matvec"] = loss["mpu_busy_no_read_beyond_link_gaps"] / n_mv
    proj = {}
    for name in (base_name, "gpt2-medium"):
        pc = preset(name)
        if name == base_name and cfg.n_layer != pc.n_layer:
            continue
        proj[name] = project(pc, g, ctx_i, spec, nbytes / lay, cyc if name == cfg.name else None,
                             eff)  # fmt: skip
        if proj[name] is None:
            del proj[name]
    return {
        "model": cfg.name,
        "weights": spec,
        "geometry": g.name,
        "clock_mhz": g.clock_mhz,
        "ctx": ctx_i,
        "cycles_per_token": round(cyc),
        "bytes_per_token": round(nbytes),
        "layout_bytes_per_token": lay,
        "hbm_efficiency": eff,
        "of_model_sustained": nbytes / (cyc * model_bpc),
        "of_calibrated_achievable": nbytes / (cyc * calibrated_bpc),
        "calibrated_achievable_gbps": calibrated.sustained_gbps(g) * g.channels,
        "hbm": hbm,
        "peak_gbps": g.peak_gbps,
        "ms_per_token": cyc / clock * 1e3,
        "tokens_per_s": clock / cyc,
        "label": LABEL,
        "read_latency": hbm["read_latency"],
        # a raw record from before the option: the core had no stages
        "floorplan": _floorplan_name(raw.get("floorplan", "flat")),
        "n_layer": cfg.n_layer,
        "decode_tokens_measured": len(dec),
        "cycle_shares": {
            "hbm_data_moving": share("r_cycles"),
            "vpu_busy_no_read": share("vpu_no_read"),
            "mpu_busy_no_read": share("mpu_no_read"),
            "no_unit_busy_no_read": share("idle_no_read"),
            "of_which_dma_read_in_flight": share("idle_read_wait"),
            "of_which_hbm_write_pending": share("idle_write_wait"),
        },
        "start_pos": S,
        "kv_note": (
            f"positions 0..{S - 1} were not run: the core started at position {S} over an "
            "all-zero KV cache (cycles do not depend on the values)"
            if S
            else "every position run from 0"
        ),
        "per_token": rows,
        "lost_cycles_per_token": loss,
        "total_cycles": raw["cycles"],
        "projection": proj,
        "prompt": prompt,
        "tokens": raw["tokens"],
        "build": raw["build"],
        "counters": raw["counters"],
    }


def _floorplan_name(name: str) -> str:
    """A floorplan's name with its stage count."""
    from tandem.floorplan import floorplan

    plan = floorplan(name)
    return (
        f"{plan.name} ({plan.stages_per_boundary} stages per SLR boundary)"
        if not plan.flat
        else f"{plan.name} (no stages)"
    )


def format_report(r: dict) -> str:
    g = r["geometry"]
    weights = r.get("weights", {}).get("label", "FP16")
    lines = [
        f"Decode core cycles: {r['model']} ({weights} weights) on {g} ({r['clock_mhz']:.0f} "
        f"MHz), RTL in Verilator over the simulated HBM, floorplan "
        f"{r.get('floorplan', 'flat (before floorplanning)')}",
        f"HBM model: {describe_hbm(r['hbm'])}",
        f"{r['kv_note']}",
        f"prompt {len(r['prompt'])} tokens, {len(r['tokens'])} generated: {r['tokens']}; "
        f"{r['total_cycles']:,} cycles start to done",
        "",
        f"| token | positions | cycles | MB read | % of {r['peak_gbps']:.0f} GB/s | data moving "
        "| VPU, no read "
        "| MPU, no read | nothing busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in r["per_token"]:
        c = t["cycles"]
        lines.append(
            f"| {t['token']} | {t['positions']} | {c:,} | {t['bytes_read'] / 1e6:,.2f} | "
            f"{t['hbm_efficiency']:.1%} | {t['r_cycles'] / c:.1%} | {t['vpu_no_read'] / c:.1%} | "
            f"{t['mpu_no_read'] / c:.1%} | {t['idle_no_read'] / c:.1%} |"
        )
    lines += [
        "",
        f"(token 0 includes the program fetch and the {len(r['prompt']) - r['start_pos']} "
        "prompt positions run)",
        "",
        f"| quantity ({LABEL}) | value |",
        "|---|---:|",
        f"| cycles per decode token (mean of {r['decode_tokens_measured']}, ctx ~{r['ctx']}) | "
        f"{r['cycles_per_token']:,} |",
        f"| HBM bytes read per token (counted R beats) | {r['bytes_per_token']:,} |",
        f"| bytes per token by the layout (weights + KV) | {r['layout_bytes_per_token']:,} |",
        f"| achieved bandwidth, % of {r['peak_gbps']:.0f} GB/s | {r['hbm_efficiency']:.1%} |",
        f"| % of the calibrated achievable {r['calibrated_achievable_gbps']:.0f} GB/s "
        f"(sim/hbm_model.py CALIBRATED) | {r['of_calibrated_achievable']:.1%} |",
        f"| % of this model's sustained {r['hbm']['sustained_gbps']:.0f} GB/s | "
        f"{r['of_model_sustained']:.1%} |",
    ]
    for name, p in r["projection"].items():
        lines.append(
            f"| {name} {p.get('weights', 'FP16')}: ms per token ({p['cycles_per_token']:,} "
            f"cycles, {p['bytes_per_token'] / 1e6:,.1f} MB read, layout "
            f"{p['layout_bytes_per_token'] / 1e6:,.1f} MB; {p['source']}) | "
            f"{p['ms_per_token']:.3f} |"
        )
        lines.append(f"| {name} {p.get('weights', 'FP16')}: tokens per s | "
                     f"{1e3 / p['ms_per_token']:,.0f} |")  # fmt: skip
    s = r["cycle_shares"]
    lines += [
        "",
        "Where the decode cycles go: "
        f"HBM data moving {s['hbm_data_moving']:.1%}, VPU busy with no data moving "
        f"{s['vpu_busy_no_read']:.1%}, MPU busy with no data moving {s['mpu_busy_no_read']:.1%}, "
        f"nothing busy and no data moving {s['no_unit_busy_no_read']:.1%} (of which a DMA read "
        f"in flight {s['of_which_dma_read_in_flight']:.1%}, an HBM write pending "
        f"{s['of_which_hbm_write_pending']:.1%}, the rest the controller alone)",
        "",
        _format_loss(r["lost_cycles_per_token"], r["cycles_per_token"]),
        f"build: {r['build']}",
    ]
    return "\n".join(lines)


def describe_hbm(h: dict) -> str:
    """One line of a memory model's record (HBMTiming.as_dict)."""
    lat = f"{h['read_latency']}"
    if h.get("read_jitter"):
        lat += f"-{h['read_latency'] + h['read_jitter']}"
    ref = (
        f"refresh {h['refresh_cycles']} of every {h['refresh_interval']} cycles"
        if h.get("refresh_cycles")
        else "no refresh"
    )
    return (
        f"{h['name']}: read latency {lat} cycles, link {h['link_gbps']:.2f} GB/s per channel, "
        f"{ref}; sustained {h['sustained_gbps_per_channel']:.2f} GB/s per channel, "
        f"{h['sustained_gbps']:.0f} GB/s in all"
    )


def _format_loss(lo: dict, cycles: int) -> str:
    parts = [
        ("VPU busy, no data moving", lo["vpu_busy_no_read"]),
        (
            (
                "MPU waiting for tiles, the channels out of step under refresh (the rest) "
                if lo.get("mpu_share_by_difference")
                else "MPU busy, no data moving beyond the link's own gaps "
            )
            + f"(~{lo['mpu_no_read_per_matvec']:.0f} per MATVEC x {lo['matvecs_per_token']})",
            lo["mpu_busy_no_read_beyond_link_gaps"],
        ),
        ("nothing busy, a DMA read in flight", lo["nothing_busy_dma_read_in_flight"]),
        ("nothing busy, an HBM write pending", lo["nothing_busy_hbm_write_pending"]),
        ("the controller alone", lo["nothing_busy_controller_only"]),
    ]
    lines = [
        f"Per decode token: {cycles:,} cycles = {lo['ideal_cycles_at_model_rate']:,.0f} at the "
        f"memory model's sustained rate for the bytes read + {lo['lost_cycles']:,.0f} lost "
        f"({lo['lost_cycles'] / cycles:.1%}):"
    ]
    lines += [f"  {name}: {v:,.0f} ({v / cycles:.1%})" for name, v in parts]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
