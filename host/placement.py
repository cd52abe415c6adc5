"""``--placement auto``: choose gpu, fpga or hybrid by the thesis's cost model.

Hybrid beats GPU-only when ``GPU decode - FPGA decode > transfer``, and beats FPGA-only when
``FPGA prefill - GPU prefill > transfer``. The inputs and their sources:

- GPU prefill and GPU decode per token: measured here, by timing the torch prefill of the request's
  prompt and one torch decode step on the torch device (CPU without CUDA: labelled so);
- FPGA prefill and decode: :class:`tandem.host.thesis.FpgaDecodeModel`: the HBM efficiency
  ``make bench-rtl`` measured in RTL simulation (the package data
  ``tandem/host/data/bench-rtl.json``, recorded with its provenance) applied to this model's
  bytes per position, labelled "projected";
  without a result for this geometry, the labelled 85%-of-HBM-peak assumption;
- transfer: KV prefix bytes over PCIe Gen3 x16 at 12 GB/s, two hops (modelled).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tandem.config import GPT2Config
from tandem.geometry import CoreGeometry
from tandem.layout import HBMLayout

from .request import check_request
from .thesis import PCIE_BYTES_S, PCIE_LABEL, RTL_RESULTS, FpgaDecodeModel, kv_moved_bytes


@dataclass
class Choice:
    placement: str
    numbers: dict  # name -> (seconds, source)

    def explain(self) -> str:
        rows = [f"  {k}: {v * 1e3:.3f} ms [{src}]" for k, (v, src) in self.numbers.items()]
        return f"placement auto -> {self.placement}\n" + "\n".join(rows)


def decide(gpu_prefill, gpu_decode, fpga_prefill, fpga_decode, transfer) -> str:
    """The thesis's two conditions; ties go to the simpler single-device placement."""
    decode_gain = gpu_decode - fpga_decode > transfer
    prefill_gain = fpga_prefill - gpu_prefill > transfer
    if decode_gain and prefill_gain:
        return "hybrid"
    if decode_gain or fpga_prefill + fpga_decode < gpu_prefill + gpu_decode:
        return "fpga"
    return "gpu"


def choose(
    cfg: GPT2Config,
    geom: CoreGeometry,
    model,
    ids: list[int],
    n_new: int,
    rtl_paths=RTL_RESULTS,
    formats=None,
) -> Choice:
    """Time the torch prefill and one decode step for this request, then :func:`decide`.
    ``rtl_paths``: where :class:`~tandem.host.thesis.FpgaDecodeModel` looks for RTL cycles;
    ``formats``: the quantized matrices' formats (``tandem.layout.core_tensors``), so that the
    FPGA's bytes per token are the quantized layout's. Torch runs with the contract's CPU thread
    cap (:func:`tandem.gpu.cuda.cpu_threads`), as ``--placement gpu`` does."""
    from tandem.gpu.cuda import cpu_threads, synchronize
    from tandem.gpu.decode import decode_step
    from tandem.gpu.prefill import prefill

    ids = check_request(cfg, ids, n_new)
    where = f"measured (this machine, torch on {model.device})"
    with torch.no_grad(), cpu_threads(model.device):
        t0 = time.perf_counter()
        pre = prefill(cfg, model, ids)
        synchronize(model.device)
        t1 = time.perf_counter()
        k, v = list(pre.k.unbind(0)), list(pre.v.unbind(0))
        step = 0.0
        if n_new > 1 and len(ids) < cfg.n_ctx:
            decode_step(cfg, model, pre.first_token, k, v)
            synchronize(model.device)
            step = time.perf_counter() - t1
    fpga = FpgaDecodeModel(cfg, geom, HBMLayout(cfg, geom, formats=formats or {}), rtl_paths)
    P = len(ids)
    moved = kv_moved_bytes(cfg, geom, P)
    numbers = {
        "GPU prefill": (t1 - t0, where),
        "GPU decode": (step * max(0, n_new - 1), where + f", one step x {max(0, n_new - 1)}"),
        "FPGA prefill": (fpga.prompt(P), fpga.label),
        "FPGA decode": (fpga.tokens(P, max(0, n_new - 1)), fpga.label),
        "transfer": (2 * moved / PCIE_BYTES_S, f"{PCIE_LABEL}, {moved:,} B x 2 hops"),
    }
    placement = decide(*(numbers[k][0] for k in numbers))
    return Choice(placement, numbers)


def generate_gpu(cfg: GPT2Config, model, ids, n_new: int, progress=None, sampling=None):
    """``--placement gpu``: torch prefill and torch decode under the core's numeric contract
    (:func:`tandem.gpu.decode.generate` on a :class:`~tandem.gpu.prefill.PreparedModel`; greedy,
    or sampled with ``sampling``, ``tandem.sampling``), after the same request checks as every
    other placement (:func:`tandem.host.request.check_request`)."""
    from tandem.gpu.decode import generate

    ids = check_request(cfg, ids, n_new)
    return generate(cfg, model, ids, n_new, progress, sampling=sampling)
