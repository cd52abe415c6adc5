"""The thesis's 3x3 table (``tandem bench --thesis``): prompt 64/256/512 x output 64/256/512 at
gpt2-medium dimensions with random weights; columns CPU-only (timed here, standing in for a
GPU), A10-only (the thesis's measured GPU), FPGA-only, and the hybrid on either prefill; then
the hybrid on the A10's prefill against the A10 alone and against the thesis's own hybrid.

Nothing here has a GPU or an FPGA, so every number carries its source:

- ``measured (this CPU, <model>)``: the torch prefill and torch decode (gpu/prefill.py,
  gpu/decode.py, the same code a GPU runs) timed on this machine's CPU: the CPU-only column and
  the hybrid on the CPU's prefill. They are not GPU times.
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
  twice (GPU to host, host to FPGA), layer by layer behind the prefill
  (:func:`handoff_schedule`); only what runs past the last layer is exposed.
- ``measured in the thesis``: the prior hybrid platform's own figures (:data:`THESIS_MS`, its
  tables 4-6): FasterTransformer on an NVIDIA A10 (prefill, generation) and DFX on a U55C
  (prefill, generation, KV transfer), gpt2-medium, in ms. They give the A10 column, the hybrid
  from the A10's prefill (A10 prefill + modelled exposed transfer + projected FPGA decode) and
  the thesis's own hybrid (:func:`thesis_hybrid_ms`), against which the speed-ups are printed.
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
THESIS_CITATION = "the thesis, tables 4-6"
THESIS_MS: dict = {
    "a10_prefill": {64: 7.61, 256: 10.25, 512: 15.34},
    "a10_generation": {
        64: {64: 361.39, 256: 1249.99, 512: 2566.41},
        256: {64: 312.17, 256: 1282.23, 512: 2689.53},
        512: {64: 323.75, 256: 1320.70, 512: 2692.78},
    },
    "dfx_prefill": {64: 156.46, 256: 614.44, 512: 1247.52},
    "dfx_generation": {
        64: {64: 215.53, 256: 598.98, 512: 1715.56},
        256: {64: 218.56, 256: 869.77, 512: 1745.27},
        512: {64: 221.95, 256: 884.55, 512: 1779.86},
    },
    "kv_transfer": (149.0, 214.0),
}
"""The thesis's measured figures (:data:`THESIS_CITATION`; gpt2-medium, FasterTransformer on an
NVIDIA A10 and DFX on an Alveo U55C), every one in milliseconds, the only copy of them in the
project: ``*_prefill[prompt]`` is the prompt's prefill;
``*_generation[prompt][output]`` the total time of all ``output`` generated tokens after it;
``kv_transfer`` the (lowest, highest) KV handoff time: every shape's lies in this range (the
thesis moved one fixed n_ctx-sized buffer whatever the shape; the per-shape values are not
carried here)."""
THESIS_BEST_SPEEDUP = 1.56
"""The thesis's best hybrid speed-up over the A10 alone, as it reports it."""
A10_LABEL = (
    "A10, measured in the thesis (FasterTransformer on an NVIDIA A10, gpt2-medium; "
    f"{THESIS_CITATION})"
)
THESIS_HYBRID_LABEL = (
    "measured in the thesis: A10 prefill + KV transfer "
    f"({THESIS_MS['kv_transfer'][0]:.0f}-{THESIS_MS['kv_transfer'][1]:.0f} ms: every shape's "
    "transfer lies in this range, the same fixed n_ctx buffer each time; the per-shape value is "
    "not carried, so the thesis hybrid is a range) + DFX's generation on a U55C "
    f"({THESIS_CITATION})"
)
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


def handoff_schedule(layers, hop: float) -> tuple[list[tuple[float, float, float, float]], float]:
    """The layer-by-layer KV handoff (gpu/transfer.py's pipeline), modelled: layer ``i``'s K and V
    cross two links one after the other (GPU to pinned host, host to FPGA HBM), ``hop`` seconds
    each; the first hop starts when the layer has ended and the first link is free, the second
    when the first hop is done and the second link is free. ``layers``: the prefill's seconds per
    layer, back to back from 0.

    Returns ``(rows, exposed)``: per layer (start, duration, first hop's start, second hop's
    start), and the seconds by which the last hop ends after the last layer (what the overlap
    cannot hide; ``2 * hop`` when every hop is shorter than the layer after it)."""
    t = free1 = free2 = 0.0
    rows = []
    for dt in layers:
        start, t = t, t + dt
        s1 = max(t, free1)
        free1 = s1 + hop
        s2 = max(free1, free2)
        free2 = s2 + hop
        rows.append((start, dt, s1, s2))
    return rows, free2 - t


def a10_only_ms(P: int, N: int) -> float:
    """The A10 alone, from :data:`THESIS_MS`: prefill of ``P`` + generation of ``N`` (ms)."""
    return THESIS_MS["a10_prefill"][P] + THESIS_MS["a10_generation"][P][N]


def thesis_hybrid_ms(P: int, N: int) -> tuple[float, float]:
    """The thesis's hybrid from its measured figures (:data:`THESIS_MS`), in ms: A10 prefill of
    ``P`` + KV transfer + DFX generation of ``N``, at the lowest and the highest KV transfer
    the thesis reports (it gives the range, the same for every shape)."""
    base = THESIS_MS["a10_prefill"][P] + THESIS_MS["dfx_generation"][P][N]
    lo, hi = THESIS_MS["kv_transfer"]
    return base + lo, base + hi


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
    """One (prompt, output) shape; every time in seconds. See :func:`thesis_table`."""

    cpu_only: float
    fpga_only: float
    cpu_hybrid: float
    a10_only: float
    a10_hybrid: float
    thesis_hybrid: tuple[float, float]  # at the thesis's lowest and highest KV transfer
    parts: dict

    @property
    def speedup_over_a10(self) -> float:
        """The hybrid on the A10's prefill against the A10 alone."""
        return self.a10_only / self.a10_hybrid

    @property
    def speedup_over_thesis(self) -> tuple[float, float]:
        """The hybrid on the A10's prefill against the thesis's hybrid (low, high)."""
        return tuple(t / self.a10_hybrid for t in self.thesis_hybrid)

    @property
    def thesis_speedup_over_a10(self) -> tuple[float, float]:
        """The thesis's hybrid against the A10 alone (low, high)."""
        return tuple(self.a10_only / t for t in reversed(self.thesis_hybrid))


def cpu_layers(cpu: CpuTimes, cfg: GPT2Config, P: int) -> list[float]:
    """The CPU's measured seconds per layer for a ``P``-token prefill; spread evenly over
    ``cfg``'s layers when another model was timed."""
    pre = cpu.prefill(P)
    if cpu.cfg.n_layer == cfg.n_layer:
        return cpu.layer_s[P]
    return [pre / cfg.n_layer] * cfg.n_layer


def a10_layers(cfg: GPT2Config, P: int) -> list[float]:
    """The A10's prefill of ``P`` tokens (:data:`THESIS_MS`, a total) spread evenly over the
    layers, in seconds: the thesis gives no per-layer times."""
    return [THESIS_MS["a10_prefill"][P] / 1e3 / cfg.n_layer] * cfg.n_layer


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
    to look for the bench-rtl result (:class:`FpgaDecodeModel`).

    Per cell (seconds): ``cpu_only`` = CPU prefill + (N-1) CPU decode steps; ``fpga_only`` =
    the core's prompt and N-1 tokens; ``cpu_hybrid`` = CPU prefill + exposed transfer + FPGA
    decode of N-1 tokens (the prefill gives the first); ``a10_only`` = A10 prefill + A10
    generation (:func:`a10_only_ms`); ``a10_hybrid`` = A10 prefill + exposed transfer (the
    prefill spread evenly over the layers, :func:`handoff_schedule`) + the same FPGA decode;
    ``thesis_hybrid`` = :func:`thesis_hybrid_ms`."""
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
        hop = moved / cfg.n_layer / PCIE_BYTES_S
        _, cpu_exposed = handoff_schedule(cpu_layers(cpu, cfg, P), hop)
        _, a10_exposed = handoff_schedule(a10_layers(cfg, P), hop)
        a10_pre = THESIS_MS["a10_prefill"][P] / 1e3
        for N in OUTPUTS:
            cpu_decode = d_ctx * (N - 1)
            fpga_decode = fpga.tokens(P, N - 1)
            cells[P, N] = Cell(
                cpu_only=pre + cpu_decode,
                fpga_only=fpga.prompt(P) + fpga_decode,
                cpu_hybrid=pre + cpu_exposed + fpga_decode,
                a10_only=a10_only_ms(P, N) / 1e3,
                a10_hybrid=a10_pre + a10_exposed + fpga_decode,
                thesis_hybrid=tuple(t / 1e3 for t in thesis_hybrid_ms(P, N)),
                parts={
                    "prefill": pre,
                    "cpu_decode": cpu_decode,
                    "fpga_prefill": fpga.prompt(P),
                    "fpga_decode": fpga_decode,
                    "transfer": 2 * moved / PCIE_BYTES_S,
                    "transfer_exposed": cpu_exposed,
                    "a10_prefill": a10_pre,
                    "a10_generation": THESIS_MS["a10_generation"][P][N] / 1e3,
                    "a10_transfer_exposed": a10_exposed,
                    "dfx_generation": THESIS_MS["dfx_generation"][P][N] / 1e3,
                    "kv_moved": moved,
                },
            )
    sources = {
        "cpu": cpu.label
        + f" (prefill once; decode: the mean of {cpu.decode_steps} timed steps after the "
        "prefill of P tokens, x (N-1))",
        "a10": A10_LABEL,
        "fpga": fpga.label + fpga.origin(),
        "transfer": PCIE_LABEL + ", layer by layer behind the prefill (exposed: what runs past "
        "the last layer: its two hops while every hop is shorter than a layer)",
        "thesis": THESIS_HYBRID_LABEL,
    }
    return cells, sources, cpu, fpga, cfg, g


def _range(lo: float, hi: float, fmt: str = ".2f", unit: str = "") -> str:
    return f"{lo:{fmt}}-{hi:{fmt}}{unit}"


def format_thesis(cells, sources, cfg, g) -> str:
    lines = [
        f"Thesis table: gpt2-medium dimensions, random weights, {g.name} geometry; seconds "
        "per request (prefill + all output tokens)",
        "",
        "| prompt | output | CPU-only s (this CPU) | A10-only s (thesis) | FPGA-only s "
        "| hybrid s, CPU prefill | hybrid s, A10 prefill | KV moved MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (P, N), c in sorted(cells.items()):
        lines.append(
            f"| {P} | {N} | {c.cpu_only:.3f} | {c.a10_only:.3f} | {c.fpga_only:.3f} "
            f"| {c.cpu_hybrid:.3f} | {c.a10_hybrid:.3f} | {c.parts['kv_moved'] / 1e6:.2f} |"
        )
    lines += [
        "",
        "Hybrid on the A10's figures against the A10 alone and the thesis's hybrid, ms per "
        "request:",
        "",
        "| prompt | output | A10 prefill | exposed transfer | FPGA decode | hybrid | A10-only "
        "| hybrid vs A10 | thesis hybrid | hybrid vs thesis hybrid | thesis hybrid vs A10 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (P, N), c in sorted(cells.items()):
        p = c.parts
        lines.append(
            f"| {P} | {N} | {p['a10_prefill'] * 1e3:.2f} | {p['a10_transfer_exposed'] * 1e3:.3f} "
            f"| {p['fpga_decode'] * 1e3:.2f} | {c.a10_hybrid * 1e3:.2f} | {c.a10_only * 1e3:.2f} "
            f"| {c.speedup_over_a10:.2f}x | {_range(*(t * 1e3 for t in c.thesis_hybrid))} "
            f"| {_range(*c.speedup_over_thesis, unit='x')} "
            f"| {_range(*c.thesis_speedup_over_a10, unit='x')} |"
        )
    full = full_kv_bytes(cfg, g)
    best = max(cells.values(), key=lambda c: c.thesis_speedup_over_a10[1])
    bP, bN = next(k for k, v in cells.items() if v is best)
    lines += [
        "",
        "Sources:",
        f"- CPU-only = prefill + decode, {sources['cpu']}: a CPU, not a GPU",
        f"- A10-only = prefill + generation, {sources['a10']}",
        f"- FPGA-only = prompt and output token by token on the core, {sources['fpga']}",
        f"- hybrid = prefill (CPU: measured; A10: the thesis's, spread evenly over the "
        f"{cfg.n_layer} layers) + exposed transfer + FPGA decode of the N-1 tokens after the "
        f"prefill's first (projected, as FPGA-only); transfer {sources['transfer']}",
        f"- thesis hybrid = {sources['thesis']}; the thesis reports its best speed-up over the "
        f"A10 as {THESIS_BEST_SPEEDUP:.2f}x (here its best shape is prompt {bP}, output {bN}: "
        f"{_range(*best.thesis_speedup_over_a10, unit='x')})",
        "- hybrid vs A10 = A10-only / hybrid; hybrid vs thesis hybrid = thesis hybrid / hybrid; "
        "thesis hybrid vs A10 = A10-only / thesis hybrid",
        f"- KV moved = layout.kv_prefix_bytes of the prompt, all layers, K and V; the thesis "
        f"moved the fixed n_ctx={cfg.n_ctx} buffer: {full / 1e6:.2f} MB on every request",
    ]
    return "\n".join(lines)


def _draw_handoff(ax, layers, hop, decode, labels, cyan=("tab:cyan", "tab:blue")):
    """Bars of one hybrid request on ``ax`` (ms): prefill per layer at y 20, the two hops at
    10 and 0, the FPGA decode at -10 from the end of the last hop. Returns the decode's start."""
    rows, exposed = handoff_schedule(layers, hop)
    for i, (start, dt, s1, s2) in enumerate(rows):
        ax.broken_barh([(start * 1e3, dt * 1e3)], (20, 8), color=cyan[i % 2])
        ax.broken_barh([(s1 * 1e3, hop * 1e3)], (10, 8), color="tab:orange")
        ax.broken_barh([(s2 * 1e3, hop * 1e3)], (0, 8), color="tab:red")
    t0 = sum(layers) + exposed
    ax.broken_barh([(t0 * 1e3, decode * 1e3)], (-10, 8), color="tab:green")
    ax.set_yticks([24, 14, 4, -6][: len(labels)])
    ax.set_yticklabels(labels, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return t0


def plot_timeline(path: Path, cpu: CpuTimes, fpga: FpgaDecodeModel, cfg, g, P: int, N: int):
    """Per-layer prefill, per-layer transfer (two hops) and decode for one configuration, in
    three panels: the CPU's measured prefill; the A10's (the thesis's total spread over the
    layers) with the thesis's own hybrid under it; the A10's prefill and handoff enlarged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hop = kv_moved_bytes(cfg, g, P) / cfg.n_layer / PCIE_BYTES_S
    dec = fpga.tokens(P, N - 1)
    fpga_name = fpga.label.split(",")[0].split(" (")[0]
    hops = ["KV GPU->host\n(modelled PCIe)", "KV host->FPGA\n(modelled PCIe)"]
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(11, 10.5), dpi=120, gridspec_kw={"height_ratios": [1, 1.5, 1]}
    )
    _draw_handoff(
        ax1,
        cpu_layers(cpu, cfg, P),
        hop,
        dec,
        [
            f"prefill per layer\n(measured on this CPU,\n{cpu.cfg.name})",
            *hops,
            f"FPGA decode\n({fpga_name})",
        ],
    )
    ax1.set_xlabel("time (ms)")
    ax1.set_title(
        f"gpt2-medium, prompt {P}, output {N}: prefill (this CPU, standing in for the GPU) / "
        "per-layer KV transfer / decode",
        fontsize=10,
    )

    a10 = a10_layers(cfg, P)
    a10_labels = [
        f"prefill per layer\n(A10, measured in the\nthesis, total / {cfg.n_layer})",
        *hops,
        f"FPGA decode\n({fpga_name})",
    ]
    start = _draw_handoff(ax2, a10, hop, dec, a10_labels)
    pre = sum(a10)
    lo, hi = (t / 1e3 for t in THESIS_MS["kv_transfer"])
    gen = THESIS_MS["dfx_generation"][P][N] / 1e3
    ax2.broken_barh([(pre * 1e3, lo * 1e3)], (-20, 8), color="tab:gray")
    ax2.broken_barh([((pre + lo) * 1e3, (hi - lo) * 1e3)], (-20, 8), color="tab:gray", alpha=0.35)
    ax2.broken_barh([((pre + lo) * 1e3, gen * 1e3)], (-30, 8), color="tab:purple", alpha=0.6)
    alone = a10_only_ms(P, N) / 1e3
    ax2.broken_barh([(0, pre * 1e3)], (-40, 8), color="tab:cyan")
    ax2.broken_barh([(pre * 1e3, (alone - pre) * 1e3)], (-40, 8), color="tab:blue", alpha=0.6)
    ax2.set_yticks([24, 14, 4, -6, -16, -26, -36])
    ax2.set_yticklabels(
        [
            *a10_labels,
            f"thesis: KV transfer\n({lo * 1e3:.0f}-{hi * 1e3:.0f} ms, measured)",
            "thesis: DFX generation\n(measured, from the\nshortest transfer)",
            "A10 alone: prefill,\ngeneration (measured\nin the thesis)",
        ],
        fontsize=8,
    )
    hybrid = start + dec
    end = max(hybrid, pre + hi + gen, alone)
    ax2.set_xlim(-0.02 * end * 1e3, 1.02 * end * 1e3)
    ax2.set_xlabel("time (ms)")
    ax2.set_title(
        f"the same with the A10's prefill ({pre * 1e3:.2f} ms, measured in the thesis): hybrid "
        f"{hybrid * 1e3:.1f} ms,\n{alone / hybrid:.2f}x the A10 alone ({alone * 1e3:.1f} ms) "
        f"and {(pre + lo + gen) / hybrid:.2f}-{(pre + hi + gen) / hybrid:.2f}x the thesis's "
        f"hybrid ({(pre + lo + gen) * 1e3:.0f}-{(pre + hi + gen) * 1e3:.0f} ms)",
        fontsize=10,
    )

    _draw_handoff(ax3, a10, hop, dec, a10_labels)
    ax3.set_xlim(-0.2, (start + 0.05 * pre) * 1e3 + 0.5)
    ax3.set_xlabel("time (ms)")
    ax3.set_title(
        f"enlarged: the A10's prefill and the layer-by-layer handoff ({hop * 1e3:.3f} ms per "
        f"hop per layer; {(start - pre) * 1e3:.3f} ms exposed after the last layer)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
