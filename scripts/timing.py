"""`make timing`: logic depth of the synthesized core, per block, against a LUT-level budget.

Reads the flat netlist that `make estimate` writes (``build/estimate/<geometry>/core/
netlist.json``: Yosys ``write_json`` after ``synth_xilinx -family xcup`` and a final
``flatten -scopename``) and walks it: every register-to-register path, counted in LUT levels.

What counts (see :data:`LUT_CELLS` and :func:`cell_model`):

- **LUT levels**: LUT1-6 and INV (Vivado makes an INV a LUT1) add one level each. MUXF7/8/9 add
  none: a wide mux is part of the LUT level before it (they are counted on the path, apart).
- **Carry**: CARRY4/CARRY8 cells add no LUT level; the carry bits a path runs through are
  counted apart, in CARRY8 cells (8 bits each; Yosys maps UltraScale+ adders to CARRY4, which
  Vivado retargets two to a CARRY8). Each output of a carry cell depends only on the inputs at
  its own and lower bit positions and on the carry in.
- **DSP48E2**: sequential where its parameters enable a register on the way (AREG/BREG/CREG/DREG/
  ADREG, MREG, PREG, and the control registers for OPMODE/ALUMODE/INMODE/CARRYIN), combinational
  otherwise; a combinational DSP on a path is counted apart (a multiply takes a large part of
  a 4 ns cycle on its own). The DSP *cascade* is the longest chain of DSPs on one path
  (through the fabric or the PCOUT/ACOUT/BCOUT cascade ports).
- **Start and end points**: flip-flops (FD*), block RAM (RAMB*), UltraRAM (URAM*) and
  registered DSPs, on every input but the clock; the core's ports (the platform's AXI
  interfaces; they enter in SLR0). Distributed RAM (RAM32M, RAM64M8, ...) and shift registers
  (SRL*) are written on the clock (their data and enable inputs end paths, their outputs start
  them), but their read address reaches the output through the LUT itself: one LUT level.

The **budget** (``--budget``, default :data:`BUDGET`): AMD's ``report_failfast``
(XilinxTclStore, ``designutils/report_failfast.tcl``) allows 0.300 ns per LUT plus its net on
an UltraScale+ -2 part, so a 4.0 ns (250 MHz) path may have int(4.0 / 0.300) = 13 LUT levels
before clock skew and uncertainty. The U55C's -2L part in its low-voltage mode has 0.391 ns
per level (10 levels). The budget is 10: three levels (0.9 ns) of margin on the -2 figure for
clock uncertainty, skew and the detours of routing around the HBM and the SLR crossings. A path
whose two ends are in different SLRs (by ``tandem/floorplan.py``) must be a register-to-register
hop: its budget is 0 LUT levels.

The depth of a Yosys netlist is not Vivado's: ``abc -luts`` maps for area as much as depth,
Vivado re-optimizes across block boundaries, and retiming is off. The numbers say where the
deep logic is and roughly how deep; a real timing report needs Vivado.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLOCK_NS = 4.0
NS_PER_LUT = 0.300
RAW_LEVELS = int(CLOCK_NS / NS_PER_LUT)
BUDGET = 10
"""LUT levels allowed on a register-to-register path inside one SLR (module docstring)."""
CROSSING_BUDGET = 0
"""LUT levels allowed on a path whose ends are in different SLRs: none."""

LUT_CELLS = frozenset({"LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "INV"})
MUXF_CELLS = frozenset({"MUXF7", "MUXF8", "MUXF9"})
CARRY_BITS = {"CARRY4": 4, "CARRY8": 8}
DSP_CELLS = frozenset({"DSP48E2", "DSP48E1"})
PASS_CELLS = frozenset({"BUFG", "BUFGCE", "IBUF", "OBUF", "BUF"})
IGNORED_CELLS = frozenset({"$scopeinfo"})
CLOCK_PINS = frozenset(
    {"C", "CLK", "WCLK", "CLKARDCLK", "CLKBWRCLK", "CLKA", "CLKB", "G", "GE", "CLKU", "CLKL"}
)
_DSP_REG_PARAMS = (
    "AREG",
    "BREG",
    "CREG",
    "DREG",
    "ADREG",
    "MREG",
    "PREG",
    "ACASCREG",
    "BCASCREG",
    "INMODEREG",
    "OPMODEREG",
    "ALUMODEREG",
    "CARRYINREG",
    "CARRYINSELREG",
)
_DSP_CASCADE_IN = ("ACIN", "BCIN", "PCIN", "CARRYCASCIN", "MULTSIGNIN")


def _is_seq(ctype: str) -> bool:
    return ctype.startswith(("FD", "LD", "RAMB", "URAM", "FIFO"))


def _is_lutram(ctype: str) -> bool:
    return ctype.startswith("RAM") and not ctype.startswith("RAMB")


def _is_srl(ctype: str) -> bool:
    return ctype.startswith("SRL")


def _read_addr_pin(pin: str) -> bool:
    """A distributed RAM's or SRL's address pin (read through the LUT, combinational)."""
    return pin.startswith(("ADDR", "DPRA")) or (pin[:1] == "A" and pin[1:].isdigit()) or pin == "A"


def _param_int(v) -> int:
    if isinstance(v, int):
        return v
    s = str(v).strip()
    if s and set(s) <= {"0", "1"}:
        return int(s, 2)
    try:
        return int(s)
    except ValueError:
        return 0


def dsp_registered(params: dict) -> bool:
    """Whether a DSP48E2's parameters enable any register between its inputs and P."""
    return any(_param_int(params.get(p, 0)) > 0 for p in _DSP_REG_PARAMS)


# ---- the netlist ----------------------------------------------------------------------------


@dataclass
class Netlist:
    """A flat module of a Yosys JSON netlist, reduced to what the walk needs."""

    name: str
    cells: dict[str, dict]
    ports: dict[str, dict]
    netnames: dict[str, dict]


def load(source, top: str | None = None) -> Netlist:
    """The top module of a Yosys JSON netlist (a path or the parsed dict). With several
    non-blackbox modules, ``top`` or the one with the ``top`` attribute is taken; the module
    must be flat (no cell of a type that is another module of the file)."""
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    mods = {
        k: v
        for k, v in data["modules"].items()
        if not _param_int(v.get("attributes", {}).get("blackbox", 0))
    }
    if top is None:
        tops = [k for k, v in mods.items() if _param_int(v.get("attributes", {}).get("top", 0))]
        if len(tops) == 1:
            top = tops[0]
        elif len(mods) == 1:
            top = next(iter(mods))
        else:
            raise ValueError(f"netlist has modules {sorted(mods)}; name the top one")
    m = mods[top]
    sub = sorted({c["type"] for c in m["cells"].values() if c["type"] in mods})
    if sub:
        raise ValueError(f"module {top} is not flat: it instantiates {sub}; run `flatten` first")
    return Netlist(top, m["cells"], m.get("ports", {}), m.get("netnames", {}))


def location(name: str, attributes: dict, blocks=None) -> str:
    """Where a flattened cell came from, as an instance path under the top: the first level
    (a block of ``blocks``), or the first two levels for other instances (``xing_tiles/stage0``:
    each stage of a relay, delay or reset chain has its own place). From the cell's
    ``scopename`` (private names, ``flatten -scopename``) or ``hdlname`` (public names, whose
    last part is the cell itself); ``core`` for the top level's own glue."""
    scope = None
    v = attributes.get("scopename")
    if v:
        scope = str(v).split(" ")
    else:
        v = attributes.get("hdlname")
        if v:
            scope = str(v).split(" ")[:-1]
    if scope is None and name.startswith("$flatten\\"):
        scope = name[len("$flatten\\") :].split(".")[:1]
    if not scope:
        return "core"
    if blocks is None or scope[0] in blocks:
        return scope[0]
    return "/".join(scope[:2])


def group(loc: str) -> str:
    """The table row of a location: its first level (a block, or a relay/delay instance)."""
    return loc.split("/")[0]


# ---- the model of each cell -----------------------------------------------------------------


@dataclass
class Arc:
    """Outputs that depend combinationally on inputs, with what the cell adds to a path."""

    outs: list
    ins: list
    lut: int = 0
    carry_bits: int = 0
    muxf: int = 0
    dsp: int = 0


@dataclass
class CellModel:
    starts: list  # output bits that start paths (registered)
    ends: list  # (pin, bit) inputs that end paths
    arcs: list  # Arc


def _bits(conn: dict, pin: str) -> list:
    return [b for b in conn.get(pin, []) if isinstance(b, int)]


def cell_model(ctype: str, cell: dict) -> CellModel | None:
    """How a cell takes part in timing paths; None for cells with no timing (``$scopeinfo``).
    Raises on a cell type it does not know, so nothing is silently left out."""
    conn = cell.get("connections", {})
    dirs = cell.get("port_directions", {})
    ins = [p for p, d in dirs.items() if d == "input"]
    outs = [p for p, d in dirs.items() if d == "output"]
    out_bits = [b for p in outs for b in _bits(conn, p)]
    if ctype in IGNORED_CELLS:
        return None
    if ctype in LUT_CELLS:
        return CellModel([], [], [Arc(out_bits, [b for p in ins for b in _bits(conn, p)], lut=1)])
    if ctype in MUXF_CELLS:
        return CellModel([], [], [Arc(out_bits, [b for p in ins for b in _bits(conn, p)], muxf=1)])
    if ctype in PASS_CELLS:
        return CellModel([], [], [Arc(out_bits, [b for p in ins for b in _bits(conn, p)])])
    if ctype in CARRY_BITS:
        width = CARRY_BITS[ctype]
        common = _bits(conn, "CI") + _bits(conn, "CYINIT") + _bits(conn, "CI_TOP")
        s, di = conn.get("S", []), conn.get("DI", [])
        o, co = conn.get("O", []), conn.get("CO", [])
        arcs = []
        for i in range(width):
            lower = [b for b in s[: i + 1] + di[: i + 1] if isinstance(b, int)]
            ob = [b for b in (o[i : i + 1] + co[i : i + 1]) if isinstance(b, int)]
            if ob:
                arcs.append(Arc(ob, common + lower, carry_bits=width))
        return CellModel([], [], arcs)
    if ctype in DSP_CELLS:
        data_ins = [(p, b) for p in ins if p not in CLOCK_PINS for b in _bits(conn, p)]
        if dsp_registered(cell.get("parameters", {})):
            return CellModel(out_bits, data_ins, [])
        return CellModel([], [], [Arc(out_bits, [b for _, b in data_ins], dsp=1)])
    if _is_lutram(ctype) or _is_srl(ctype):
        addr = [b for p in ins if _read_addr_pin(p) for b in _bits(conn, p)]
        ends = [(p, b) for p in ins if p not in CLOCK_PINS for b in _bits(conn, p)]
        return CellModel(out_bits, ends, [Arc(out_bits, addr, lut=1)] if addr else [])
    if _is_seq(ctype):
        ends = [(p, b) for p in ins if p not in CLOCK_PINS for b in _bits(conn, p)]
        return CellModel(out_bits, ends, [])
    raise ValueError(f"cell type {ctype!r} has no timing model; extend timing.cell_model()")


# ---- the walk -------------------------------------------------------------------------------

# An arrival: (lut levels, dsps, carry bits, muxf, predecessor bit or None at a start point).
_Z = (0, 0, 0, 0, None)


def _better(a: tuple, b: tuple) -> bool:
    return a[:3] > b[:3]


@dataclass
class TimingPath:
    lut: int
    dsp: int
    carry_bits: int
    muxf: int
    start: str
    end: str
    start_block: str
    end_block: str

    @property
    def carry8(self) -> int:
        return math.ceil(self.carry_bits / 8)

    def as_dict(self) -> dict:
        return {
            "lut_levels": self.lut,
            "dsp": self.dsp,
            "carry8": self.carry8,
            "carry_bits": self.carry_bits,
            "muxf": self.muxf,
            "start": self.start,
            "end": self.end,
            "start_block": self.start_block,
            "end_block": self.end_block,
        }


def _names(net: Netlist, wanted: set[int]) -> dict[int, list[tuple[int, str]]]:
    """Every name of the ``wanted`` net bits, as (hidden, label)."""
    out: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for name, n in net.netnames.items():
        bits = n.get("bits", [])
        hidden = int(n.get("hide_name", 0))
        for i, b in enumerate(bits):
            if b in wanted:
                out[b].append((hidden, name if len(bits) == 1 else f"{name}[{i}]"))
    return out


def _pick(names: list[tuple[int, str]], block: str) -> str | None:
    """The most readable name: public, inside ``block`` (flattened names start with it), with
    the fewest Yosys/Amaranth ``$`` names, shortest."""
    if not names:
        return None

    def rank(item):
        hidden, label = item
        inside = label.startswith(f"{block}.") or label.startswith(f"$flatten\\{block}.")
        return (hidden, not inside, label.count("$"), len(label))

    return min(names, key=rank)[1]


def analyze(
    net: Netlist,
    *,
    blocks=None,
    slr_of: Callable[[str], int | None] | dict | None = None,
    port_slr: int = 0,
    budget: int = BUDGET,
    progress: Callable[[str], None] | None = None,
    pairs: bool = False,
) -> dict:
    """Longest register-to-register paths of a flat netlist, per place.

    A cell's place is its :func:`location` (``blocks``: the instance names that are one place
    however deep); ``slr_of`` gives a place's SLR (a dict or a function; None: unplaced), the
    core's ports are in ``port_slr``. Returns a dict:

    - ``blocks``: per :func:`group` (a block, or a relay or delay instance): the worst path
      ending there (``worst``), the worst that starts there too (``internal``), the longest
      carry chain in CARRY8 cells, the most DSPs on one path, its SLRs;
    - ``locations``: the same per place;
    - ``core``: the worst path of all;
    - ``crossings``: per pair of places in different SLRs, the worst path between them;
    - ``over_budget``: per end register (bits of one name together) every path over the
      budget (``budget``; a crossing's is :data:`CROSSING_BUDGET`), worst first;
    - with ``pairs``: ``pairs``, the worst path between every two places that have one, keyed
      ``"<start place> -> <end place>"`` (a unit alone: ``core -> core`` is register to
      register, ``port -> core`` from its inputs, ``core -> port`` to its outputs).
    """
    if slr_of is None:
        slr_map: dict = {}
        slr_of = slr_map.get
    elif isinstance(slr_of, dict):
        slr_of = dict(slr_of).get
    t0 = time.monotonic()

    def say(msg):
        if progress:
            progress(f"{msg} ({time.monotonic() - t0:.0f} s)")

    def place_slr(loc: str) -> int | None:
        return port_slr if loc == "port" else slr_of(loc)

    driver: dict[int, int] = {}  # bit -> arc index
    arcs: list[Arc] = []
    arc_block: list[str] = []
    start_of: dict[int, tuple[str, str]] = {}  # bit -> (block, cell name)
    ends: list[tuple[int, str, str]] = []  # (bit, block, cell name)
    cell_block: dict[str, str] = {}
    carries: list[tuple[str, dict]] = []
    dsp_cells: list[tuple[str, dict]] = []
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for cname, cell in net.cells.items():
        ctype = cell["type"].lstrip("\\")
        model = cell_model(ctype, cell)
        if model is None:
            continue
        blk = location(cname, cell.get("attributes", {}), blocks)
        cell_block[cname] = blk
        counts[blk][ctype] += 1
        for b in model.starts:
            start_of[b] = (blk, cname)
        ends.extend((b, blk, cname) for _, b in model.ends)
        for a in model.arcs:
            idx = len(arcs)
            arcs.append(a)
            arc_block.append(blk)
            for b in a.outs:
                if b in driver:
                    raise ValueError(f"net bit {b} has two drivers (cell {cname})")
                driver[b] = idx
        if ctype in CARRY_BITS:
            carries.append((cname, cell))
        if ctype in DSP_CELLS:
            dsp_cells.append((cname, cell))
    for pname, p in net.ports.items():
        bits = [b for b in p.get("bits", []) if isinstance(b, int)]
        if p.get("direction") == "input":
            for b in bits:
                if b not in driver and b not in start_of:
                    start_of[b] = ("port", f"port {pname}")
        elif p.get("direction") == "output":
            ends.extend((b, "port", f"port {pname}") for b in bits)
    say(f"timing: {len(net.cells)} cells, {len(arcs)} combinational arcs")

    # Topological order of the arcs (Kahn); an arc waits for the arcs that drive its inputs.
    users: list[list[int]] = [[] for _ in arcs]
    pending = [0] * len(arcs)
    for i, a in enumerate(arcs):
        deps = {driver[b] for b in a.ins if b in driver}
        pending[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = deque(i for i, n in enumerate(pending) if n == 0)
    # arrival per arc: start block -> (lut, dsp, carry, muxf, pred bit)
    arrival: list[dict | None] = [None] * len(arcs)
    start_arr = {b: {blk: _Z} for b, (blk, _) in start_of.items()}
    empty: dict = {}

    def arr_of(bit):
        i = driver.get(bit)
        if i is not None:
            return arrival[i]
        return start_arr.get(bit, empty)

    done = 0
    while ready:
        i = ready.popleft()
        a = arcs[i]
        acc: dict = {}
        for b in a.ins:
            for k, v in arr_of(b).items():
                cand = (v[0] + a.lut, v[1] + a.dsp, v[2] + a.carry_bits, v[3] + a.muxf, b)
                old = acc.get(k)
                if old is None or _better(cand, old):
                    acc[k] = cand
        # an output that is also a start point (distributed RAM, SRL): the stored value
        for b in a.outs:
            if b in start_of:
                k = start_of[b][0]
                if k not in acc:
                    acc[k] = _Z
        arrival[i] = acc
        done += 1
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if done != len(arcs):
        stuck = [i for i, n in enumerate(pending) if n]
        raise ValueError(
            f"combinational loop: {len(stuck)} arcs never became ready "
            f"(e.g. in block {arc_block[stuck[0]]})"
        )
    say("timing: arrivals done")

    def trace(bit: int, key: str) -> tuple[int, str]:
        """The start bit of the worst path from start block ``key`` to ``bit``."""
        seen = 0
        while True:
            v = arr_of(bit).get(key)
            if v is None or v[4] is None:
                return bit
            bit = v[4]
            seen += 1
            if seen > 10_000_000:
                raise RuntimeError("path trace does not end")

    # Worst per (end block, start block), keeping the end bit.
    worst: dict[tuple[str, str], tuple[tuple, int, str]] = {}
    for bit, blk, cname in ends:
        for k, v in arr_of(bit).items():
            old = worst.get((blk, k))
            if old is None or _better(v, old[0]):
                worst[(blk, k)] = (v, bit, cname)
    say("timing: end points done")

    to_name: list[tuple[TimingPath, int, int]] = []
    dicts: list[tuple[dict, TimingPath]] = []

    def path_dict(key, entry=None) -> dict:
        p = make_path(key, entry)
        d = p.as_dict()
        dicts.append((d, p))
        return d

    def make_path(key, entry=None) -> TimingPath:
        """The path of ``entry`` (default ``worst[key]``: arrival, end bit, end cell), its
        start traced back; named once all paths are chosen."""
        v, bit, cname = entry or worst[key]
        end_blk, start_blk = key
        s = trace(bit, start_blk)
        start_cell = start_of.get(s, (start_blk, "?"))[1]
        p = TimingPath(
            lut=v[0],
            dsp=v[1],
            carry_bits=v[2],
            muxf=v[3],
            start=start_cell,
            end=cname,
            start_block=start_blk,
            end_block=end_blk,
        )
        # the register an end point writes is named by its output where it has one
        out_bit = _out_bit(net, cname)
        to_name.append((p, s, bit if out_bit is None else out_bit))
        return p

    carry_chain = _carry_chains(carries, cell_block)
    dsp_cascade = _dsp_cascades(dsp_cells, cell_block, arrival, driver, start_of)
    places = sorted(set(cell_block.values()) | {k[0] for k in worst})

    def summary(locs: list[str]) -> dict:
        keys = [k for k in worst if k[0] in locs]
        slrs = sorted({s for s in map(place_slr, locs) if s is not None})
        entry = {
            "slr": slrs,
            "carry8_chain": math.ceil(max((carry_chain.get(x, 0) for x in locs), default=0) / 8),
            "carry_chain_bits": max((carry_chain.get(x, 0) for x in locs), default=0),
            "dsp_cascade": max((dsp_cascade.get(x, 0) for x in locs), default=0),
        }
        if keys:
            entry["worst"] = path_dict(max(keys, key=lambda k: worst[k][0][:3]))
            inside = [k for k in keys if k[1] in locs]
            if inside:
                entry["internal"] = path_dict(max(inside, key=lambda k: worst[k][0][:3]))
        return entry

    out_locs = {x: summary([x]) for x in places}
    for x in places:
        out_locs[x]["cells"] = dict(sorted(counts[x].items())) if x in counts else {}
    grouped: dict[str, list[str]] = defaultdict(list)
    for x in places:
        grouped[group(x)].append(x)
    out_blocks = {g: summary(locs) for g, locs in sorted(grouped.items())}
    core_key = max(worst, key=lambda k: worst[k][0][:3]) if worst else None
    core = path_dict(core_key) if core_key else None
    # paths between places in different SLRs
    crossings = []
    for end_loc, start_loc in worst:
        s_slr, e_slr = place_slr(start_loc), place_slr(end_loc)
        if s_slr is None or e_slr is None or s_slr == e_slr:
            continue
        p = path_dict((end_loc, start_loc))
        p["start_slr"], p["end_slr"] = s_slr, e_slr
        crossings.append(p)
    crossings.sort(key=lambda p: (-p["lut_levels"], p["start_block"], p["end_block"]))
    between = (
        {f"{k[1]} -> {k[0]}": path_dict(k) for k in sorted(worst, key=lambda k: (k[1], k[0]))}
        if pairs
        else None
    )
    # every end point over its budget, by end register
    over_bits = []
    for bit, loc, cname in ends:
        e_slr = place_slr(loc)
        for k, v in arr_of(bit).items():
            s_slr = place_slr(k)
            crossing = s_slr is not None and e_slr is not None and s_slr != e_slr
            limit = CROSSING_BUDGET if crossing else budget
            if v[0] > limit:
                over_bits.append((v, bit, loc, cname, k, limit, crossing))
    say(f"timing: {len(over_bits)} end point bits over budget")
    out_bit_of = {c: _out_bit(net, c) for _, _, _, c, _, _, _ in over_bits}
    over_names = _names(
        net, {b for b in out_bit_of.values() if b is not None} | {o[1] for o in over_bits}
    )
    by_reg: dict[tuple, list] = {}
    for o in over_bits:
        v, bit, loc, cname, k, limit, crossing = o
        ob = out_bit_of[cname]
        reg = _pick(over_names.get(ob if ob is not None else bit, []), loc) or cname
        base = re.sub(r"\[\d+\]$", "", reg)
        key = (loc, base, k, crossing)
        cur = by_reg.get(key)
        if cur is None:
            by_reg[key] = [o, 1]
        else:
            cur[1] += 1
            if _better(v, cur[0][0]):
                cur[0] = o
    over = []
    for (loc, base, k, crossing), (o, nbits) in by_reg.items():
        v, bit, _, cname, _, limit, _ = o
        d = path_dict((loc, k), (v, bit, cname))
        d.update(
            budget=limit,
            bits=nbits,
            register=base,
            why="SLR crossing with logic (not register to register)"
            if crossing
            else "LUT levels over the budget",
        )
        over.append(d)
    over.sort(key=lambda d: (-d["lut_levels"], d["end_block"], d["register"]))
    names = _names(net, {b for _, s, e in to_name for b in (s, e)})
    for p, s, e in to_name:
        p.start = _pick(names.get(s, []), p.start_block) or p.start
        p.end = _pick(names.get(e, []), p.end_block) or p.end
    for d, p in dicts:
        d.update(start=p.start, end=p.end)
    say("timing: done")
    out = {
        "budget": budget,
        "crossing_budget": CROSSING_BUDGET,
        "cells": len(net.cells),
        "arcs": len(arcs),
        "end_points": len(ends),
        "blocks": out_blocks,
        "locations": out_locs,
        "core": core,
        "crossings": crossings,
        "over_budget": over,
    }
    if between is not None:
        out["pairs"] = between
    return out


def _out_bit(net: Netlist, cname: str) -> int | None:
    """The first output bit of an end point's cell (a register's Q), None for a port."""
    cell = net.cells.get(cname)
    if cell is None:
        return None
    conn = cell.get("connections", {})
    for pin, d in cell.get("port_directions", {}).items():
        if d == "output":
            bits = [b for b in conn.get(pin, []) if isinstance(b, int)]
            if bits:
                return bits[0]
    return None


def _carry_chains(carries: Iterable[tuple[str, dict]], cell_block: dict) -> dict[str, int]:
    """Longest chain of carry cells (CO of the top bit into the next cell's CI), in bits, per
    block of the chain's last cell."""
    top_co: dict[int, str] = {}
    info = {}
    for cname, cell in carries:
        ctype = cell["type"].lstrip("\\")
        width = CARRY_BITS[ctype]
        co = cell["connections"].get("CO", [])
        if len(co) >= width and isinstance(co[width - 1], int):
            top_co[co[width - 1]] = cname
        ci = [b for b in cell["connections"].get("CI", []) if isinstance(b, int)]
        info[cname] = (width, ci[0] if ci else None)
    length: dict[str, int] = {}

    def chain(c: str) -> int:
        stack = [c]
        while stack:
            x = stack[-1]
            w, ci = info[x]
            prev = top_co.get(ci) if ci is not None else None
            if prev is None or prev in length:
                length[x] = w + (length[prev] if prev is not None else 0)
                stack.pop()
            elif prev in stack:
                raise ValueError(f"carry loop at {prev}")
            else:
                stack.append(prev)
        return length[c]

    out: dict[str, int] = {}
    for cname in info:
        blk = cell_block[cname]
        out[blk] = max(out.get(blk, 0), chain(cname))
    return out


def _dsp_cascades(dsp_cells, cell_block, arrival, driver, start_of) -> dict[str, int]:
    """Longest run of DSPs on one path, per block: combinational DSPs in series (the arrival's
    DSP count) plus the cascade ports (``*COUT`` -> ``*CIN``) between any DSPs."""
    names = {c for c, _ in dsp_cells}
    out_to_cell: dict[int, str] = {}
    for cname, cell in dsp_cells:
        for pin in ("ACOUT", "BCOUT", "PCOUT", "CARRYCASCOUT", "MULTSIGNOUT"):
            for b in cell["connections"].get(pin, []):
                if isinstance(b, int):
                    out_to_cell[b] = cname
    prev_of: dict[str, str] = {}
    for cname, cell in dsp_cells:
        for pin in _DSP_CASCADE_IN:
            for b in cell["connections"].get(pin, []):
                if isinstance(b, int) and b in out_to_cell:
                    prev_of[cname] = out_to_cell[b]
    depth: dict[str, int] = {}
    for cname in names:
        n, x, seen = 1, cname, {cname}
        while x in prev_of and prev_of[x] not in seen:
            x = prev_of[x]
            seen.add(x)
            n += 1
        depth[cname] = n
    out: dict[str, int] = {}
    for cname, cell in dsp_cells:
        blk = cell_block[cname]
        comb = 0
        p = [b for b in cell["connections"].get("P", []) if isinstance(b, int)]
        if p and p[0] in driver:
            a = arrival[driver[p[0]]]
            comb = max((v[1] for v in a.values()), default=0) if a else 0
        out[blk] = max(out.get(blk, 0), depth[cname], comb)
    return out


# ---- report ---------------------------------------------------------------------------------


def _slrs(e: dict) -> str:
    return ",".join(str(s) for s in e.get("slr", [])) or "-"


def table(result: dict, order=()) -> str:
    """The per-block table: the worst path ending in each block (or relay/delay instance)."""
    budget = result["budget"]
    head = (
        f"{'block':26}{'SLR':>6}{'LUT lv':>8}{'DSP':>5}{'carry8':>8}{'chain8':>8}{'cascade':>8}"
        f"  {'verdict':8}worst path: [start place] start -> end"
    )
    rule = "-" * 130
    lines = [head, rule]
    rank = {b: i for i, b in enumerate(order)}
    rows = sorted(result["blocks"].items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    for blk, e in rows:
        w = e.get("worst")
        s = _slrs(e)
        if w is None:
            lines.append(
                f"{blk:26}{s:>6}{'-':>8}{'':>5}{'':>8}{e['carry8_chain']:>8}{e['dsp_cascade']:>8}"
            )
            continue
        verdict = "OVER" if w["lut_levels"] > budget else "ok"
        lines.append(
            f"{blk:26}{s:>6}{w['lut_levels']:>8}{w['dsp']:>5}{w['carry8']:>8}"
            f"{e['carry8_chain']:>8}{e['dsp_cascade']:>8}  {verdict:8}"
            f"[{w['start_block']}] {w['start']} -> {w['end']}"
        )
    c = result.get("core")
    if c:
        lines.append(rule)
        verdict = "OVER" if c["lut_levels"] > budget else "ok"
        lines.append(
            f"{'whole core':26}{'':>6}{c['lut_levels']:>8}{c['dsp']:>5}{c['carry8']:>8}"
            f"{'':>8}{'':>8}  {verdict:8}[{c['start_block']}] {c['start']} -> "
            f"[{c['end_block']}] {c['end']}"
        )
    return "\n".join(lines)


def crossing_lines(result: dict) -> list[str]:
    """The paths between SLRs that are not register to register."""
    out = []
    for p in result["crossings"]:
        if p["lut_levels"] <= result["crossing_budget"]:
            continue
        out.append(
            f"  {p['start_block']} (SLR{p['start_slr']}) -> {p['end_block']} (SLR{p['end_slr']}): "
            f"{p['lut_levels']} LUT levels, {p['dsp']} DSP, {p['carry8']} CARRY8: "
            f"{p['start']} -> {p['end']}"
        )
    return out


def over_lines(result: dict, limit: int = 40) -> list[str]:
    """Registers with paths over budget, worst first (``limit`` lines)."""
    out = []
    for d in result["over_budget"][:limit]:
        tag = "crossing " if d["budget"] == result["crossing_budget"] else ""
        out.append(
            f"  {d['lut_levels']:>3} > {d['budget']} {tag}[{d['end_block']}] {d['register']} "
            f"({d['bits']} bit{'s' if d['bits'] != 1 else ''}) from [{d['start_block']}] "
            f"{d['start']} (DSP {d['dsp']}, CARRY8 {d['carry8']})"
        )
    rest = len(result["over_budget"]) - limit
    if rest > 0:
        out.append(f"  ... and {rest} more (build/timing.json lists them all)")
    return out


def default_netlist(geometry: str) -> Path:
    return ROOT / "build" / "estimate" / geometry / "core" / "netlist.json"


def _estimate():
    """scripts/estimate.py as a module (it synthesizes the core and knows its cache)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tandem_estimate", Path(__file__).with_name("estimate.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="u55c", help="whose `make estimate` netlist to read")
    ap.add_argument("--netlist", type=Path, help="a Yosys JSON netlist (default: the estimate's)")
    ap.add_argument("--floorplan", default="u55c", help="block -> SLR plan (tandem/floorplan.py)")
    ap.add_argument("--budget", type=int, default=BUDGET, help=f"LUT levels (default {BUDGET})")
    ap.add_argument("--list", type=int, default=40, help="over-budget registers to print")
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "timing.json")
    ap.add_argument(
        "--unit",
        action="append",
        metavar="NAME",
        help="time one unit synthesized alone (repeatable; an arith unit such as FP16Add, or "
        "RowMax, or 'VectorUnit(tiny)', the whole tiny VPU; `estimate.py --unit` names), "
        "synthesizing it first if needed; writes timing.json in its folder",
    )
    ap.add_argument(
        "--free-running",
        action="store_true",
        help="with --unit: the unit's output always ready (o.ready = 1), as the MPU and VPU "
        "run it (no stall enables; it maps a little differently)",
    )
    args = ap.parse_args(argv)

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.unit:
        return main_units(args.unit, budget=args.budget, limit=args.list, free=args.free_running)
    from tandem.floorplan import BLOCKS, floorplan

    plan = floorplan(args.floorplan)
    path = args.netlist
    if path is None:
        est = _estimate()
        from tandem.geometry import geometry

        geom = geometry(args.geometry)
        path = default_netlist(geom.name)
        if not path.is_file():
            print(
                f"timing: no netlist at {path}: synthesizing the core first (`make estimate`; "
                "u55c: about an hour)",
                flush=True,
            )
            est.run_core(geom, plan, out=ROOT / "build" / "estimate")
        else:
            key = est.core_key(geom, plan)
            meta = json.loads((path.parent / "result.json").read_text())
            if meta.get("key") != key:
                print(
                    f"timing: WARNING: the netlist is from commit {meta.get('commit', '?')} and "
                    "rtl/ or tandem/ changed since (or the floorplan differs): run `make "
                    "estimate` to refresh it",
                    flush=True,
                )
    if not path.is_file():
        raise SystemExit(f"timing: no netlist at {path}")
    t0 = time.monotonic()
    print(f"timing: reading {path} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    net = load(path)
    meta_path = path.parent / "result.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    placed = meta.get("placement")  # the placement of the RTL the netlist was made from
    if placed is None:
        from tandem.rtl.core import placement

        placed = dict(placement(plan))
    result = analyze(
        net,
        blocks=BLOCKS,
        slr_of=_slr_lookup(placed),
        budget=args.budget,
        progress=lambda m: print(m, flush=True),
    )
    result["netlist"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    result["synthesis"] = {
        k: meta.get(k) for k in ("geometry", "commit", "dirty", "date", "lut_mapping") if k in meta
    }
    result["floorplan"] = plan.name
    result["seconds"] = round(time.monotonic() - t0, 1)
    syn = result["synthesis"]
    dirty = " + local changes" if syn.get("dirty") else ""
    print()
    print(
        f"Logic depth, geometry {syn.get('geometry', args.geometry)}, netlist of commit "
        f"{syn.get('commit', '?')}{dirty} ({syn.get('lut_mapping', '?')}), floorplan {plan.name}"
    )
    print(
        f"Budget: {args.budget} LUT levels per register-to-register path (report_failfast: "
        f"{NS_PER_LUT} ns per LUT+net on -2, {RAW_LEVELS} levels at {CLOCK_NS} ns, less margin); "
        f"{CROSSING_BUDGET} on a path between SLRs"
    )
    print(
        "LUT lv, DSP, carry8: on the worst path ending in the block (DSP: combinational DSP48E2s "
        "on it); chain8: longest carry chain (CARRY8 cells); cascade: most DSPs on one path"
    )
    print(table(result, order=BLOCKS))
    cross = crossing_lines(result)
    n_cross = len(result["crossings"])
    print(
        f"Paths between SLRs: {n_cross} pairs of places, {len(cross)} not register to register"
        + (":" if cross else "")
    )
    for line in cross:
        print(line)
    n_over = len(result["over_budget"])
    if n_over:
        print(f"Registers over budget ({n_over}; per end register, worst path):")
        for line in over_lines(result, args.list):
            print(line)
    else:
        print("timing: every path within budget")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"timing: wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


_UNIT_PAIRS = (
    ("core -> core", "register to register"),
    ("port -> core", "input ports to registers"),
    ("core -> port", "registers to output ports"),
    ("port -> port", "input ports to output ports"),
)


def unit_lines(name: str, result: dict, resources: dict | None = None) -> list[str]:
    """The summary of one unit alone: its resources, and the worst path of each kind
    (register to register, from its inputs, to its outputs) against the budget."""
    out = [f"{name}:"]
    if resources is not None:
        out[0] += (
            f" {resources['LUT']:,.0f} LUT, {resources['FF']:,.0f} FF, "
            f"{resources['DSP']:,.0f} DSP, {resources['CARRY8']:,.1f} CARRY8"
        )
    pairs = result.get("pairs", {})
    for key, label in _UNIT_PAIRS:
        p = pairs.get(key)
        if p is None:
            continue
        verdict = "OVER" if p["lut_levels"] > result["budget"] else "ok"
        out.append(
            f"  {label:28}{p['lut_levels']:>3} LUT levels, CARRY8 {p['carry8']}, DSP {p['dsp']}"
            f"  {verdict:5}{p['start']} -> {p['end']}"
        )
    return out


def main_units(
    names: list[str], *, budget: int = BUDGET, limit: int = 40, free: bool = False
) -> int:
    """``--unit NAME``: each named unit synthesized alone (`estimate.py --unit`,
    cached) and walked: its worst register-to-register path, the worst from its input ports and
    to its output ports, and its registers over the budget. In a core, a unit's ports meet the
    registers and logic around it, so its paths from and to the ports add to those."""
    est = _estimate()
    worst = 0
    for wanted in names:
        name, factory = est.unit_factory(wanted)
        out = ROOT / "build" / "estimate"
        res = est.run_unit(name, factory, out=out, netlist=True, free=free)
        folder = est.unit_folder(out, name, free_running=free)
        net = load(folder / "netlist.json")
        result = analyze(net, budget=budget, pairs=True)
        result["unit"] = name
        result["free_running"] = free
        result["synthesis"] = {k: res.get(k) for k in ("commit", "dirty", "date")}
        resources = est.classify(res["design"])
        result["resources"] = {k: v for k, v in resources.items() if k != "other"}
        (folder / "timing.json").write_text(json.dumps(result, indent=1))
        label = f"{name} (output always ready)" if free else name
        for line in unit_lines(label, result, resources):
            print(line)
        internal = result["pairs"].get("core -> core")
        over = result["over_budget"]
        if over:
            print(f"  registers over budget ({len(over)}; from [a port] or [core], a register):")
            for d in over[:limit]:
                print(
                    f"    {d['lut_levels']:>3} > {d['budget']} {d['register']} "
                    f"({d['bits']} bits) from [{d['start_block']}] {d['start']} "
                    f"(CARRY8 {d['carry8']})"
                )
        if internal:
            worst = max(worst, internal["lut_levels"])
    print(
        f"timing: worst register-to-register path of the units: {worst} LUT levels "
        f"(budget {budget})"
    )
    return 0


def _slr_lookup(placed: dict[str, int]) -> Callable[[str], int | None]:
    """A place's SLR from ``tandem.rtl.core.placement`` (paths with ``/``): its own entry, else
    its first stage's (a relay's own counter is clocked with its first stage)."""

    def look(loc: str) -> int | None:
        if loc in placed:
            return placed[loc]
        return placed.get(f"{loc}/stage0")

    return look


if __name__ == "__main__":
    sys.exit(main())
