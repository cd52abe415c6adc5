"""Hybrid generation: prefill on the GPU, decode on the core, joined by the KV handoff.

The pipeline::

    ids ──► GPU prefill (tandem.gpu.prefill) ──► first token
              │ per layer, as soon as K/V are final
              └─► reshape on the GPU ─► host buffers ─► device HBM (tandem.gpu.transfer)
    core: Session.generate(ids + [first], n_new - 1, start_pos=len(ids)) ──► the rest

The prefill computes under the core's numeric contract, so the cache it hands over is the one
the core would have built, and the tokens equal ``FaithfulModel.generate``'s. The core starts at
position ``L = len(ids)`` with the first generated token at ``prompt[L]`` (``prompt_len = L+1``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.checkpoint import validate
from tandem.config import GPT2Config
from tandem.geometry import CoreGeometry
from tandem.gpu.prefill import PreparedModel, prefill
from tandem.gpu.transfer import KVTransfer, TransferReport
from tandem.sampling import Sampling

from .device import Closes
from .request import check_geometry, check_request
from .runtime import DecodeTimeout, Progress, Session, resolve_geometry


@dataclass
class HybridResult:
    """Generated ``tokens`` and the timing breakdown (seconds): ``prefill`` (GPU compute),
    ``reshape`` and ``copy`` (summed over layers), ``transfer_write`` (into device HBM),
    ``transfer_exposed`` / ``transfer_hidden``, ``decode`` (the core), ``total``."""

    tokens: list[int]
    timings: dict[str, float]
    transfer: TransferReport
    kv_bytes: int
    stats: dict = field(default_factory=dict)


class HybridSession(Closes):
    """A model prepared for GPU prefill and compiled and loaded on a decode device.

    Parameters
    ----------
    cfg, weights : the model (float weights keyed as in tandem.checkpoint; checked against cfg)
    geom : core geometry, name, or None for the smallest that fits
    backend : decode device backend name (``tandem.host.device.BACKENDS``)
    prefill_device : 'cpu', 'cuda' or None (CUDA when available)
    logits : compile the program that stores every position's logits (:meth:`logits`)
    """

    def __init__(
        self,
        cfg: GPT2Config,
        weights: Mapping[str, np.ndarray],
        geom: CoreGeometry | str | None = None,
        backend: str = "model",
        prefill_device=None,
        device_options: Mapping | None = None,
        logits: bool = False,
    ):
        validate(cfg, weights)
        geom = resolve_geometry(cfg, geom)
        check_geometry(cfg, geom)  # before the (slow) preparation and compilation
        self.cfg = cfg
        t0 = time.perf_counter()
        self.model = PreparedModel(cfg, weights, prefill_device)
        t1 = time.perf_counter()
        self.session = Session(
            cfg, weights, geom, backend, device_options=device_options, logits=logits
        )
        self.timings = {"prepare": t1 - t0, **self.session.timings}

    @property
    def geom(self) -> CoreGeometry:
        return self.session.geom

    def generate(
        self,
        prompt_ids: Sequence[int],
        n_new: int,
        progress: Progress | None = None,
        timeout: float | None = None,
        sampling: Sampling | None = None,
    ) -> HybridResult:
        """Greedy decoding of ``n_new`` tokens after ``prompt_ids`` (or sampled with
        ``sampling``: the GPU samples the first token, the core the rest, one stream keyed by
        position). Raises ValueError for a
        request that does not fit (empty prompt, over the context, bad ids), and
        :class:`~tandem.host.runtime.DecodeTimeout` if the device does not finish the decode
        within ``timeout`` seconds (its ``tokens`` hold the GPU's first token; the session stays
        usable, and calling ``generate`` again retries the request)."""
        ids = check_request(self.cfg, prompt_ids, n_new, timeout=timeout)
        L = len(ids)
        if n_new == 0:
            return HybridResult([], {}, TransferReport(), 0)
        # A run an earlier request timed out on must end before the KV transfer writes HBM.
        self.session.settle(timeout)
        layout = self.session.compiled.layout
        transfer = KVTransfer(self.session.device, layout, self.model.device)
        t0 = time.perf_counter()
        try:
            pre = prefill(self.cfg, self.model, ids, on_layer=transfer.on_layer, sampling=sampling)
        finally:
            t1 = time.perf_counter()
            report = transfer.finish()
        tokens = [pre.first_token]
        if progress is not None:
            progress(0, pre.first_token)
        decode, stats = 0.0, {}
        if n_new > 1:

            def shifted(i, tok):
                progress(i + 1, tok)

            try:
                res = self.session.generate(
                    [*ids, pre.first_token],
                    n_new - 1,
                    progress=shifted if progress is not None else None,
                    timeout=timeout,
                    start_pos=L,
                    sampling=sampling,
                )
            except DecodeTimeout as err:
                err.tokens = tokens + err.tokens
                raise
            tokens += res.tokens
            decode, stats = res.timings["decode"], res.stats
        t3 = time.perf_counter()
        timings = {
            "prefill": t1
            - t0
            - (report.total("reshape") + report.total("copy") if not transfer.lane.cuda else 0.0),
            "reshape": report.total("reshape"),
            "copy": report.total("copy"),
            "transfer_write": report.total("write"),
            "transfer_exposed": report.exposed,
            "transfer_hidden": report.hidden,
            "decode": decode,
            "total": t3 - t0,
        }
        return HybridResult(tokens, timings, report, report.nbytes, stats)

    def logits(self, ids: Sequence[int], split: int, timeout: float | None = None) -> np.ndarray:
        """Teacher forcing across the handoff: the GPU prefills ``ids[:split]`` (their logits
        come from it) and hands the KV cache over; the core runs positions ``split ..
        len(ids) - 1`` (their logits come from the core). Returns the binary16 logits of every
        position, uint16 [len(ids), n_vocab]. Needs ``logits=True``."""
        from tandem.gpu.contract import bits_to_numpy

        ids = check_request(self.cfg, ids, 1, timeout=timeout)
        if not 0 < split < len(ids):
            raise ValueError(f"split {split} must be in [1, {len(ids)}): both sides need a token")
        self.session.settle(timeout)
        transfer = KVTransfer(self.session.device, self.session.compiled.layout, self.model.device)
        try:
            pre = prefill(
                self.cfg, self.model, ids[:split], on_layer=transfer.on_layer, logits=True
            )
        finally:
            transfer.finish()
        core = self.session.logits(ids, start_pos=split, timeout=timeout)
        return np.concatenate([bits_to_numpy(pre.logits16), core])

    def close(self) -> None:
        self.session.close()
