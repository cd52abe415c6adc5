"""scripts/estimate.py: cell classes, the memory-init rewrite, per-block and per-SLR attribution,
and real pyosys runs on tiny designs (a multiplier, a two-block design, a failing script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "tandem_estimate", ROOT / "scripts" / "estimate.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


est = _load()


def test_classify_counts_each_cell_in_its_class():
    r = est.classify(
        {
            "LUT1": 2,
            "LUT6": 10,
            "INV": 3,
            "RAM32M16": 2,  # 8 LUTs each
            "SRLC32E": 4,
            "FDRE": 7,
            "FDCE": 1,
            "DSP48E2": 5,
            "RAMB36E2": 3,
            "RAMB18E2": 3,  # half a RAMB36 each
            "URAM288": 1,
            "CARRY4": 100,  # half a CARRY8 each; not LUTs
            "CARRY8": 1,
            "MUXF7": 50,
            "$scopeinfo": 9,
        }
    )
    assert r["LUT"] == 2 + 10 + 3 + 16 + 4
    assert r["FF"] == 8 and r["DSP"] == 5 and r["BRAM36"] == 4.5 and r["URAM"] == 1
    assert r["CARRY8"] == 51
    assert r["other"]["CARRY4"] == 100 and r["other"]["MUXF7"] == 50


def test_classify_refuses_unknown_cells():
    with pytest.raises(ValueError, match=r"\$_DFF_P_"):
        est.classify({"LUT2": 1, "$_DFF_P_": 3})


def test_readmemh_moves_word_by_word_initial_blocks_to_hex_files(tmp_path):
    text = (
        "module m;\n"
        "  reg [15:0] rom [2:0];\n"
        "  initial begin\n"
        "    rom[0] = 16'h0001;\n"
        "    rom[1] = 16'habcd;\n"
        "    rom[2] = 16'h0000;\n"
        "  end\n"
        "  reg [3:0] gap [3:0];\n"
        "  initial begin\n"  # not from 0 up: left as it is
        "    gap[1] = 4'h1;\n"
        "    gap[3] = 4'h2;\n"
        "  end\n"
        "endmodule\n"
    )
    out, n = est.readmemh(text, tmp_path)
    assert n == 1
    assert '  initial $readmemh("mem/0.hex", rom);\n' in out
    assert (tmp_path / "mem" / "0.hex").read_text() == "0001\nabcd\n0000\n"
    assert "gap[3] = 4'h2;" in out and "rom[1]" not in out


def test_kept_modules_are_the_top_instances_and_the_stages_of_the_others():
    names = [
        "top",
        "top.mpu",
        "top.mpu.lane0",
        "top.xing_tiles",
        "top.xing_tiles.stage0",
        "top.xing_tiles.stage0.inner",
        "top.rst_root",
        "top.rst_root.stage0",
    ]
    kept = est.kept_modules(names, "top", {"mpu"})
    assert kept == [
        "top.mpu",
        "top.xing_tiles",
        "top.xing_tiles.stage0",
        "top.rst_root",
        "top.rst_root.stage0",
    ]
    text = "module \\top.mpu (a, b);\nendmodule\nmodule top(x);\nendmodule\n"
    assert est.module_names(text) == ["top.mpu", "top"]


def test_per_instance_leaves_out_kept_children_and_sums_to_the_design():
    modules = {
        "top": {"LUT2": 3, "top.mpu": 1, "top.xing_t": 1},
        "top.mpu": {"LUT6": 10, "DSP48E2": 2},
        "top.xing_t": {"FDRE": 1, "top.xing_t.stage0": 1, "top.xing_t.stage1": 1},
        "top.xing_t.stage0": {"FDRE": 5},
        "top.xing_t.stage1": {"FDRE": 5, "LUT3": 1},
    }
    inst, glue = est.per_instance(modules, "top")
    assert glue["LUT"] == 3
    assert inst["mpu"]["DSP"] == 2 and inst["xing_t"]["FF"] == 1
    assert inst["xing_t/stage1"]["LUT"] == 1
    placed = {"mpu": 1, "xing_t/stage0": 0, "xing_t/stage1": 1}
    assert est.slr_of("xing_t", placed) == 0  # its counter: with its first stage
    assert est.slr_of("mpu/lane0", placed) == 1
    assert est.slr_of("other", placed) is None
    slrs = est.slr_totals(inst, glue, placed, 3)
    assert slrs["SLR0"]["FF"] == 1 + 5
    assert slrs["SLR1"]["FF"] == 5 and slrs["SLR1"]["LUT"] == 10 + 1
    assert slrs["SLR2"]["LUT"] == 0 and slrs["unplaced"]["LUT"] == 3
    assert est.group_of("xing_t/stage1", {"mpu"}) == "relays (xing_*)"
    assert est.group_of("mpu", {"mpu"}) == "mpu"


def test_every_placed_instance_of_the_u55c_core_has_an_slr():
    from tandem.floorplan import BLOCKS, U55C

    placed = est.placement_of(U55C)
    assert all(est.slr_of(b, placed) == U55C.slr[b] for b in BLOCKS)
    tiles = [p for p in placed if p.startswith("xing_tiles/")]
    assert tiles and {placed[p] for p in tiles} == {U55C.slr["dma"], U55C.slr["mpu"]}


def _mul():
    from amaranth import Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class Mul(wiring.Component):
        def __init__(self):
            super().__init__({"a": In(16), "b": In(16), "p": Out(32)})

        def elaborate(self, platform):
            m = Module()
            ra, rb = Signal(16), Signal(16)
            m.d.sync += [ra.eq(self.a), rb.eq(self.b), self.p.eq(ra * rb)]
            return m

    return Mul()


def test_synthesize_maps_a_multiplier_to_one_dsp_and_caches(tmp_path):
    """A registered 16 x 16 multiply through the real flow: pyosys in a subprocess."""
    pytest.importorskip("pyosys")
    from amaranth.back import verilog

    text = verilog.convert(_mul(), name="top", emit_src=False)
    script = est.synth_script("top")
    r = est.synthesize(tmp_path, text, script, key="k1")
    assert est.classify(r["design"])["DSP"] == 1
    assert r["peak_rss_mb"] > 0 and r["yosys_seconds"] > 0 and not r["cached"]
    assert (tmp_path / "netlist.json").is_file() and (tmp_path / "synth.log").is_file()
    again = est.cached(tmp_path, "k1")
    assert again["cached"] and again["design"] == r["design"]
    assert est.cached(tmp_path, "other key") is None


def test_a_failing_yosys_run_raises_with_its_log(tmp_path):
    pytest.importorskip("pyosys")
    with pytest.raises(RuntimeError, match="yosys failed") as e:
        est.synthesize(tmp_path, "module top(;\n", est.synth_script("top"), key="k")
    assert "syntax error" in str(e.value) or "ERROR" in str(e.value)


def test_the_worker_names_pyosys_when_it_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "pyosys", None)  # import fails
    assert est._worker(str(tmp_path)) == 3
    assert "pyosys" in capsys.readouterr().err


def test_units_alone_include_the_vpus_blocks_and_two_port_tables():
    """`--unit` names the VPU's own blocks (not in `--units`); a unit with two stream pairs
    runs free with a pair of ports per stream; the VPU itself is not wrapped."""
    from amaranth.back import verilog

    from tandem.rtl.arith import FP16Table
    from tandem.rtl.vpu import RowMax, VectorUnit

    names = [n for n, _ in est.unit_designs()]
    assert "FP16Table(exp, ports=2)" in names and "RowMax" not in names
    name, factory = est.unit_factory("vectorunit(TINY)")
    assert name == "VectorUnit(tiny)"
    vpu = factory()
    vpu._MustUse__silence = True  # built only to look at
    assert isinstance(vpu, VectorUnit) and est.free_running(vpu) is vpu
    rowmax = est.unit_factory("rowmax")[1]()
    rowmax._MustUse__silence = True
    assert isinstance(rowmax, RowMax)
    top = est.free_running(FP16Table("recip", ports=2))
    assert {"i0", "i1", "o0", "o1", "o0_valid", "o1_valid"} <= set(top.signature.members)
    text = verilog.convert(top, name="top", emit_src=False)
    assert "o1_valid" in text and "i1__payload" in text
