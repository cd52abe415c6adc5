"""scripts/bench_rtl.py's analysis on a hand-made raw record (no simulation): per-token deltas,
mean decode cycles and bytes, efficiency against 460 GB/s, context, and the lost-cycle
breakdown adding up to the cycles over the link-rate ideal."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tandem.sim.rtljob import COUNTERS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_rtl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rtl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _event(value, **counters):
    base = dict.fromkeys(COUNTERS, 0)
    return {"kind": "token", "value": value, **base, **counters}


def _raw(start_pos=0):
    # token 0 after 1,000 cycles; then two decode tokens of 460 cycles each, 256 beats
    # (16 KiB) read in each, of which 200 cycles moved data
    ev = [
        _event(5, cycles=1000, r_beats=100, r_cycles=80, mpu_busy=600, vpu_no_read=100,
               idle_no_read=50, idle_read_wait=20, idle_write_wait=10),
        _event(6, cycles=1460, r_beats=356, r_cycles=280, mpu_busy=900, vpu_no_read=150,
               idle_no_read=90, idle_read_wait=40, idle_write_wait=20),
        _event(7, cycles=1920, r_beats=612, r_cycles=480, mpu_busy=1200, vpu_no_read=200,
               idle_no_read=130, idle_read_wait=60, idle_write_wait=30),
    ]  # fmt: skip
    return {
        "args": {"model": "test-tiny", "read_latency": 80, "start_pos": start_pos},
        "model": "test-tiny",
        "n_layer": 2,
        "geometry": "tiny",
        "prompt": [1, 2, 3],
        "tokens": [5, 6, 7],
        "cycles": 2000,
        "events": [*ev, {**ev[-1], "kind": "status", "value": 0}],
        "counters": {},
        "build": {},
    }


def test_analysis(bench, tmp_path):
    r = bench.analyse(_raw(), None)
    g_peak = 4 * 14.375e9 / 250e6  # tiny: 4 channels, 230 B/cycle
    assert r["cycles_per_token"] == 460 and r["bytes_per_token"] == 256 * 64
    assert r["hbm_efficiency"] == pytest.approx(256 * 64 / (460 * g_peak))
    # decode tokens 1 and 2 come from positions 3 and 4: contexts 4 and 5
    assert [t["ctx"] for t in r["per_token"]] == [3, 4, 5] and r["ctx"] == 4
    assert [t["positions"] for t in r["per_token"]] == [3, 1, 1]
    lo = r["lost_cycles_per_token"]
    # a record from before the calibrated model ran over the ideal one
    assert r["hbm"]["name"] == "ideal" and r["read_latency"] == 80
    assert lo["ideal_cycles_at_model_rate"] == pytest.approx(256 * 64 / g_peak)
    assert r["of_model_sustained"] == pytest.approx(r["hbm_efficiency"])
    parts = (
        lo["vpu_busy_no_read"]
        + lo["mpu_busy_no_read_beyond_link_gaps"]
        + lo["nothing_busy_dma_read_in_flight"]
        + lo["nothing_busy_hbm_write_pending"]
        + lo["nothing_busy_controller_only"]
    )
    # the parts are the cycles without an R beat, less the link's own gaps
    no_read = 460 - 200
    link_gaps = 200 * (4 * 64 / g_peak - 1)
    assert parts == pytest.approx(no_read - link_gaps)
    assert lo["matvecs_per_token"] > 0
    assert r["start_pos"] == 0 and "from 0" in r["kv_note"]
    text = bench.format_report(r)
    assert "projection (simulated cycles / 250 MHz)" in text
    assert "| cycles per decode token (mean of 2, ctx ~4) | 460 |" in text


def test_analysis_over_the_calibrated_model(bench):
    """A run over the calibrated model: the ideal cycles at its sustained rate (refresh
    included), the loss split so that its parts add up to it, the share of its sustained and of
    the calibrated achievable, and the model named in the report."""
    from tandem.geometry import geometry
    from tandem.sim.hbm_model import hbm_timing

    g = geometry("tiny")
    cal = hbm_timing("calibrated", g)
    raw = {**_raw(), "hbm": cal.as_dict(g)}
    r = bench.analyse(raw, None)
    bpc = cal.sustained_gbps(g) * 4 * 1e9 / 250e6  # 4 channels at 12.77 GB/s
    lo = r["lost_cycles_per_token"]
    assert lo["ideal_cycles_at_model_rate"] == pytest.approx(256 * 64 / bpc)
    assert lo["lost_cycles"] == pytest.approx(460 - 256 * 64 / bpc)
    assert r["of_model_sustained"] == pytest.approx(256 * 64 / (460 * bpc))
    assert r["of_calibrated_achievable"] == pytest.approx(r["of_model_sustained"])
    assert r["calibrated_achievable_gbps"] == pytest.approx(cal.sustained_gbps(g) * 4)
    parts = sum(
        lo[k]
        for k in (
            "vpu_busy_no_read",
            "mpu_busy_no_read_beyond_link_gaps",
            "nothing_busy_dma_read_in_flight",
            "nothing_busy_hbm_write_pending",
            "nothing_busy_controller_only",
        )
    )
    # under refresh the channels move out of step: the MPU's share is the rest of the loss
    assert lo["mpu_share_by_difference"] and parts == pytest.approx(lo["lost_cycles"])
    text = bench.format_report(r)
    assert "the channels out of step under refresh (the rest)" in text
    assert "HBM model: calibrated: read latency 150-175 cycles, link 14.04 GB/s" in text
    assert "refresh 88 of every 975 cycles" in text
    assert "| % of this model's sustained 51 GB/s |" in text


def test_sweep_table(bench):
    """One sweep row per point, with the memory model's link rate, refresh and latency."""
    from tandem.geometry import geometry
    from tandem.sim.hbm_model import hbm_timing

    g = geometry("tiny")
    rows = []
    for rate, refresh in (("ideal", False), ("calibrated", True)):
        t = hbm_timing(rate, g, refresh=refresh, read_latency=150)
        r = bench.analyse({**_raw(), "hbm": t.as_dict(g)}, None)
        rows.append({"rate": rate, "refresh": refresh, "read_latency": 150, **r})
    text = bench.format_sweep(rows)
    assert "| ideal (14.38 GB/s) | off | 150 | 460 |" in text
    assert "| calibrated (14.04 GB/s) | on | 150-175 | 460 |" in text


def test_start_pos_labelled(bench):
    r = bench.analyse(_raw(start_pos=2), None)
    assert r["per_token"][0]["positions"] == 1
    assert "all-zero KV" in r["kv_note"]
    json.dumps(r)  # serialisable


def test_record_writes_package_data_with_provenance(bench, tmp_path):
    r = bench.analyse(_raw(), None)
    paths = bench.record(r, _raw()["args"], (tmp_path / "pkg.json", tmp_path / "doc.json"))
    pkg, doc = (p.read_text() for p in paths)
    assert pkg == doc
    data = json.loads(pkg)
    assert data["provenance"]["command"].startswith("python scripts/bench_rtl.py --record")
    assert "--model test-tiny" in data["provenance"]["command"]
    assert {k: v for k, v in data.items() if k != "provenance"} == json.loads(json.dumps(r))


def test_recorded_result_ships_in_the_package(bench):
    """--record writes the file the cost model reads, and its docs copy matches it."""
    from tandem.host.thesis import RTL_RESULT

    assert bench.PACKAGED.resolve() == RTL_RESULT.resolve()
    assert bench.DOC.read_text() == RTL_RESULT.read_text()
    assert "provenance" in json.loads(RTL_RESULT.read_text())


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--sweep-only"], ["sweep"]),
        (["--sweep", "--sweep-only"], ["sweep"]),
        (["--sweep"], ["measure", "sweep"]),
        ([], ["measure"]),
    ],
)
def test_sweep_flags_choose_the_runs(bench, tmp_path, monkeypatch, flags, want):
    """``--sweep-only`` alone is the sweep without the default run (it once ran the default
    run alone); ``--sweep`` is both; neither, the default run."""
    calls = []

    def measure(args, ap, timing):
        calls.append("measure")
        return {}

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "finish", lambda raw, args: 0)
    monkeypatch.setattr(bench, "sweep", lambda args, ap: calls.append("sweep") or 0)
    assert bench.main([*flags, "--json", str(tmp_path / "b.json")]) == 0
    assert calls == want
