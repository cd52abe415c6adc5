"""KV handoff numbers: bytes moved for a prompt, and the on-device reshape's throughput as a
fraction of a plain copy of the same bytes (both torch ops on the same device).

    python scripts/measure_kv_reshape.py [--model gpt2-medium] [--prompt 512] [--device cpu]
                                         [--reps 200]

Reshape and copy are timed interleaved (copy, reshape, copy, reshape, ...) and the best of each
is kept, so a burst of load from other jobs hits both alike; torch runs one thread. The load
average before and after is printed: on a shared machine it says how much to trust the figure.
Also timed, for the record: the reshape's parts (K gather, V transpose, V gather) and the
previous implementation (one permute-and-copy per tensor), on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tandem.config import preset
from tandem.geometry import geometry
from tandem.gpu.cuda import resolve_device, synchronize
from tandem.gpu.reshape import _gather_beats, reshape_kv
from tandem.layout import HBMLayout, dense_stride, kv_prefix_bytes


def interleaved_best(fns: dict, dev, reps: int) -> dict:
    """Best (minimum) seconds of each function, calling them in turn ``reps`` times."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(dev)
            t0 = time.perf_counter()
            fn()
            synchronize(dev)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def permute_reshape(g, k, v):
    """The previous gpu/reshape.py (commit 5ab773e): one permute + one copy per tensor straight
    into channel order (T a multiple of 64 here). Kept only to compare against."""
    n_head, t_len, _ = k.shape
    gg, st, lanes, be = t_len // 64, dense_stride(g), g.lanes, g.beat_elems
    jj = 64 // be
    kt = k.reshape(n_head, gg, st, lanes, jj, be).permute(3, 4, 1, 0, 2, 5)
    vt = v.reshape(n_head, gg, jj, be, st, lanes).permute(5, 2, 1, 0, 4, 3)
    return (
        kt.contiguous().view(torch.uint8).reshape(g.channels, -1),
        vt.contiguous().view(torch.uint8).reshape(g.channels, -1),
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--geometry", default="u55c")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)  # the host is shared; one thread gives stable numbers
    cfg, g, dev = preset(a.model), geometry(a.geometry), resolve_device(a.device)
    T = a.prompt
    per_layer = 2 * g.channels * kv_prefix_bytes(g, cfg.n_head, T)
    total = per_layer * cfg.n_layer
    region = HBMLayout(cfg, g)["h.0.k"].nbytes * g.channels * 2 * cfg.n_layer
    print(
        f"{a.model} on {g.name}, prompt {T}: KV moved {total / 1e6:.2f} MB "
        f"({per_layer / 1e6:.3f} MB per layer); full n_ctx={cfg.n_ctx} regions "
        f"{region / 1e6:.2f} MB"
    )
    k = torch.randint(-(1 << 15), 1 << 15, (cfg.n_head, T, 64), dtype=torch.int16, device=dev)
    v = torch.randint(-(1 << 15), 1 << 15, (cfg.n_head, T, 64), dtype=torch.int16, device=dev)
    kk, vv = k.clone(), v.clone()
    kb, vb = reshape_kv(g, k, v)
    gg = -(-T // 64)
    vt = torch.empty((cfg.n_head, gg, 64, 64), dtype=torch.int16, device=dev)
    beats = torch.empty((kb.numel() // g.beat_bytes, g.beat_elems), dtype=torch.int16, device=dev)
    fns = {
        "copy": lambda: (kk.copy_(k), vv.copy_(v)),
        "reshape": lambda: reshape_kv(g, k, v),
    }
    if T % 64 == 0:
        fns |= {
            "K gather": lambda: _gather_beats(g, k, T, beats),
            "V transpose": lambda: vt.copy_(v.reshape(cfg.n_head, gg, 64, 64).transpose(2, 3)),
            "V gather": lambda: _gather_beats(g, vt.view(cfg.n_head, -1, 64), T, beats),
            "previous": lambda: permute_reshape(g, k, v),
        }
        prev = permute_reshape(g, k, v)
        assert torch.equal(prev[0], kb) and torch.equal(prev[1], vb)
    before = load()
    best = interleaved_best(fns, dev, a.reps)
    after = load()
    nbytes = 2 * k.numel() * 2
    t_copy, t_reshape = best["copy"], best["reshape"]
    print(
        f"one layer, {nbytes / 1e6:.3f} MB in, best of {a.reps} interleaved, "
        f"{torch.get_num_threads()} torch thread(s), {dev}:"
    )
    for name, t in best.items():
        moved = nbytes // 2 if name in ("K gather", "V transpose", "V gather") else nbytes
        print(
            f"  {name:12s} {t * 1e3:7.3f} ms  ({moved / 1e6:.3f} MB, {moved / t / 1e9:6.2f} GB/s)"
        )
    print(f"reshape at {t_copy / t_reshape:.0%} of a plain copy of the same bytes")
    if "previous" in best:
        print(f"previous implementation at {t_copy / best['previous']:.0%} of the copy")
    print(f"load average (1, 5, 15 min): before {before}; after {after}")
    pcie = 12e9  # practical PCIe Gen3 x16 host<->device rate (of 15.75 GB/s raw)
    print(
        f"at {pcie / 1e9:.0f} GB/s (PCIe Gen3 x16, modelled) one layer crosses in "
        f"{per_layer / pcie * 1e3:.3f} ms; all layers {total / pcie * 1e3:.2f} ms "
        f"(twice over: GPU->host, host->FPGA)"
    )


if __name__ == "__main__":
    main()
