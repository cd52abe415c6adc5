"""host/thesis.py: FPGA times from ``make bench-rtl``'s JSON (the packaged result by default,
the first of the given paths that exists, else the labelled assumption), with exact labels and
numbers; the 3x3 table from saved CPU times."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import thesis_cpu_times

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.geometry import geometry
from tandem.gpu.prefill import PreparedModel
from tandem.host.placement import choose
from tandem.host.thesis import (
    PCIE_BYTES_S,
    CpuTimes,
    FpgaDecodeModel,
    format_thesis,
    head_bytes,
    kv_read_bytes,
    plot_timeline,
    streamed_bytes,
    thesis_table,
)
from tandem.layout import HBMLayout

# gpt2-medium on the u55c geometry (checked in test_layout_byte_counts)
STREAMED = 707_645_440  # every MPU matrix and vector once
HEAD = 103_026_688  # lm_head + ln_f, which prompt positions skip
KV64 = 6_291_456  # K and V of one 64-position group, all 24 layers
PEAK = 32 * 14.375e9  # bytes/s, the U55C's 32 pseudo-channels
# gpt2 on u55c
GPT2_STREAMED, GPT2_KV64 = 247_435_264, 2_359_296

# self-consistent: 460e6 bytes in 1e6 cycles = 460 B/cycle = 25% of 1,840 B/cycle
RTL = {
    "model": "gpt2",
    "geometry": "u55c",
    "clock_mhz": 250.0,
    "ctx": 5,
    "cycles_per_token": 1_000_000,
    "bytes_per_token": 460_000_000,
    "hbm_efficiency": 0.25,
}


def rtl_json(path, **change):
    path.write_text(json.dumps(RTL | change))
    return path


def medium():
    cfg, g = preset("gpt2-medium"), geometry("u55c")
    return cfg, g, HBMLayout(cfg, g)


def test_layout_byte_counts():
    cfg, g, lay = medium()
    assert streamed_bytes(lay) == STREAMED
    assert head_bytes(lay) == HEAD
    assert kv_read_bytes(cfg, g, 1) == kv_read_bytes(cfg, g, 64) == KV64
    assert kv_read_bytes(cfg, g, 512) == 8 * KV64
    c2 = preset("gpt2")
    assert streamed_bytes(HBMLayout(c2, g)) == GPT2_STREAMED
    assert kv_read_bytes(c2, g, 5) == GPT2_KV64


def test_gpt2_cycles_projected_onto_gpt2_medium(tmp_path):
    cfg, g, lay = medium()
    path = rtl_json(tmp_path / "bench-rtl.json")
    f = FpgaDecodeModel(cfg, g, lay, [path])
    assert f.label == (
        "projected (RTL cycles of gpt2 at u55c, 25.0% of HBM peak, applied to gpt2-medium's "
        "bytes per token)"
    )
    assert f.origin() == f"; from {path}"
    assert (f.efficiency, f.read_ratio) == (0.25, 1.0)
    assert f.per_token(512) * 1e3 == pytest.approx(6.591105113043478, rel=1e-12)
    assert f.per_token(512) == pytest.approx((STREAMED + 8 * KV64) / (0.25 * PEAK), rel=1e-12)
    assert f.per_token(64, head=False) == pytest.approx(
        (STREAMED - HEAD + KV64) / (0.25 * PEAK), rel=1e-12
    )
    # a 3-token prompt: two positions without the LM head, the last with it
    assert f.prompt(3) == pytest.approx(
        (2 * (STREAMED - HEAD) + STREAMED + 3 * KV64) / (0.25 * PEAK), rel=1e-12
    )
    assert f.tokens(63, 2) == pytest.approx((2 * STREAMED + 3 * KV64) / (0.25 * PEAK), rel=1e-12)


def test_read_ratio_from_the_layout_count(tmp_path):
    cfg, g, lay = medium()
    path = rtl_json(tmp_path / "r.json", layout_bytes_per_token=383_333_333)  # read 1.2x
    f = FpgaDecodeModel(cfg, g, lay, [path])
    assert f.label == (
        "projected (RTL cycles of gpt2 at u55c, 25.0% of HBM peak, 1.200x the layout's bytes, "
        "applied to gpt2-medium's bytes per token)"
    )
    ratio = 460_000_000 / 383_333_333
    assert f.per_token(512) == pytest.approx(
        (STREAMED + 8 * KV64) * ratio / (0.25 * PEAK), rel=1e-12
    )


def test_measured_model_gets_its_cycles_back(tmp_path):
    cfg, g = preset("gpt2"), geometry("u55c")
    f = FpgaDecodeModel(cfg, g, HBMLayout(cfg, g), [rtl_json(tmp_path / "b.json")])
    assert f.label == (
        "projected (RTL cycles of gpt2 at u55c: 1,000,000 cycles/token at context 5, 250 MHz, "
        "25.0% of HBM peak)"
    )
    assert f.per_token(5) == pytest.approx(1_000_000 / 250e6, rel=1e-12)  # 4 ms
    # more context: more KV bytes at the same efficiency
    assert f.per_token(65) == pytest.approx(
        4e-3 * (GPT2_STREAMED + 2 * GPT2_KV64) / (GPT2_STREAMED + GPT2_KV64), rel=1e-12
    )


def test_first_existing_path_then_assumed(tmp_path):
    cfg, g, lay = medium()
    build, docs = tmp_path / "build.json", tmp_path / "docs.json"
    rtl_json(docs, hbm_efficiency=0.5)
    f = FpgaDecodeModel(cfg, g, lay, [build, docs])
    assert f.rtl_path == docs and f.efficiency == 0.5
    assert f.label.startswith("projected (RTL cycles of gpt2 at u55c, 50.0% of HBM peak")
    rtl_json(build)
    f = FpgaDecodeModel(cfg, g, lay, [build, docs])
    assert f.rtl_path == build and f.efficiency == 0.25
    f = FpgaDecodeModel(cfg, g, lay, [tmp_path / "none.json"])
    assert f.rtl is None and f.origin() == ""
    assert f.label == (
        "assumed: 1.94 ms/token (DFX-style 85% of HBM peak target), awaiting make bench-rtl"
    )
    assert f.per_token(512) == pytest.approx((STREAMED + 8 * KV64) / (0.85 * PEAK), rel=1e-12)


def test_other_geometry_or_missing_field(tmp_path):
    cfg, g, lay = medium()
    path = rtl_json(tmp_path / "t.json", geometry="tiny")
    f = FpgaDecodeModel(cfg, g, lay, [path])
    assert f.rtl is None and f.label.startswith("assumed: 1.94 ms/token")
    assert f.origin() == f" ({path} is for the tiny geometry, not u55c: not used)"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in RTL.items() if k != "hbm_efficiency"}))
    with pytest.raises(ValueError, match=r"bad\.json lacks hbm_efficiency"):
        FpgaDecodeModel(cfg, g, lay, [bad])


def saved_cpu_times(tmp_path):
    """CPU times as `tandem bench --thesis --save-times` writes them (made-up values)."""
    data = thesis_cpu_times()
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_thesis_table_from_saved_times_and_rtl(tmp_path):
    cpu = CpuTimes.load(saved_cpu_times(tmp_path))
    assert cpu.label == "measured (this CPU, gpt2-medium, 1 threads; saved in cpu.json)"
    rtl = rtl_json(tmp_path / "bench-rtl.json")
    cells, sources, cpu, fpga, cfg, g = thesis_table(cpu=cpu, rtl_paths=[rtl])
    assert sorted(cells) == [(p, n) for p in (64, 256, 512) for n in (64, 256, 512)]
    c = cells[256, 64]
    moved = 4 * KV64  # 256 positions: four groups
    exposed = moved / 24 * 2 / PCIE_BYTES_S
    fpga_decode = sum(
        (STREAMED + (-(-(t + 1) // 64)) * KV64) / (0.25 * PEAK) for t in range(256, 256 + 63)
    )
    fpga_prompt = (
        sum((STREAMED - HEAD + (-(-(t + 1) // 64)) * KV64) for t in range(255))
        + STREAMED
        + 4 * KV64
    ) / (0.25 * PEAK)
    assert c.parts["kv_moved"] == moved
    assert c.gpu_only == pytest.approx(4.0 + 0.6 * 63, rel=1e-12)
    assert c.fpga_only == pytest.approx(fpga_prompt + fpga_decode, rel=1e-12)
    assert c.hybrid == pytest.approx(4.0 + exposed + fpga_decode, rel=1e-12)
    assert sources["fpga"] == fpga.label + f"; from {rtl}"
    text = format_thesis(cells, sources, cfg, g)
    assert f"| 256 | 64 | {c.gpu_only:.3f} | {c.fpga_only:.3f} | {c.hybrid:.3f} | 25.17 |" in text
    assert (
        "- FPGA-only = prompt and output token by token on the core, projected (RTL cycles of "
        "gpt2 at u55c, 25.0% of HBM peak, applied to gpt2-medium's bytes per token); from"
    ) in text
    png = plot_timeline(tmp_path / "t.png", cpu, fpga, cfg, g, 512, 64)
    assert png.stat().st_size > 10_000
    cpu.save(tmp_path / "again.json")
    back = CpuTimes.load(tmp_path / "again.json")
    assert (back.prefill_s, back.decode_s, back.layer_s) == (
        cpu.prefill_s,
        cpu.decode_s,
        cpu.layer_s,
    )


def test_auto_placement_uses_the_rtl_projection(tmp_path):
    cfg, g = preset("test-tiny"), geometry("u55c")
    model = PreparedModel(cfg, random_weights(cfg, seed=0), "cpu")
    ids = np.arange(5).tolist()
    choice = choose(cfg, g, model, ids, 4, rtl_paths=[rtl_json(tmp_path / "b.json")])
    label = (
        "projected (RTL cycles of gpt2 at u55c, 25.0% of HBM peak, applied to test-tiny's "
        "bytes per token)"
    )
    lay = HBMLayout(cfg, g)
    per = (streamed_bytes(lay) + kv_read_bytes(cfg, g, 1)) / (0.25 * PEAK)  # ctx <= 64
    no_head = (streamed_bytes(lay) - head_bytes(lay) + kv_read_bytes(cfg, g, 1)) / (0.25 * PEAK)
    assert choice.numbers["FPGA decode"] == (pytest.approx(3 * per, rel=1e-12), label)
    assert choice.numbers["FPGA prefill"] == (pytest.approx(4 * no_head + per, rel=1e-12), label)
    assert label in choice.explain()


def test_cli_bench_thesis_from_saved_times(tmp_path, capsys):
    from tandem.host.cli import main

    png = tmp_path / "timeline.png"
    argv = ["bench", "--thesis", "--load-times", str(saved_cpu_times(tmp_path)), "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| 512 | 512 |" in out and "| 64 | 64 | 32.500 |" in out  # 1.0 + 0.5 * 63
    assert "measured (this CPU, gpt2-medium, 1 threads; saved in cpu.json)" in out
    assert f"timeline (prompt 512, output 64): {png}" in out and png.is_file()


def test_packaged_result_is_the_default_and_carries_provenance():
    """The cost model reads the result shipped in the package, not the repository's docs/."""
    from tandem.host.thesis import RTL_RESULT, RTL_RESULTS, read_rtl_result

    assert RTL_RESULTS == (RTL_RESULT,) and RTL_RESULT.parent.name == "data"
    assert "docs" not in RTL_RESULT.parts
    data, path = read_rtl_result()
    assert path == RTL_RESULT
    prov = data["provenance"]
    assert prov["core_commit"] == data["build"]["core"]
    assert "scripts/bench_rtl.py --record" in prov["command"]
    cfg, g, lay = medium()
    f = FpgaDecodeModel(cfg, g, lay)
    assert f.rtl_path == RTL_RESULT
    assert (
        f.origin()
        == f"; from the packaged tandem/host/data/bench-rtl.json (RTL {prov['core_commit']})"
    )
