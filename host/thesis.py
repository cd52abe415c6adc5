"""The thesis's 3x3 table (``tandem bench --thesis``): prompt 64/256/512 x output 64/256/512 at
gpt2-medium dimensions with random weights; columns GPU-only, FPGA-only and hybrid.

Nothing here has a GPU or an FPGA, so every number carries its source:

- ``measured (this CPU, <model>)``: the torch prefill and torch decode (gpu/prefill.py,
  gpu/decode.py, the same code a GPU runs) timed on this machine's CPU. They stand in for the GPU
  columns; they are not GPU times.
- ``projected (RTL cycles)``: FPGA decode from an RTL-simulation cycle count (``make bench-rtl``,
  read from :data:`RTL_RESULT`) divided by the kernel clock. Until that exists the FPGA decode is
  ``assumed``: HBM bytes per token over :data:`ASSUMED_HBM_EFFICIENCY` of the U55C's peak, the
  DFX-style target, and is labelled so.
- ``modelled (PCIe Gen3 x16, 12 GB/s)``: KV bytes (``layout.kv_prefix_bytes``) over the link,
  twice (GPU to host, host to FPGA).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.config import GPT2Config, preset
from tandem.geometry import CoreGeometry, geometry
from tandem.layout import HBMLayout, Kind, kv_prefix_bytes

PROMPTS = (64, 256, 512)
OUTPUTS = (64, 256, 512)
PCIE_BYTES_S = 12e9
PCIE_LABEL = "modelled (PCIe Gen3 x16, 12 GB/s)"
ASSUMED_HBM_EFFICIENCY = 0.85
RTL_RESULT = Path("build/bench-rtl.json")
"""Where ``make bench-rtl`` is to leave ``{"model": ..., "cycles_per_token": ...}``."""


@dataclass
class Source:
    value: float  # seconds
    label: str


def streamed_bytes(layout: HBMLayout) -> int:
    """HBM bytes one token streams: every MPU matrix and vector once (not the embedding tables,
    of which one row is read)."""
    g = layout.geom
    return sum(
        r.nbytes * g.channels
        for n, r in layout.regions.items()
        if r.kind in (Kind.TILED, Kind.VECTOR) and not n.endswith((".k", ".v"))
    )


def kv_read_bytes(cfg: GPT2Config, g: CoreGeometry, ctx: int) -> int:
    return 2 * cfg.n_layer * g.channels * kv_prefix_bytes(g, cfg.n_head, ctx)


def kv_moved_bytes(cfg: GPT2Config, g: CoreGeometry, prompt: int) -> int:
    """Bytes the hybrid handoff moves: the prompt's KV prefix, all layers, K and V."""
    return kv_read_bytes(cfg, g, prompt)


def full_kv_bytes(cfg: GPT2Config, g: CoreGeometry) -> int:
    """The thesis's fixed buffer: every layer's whole n_ctx-sized K and V."""
    return kv_read_bytes(cfg, g, cfg.n_ctx)


class FpgaDecodeModel:
    """Seconds per FPGA token at a context length, from RTL cycles if measured, else assumed."""

    def __init__(self, cfg: GPT2Config, g: CoreGeometry, layout: HBMLayout):
        self.cfg, self.g, self.layout = cfg, g, layout
        self.peak = g.channels * g.channel_gbps * 1e9
        self.cycles = None
        if RTL_RESULT.is_file():
            data = json.loads(RTL_RESULT.read_text())
            if data.get("model") == cfg.name:
                self.cycles = float(data["cycles_per_token"])
        mid = self.per_token(cfg.n_ctx // 2)
        if self.cycles is not None:
            self.label = f"projected (RTL cycles, {self.cycles:,.0f} @ {g.clock_mhz:.0f} MHz)"
        else:
            self.label = (
                f"assumed: {mid * 1e3:.2f} ms/token (DFX-style {ASSUMED_HBM_EFFICIENCY:.0%} of "
                f"HBM peak target), awaiting make bench-rtl"
            )

    def per_token(self, ctx: int) -> float:
        if self.cycles is not None:
            return self.cycles / (self.g.clock_mhz * 1e6)
        nbytes = streamed_bytes(self.layout) + kv_read_bytes(self.cfg, self.g, ctx)
        return nbytes / (ASSUMED_HBM_EFFICIENCY * self.peak)

    def tokens(self, first: int, n: int) -> float:
        """Positions first .. first+n-1, one at a time."""
        return sum(self.per_token(t + 1) for t in range(first, first + n))


class CpuTimes:
    """Torch prefill and decode timed on this CPU (stand-ins for the GPU)."""

    def __init__(self, model_name: str, log: Callable[[str], None], decode_steps: int = 2):
        import torch

        from tandem.checkpoint import random_weights
        from tandem.gpu.prefill import PreparedModel

        self.cfg = preset(model_name)
        self.label = f"measured (this CPU, {model_name}, {torch.get_num_threads()} threads)"
        log(f"{model_name}: random weights, preparing for torch on the CPU ...")
        self.model = PreparedModel(self.cfg, random_weights(self.cfg, seed=0), "cpu")
        self.decode_steps = decode_steps
        self.prefill_s: dict[int, float] = {}
        self.layer_s: dict[int, list[float]] = {}
        self.decode_s: dict[int, float] = {}
        self.log = log

    def prefill(self, T: int) -> float:
        from tandem.gpu.prefill import prefill

        if T not in self.prefill_s:
            self.log(f"timing prefill of {T} tokens on the CPU ...")
            ids = np.random.default_rng(T).integers(0, self.cfg.n_vocab, T).tolist()
            r = prefill(self.cfg, self.model, ids)
            self.prefill_s[T] = r.timings["total"]
            self.layer_s[T] = r.timings["layers"]
            self.kv = (r.k, r.v, r.first_token)
        return self.prefill_s[T]

    def decode_per_token(self, ctx: int) -> float:
        """One decode step at context ``ctx`` (mean of a few steps after a ``ctx`` prefill)."""
        import torch

        from tandem.gpu.decode import decode_step

        if ctx not in self.decode_s:
            self.prefill(ctx)
            k, v, tok = self.kv
            k, v = list(k.unbind(0)), list(v.unbind(0))
            self.log(f"timing {self.decode_steps} decode steps at context {ctx} on the CPU ...")
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(self.decode_steps):
                    tok, k, v = decode_step(self.cfg, self.model, tok, k, v)
            self.decode_s[ctx] = (time.perf_counter() - t0) / self.decode_steps
        return self.decode_s[ctx]


@dataclass
class Cell:
    gpu_only: float
    fpga_only: float
    hybrid: float
    parts: dict


def thesis_table(
    measure_model: str = "gpt2-medium",
    geom: str = "u55c",
    log: Callable[[str], None] = lambda m: None,
    decode_steps: int = 2,
):
    """Returns (cells[(P, N)], sources dict, cpu) for the 3x3 table."""
    cfg, g = preset("gpt2-medium"), geometry(geom)
    layout = HBMLayout(cfg, g)
    fpga = FpgaDecodeModel(cfg, g, layout)
    cpu = CpuTimes(measure_model, log, decode_steps)
    cells = {}
    for P in PROMPTS:
        pre = cpu.prefill(P)
        d_ctx = cpu.decode_per_token(P)  # GPU-decode per token, measured at context P
        moved = kv_moved_bytes(cfg, g, P)
        xfer = 2 * moved / PCIE_BYTES_S
        last_layer = moved / cfg.n_layer * 2 / PCIE_BYTES_S  # what overlap cannot hide
        for N in OUTPUTS:
            gpu_decode = d_ctx * (N - 1)
            fpga_decode = fpga.tokens(P, N - 1)
            cells[P, N] = Cell(
                gpu_only=pre + gpu_decode,
                fpga_only=fpga.tokens(0, P) + fpga_decode,
                hybrid=pre + last_layer + fpga_decode,
                parts={
                    "prefill": pre,
                    "gpu_decode": gpu_decode,
                    "fpga_prefill": fpga.tokens(0, P),
                    "fpga_decode": fpga_decode,
                    "transfer": xfer,
                    "transfer_exposed": last_layer,
                    "kv_moved": moved,
                },
            )
    sources = {
        "gpu": cpu.label + " (prefill once; decode: one timed step at context P, x (N-1))",
        "fpga": fpga.label,
        "transfer": PCIE_LABEL + " (exposed: the last layer's share; the rest overlaps prefill)",
    }
    return cells, sources, cpu, fpga, cfg, g


def format_thesis(cells, sources, cfg, g) -> str:
    lines = [
        f"Thesis table: gpt2-medium dimensions, random weights, {g.name} geometry; seconds "
        "per request (prefill + all output tokens)",
        "",
        "| prompt | output | GPU-only s | FPGA-only s | hybrid s | KV moved MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (P, N), c in sorted(cells.items()):
        lines.append(
            f"| {P} | {N} | {c.gpu_only:.3f} | {c.fpga_only:.3f} | {c.hybrid:.3f} "
            f"| {c.parts['kv_moved'] / 1e6:.2f} |"
        )
    full = full_kv_bytes(cfg, g)
    lines += [
        "",
        "Sources:",
        f"- GPU-only = prefill + decode, {sources['gpu']}",
        f"- FPGA-only = prompt and output token by token on the core, {sources['fpga']}",
        f"- hybrid = measured prefill + exposed transfer + FPGA decode; transfer "
        f"{sources['transfer']}",
        f"- KV moved = layout.kv_prefix_bytes of the prompt, all layers, K and V; the thesis "
        f"moved the fixed n_ctx={cfg.n_ctx} buffer: {full / 1e6:.2f} MB on every request",
    ]
    return "\n".join(lines)


def plot_timeline(path: Path, cpu: CpuTimes, fpga: FpgaDecodeModel, cfg, g, P: int, N: int):
    """Per-layer prefill, per-layer transfer (two hops) and decode for one configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = cpu.layer_s[P] if cpu.cfg.n_layer == cfg.n_layer else None
    pre = cpu.prefill(P)
    if layers is None:  # another model was timed: spread its total evenly
        layers = [pre / cfg.n_layer] * cfg.n_layer
    hop = kv_moved_bytes(cfg, g, P) / cfg.n_layer / PCIE_BYTES_S
    fig, ax = plt.subplots(figsize=(11, 3.6), dpi=120)
    t, hop1_free, hop2_free = 0.0, 0.0, 0.0
    for i, dt in enumerate(layers):
        ax.broken_barh([(t * 1e3, dt * 1e3)], (20, 8), color="tab:blue" if i % 2 else "tab:cyan")
        t += dt
        s1 = max(t, hop1_free)
        ax.broken_barh([(s1 * 1e3, hop * 1e3)], (10, 8), color="tab:orange")
        hop1_free = s1 + hop
        s2 = max(hop1_free, hop2_free)
        ax.broken_barh([(s2 * 1e3, hop * 1e3)], (0, 8), color="tab:red")
        hop2_free = s2 + hop
    dec = fpga.tokens(P, N - 1)
    ax.broken_barh([(hop2_free * 1e3, dec * 1e3)], (-10, 8), color="tab:green")
    ax.set_yticks([24, 14, 4, -6])
    ax.set_yticklabels(
        [
            "prefill per layer\n(" + cpu.label.split(" (")[0] + ")",
            "KV GPU->host\n(modelled PCIe)",
            "KV host->FPGA\n(modelled PCIe)",
            "FPGA decode\n(" + fpga.label.split(",")[0].split(" (")[0] + ")",
        ],
        fontsize=8,
    )
    ax.set_xlabel("time (ms)")
    ax.set_title(
        f"gpt2-medium, prompt {P}, output {N}: prefill / per-layer KV transfer / decode",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
