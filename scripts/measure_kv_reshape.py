"""KV handoff numbers: bytes moved for a prompt, and the on-device reshape's throughput as a
fraction of a plain copy of the same bytes (both torch ops on the same device).

    python scripts/measure_kv_reshape.py [--model gpt2-medium] [--prompt 512] [--device cpu]
                                         [--reps 200]

The inputs are one layer's K [n_head, T, 64] and V^T [n_head, 64, T] (V transposed), in one
buffer side by side, as ``tandem.gpu.prefill`` hands them to the reshape. Reshape and copy are
timed interleaved (copy, reshape, copy, reshape, ...) and the best of each is kept, so a burst
of load from other jobs hits both alike; torch runs one thread. The load average before and
after is printed: on a shared machine it says how much to trust the figure. Also timed, on the
same data, for the record: the reshape's parts (K gather alone, V^T by strided copies), the
reshape of K and V^T in separate buffers (its general path), and the previous implementation
(commit 9a408b1: V [n_head, T, 64] from the prefill, transposed inside the reshape).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from tandem.config import preset
from tandem.geometry import CoreGeometry, geometry
from tandem.gpu.cuda import resolve_device, synchronize
from tandem.gpu.reshape import k_region, reshape_kv, v_region
from tandem.layout import HBMLayout, kv_prefix_bytes


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


@functools.lru_cache(maxsize=8)
def _previous_index(lanes: int, beat: int, n_head: int, rows: int, device: str):
    g, st, jj = rows // 64, 64 // lanes, 64 // beat
    lane = torch.arange(lanes).view(lanes, 1, 1, 1, 1)
    j = torch.arange(jj).view(1, jj, 1, 1, 1)
    grp = torch.arange(g).view(1, 1, g, 1, 1)
    h = torch.arange(n_head).view(1, 1, 1, n_head, 1)
    rb = torch.arange(st).view(1, 1, 1, 1, st)
    row = grp * 64 + rb * lanes + lane
    return ((h * rows + row) * jj + j).expand(lanes, jj, g, n_head, st).reshape(-1).to(device)


def previous_reshape(geom: CoreGeometry, k: torch.Tensor, v: torch.Tensor):
    """The previous gpu/reshape.py (commit 9a408b1), T a multiple of 64: K one beat gather;
    V [n_head, T, 64] transposed into 64x64 V^T blocks (element by element), then the same
    gather. Kept only to compare against."""
    n_head, t_len, _ = k.shape
    g, be = t_len // 64, geom.beat_elems
    vt = torch.empty((n_head, g, 64, 64), dtype=v.dtype, device=v.device)
    vt.copy_(v.reshape(n_head, g, 64, 64).transpose(2, 3))
    index = _previous_index(geom.lanes, be, n_head, t_len, str(k.device))
    out = torch.empty((2, index.numel(), be), dtype=k.dtype, device=k.device)
    torch.index_select(k.reshape(-1, be), 0, index, out=out[0])
    torch.index_select(vt.view(-1, be), 0, index, out=out[1])
    out = out.view(torch.uint8).reshape(2, geom.channels, -1)
    return out[0], out[1]


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
    T, H = a.prompt, cfg.n_head
    per_layer = 2 * g.channels * kv_prefix_bytes(g, H, T)
    total = per_layer * cfg.n_layer
    region = HBMLayout(cfg, g)["h.0.k"].nbytes * g.channels * 2 * cfg.n_layer
    print(
        f"{a.model} on {g.name}, prompt {T}: KV moved {total / 1e6:.2f} MB "
        f"({per_layer / 1e6:.3f} MB per layer); full n_ctx={cfg.n_ctx} regions "
        f"{region / 1e6:.2f} MB"
    )
    # one layer's K and V^T side by side in one buffer, as the prefill allocates them
    kv = torch.randint(-(1 << 15), 1 << 15, (2, H * T * 64), dtype=torch.int16, device=dev)
    k, vt = kv[0].view(H, T, 64), kv[1].view(H, 64, T)
    kk, vv = k.clone(), vt.clone()
    kb, vb = reshape_kv(g, k, vt)
    sep = (k.clone(), vt.clone())  # separate buffers: the general path
    beats = torch.empty((kb.numel() // g.beat_bytes, g.beat_elems), dtype=k.dtype, device=dev)
    fns = {
        "copy": lambda: (kk.copy_(k), vv.copy_(vt)),
        "reshape": lambda: reshape_kv(g, k, vt),
        "separate": lambda: reshape_kv(g, *sep),
        "K gather": lambda: k_region(g, k, beats),
        "V^T copy": lambda: v_region(g, vt, beats),
    }
    got = reshape_kv(g, *sep)
    assert torch.equal(got[0], kb) and torch.equal(got[1], vb)
    if T % 64 == 0:
        v = vt.transpose(1, 2).contiguous()  # what the prefill used to hand over
        fns["previous"] = lambda: previous_reshape(g, k, v)
        prev = previous_reshape(g, k, v)
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
        moved = nbytes // 2 if name in ("K gather", "V^T copy") else nbytes
        print(
            f"  {name:12s} {t * 1e3:7.3f} ms  ({moved / 1e6:.3f} MB, {moved / t / 1e9:6.2f} GB/s)"
            f"  {t_copy * moved / nbytes / t:4.0%} of the copy's rate"
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
