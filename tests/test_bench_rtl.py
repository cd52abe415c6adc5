"""scripts/bench_rtl.py's analysis on a hand-made raw record (no simulation): per-token deltas,
mean decode cycles and bytes, efficiency against 460 GB/s, context, and the lost-cycle
breakdown adding up to the cycles over the link-rate ideal."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------------------------
# --weights int8 / int4 (issue 17): the plumbing and the projection arithmetic, no RTL


@pytest.mark.parametrize(
    "argv, weights, group, json_name",
    [
        ([], "fp16", None, "bench-rtl.json"),
        (["--weights", "int8"], "int8", -1, "bench-rtl-int8.json"),
        (["--weights", "int4"], "int4", 128, "bench-rtl-int4.json"),
        (["--weights", "int4", "--group", "64"], "int4", 64, "bench-rtl-int4-g64.json"),
        (["--weights", "int8", "--group", "128"], "int8", 128, "bench-rtl-int8-g128.json"),
    ],
)
def test_weights_flags(bench, monkeypatch, argv, weights, group, json_name):
    """The format and group reach the run, and each format has its own result file."""
    seen = {}

    def measure(args, ap, timing):
        seen.update(vars(args))
        return {}

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "finish", lambda raw, args: 0)
    assert bench.main(argv) == 0
    assert (seen["weights"], seen["group"]) == (weights, group)
    assert seen["json"] == bench.OUT.with_name(json_name)
    spec = bench.weights_spec(seen)
    assert spec["format"] == weights and spec["group"] == group
    if weights == "fp16":
        assert bench.record_paths(seen) == (bench.PACKAGED, bench.DOC)
    else:
        # --record of a quantized run leaves the FP16 result the cost model reads alone
        assert bench.record_paths(seen) == (bench.DOC.with_name(json_name),)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group", "64"], "--group applies to --weights int8 or int4"),
        (["--weights", "int4", "--group", "100"], "--group 100: a multiple of 64, or -1"),
        (["--weights", "int2"], "invalid choice: 'int2'"),
    ],
)
def test_weights_flags_refused(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_old_records_are_fp16(bench):
    assert bench.weights_spec({"model": "gpt2"})["label"] == "FP16"
    assert bench.weights_spec({"weights": "int8", "group": None})["group"] == -1
    assert bench.weights_spec({"weights": "int4", "group": 64})["label"] == (
        "W4 groups of 64 (RTN, LM head quantized)"
    )


@pytest.mark.parametrize("bits, group", [(8, -1), (4, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize("name", ["head64", "test-tiny", "test-odd"])
def test_quant_formats_are_the_compilers(bench, name, bits, group):
    """The formats the projection lays gpt2-medium out with, without quantizing it, are what
    core_tensors gives for quantized weights (head_dim 64; padded heads quantize a stand-in)."""
    from tandem.checkpoint import random_weights
    from tandem.config import GPT2Config, preset
    from tandem.geometry import geometry
    from tandem.layout import core_tensors
    from tandem.qweights import quantize_weights

    if name == "head64":
        cfg = GPT2Config(n_vocab=300, n_ctx=32, n_embd=192, n_head=3, n_layer=2, name=name)
    else:
        cfg = preset(name)
    g = geometry("tiny")
    qw = quantize_weights(random_weights(cfg, seed=1), cfg, bits=bits, group=group)
    assert bench.quant_formats(cfg, g, bits, group) == core_tensors(cfg, qw)[1]


def _quant_raw(model="gpt2", geometry="u55c", weights="int4", group=128, beats=3000):
    raw = _raw()
    ev = [dict(e) for e in raw["events"]]
    for i, e in enumerate(ev):  # each decode token: 100,000 cycles, `beats` R beats per channel
        e["cycles"] = 50_000 + 100_000 * min(i, 2)
        e["r_beats"] = 32 * (1000 + beats * min(i, 2))
        e["r_cycles"] = 900 * (1 + min(i, 2))
    args = {"model": model, "read_latency": 80, "start_pos": 0, "weights": weights, "group": group}
    return {**raw, "args": args, "model": model, "n_layer": 12, "geometry": geometry, "events": ev}


def test_quantized_analysis_projects_from_the_quantized_layout(bench):
    """A W4 g128 gpt2 record on u55c: the layout bytes are the quantized layout's, gpt2-medium's
    projection its own quantized layout's bytes at the measured efficiency, with ms/token and
    tokens/s; every time labelled a projection."""
    from tandem.config import preset
    from tandem.geometry import geometry

    g = geometry("u55c")
    r = bench.analyse(_quant_raw(), None)
    assert r["weights"]["label"] == "W4 groups of 128 (RTN, LM head quantized)"
    nbytes = 32 * 3000 * 64
    assert r["cycles_per_token"] == 100_000 and r["bytes_per_token"] == nbytes
    peak_bpc = 460e9 / 250e6
    assert r["hbm_efficiency"] == pytest.approx(nbytes / (100_000 * peak_bpc))
    assert r["tokens_per_s"] == pytest.approx(2500)
    gpt2, med = preset("gpt2"), preset("gpt2-medium")
    fp16_med = bench.layout_bytes(med, g, r["ctx"])
    w4_med = bench.layout_bytes(med, g, r["ctx"], bench.quant_formats(med, g, 4, 128))
    w8_med = bench.layout_bytes(med, g, r["ctx"], bench.quant_formats(med, g, 8, -1))
    # the weights stream at a quarter (plus scale beats), the vectors and KV as at FP16
    assert 0.25 < w4_med / fp16_med < 0.3 and 0.5 < w8_med / fp16_med < 0.55
    assert r["layout_bytes_per_token"] == bench.layout_bytes(
        gpt2, g, r["ctx"], bench.quant_formats(gpt2, g, 4, 128)
    )
    p = r["projection"]
    assert p["gpt2"]["cycles_per_token"] == 100_000 and p["gpt2"]["tokens_per_s"] == 2500
    m = p["gpt2-medium"]
    assert m["layout_bytes_per_token"] == w4_med
    read = w4_med * nbytes / r["layout_bytes_per_token"]
    assert m["bytes_per_token"] == round(read)
    cycles = read / (r["hbm_efficiency"] * peak_bpc)
    assert m["ms_per_token"] == pytest.approx(cycles / 250e6 * 1e3)
    assert m["tokens_per_s"] == pytest.approx(250e6 / cycles)
    assert m["source"].startswith("projected") and m["weights"] == r["weights"]["label"]
    text = bench.format_report(r)
    assert "gpt2 (W4 groups of 128 (RTN, LM head quantized) weights) on u55c" in text
    assert f"| gpt2-medium {m['weights']}: tokens per s | {m['tokens_per_s']:,.0f} |" in text
    assert "projection (simulated cycles / 250 MHz)" in text
    # the same record at FP16 projects from the FP16 layout
    fp16 = bench.analyse({**_quant_raw(), "args": {**_quant_raw()["args"], "weights": "fp16",
                                                   "group": None}}, None)  # fmt: skip
    assert fp16["projection"]["gpt2-medium"]["layout_bytes_per_token"] == fp16_med
    assert fp16["weights"]["format"] == "fp16"


def test_quantized_record_and_summary(bench, tmp_path):
    """--record of a W4 run writes its own file with its provenance; --summary reads every
    format's recorded file (a missing one is a row that says so)."""
    r = bench.analyse(_quant_raw(), None)
    raw_args = _quant_raw()["args"]
    doc = tmp_path / "bench-rtl.json"
    (path,) = bench.record(r, raw_args, (doc.with_name("bench-rtl-int4.json"),))
    data = json.loads(path.read_text())
    assert "--weights int4 --group 128" in data["provenance"]["command"]
    assert "W4 groups of 128" in data["provenance"]["what"]
    assert not doc.exists()
    text = bench.format_summary(bench.read_recorded(doc))
    rows = [line for line in text.splitlines() if line.startswith("| W")]
    assert rows[0].startswith("| W8 per channel | not recorded (bench-rtl-int8.json) |")
    assert rows[1].startswith("| W4 groups of 128 (RTN, LM head quantized) | gpt2 | 100,000 |")
    assert f"| {1e3 / r['projection']['gpt2-medium']['ms_per_token']:,.0f} |" in rows[1]
    assert all(line.count("|") == 13 for line in text.splitlines()[2:])


def test_dry_run_int4_on_tiny(bench, capsys):
    """--dry-run: the quantized job on the ISA simulator, whose tokens are the faithful
    model's on the same RTN-quantized weights, and the layout's bytes per token."""
    from tandem.checkpoint import random_weights
    from tandem.config import preset
    from tandem.golden.faithful import FaithfulModel
    from tandem.qweights import quantize_weights

    argv = ["--model", "test-odd", "--geometry", "tiny", "--weights", "int4", "--group", "64"]
    assert bench.main([*argv, "--dry-run", "--tokens", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    cfg = preset("test-odd")
    qw = quantize_weights(random_weights(cfg, seed=2), cfg, bits=4, group=64)
    prompt = np.random.default_rng(2).integers(0, cfg.n_vocab, 3).tolist()
    want = FaithfulModel(cfg, qw).generate(prompt, 3)
    assert "W4 groups of 64 (RTN, LM head quantized) on tiny: the ISA simulator ran" in out
    assert f": {want} (the RTL must give these)" in out
    assert "gpt2-medium: no layout on tiny" in out


def test_profile_sites_sum_a_layer_instruction_over_the_layers(bench):
    """--profile: every pc's cycles land in one site; a layer's instruction is one site over all
    layers (``h.N.`` dropped), named by its HBM region or its VBUF operand; the table lists the
    largest idle first, per position."""
    from tandem.checkpoint import lively_weights
    from tandem.compiler import compile_model
    from tandem.config import preset
    from tandem.geometry import geometry

    cfg = preset("test-tiny")
    c = compile_model(cfg, lively_weights(cfg, seed=1), geometry("tiny"))
    prof = [{"cycles": 3 * pc + 1, "idle": pc % 5} for pc in range(len(c.program))]
    rows = bench.profile_sites(c, prof)
    assert sum(r["cycles"] for r in rows) == sum(e["cycles"] for e in prof)
    assert sum(r["idle"] for r in rows) == sum(e["idle"] for e in prof)
    assert sum(r["pcs"] for r in rows) == len(c.program)
    by = {r["site"]: r for r in rows}
    site = "MATVEC h.*.attn.c_attn.weight"
    lines = {c.layout[f"h.{n}.attn.c_attn.weight"].line for n in range(cfg.n_layer)}
    c_attn = [pc for pc, i in enumerate(c.program) if i.op.name == "MATVEC" and i["line"] in lines]
    assert len(c_attn) == by[site]["pcs"] == cfg.n_layer
    assert by[site]["cycles"] == sum(3 * pc + 1 for pc in c_attn)
    assert "STROW h.*.k" in by and "VGELU -> hm" in by and "HALT" in by
    assert [r["first"] for r in rows] == sorted(r["first"] for r in rows)
    table = bench.format_profile(rows, positions=2, top=3).splitlines()
    assert len(table) == 3 + 3
    idles = [float(ln.split("|")[5].replace(",", "")) for ln in table[3:]]
    assert idles == sorted(idles, reverse=True)
