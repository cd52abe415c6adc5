"""KV handoff numbers: bytes moved for a prompt, and the on-device reshape's throughput as a
fraction of a plain copy of the same bytes (both torch ops on the same device).

    python scripts/measure_kv_reshape.py [--model gpt2-medium] [--prompt 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from tandem.config import preset
from tandem.geometry import geometry
from tandem.gpu.cuda import resolve_device, synchronize
from tandem.gpu.reshape import reshape_kv
from tandem.layout import HBMLayout, kv_prefix_bytes


def best(fn, dev, reps=20):
    out = float("inf")
    for _ in range(reps):
        synchronize(dev)
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--geometry", default="u55c")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--device", default="cpu")
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
    t_reshape = best(lambda: reshape_kv(g, k, v), dev)
    kk, vv = k.clone(), v.clone()
    t_copy = best(lambda: (kk.copy_(k), vv.copy_(v)), dev)
    nbytes = 2 * k.numel() * 2
    print(
        f"one layer, {nbytes / 1e6:.3f} MB in: reshape {t_reshape * 1e3:.3f} ms "
        f"({nbytes / t_reshape / 1e9:.2f} GB/s), plain copy {t_copy * 1e3:.3f} ms "
        f"({nbytes / t_copy / 1e9:.2f} GB/s): reshape at {t_copy / t_reshape:.0%} of copy"
    )
    pcie = 12e9  # practical PCIe Gen3 x16 host<->device rate (of 15.75 GB/s raw)
    print(
        f"at {pcie / 1e9:.0f} GB/s (PCIe Gen3 x16, modelled) one layer crosses in "
        f"{per_layer / pcie * 1e3:.3f} ms; all layers {total / pcie * 1e3:.2f} ms "
        f"(twice over: GPU->host, host->FPGA)"
    )


if __name__ == "__main__":
    main()
