"""host/thesis.py: FPGA times from ``make bench-rtl``'s JSON (the packaged result by default,
the first of the given paths that exists, else the labelled assumption), with exact labels and
numbers; the 3x3 table from saved CPU times; the A10 column, the hybrid on the A10's prefill and
its speed-ups from the thesis's figures, checked against arithmetic done here by hand."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import thesis_cpu_times

from tandem.checkpoint import random_weights
from tandem.config import preset
from tandem.geometry import geometry
from tandem.gpu.prefill import PreparedModel
from tandem.host.placement import choose
from tandem.host.thesis import (
    A10_LABEL,
    PCIE_BYTES_S,
    THESIS_HYBRID_LABEL,
    THESIS_MS,
    CpuTimes,
    FpgaDecodeModel,
    format_thesis,
    handoff_schedule,
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
    assert c.cpu_only == pytest.approx(4.0 + 0.6 * 63, rel=1e-12)
    assert c.fpga_only == pytest.approx(fpga_prompt + fpga_decode, rel=1e-12)
    assert c.cpu_hybrid == pytest.approx(4.0 + exposed + fpga_decode, rel=1e-12)
    assert c.a10_only == pytest.approx((10.25 + 312.17) / 1e3, rel=1e-12)
    assert c.a10_hybrid == pytest.approx(10.25e-3 + exposed + fpga_decode, rel=1e-12)
    assert sources["fpga"] == fpga.label + f"; from {rtl}"
    assert sources["a10"] == A10_LABEL
    text = format_thesis(cells, sources, cfg, g)
    assert (
        f"| 256 | 64 | {c.cpu_only:.3f} | 0.322 | {c.fpga_only:.3f} | {c.cpu_hybrid:.3f} "
        f"| {c.a10_hybrid:.3f} | 25.17 |"
    ) in text
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


def test_thesis_figures_are_the_thesis_tables():
    """The one copy of the thesis's figures (ms), as its tables 4-6 give them."""
    assert THESIS_MS["a10_prefill"] == {64: 7.61, 256: 10.25, 512: 15.34}
    assert THESIS_MS["a10_generation"][64] == {64: 361.39, 256: 1249.99, 512: 2566.41}
    assert THESIS_MS["a10_generation"][256] == {64: 312.17, 256: 1282.23, 512: 2689.53}
    assert THESIS_MS["a10_generation"][512] == {64: 323.75, 256: 1320.70, 512: 2692.78}
    assert THESIS_MS["dfx_prefill"] == {64: 156.46, 256: 614.44, 512: 1247.52}
    assert THESIS_MS["dfx_generation"][64] == {64: 215.53, 256: 598.98, 512: 1715.56}
    assert THESIS_MS["dfx_generation"][256] == {64: 218.56, 256: 869.77, 512: 1745.27}
    assert THESIS_MS["dfx_generation"][512] == {64: 221.95, 256: 884.55, 512: 1779.86}
    assert THESIS_MS["kv_transfer"] == (149.0, 214.0)


def test_handoff_schedule_exposes_what_runs_past_the_last_layer():
    # hops shorter than a layer: each layer's two hops hide behind the next layer
    rows, exposed = handoff_schedule([1.0, 1.0, 1.0], 0.25)
    assert rows == [(0.0, 1.0, 1.0, 1.25), (1.0, 1.0, 2.0, 2.25), (2.0, 1.0, 3.0, 3.25)]
    assert exposed == 0.5
    # hops longer than a layer queue on the links: hop 1 at 1, 3, 5; hop 2 at 3, 5, 7 -> ends 9
    rows, exposed = handoff_schedule([1.0, 1.0, 1.0], 2.0)
    assert [(r[2], r[3]) for r in rows] == [(1.0, 3.0), (3.0, 5.0), (5.0, 7.0)]
    assert exposed == 6.0


def test_a10_column_and_speedups_by_hand(tmp_path):
    """Two shapes worked out here from the thesis's ms and the 25% RTL fixture; nothing below
    calls the code under test except to read the cells."""
    cpu = CpuTimes.load(saved_cpu_times(tmp_path))
    rtl = rtl_json(tmp_path / "bench-rtl.json")
    cells, sources, _, _, cfg, g = thesis_table(cpu=cpu, rtl_paths=[rtl])
    rate = 0.25 * PEAK

    # prompt 64, output 256. A10 alone: 7.61 + 1249.99 = 1257.60 ms. FPGA decode: 255 tokens
    # at context 65 .. 319, KV groups of 64: 64 tokens each with 2, 3, 4 groups, 63 with 5.
    c = cells[64, 256]
    assert c.a10_only == pytest.approx(1.2576, rel=1e-12)
    decode = (255 * STREAMED + (64 * 2 + 64 * 3 + 64 * 4 + 63 * 5) * KV64) / rate
    assert decode == pytest.approx(1.6178719521391305, rel=1e-12)
    # A10 layer 7.61/24 ms > one hop (6.29 MB / 24 / 12 GB/s): only the last layer's 2 hops show
    exposed = 2 * KV64 / 24 / 12e9
    assert exposed * 1e3 == pytest.approx(0.043690666666666667, rel=1e-12)
    hybrid = 7.61e-3 + exposed + decode
    assert c.parts["a10_transfer_exposed"] == pytest.approx(exposed, rel=1e-9)
    assert c.a10_hybrid == pytest.approx(hybrid, rel=1e-12)
    assert c.a10_hybrid == pytest.approx(1.6255256428057971, rel=1e-12)
    # the thesis's hybrid: 7.61 + (149 or 214) + 598.98 = 755.59 .. 820.59 ms
    assert c.thesis_hybrid == (pytest.approx(0.75559, rel=1e-12), pytest.approx(0.82059, rel=1e-12))
    assert c.speedup_over_a10 == pytest.approx(1.2576 / hybrid, rel=1e-12)
    assert c.speedup_over_a10 == pytest.approx(0.7736574354061091, rel=1e-12)
    lo, hi = c.speedup_over_thesis
    assert (lo, hi) == (pytest.approx(0.75559 / hybrid), pytest.approx(0.82059 / hybrid))
    # the thesis's own best (1.56x over the A10) lies in this shape's range: 1.53 .. 1.66
    tlo, thi = c.thesis_speedup_over_a10
    assert (tlo, thi) == (pytest.approx(1257.60 / 820.59), pytest.approx(1257.60 / 755.59))
    assert tlo < 1.56 < thi

    # prompt 512, output 512. A10 alone: 15.34 + 2692.78 = 2708.12 ms. FPGA decode: 511 tokens
    # at context 513 .. 1023: 64 each with 9 .. 15 groups, 63 with 16.
    c = cells[512, 512]
    assert c.a10_only == pytest.approx(2.70812, rel=1e-12)
    groups = 64 * sum(range(9, 16)) + 63 * 16
    assert groups == 6384
    decode = (511 * STREAMED + groups * KV64) / rate
    exposed = 2 * 8 * KV64 / 24 / 12e9  # 0.350 ms: 2 hops of 2.097 MB
    hybrid = 15.34e-3 + exposed + decode
    assert hybrid == pytest.approx(3.5093545248463767, rel=1e-12)
    assert c.a10_hybrid == pytest.approx(hybrid, rel=1e-12)
    # 15.34 + (149 or 214) + 1779.86 = 1944.20 .. 2009.20 ms
    assert c.thesis_hybrid == (pytest.approx(1.9442, rel=1e-12), pytest.approx(2.0092, rel=1e-12))
    assert c.speedup_over_a10 == pytest.approx(2.70812 / hybrid, rel=1e-12)
    assert c.speedup_over_thesis == (
        pytest.approx(1.9442 / hybrid, rel=1e-12),
        pytest.approx(2.0092 / hybrid, rel=1e-12),
    )

    text = format_thesis(cells, sources, cfg, g)
    assert "| prompt | output | CPU-only s (this CPU) | A10-only s (thesis) | FPGA-only s " in text
    assert (
        "| 64 | 256 | 7.61 | 0.044 | 1617.87 | 1625.53 | 1257.60 | 0.77x | 755.59-820.59 "
        "| 0.46-0.50x | 1.53-1.66x |"
    ) in text
    assert (
        "| 512 | 512 | 15.34 | 0.350 | 3493.66 | 3509.35 | 2708.12 | 0.77x | 1944.20-2009.20 "
        in (text)
    )
    assert f"- A10-only = prefill + generation, {A10_LABEL}" in text
    assert A10_LABEL == (
        "A10, measured in the thesis (FasterTransformer on an NVIDIA A10, gpt2-medium; the "
        "thesis, tables 4-6)"
    )
    assert f"- thesis hybrid = {THESIS_HYBRID_LABEL}" in text
    assert (
        "the thesis reports its best speed-up over the A10 as 1.56x (here its best shape is "
        "prompt 64, output 256: 1.53-1.66x)"
    ) in text


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
    assert "| 512 | 512 |" in out
    # CPU-only 1.0 + 0.5 * 63 s, beside the A10 alone: 7.61 + 361.39 ms
    assert "| 64 | 64 | 32.500 | 0.369 |" in out
    assert "| CPU-only s (this CPU) | A10-only s (thesis) |" in out
    assert (
        "| prompt | output | A10 prefill | exposed transfer | FPGA decode | hybrid | A10-only "
        "| hybrid vs A10 | thesis hybrid | hybrid vs thesis hybrid | thesis hybrid vs A10 |"
    ) in out
    # one speed-up row per shape (the FPGA figures follow the packaged bench-rtl result)
    for (P, N), (a10_alone, thesis) in {
        (64, 64): ("369.00", "372.14-437.14"),
        (256, 256): ("1292.48", "1029.02-1094.02"),
        (512, 64): ("339.09", "386.29-451.29"),
    }.items():
        row = rf"\| {P} \| {N} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| {a10_alone} "
        row += rf"\| [\d.]+x \| {thesis} \| [\d.]+-[\d.]+x \| [\d.]+-[\d.]+x \|"
        assert re.search(row, out), row
    assert len(re.findall(r"^\| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| .*x \|$", out, re.M)) == 9
    assert "measured (this CPU, gpt2-medium, 1 threads; saved in cpu.json)" in out
    assert "A10, measured in the thesis (FasterTransformer on an NVIDIA A10" in out
    assert "thesis hybrid = measured in the thesis: A10 prefill + KV transfer (149-214 ms" in out
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


def test_choose_projects_a_quantized_model_from_its_layout(tmp_path):
    """--placement auto on a quantized model: the FPGA's bytes per token are the quantized
    layout's (weight tiles and scale beats), not FP16's."""
    from tandem.layout import core_tensors
    from tandem.qweights import quantize_weights

    cfg, g = preset("test-tiny"), geometry("u55c")
    weights = quantize_weights(random_weights(cfg, seed=0), cfg, bits=4, group=64)
    formats = core_tensors(cfg, weights)[1]
    assert formats  # the matrices are quantized
    model = PreparedModel(cfg, weights, "cpu")
    paths = [rtl_json(tmp_path / "b.json")]
    choice = choose(cfg, g, model, [1, 2, 3], 4, rtl_paths=paths, formats=formats)
    lay = HBMLayout(cfg, g, formats=formats)
    per = (streamed_bytes(lay) + kv_read_bytes(cfg, g, 1)) / (0.25 * PEAK)
    assert choice.numbers["FPGA decode"][0] == pytest.approx(3 * per, rel=1e-12)
    fp16 = choose(cfg, g, model, [1, 2, 3], 4, rtl_paths=paths)
    assert choice.numbers["FPGA decode"][0] < fp16.numbers["FPGA decode"][0]
