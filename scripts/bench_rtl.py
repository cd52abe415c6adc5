"""`make bench-rtl`: decode-core cycles per token from RTL simulation (issue 4).

gpt2 (124M, ``tandem.checkpoint.random_weights``) compiled for the u55c geometry (32 channels x
512 bits, 16 lanes, 250 MHz) runs on the whole RTL core (rtl/core.py) in Verilator over the
simulated HBM (sim/hbm_model.py: the calibrated U55C model by default), through
:mod:`tandem.sim.rtljob`: a prompt of a few tokens, then a few decode tokens. The harness's
monitors give the cycle at which each output token was issued and the HBM beats read up to it,
so each decode token's cycles and bytes are measured, not computed.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def log(msg: str) -> None:
    print(f"[bench-rtl] {msg}", file=sys.stderr, flush=True)


def core_revision() -> str:
    """The commit the RTL came from, and whether rtl/ or tandem/ had uncommitted changes."""
    import subprocess

    def git(*args):
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "rtl", "tandem")
    return rev + (" + uncommitted changes in rtl/ or tandem/" if dirty else "")


def peak_child_gb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def layout_bytes(cfg, g, ctx: int) -> int:
    """What one generated token streams according to the layout: every MPU matrix and vector
    once, and the KV prefix of ``ctx`` positions (host/thesis.py's formula)."""
    from tandem.host.thesis import kv_read_bytes, streamed_bytes
    from tandem.layout import HBMLayout

    return streamed_bytes(HBMLayout(cfg, g)) + kv_read_bytes(cfg, g, ctx)


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cycles", type=int, default=50_000_000)
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument(
        "--record",
        action="store_true",
        help="also write the result with its provenance to the package data the cost model "
        "reads (host/data/bench-rtl.json) and to docs/bench-rtl.json",
    )
    ap.add_argument(
        "--reanalyse",
        action="store_true",
        help="no simulation: redo the table and JSON from the last run's raw record "
        "(<json>-raw.json)",
    )
    args = ap.parse_args(argv)
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


def measure(args, ap, timing) -> dict:
    """Compile, build (cached), run one job over the HBM model ``timing``; the raw record."""

    from tandem import layout as L
    from tandem.checkpoint import random_weights
    from tandem.compiler import compile_model
    from tandem.config import preset
    from tandem.geometry import geometry
    from tandem.sim import rtljob

    g = geometry(args.geometry)
    cfg = preset(args.model)
    if args.layers is not None and args.layers != cfg.n_layer:
        cfg = dataclasses.replace(cfg, n_layer=args.layers, name=f"{cfg.name}-{args.layers}L")
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (a decode token is the gap between two tokens)")
    t_all = time.monotonic()

    t0 = time.monotonic()
    log(f"{cfg.name}: random weights (seed {args.seed}) ...")
    weights = random_weights(cfg, seed=args.seed)
    log(f"compiling for {g.name} ...")
    c = compile_model(cfg, weights, g)
    del weights
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.n_vocab, args.start_pos + args.prompt_len).tolist()
    image = L.HBMImage(g, c.image.nbytes)
    image.data[:] = c.image.data
    c.write_prompt(image, prompt)
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
    )
    res.status.check()
    out_region = res.dumps[(c.layout["output"].base, c.layout["output"].nbytes)]
    mem_tokens = L.unpack_tokens(out_region[0, : 4 * res.status.tokens])
    if mem_tokens != res.tokens or len(res.tokens) != args.tokens:
        raise SystemExit(f"token mismatch: monitor {res.tokens}, memory {mem_tokens}")

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


def finish(raw: dict, args) -> int:
    report = analyse(raw, args)
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    if args.record:
        for path in record(report, raw["args"]):
            log(f"recorded {path}")
    return 0


def provenance(report: dict, run_args: dict) -> dict:
    """Where a recorded result came from: what was measured, the command, the RTL commit."""
    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in run_args.items()
        if k not in ("record", "reanalyse") and v is not None and v is not False
    )
    return {
        "what": f"decode-core cycles per token measured in RTL simulation: {report['model']} "
        f"(random weights) on the {report['geometry']} core in Verilator over the simulated HBM "
        f"({report['hbm']['name']} model: {report['read_latency']}-cycle read latency, "
        f"{report['hbm']['sustained_gbps']:.0f} GB/s sustained); times are {LABEL}, no FPGA ran",
        "command": f"python scripts/bench_rtl.py --record (make bench-rtl "
        f"BENCH_RTL_ARGS=--record): {flags}",
        "core_commit": report["build"].get("core", "unknown"),
        "recorded_in_commit": "the commit that adds this file",
        "used_by": "tandem.host.thesis.FpgaDecodeModel (tandem bench --thesis, tandem generate "
        "--placement auto)",
    }


def record(report: dict, run_args: dict, paths=(PACKAGED, DOC)) -> list[Path]:
    """Write the report with its provenance to the package data and its docs copy."""
    text = json.dumps({"provenance": provenance(report, run_args), **report}, indent=2) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(paths)


def matvecs_per_position(cfg, g) -> int:
    """MATVEC instructions the compiled program runs per generated token (the program has no
    loop inside a position; the prologue has none)."""
    from tandem.compiler import program
    from tandem.isa import Op

    return sum(i.op == Op.MATVEC for i in program(cfg, g))


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
    from tandem.layout import LayoutError
    from tandem.sim.hbm_model import hbm_timing

    g = geometry(raw["geometry"])
    hbm = hbm_record(raw, g)
    calibrated = hbm_timing("calibrated", g)
    cfg = preset(raw["args"]["model"])
    if raw["n_layer"] != cfg.n_layer:
        cfg = dataclasses.replace(cfg, n_layer=raw["n_layer"], name=raw["model"])
    prompt = raw["prompt"]
    base_name = raw["args"]["model"]

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
    lay = layout_bytes(cfg, g, ctx_i)

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
    n_mv = matvecs_per_position(cfg, g)
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
        try:
            lb = layout_bytes(pc, g, ctx_i)
        except LayoutError as err:  # e.g. gpt2-medium on a test geometry
            log(f"no projection for {name}: {err}")
            continue
        # bytes the core reads scale with the layout's (same read pattern per matrix)
        b = lb * (nbytes / lay)
        cycles = cyc if name == cfg.name else b / (eff * peak_bpc)
        proj[name] = {
            "layout_bytes_per_token": lb,
            "bytes_per_token": round(b),
            "cycles_per_token": round(cycles),
            "ms_per_token": cycles / clock * 1e3,
            "source": "measured in RTL simulation"
            if name == cfg.name
            else "projected from the measured HBM efficiency and its layout's bytes per token",
        }
    return {
        "model": cfg.name,
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
    lines = [
        f"Decode core cycles: {r['model']} on {g} ({r['clock_mhz']:.0f} MHz), RTL in Verilator "
        f"over the simulated HBM, floorplan {r.get('floorplan', 'flat (before floorplanning)')}",
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
            f"| {name}: ms per token ({p['cycles_per_token']:,} cycles, "
            f"{p['bytes_per_token'] / 1e6:,.1f} MB; {p['source']}) | {p['ms_per_token']:.3f} |"
        )
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
