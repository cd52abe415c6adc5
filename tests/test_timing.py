"""scripts/timing.py: the logic-depth walk on hand-made netlists with known answers, and on a toy
design synthesized for real (pyosys) whose LUT levels and carry chain are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"tandem_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tm = _load("timing")


class Net:
    """A hand-made flat Yosys JSON netlist: cells by scope, bits numbered as they are made."""

    def __init__(self):
        self.cells = {}
        self.netnames = {}
        self.ports = {}
        self.next = 2

    def bit(self, name=None):
        b = self.next
        self.next += 1
        if name:
            self.netnames[name] = {"hide_name": 0, "bits": [b]}
        return b

    def cell(self, scope, ctype, ins: dict, outs: dict, params=None):
        name = f"$flatten\\{scope}.$c{len(self.cells)}" if scope else f"$c{len(self.cells)}"
        attrs = {"scopename": scope} if scope else {}
        conns = {p: (v if isinstance(v, list) else [v]) for p, v in {**ins, **outs}.items()}
        dirs = {**dict.fromkeys(ins, "input"), **dict.fromkeys(outs, "output")}
        self.cells[name] = {
            "type": ctype,
            "parameters": params or {},
            "attributes": attrs,
            "port_directions": dirs,
            "connections": conns,
        }
        return name

    def ff(self, scope, d, name):
        q = self.bit(name)
        self.cell(scope, "FDRE", {"C": 1, "CE": "1", "R": "0", "D": d}, {"Q": q})
        return q

    def lut(self, scope, *ins):
        o = self.bit()
        k = len(ins)
        self.cell(scope, f"LUT{k}", {f"I{i}": b for i, b in enumerate(ins)}, {"O": o})
        return o

    def json(self):
        return {
            "modules": {
                "top": {
                    "attributes": {"top": "00000000000000000000000000000001"},
                    "ports": self.ports,
                    "cells": self.cells,
                    "netnames": self.netnames,
                }
            }
        }


def _chain(net, scope, start, n):
    x = start
    for _ in range(n):
        x = net.lut(scope, x)
    return x


def test_lut_levels_pick_the_longest_path_and_name_its_ends():
    n = Net()
    a = n.ff("blk", n.bit(), "blk.a")
    # a -> 4 LUTs -> b, and a -> 1 LUT -> b: the longest counts
    deep = _chain(n, "blk", a, 4)
    shallow = n.lut("blk", a)
    d = n.lut("blk", deep, shallow)  # 5th level
    n.ff("blk", d, "blk.b")
    r = tm.analyze(tm.load(n.json()), budget=4)
    w = r["blocks"]["blk"]["worst"]
    assert w["lut_levels"] == 5
    assert w["start"] == "blk.a" and w["end"] == "blk.b"
    assert r["core"]["lut_levels"] == 5
    assert [o["register"] for o in r["over_budget"]] == ["blk.b"]
    assert tm.analyze(tm.load(n.json()), budget=5)["over_budget"] == []


def test_muxf_adds_no_level_and_carry_is_counted_apart():
    n = Net()
    a = n.ff("x", n.bit(), "x.a")
    l1 = n.lut("x", a)
    l2 = n.lut("x", a)
    m7 = n.bit()
    n.cell("x", "MUXF7", {"I0": l1, "I1": l2, "S": a}, {"O": m7})
    # a two-cell CARRY4 chain: S[0] of the first to O[3] of the second
    co1 = [n.bit() for _ in range(4)]
    o1 = [n.bit() for _ in range(4)]
    n.cell("x", "CARRY4", {"CI": "0", "CYINIT": "0", "S": [m7, "0", "0", "0"],
                          "DI": ["0"] * 4}, {"CO": co1, "O": o1})  # fmt: skip
    co2 = [n.bit() for _ in range(4)]
    o2 = [n.bit() for _ in range(4)]
    n.cell("x", "CARRY4", {"CI": co1[3], "CYINIT": "0", "S": ["0"] * 4,
                          "DI": ["0"] * 4}, {"CO": co2, "O": o2})  # fmt: skip
    n.ff("x", o2[3], "x.sum")
    r = tm.analyze(tm.load(n.json()))
    w = r["blocks"]["x"]["worst"]
    assert w["lut_levels"] == 1 and w["muxf"] == 1
    assert w["carry_bits"] == 8 and w["carry8"] == 1
    assert r["blocks"]["x"]["carry_chain_bits"] == 8
    assert r["blocks"]["x"]["carry8_chain"] == 1


def test_carry_output_depends_only_on_lower_bits():
    """O[0] of a CARRY4 does not see S[3]: a deep LUT into S[3] is not on the path to O[0]."""
    n = Net()
    a = n.ff("x", n.bit(), "x.a")
    deep = _chain(n, "x", a, 6)
    o = [n.bit() for _ in range(4)]
    co = [n.bit() for _ in range(4)]
    n.cell("x", "CARRY4", {"CI": "0", "CYINIT": "0", "S": [a, "0", "0", deep],
                          "DI": ["0"] * 4}, {"CO": co, "O": o})  # fmt: skip
    n.ff("x", o[0], "x.low")
    n.ff("y", o[3], "y.high")
    r = tm.analyze(tm.load(n.json()))
    assert r["blocks"]["x"]["worst"]["lut_levels"] == 0
    assert r["blocks"]["y"]["worst"]["lut_levels"] == 6


def _dsp(n, scope, a, preg):
    p = [n.bit() for _ in range(2)]
    params = {"AREG": "0", "BREG": "0", "MREG": "0", "PREG": "1" if preg else "0"}
    n.cell(scope, "DSP48E2", {"CLK": 1, "A": [a], "B": [a]}, {"P": p}, params)
    return p


def test_a_dsp_is_sequential_only_with_a_register_enabled():
    n = Net()
    a = n.ff("m", n.bit(), "m.a")
    p = _dsp(n, "m", n.lut("m", a), preg=False)  # combinational: on the path
    p2 = _dsp(n, "m", n.lut("m", p[0]), preg=False)  # two in series: cascade 2
    n.ff("m", n.lut("m", p2[0]), "m.out")
    r = tm.analyze(tm.load(n.json()))
    w = r["blocks"]["m"]["worst"]
    assert (w["lut_levels"], w["dsp"]) == (3, 2) and w["start"] == "m.a"
    assert r["blocks"]["m"]["dsp_cascade"] == 2

    n = Net()
    a = n.ff("m", n.bit(), "m.a")
    p = _dsp(n, "m", n.lut("m", a), preg=True)  # PREG: the path ends and starts at the DSP
    n.ff("m", n.lut("m", n.lut("m", p[0])), "m.out")
    r = tm.analyze(tm.load(n.json()))
    assert r["blocks"]["m"]["worst"]["lut_levels"] == 2
    assert r["blocks"]["m"]["worst"]["dsp"] == 0


def test_distributed_ram_read_is_one_level_and_its_contents_start_paths():
    n = Net()
    a = n.ff("q", n.bit(), "q.addr")
    addr = n.lut("q", n.lut("q", a))  # 2 levels to the address
    do = n.bit("q.ram_out")
    n.cell("q", "RAM64M", {"WCLK": 1, "WE": "0", "DIA": "0", "ADDRA": [addr] + ["0"] * 5},
           {"DOA": do})  # fmt: skip
    n.ff("q", n.lut("q", do), "q.out")
    r = tm.analyze(tm.load(n.json()))
    assert r["blocks"]["q"]["worst"]["lut_levels"] == 4  # 2 + the RAM's read + 1
    assert r["blocks"]["q"]["worst"]["start"] == "q.addr"


def test_ports_start_and_end_paths():
    n = Net()
    i = n.bit("in_data")
    o = n.bit("out_data")
    n.ports = {
        "in_data": {"direction": "input", "bits": [i]},
        "out_data": {"direction": "output", "bits": [o]},
    }
    n.cells[n.cell(None, "LUT1", {"I0": i}, {"O": o})]["attributes"] = {}
    r = tm.analyze(tm.load(n.json()))
    assert r["blocks"]["port"]["worst"]["lut_levels"] == 1
    assert r["blocks"]["port"]["worst"]["start"] == "in_data"


def test_pairs_split_a_unit_alone_into_internal_input_and_output_paths():
    """A unit synthesized alone (`timing.py --unit`): its cells are one place, ``core``; the
    worst path from its input ports, between its registers and to its outputs come apart."""
    n = Net()
    i = n.bit("i")
    o = n.bit("o")
    n.ports = {"i": {"direction": "input", "bits": [i]}, "o": {"direction": "output", "bits": [o]}}
    a = n.ff(None, _chain(n, None, i, 2), "a")  # input -> 2 LUTs -> a
    b = n.ff(None, _chain(n, None, a, 3), "b")  # a -> 3 LUTs -> b
    n.cells[n.cell(None, "LUT1", {"I0": b}, {"O": o})]["attributes"] = {}  # b -> 1 LUT -> o
    r = tm.analyze(tm.load(n.json()), pairs=True)
    levels = {k: (p["lut_levels"], p["start"], p["end"]) for k, p in r["pairs"].items()}
    assert levels == {
        "port -> core": (2, "i", "a"),
        "core -> core": (3, "a", "b"),
        "core -> port": (1, "b", "o"),
    }
    assert "pairs" not in tm.analyze(tm.load(n.json()))
    lines = tm.unit_lines("toy", r)
    assert lines[1].split()[:5] == ["register", "to", "register", "3", "LUT"]


def test_unit_names_are_the_estimates_units():
    est = _load("estimate")
    name, factory = est.unit_factory("fp16add")
    assert name == "FP16Add" and callable(factory)
    with pytest.raises(ValueError, match="unknown unit 'FP16Div'; the units are FP16Add"):
        est.unit_factory("FP16Div")


def test_a_path_between_slrs_must_be_register_to_register():
    n = Net()
    a = n.ff("dma", n.bit(), "dma.r")
    s0 = n.ff("xing_t/stage0", a, "xing_t.stage0.q")  # a plain hop: fine
    s1 = n.ff("xing_t/stage1", n.lut("xing_t/stage1", s0), "xing_t.stage1.q")  # logic: not
    n.ff("mpu", s1, "mpu.w")
    slr = {"dma": 0, "xing_t/stage0": 0, "xing_t/stage1": 1, "mpu": 1}
    r = tm.analyze(tm.load(n.json()), blocks={"dma", "mpu"}, slr_of=slr)
    assert set(r["blocks"]) == {"dma", "xing_t", "mpu"}
    assert r["blocks"]["xing_t"]["slr"] == [0, 1]
    cross = [(p["start_block"], p["end_block"], p["lut_levels"]) for p in r["crossings"]]
    assert cross == [("xing_t/stage0", "xing_t/stage1", 1)]
    over = r["over_budget"]
    assert len(over) == 1 and over[0]["budget"] == 0 and "SLR" in over[0]["why"]
    assert over[0]["register"] == "xing_t.stage1.q"


def test_location_from_scopename_and_hdlname():
    blocks = {"mpu"}
    assert tm.location("$flatten\\mpu.$abc$1", {"scopename": "mpu"}, blocks) == "mpu"
    assert tm.location("x", {"scopename": "xing_tiles stage1"}, blocks) == "xing_tiles/stage1"
    assert tm.location("x", {"hdlname": "mpu lane0 acc"}, blocks) == "mpu"
    assert tm.location("x", {"hdlname": "xing_tiles n"}, blocks) == "xing_tiles"
    assert tm.location("$abc$3", {}, blocks) == "core"


def test_unknown_cells_and_loops_are_errors():
    n = Net()
    n.cell("x", "GTYE4_CHANNEL", {"I": n.bit()}, {"O": n.bit()})
    with pytest.raises(ValueError, match="GTYE4_CHANNEL"):
        tm.analyze(tm.load(n.json()))
    n = Net()
    b1, b2 = n.bit(), n.bit()
    n.cell("x", "LUT1", {"I0": b2}, {"O": b1})
    n.cell("x", "LUT1", {"I0": b1}, {"O": b2})
    with pytest.raises(ValueError, match="combinational loop"):
        tm.analyze(tm.load(n.json()))


def test_a_netlist_with_hierarchy_is_refused():
    n = Net()
    data = n.json()
    data["modules"]["sub"] = {"attributes": {}, "cells": {}, "ports": {}, "netnames": {}}
    data["modules"]["top"]["cells"]["u"] = {"type": "sub", "connections": {}}
    with pytest.raises(ValueError, match="not flat"):
        tm.load(data, top="top")


def test_real_synthesis_of_known_depths(tmp_path):
    """XOR of 36 registered bits is two LUT levels; of 216, three; a registered 32-bit add is
    one LUT level into a 32-bit carry chain (four CARRY8). Synthesized with pyosys and walked."""
    pytest.importorskip("pyosys")
    from amaranth import Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    est = _load("estimate")

    class Xor(wiring.Component):
        def __init__(self, n):
            self.n = n
            super().__init__({"i": In(n), "o": Out(1)})

        def elaborate(self, platform):
            m = Module()
            r = Signal(self.n)
            m.d.sync += [r.eq(self.i), self.o.eq(r.xor())]
            return m

    class Add(wiring.Component):
        def __init__(self):
            super().__init__({"a": In(32), "b": In(32), "s": Out(32)})

        def elaborate(self, platform):
            m = Module()
            ra, rb = Signal(32), Signal(32)
            m.d.sync += [ra.eq(self.a), rb.eq(self.b), self.s.eq(ra + rb)]
            return m

    class Top(wiring.Component):
        def __init__(self):
            super().__init__({"i": In(216 + 36 + 64), "o": Out(2 + 32)})

        def elaborate(self, platform):
            m = Module()
            m.submodules.x2 = x2 = Xor(36)
            m.submodules.x3 = x3 = Xor(216)
            m.submodules.add = add = Add()
            m.d.comb += [
                x3.i.eq(self.i[:216]),
                x2.i.eq(self.i[216:252]),
                add.a.eq(self.i[252:284]),
                add.b.eq(self.i[284:316]),
                self.o.eq(Cat(x2.o, x3.o, add.s)),
            ]
            return m

    from amaranth import Cat
    from amaranth.back import verilog

    text = verilog.convert(Top(), name="top", emit_src=False)
    keep = est.kept_modules(est.module_names(text), "top", {"x2", "x3", "add"})
    assert sorted(keep) == ["top.add", "top.x2", "top.x3"]
    res = est.synthesize(tmp_path, text, est.synth_script("top", keep=keep), key="k")
    inst, _ = est.per_instance(res["modules"], "top")
    assert inst["add"]["CARRY8"] == 4, inst
    r = tm.analyze(tm.load(tmp_path / "netlist.json"), blocks={"x2", "x3", "add"})
    levels = {b: e["internal"]["lut_levels"] for b, e in r["blocks"].items() if "internal" in e}
    assert levels == {"x2": 2, "x3": 3, "add": 1}
    assert r["blocks"]["add"]["carry_chain_bits"] == 32
    assert r["blocks"]["add"]["carry8_chain"] == 4
    assert r["blocks"]["x3"]["worst"]["end"].startswith("x3.")


@pytest.mark.long
@pytest.mark.parametrize(
    "unit",
    [
        "FP16Add",
        "FP16Mul",
        "AccToFP16",
        "BlockAlign",
        "RowMax",
        "FP16Table(exp)",
        "FP16Table(exp, ports=2)",
    ],
)
def test_arith_units_stay_well_within_the_logic_budget(unit, tmp_path):
    """Issue 14: each unit alone as the MPU and VPU run it (output always ready) has no
    register-to-register path over 7 LUT levels and none over 6 from its inputs (the budget is
    10; Yosys maps a unit inside a block a few levels deeper than alone). About 10-25 s each.
    A function table's block RAM output reaches ``o`` through a register only (its output
    ports are registers: no path to them)."""
    pytest.importorskip("pyosys")
    est = _load("estimate")
    name, factory = est.unit_factory(unit)
    est.run_unit(name, factory, out=tmp_path, netlist=True, free=True)
    net = tm.load(est.unit_folder(tmp_path, name, free_running=True) / "netlist.json")
    pairs = tm.analyze(net, pairs=True)["pairs"]
    assert pairs["core -> core"]["lut_levels"] <= 7, pairs["core -> core"]
    assert pairs["port -> core"]["lut_levels"] <= 6, pairs["port -> core"]
    if unit.startswith("FP16Table"):
        assert pairs["core -> port"]["lut_levels"] == 0, pairs["core -> port"]
        assert pairs["core -> core"]["start"].startswith("$techmap"), pairs["core -> core"]


@pytest.mark.long
def test_the_vector_unit_stays_within_the_logic_budget(tmp_path):
    """Issue 14: the whole tiny-geometry VPU synthesized alone (its command decode, input
    buffer, ring and issue, operand stages, units and table ROMs) has no register-to-register
    path over 7 LUT levels and none over 7 from its ports (``cmd`` from the command queue's
    output register, the VBUF's read data); ``cmd.ready`` is a register's output through at most
    one LUT. About 4 minutes of Yosys on a quiet machine (22 minutes at a load average of 7)."""
    pytest.importorskip("pyosys")
    est = _load("estimate")
    name, factory = est.unit_factory("VectorUnit(tiny)")
    est.run_unit(name, factory, out=tmp_path, netlist=True)
    net = tm.load(est.unit_folder(tmp_path, name) / "netlist.json")
    result = tm.analyze(net, pairs=True, budget=1)  # every end over 1 LUT level listed
    pairs = result["pairs"]
    assert pairs["core -> core"]["lut_levels"] <= 7, pairs["core -> core"]
    assert pairs["port -> core"]["lut_levels"] <= 7, pairs["port -> core"]
    assert "port -> port" not in pairs, pairs["port -> port"]  # no input reaches an output
    over = [d for d in result["over_budget"] if d["lut_levels"] > 7]
    assert not over, over[:5]
    assert [d["register"] for d in result["over_budget"] if d["end_block"] == "port"]
    assert "cmd__ready" not in {d["register"] for d in result["over_budget"]}
