"""Decode benchmarks of the device backends (``tandem bench``, ``make bench``).

The ISA simulator's speed is a property of this host, not of the FPGA: it says how fast the
bit-exact model decodes here. FPGA speed comes from RTL-simulation cycle counts, elsewhere.
``tokens/s`` is wall-clock; ``CPU ms/token`` is the process's CPU time per token, which stays
meaningful when other jobs share the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.checkpoint import random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry

from .runtime import Session


@dataclass
class BenchRow:
    model: str
    geometry: str
    backend: str
    prompt: int
    tokens: int
    compile_s: float
    load_s: float
    decode_s: float
    decode_cpu_s: float
    hbm_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s

    @property
    def cpu_ms_per_token(self) -> float:
        return 1e3 * self.decode_cpu_s / self.tokens

    @property
    def hbm_bytes_per_token(self) -> float:
        """HBM traffic per position processed (each streams every weight once)."""
        return self.hbm_bytes / max(1, self.prompt + self.tokens - 1)


def bench_decode(
    model: str = "gpt2",
    geom: str = "u55c",
    prompt_len: int = 1,
    n_new: int = 32,
    seed: int = 0,
    backend: str = "model",
    log: Callable[[str], None] | None = None,
) -> BenchRow:
    """Greedy decoding of ``n_new`` tokens after a random ``prompt_len``-token prompt, with
    random weights; decode time runs from start to done (the prompt positions included)."""
    log = log or (lambda msg: None)
    cfg, g = preset(model), geometry(geom)
    log(f"{model} on {geom}: random weights ...")
    weights = random_weights(cfg, seed=seed)
    log(f"{model} on {geom}: compiling ...")
    t0 = time.perf_counter()
    compiled = compile_model(cfg, weights, g)
    compile_s = time.perf_counter() - t0
    del weights
    log(f"{model} on {geom}: loading ({len(compiled.program)} instructions) ...")
    with Session(cfg, None, g, backend, compiled=compiled) as session:
        ids = np.random.default_rng(seed).integers(0, cfg.n_vocab, prompt_len).tolist()
        log(f"{model} on {geom}: decoding {n_new} tokens ...")
        result = session.generate(ids, n_new)
    stats = result.stats
    return BenchRow(
        model=model,
        geometry=geom,
        backend=backend,
        prompt=prompt_len,
        tokens=len(result.tokens),
        compile_s=compile_s,
        load_s=result.timings["load"],
        decode_s=result.timings["decode"],
        decode_cpu_s=result.timings["decode_cpu"],
        hbm_bytes=stats.get("hbm_read", 0) + stats.get("hbm_written", 0),
    )


def format_table(rows: list[BenchRow]) -> str:
    """A Markdown table of benchmark rows."""
    head = (
        "| model | geometry | backend | prompt | tokens | compile s | load s | tokens/s "
        "| CPU ms/token | HBM bytes/token |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.geometry} | {r.backend} | {r.prompt} | {r.tokens} "
            f"| {r.compile_s:.2f} | {r.load_s:.2f} | {r.tokens_per_s:.2f} "
            f"| {r.cpu_ms_per_token:.1f} | {r.hbm_bytes_per_token:,.0f} |"
        )
    return "\n".join(lines)
