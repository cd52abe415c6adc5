"""The thesis's 3x3 table (``tandem bench --thesis``): prompt 64/256/512 x output 64/256/512 at
gpt2-medium dimensions with random weights; columns GPU-only, FPGA-only and hybrid.

Nothing here has a GPU or an FPGA, so every number carries its source:

- ``measured (this CPU, <model>)``: the torch prefill and torch decode (gpu/prefill.py,
  gpu/decode.py, the same code a GPU runs) timed on this machine's CPU. They stand in for the GPU
  columns; they are not GPU times.
- ``projected (RTL cycles ...)``: FPGA time per position from ``make bench-rtl``'s result
  (:data:`RTL_RESULT`, package data ``tandem/host/data/bench-rtl.json`` with its provenance, which
  ``scripts/bench_rtl.py --record`` writes):
  the HBM efficiency it measured in RTL simulation (achieved bytes per cycle over the
  32-channel peak) applied to the bytes the model streams per position at each context length
  (the layout's weights and KV prefix, times the ratio of bytes the core read to the layout's
  count when the result gives it). For the measured model itself this is its measured cycles at
  the measured context, and scales with the KV bytes elsewhere; for another model (the table's
  gpt2-medium when gpt2 was simulated) it is a projection and labelled so. Without a result the
  FPGA time is ``assumed``: :data:`ASSUMED_HBM_EFFICIENCY` of the U55C's peak, the DFX-style
  target, and labelled so. Prompt positions skip the LM head (the core computes it only from
  the last prompt position on), so they stream fewer bytes.
- ``modelled (PCIe Gen3 x16, 12 GB/s)``: KV bytes (``layout.kv_prefix_bytes``) over the link,
  twice (GPU to host, host to FPGA).
"""

from __future__ import annotations

import json
import math
import os
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
RTL_RESULT = Path(__file__).resolve().parent / "data" / "bench-rtl.json"
"""The recorded ``make bench-rtl`` result, shipped inside the package (``tandem.host`` package
data) so that an installed package needs no repository folder. Its ``provenance`` field names
the command and the RTL commit; ``scripts/bench_rtl.py --record`` rewrites it (and its copy
``docs/bench-rtl.json``). A fresh unrecorded run in ``build/`` is not used unless passed."""
RTL_RESULTS = (RTL_RESULT,)
"""Where :class:`FpgaDecodeModel` looks by default, in order; the first that exists is used."""
RTL_FIELDS = (
    "model",
    "geometry",
    "clock_mhz",
    "ctx",
    "cycles_per_token",
    "bytes_per_token",
    "hbm_efficiency",
)
"""Fields :class:`FpgaDecodeModel` needs from it (``layout_bytes_per_token`` is optional)."""


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


def head_bytes(layout: HBMLayout) -> int:
    """HBM bytes of the LM head and the final LayerNorm, which prompt positions skip."""
    g = layout.geom
    return sum(layout[n].nbytes * g.channels for n in ("ln_f.weight", "ln_f.bias", "lm_head"))


def kv_read_bytes(cfg: GPT2Config, g: CoreGeometry, ctx: int) -> int:
    return 2 * cfg.n_layer * g.channels * kv_prefix_bytes(g, cfg.n_head, ctx)


def kv_moved_bytes(cfg: GPT2Config, g: CoreGeometry, prompt: int) -> int:
    """Bytes the hybrid handoff moves: the prompt's KV prefix, all layers, K and V."""
    return kv_read_bytes(cfg, g, prompt)


def full_kv_bytes(cfg: GPT2Config, g: CoreGeometry) -> int:
    """The thesis's fixed buffer: every layer's whole n_ctx-sized K and V."""
    return kv_read_bytes(cfg, g, cfg.n_ctx)


def read_rtl_result(paths=RTL_RESULTS) -> tuple[dict | None, Path | None]:
    """The first of ``paths`` that exists, parsed, with its path; (None, None) if none does.
    Raises ValueError naming the file if it lacks a field of :data:`RTL_FIELDS`."""
    for path in map(Path, paths):
        if path.is_file():
            data = json.loads(path.read_text())
            missing = [f for f in RTL_FIELDS if f not in data]
            if missing:
                raise ValueError(f"{path} lacks {', '.join(missing)} (make bench-rtl writes them)")
            return data, path
    return None, None


class FpgaDecodeModel:
    """Seconds per FPGA position at a context length: from RTL cycles (``make bench-rtl``) when
    a result for this geometry exists, else assumed. See the module docstring.

    Parameters
    ----------
    cfg, g, layout : the model on the core geometry
    rtl_paths : where to look for the bench-rtl JSON, in order (default :data:`RTL_RESULTS`)

    Attributes: ``label`` (the source, for tables), ``efficiency`` (fraction of the HBM peak),
    ``read_ratio`` (bytes the core reads per layout byte), ``rtl`` (the JSON, or None),
    ``rtl_path``, and ``note`` (why a result that exists was not used).
    """

    def __init__(self, cfg: GPT2Config, g: CoreGeometry, layout: HBMLayout, rtl_paths=RTL_RESULTS):
        self.cfg, self.g, self.layout = cfg, g, layout
        self.peak = g.peak_gbps * 1e9
        self._streamed = streamed_bytes(layout)
        self._head = head_bytes(layout)
        self.efficiency, self.read_ratio = ASSUMED_HBM_EFFICIENCY, 1.0
        self.rtl, self.rtl_path, self.note = None, None, ""
        data, path = read_rtl_result(rtl_paths)
        if data is not None and data["geometry"] != g.name:
            self.note = f"{path} is for the {data['geometry']} geometry, not {g.name}: not used"
        elif data is not None:
            self.rtl, self.rtl_path = data, path
            self.efficiency = float(data["hbm_efficiency"])
            same = data["model"] == cfg.name
            lay = (
                self.position_bytes(int(data["ctx"]))
                if same
                else data.get("layout_bytes_per_token")
            )
            if lay:
                self.read_ratio = float(data["bytes_per_token"]) / float(lay)
        if self.rtl is None:
            mid = self.per_token(cfg.n_ctx // 2)
            self.label = (
                f"assumed: {mid * 1e3:.2f} ms/token (DFX-style {ASSUMED_HBM_EFFICIENCY:.0%} of "
                f"HBM peak target), awaiting make bench-rtl"
            )
            return
        d = self.rtl
        where = f"RTL cycles of {d['model']} at {d['geometry']}"
        if d["model"] == cfg.name:
            self.label = (
                f"projected ({where}: {d['cycles_per_token']:,} cycles/token at context "
                f"{d['ctx']}, {d['clock_mhz']:.0f} MHz, {self.efficiency:.1%} of HBM peak)"
            )
        else:
            ratio = (
                f", {self.read_ratio:.3f}x the layout's bytes"
                if d.get("layout_bytes_per_token")
                else ""
            )
            self.label = (
                f"projected ({where}, {self.efficiency:.1%} of HBM peak{ratio}, applied to "
                f"{cfg.name}'s bytes per token)"
            )

    def origin(self) -> str:
        """Where the FPGA numbers came from, for a table's notes ("" when assumed for lack of
        any result)."""
        if self.rtl_path is not None:
            if self.rtl_path == RTL_RESULT:
                core = self.rtl.get("provenance", {}).get("core_commit", "unknown")
                return f"; from the packaged tandem/host/data/bench-rtl.json (RTL {core})"
            return f"; from {self.rtl_path}"
        return f" ({self.note})" if self.note else ""

    def position_bytes(self, ctx: int, head: bool = True) -> int:
        """Layout bytes one position streams with ``ctx`` positions of KV (``head``: the LM
        head too, as every position from the last prompt position on)."""
        head_part = 0 if head else self._head
        return self._streamed - head_part + kv_read_bytes(self.cfg, self.g, ctx)

    def per_token(self, ctx: int, head: bool = True) -> float:
        """Seconds for one position with ``ctx`` positions of KV."""
        nbytes = self.position_bytes(ctx, head) * self.read_ratio
        return nbytes / (self.efficiency * self.peak)

    def tokens(self, first: int, n: int) -> float:
        """Generating positions first .. first+n-1, one at a time (LM head on each)."""
        return sum(self.per_token(t + 1) for t in range(first, first + n))

    def prompt(self, n: int) -> float:
        """The core consuming an ``n``-token prompt: positions 0 .. n-2 without the LM head,
        then position n-1 with it (which gives the first token)."""
        if n <= 0:
            return 0.0
        return sum(self.per_token(t + 1, head=False) for t in range(n - 1)) + self.per_token(n)


def read_cpu_times(path: Path) -> dict:
    """The JSON :meth:`CpuTimes.save` wrote, checked: an object with ``model`` (a preset name),
    ``threads`` and ``decode_steps`` (whole numbers >= 1), and ``prefill_s``, ``decode_s``
    (seconds) and ``layer_s`` (a list of seconds per layer) for every prompt length of
    :data:`PROMPTS`, every time finite and >= 0. Raises ValueError naming the file and what is
    wrong, one line."""
    from tandem.config import PRESETS

    path = Path(path)
    hint = "write it with tandem bench --thesis --save-times FILE"

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; {hint}")

    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file of CPU times; {hint}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; {hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise bad(f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise bad(f"holds a JSON {type(data).__name__}, not an object of CPU times")
    missing = [k for k in ("model", "threads", "decode_steps", *_TIME_KEYS) if k not in data]
    if missing:
        raise bad(f"lacks {', '.join(repr(k) for k in missing)}")
    if not isinstance(data["model"], str) or data["model"] not in PRESETS:
        raise bad(
            f"'model' must name a preset ({', '.join(sorted(PRESETS))}), not {data['model']!r}"
        )
    for key in ("threads", "decode_steps"):
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"{key!r} must be a whole number >= 1, not {v!r}")
    n_layer = preset(data["model"]).n_layer

    def seconds(key: str, where: str, v) -> None:
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        if not ok or not math.isfinite(v) or v < 0:
            raise bad(f"{key}[{where}] must be seconds (a finite number >= 0), not {v!r}")

    for key in _TIME_KEYS:
        table = data[key]
        if not isinstance(table, dict):
            raise bad(
                f"{key!r} must be an object of prompt length -> seconds, not {type(table).__name__}"
            )
        for P in PROMPTS:
            if str(P) not in table:
                raise bad(f"{key!r} has no entry for prompt length {P}")
        for k, v in table.items():
            if not k.isdigit():
                raise bad(f"{key!r} key {k!r} is not a prompt length")
            if key == "layer_s":
                if not isinstance(v, list) or len(v) != n_layer:
                    raise bad(
                        f"layer_s[{k!r}] must be a list of {n_layer} per-layer times "
                        f"({data['model']} has {n_layer} layers), not {v!r:.60}"
                    )
                for i, x in enumerate(v):
                    seconds(key, f"{k!r}][{i}", x)
            else:
                seconds(key, repr(k), v)
    return data


_TIME_KEYS = ("prefill_s", "layer_s", "decode_s")


class CpuTimes:
    """Torch prefill and decode timed on this CPU (stand-ins for the GPU).

    Times are kept in ``prefill_s``, ``layer_s`` and ``decode_s``; :meth:`save` writes them
    (with the model, thread count and load averages) and :meth:`load` reads them back, so the
    table can be redrawn (e.g. once ``make bench-rtl`` has run) without timing again.
    """

    def __init__(self, model_name: str, log: Callable[[str], None], decode_steps: int = 2):
        import torch

        self.cfg = preset(model_name)
        self.threads = torch.get_num_threads()
        self.label = f"measured (this CPU, {model_name}, {self.threads} threads)"
        self.model = None
        self.decode_steps = decode_steps
        self.prefill_s: dict[int, float] = {}
        self.layer_s: dict[int, list[float]] = {}
        self.decode_s: dict[int, float] = {}
        self.loadavg: list[list[float]] = []
        self.log = log

    def _prepared(self):
        if self.model is None:
            from tandem.checkpoint import random_weights
            from tandem.gpu.prefill import PreparedModel

            self.log(f"{self.cfg.name}: random weights, preparing for torch on the CPU ...")
            self.model = PreparedModel(self.cfg, random_weights(self.cfg, seed=0), "cpu")
        return self.model

    def _note_load(self) -> None:
        self.loadavg.append([round(x, 2) for x in os.getloadavg()])

    def save(self, path: Path) -> None:
        data = {
            "model": self.cfg.name,
            "threads": self.threads,
            "decode_steps": self.decode_steps,
            "cpus": os.cpu_count(),
            "loadavg_1_5_15": self.loadavg,
            "prefill_s": self.prefill_s,
            "layer_s": self.layer_s,
            "decode_s": self.decode_s,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path, log: Callable[[str], None] = lambda m: None) -> CpuTimes:
        """Times saved by :meth:`save` (measured earlier on this machine; labelled so).

        Raises ValueError, one line naming the file, for anything :meth:`save` would not have
        written (:func:`read_cpu_times`): nothing is timed again for a bad file."""
        data = read_cpu_times(path)
        self = cls.__new__(cls)
        self.cfg = preset(data["model"])
        self.threads = data["threads"]
        self.label = (
            f"measured (this CPU, {data['model']}, {self.threads} threads; "
            f"saved in {Path(path).name})"
        )
        self.model = None
        self.decode_steps = data["decode_steps"]
        self.prefill_s = {int(k): float(v) for k, v in data["prefill_s"].items()}
        self.layer_s = {int(k): [float(x) for x in v] for k, v in data["layer_s"].items()}
        self.decode_s = {int(k): float(v) for k, v in data["decode_s"].items()}
        self.loadavg = data.get("loadavg_1_5_15", [])
        self.log = log
        return self

    def prefill(self, T: int) -> float:
        from tandem.gpu.prefill import prefill

        if T not in self.prefill_s or (T not in self.decode_s and self._kv_for != T):
            self.log(f"timing prefill of {T} tokens on the CPU ...")
            ids = np.random.default_rng(T).integers(0, self.cfg.n_vocab, T).tolist()
            self._note_load()
            r = prefill(self.cfg, self._prepared(), ids)
            self._note_load()
            self.prefill_s[T] = r.timings["total"]
            self.layer_s[T] = r.timings["layers"]
            self.kv, self._kv_for = (r.k, r.v, r.first_token), T
            self.log(f"  prefill {T}: {r.timings['total']:.2f} s")
        return self.prefill_s[T]

    _kv_for: int | None = None

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
                    tok, k, v = decode_step(self.cfg, self._prepared(), tok, k, v)
            self.decode_s[ctx] = (time.perf_counter() - t0) / self.decode_steps
            self._note_load()
            self.log(f"  decode at {ctx}: {self.decode_s[ctx]:.3f} s/token")
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
    cpu: CpuTimes | None = None,
    rtl_paths=RTL_RESULTS,
):
    """Returns (cells[(P, N)], sources dict, cpu, fpga, cfg, g) for the 3x3 table. ``cpu``:
    times measured earlier (:meth:`CpuTimes.load`) instead of timing now; ``rtl_paths``: where
    to look for the bench-rtl result (:class:`FpgaDecodeModel`)."""
    cfg, g = preset("gpt2-medium"), geometry(geom)
    layout = HBMLayout(cfg, g)
    fpga = FpgaDecodeModel(cfg, g, layout, rtl_paths)
    if cpu is None:
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
                fpga_only=fpga.prompt(P) + fpga_decode,
                hybrid=pre + last_layer + fpga_decode,
                parts={
                    "prefill": pre,
                    "gpu_decode": gpu_decode,
                    "fpga_prefill": fpga.prompt(P),
                    "fpga_decode": fpga_decode,
                    "transfer": xfer,
                    "transfer_exposed": last_layer,
                    "kv_moved": moved,
                },
            )
    sources = {
        "gpu": cpu.label
        + f" (prefill once; decode: the mean of {cpu.decode_steps} timed steps after the "
        "prefill of P tokens, x (N-1))",
        "fpga": fpga.label + fpga.origin(),
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
            f"prefill per layer\n(measured on this CPU,\n{cpu.cfg.name})",
            "KV GPU->host\n(modelled PCIe)",
            "KV host->FPGA\n(modelled PCIe)",
            "FPGA decode\n(" + fpga.label.split(",")[0].split(" (")[0] + ")",
        ],
        fontsize=8,
    )
    ax.set_xlabel("time (ms)")
    ax.set_title(
        f"gpt2-medium, prompt {P}, output {N}: prefill (this CPU, standing in for the GPU) / "
        "per-layer KV transfer / decode",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
