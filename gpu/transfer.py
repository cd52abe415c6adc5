"""Layer-by-layer transfer of the prefill's KV cache into the decode device's HBM regions.

As each layer's K and V become final (``prefill(..., on_layer=transfer.on_layer)``; K
[n_head, T, 64] and V transposed, V^T [n_head, 64, T], as the prefill keeps them):

1. on a side lane ordered after the compute stream, reshape them into the HBM KV layout
   (:func:`tandem.gpu.reshape.reshape_kv`) and copy the bytes into host buffers;
2. a host worker thread waits for that copy and writes the bytes into the device's ``h.<l>.k``
   and ``h.<l>.v`` regions (``Device.write_striped``), while the next layer computes.

On CUDA the lane is a side stream ordered by events and the host buffers are pinned, so the
reshape and the device-to-host DMA overlap the next layer's kernels. On the CPU the same code
runs with :class:`tandem.gpu.cuda.Lane`'s synchronous stand-in: the reshape and copy run in
``on_layer`` (on the compute path) and only the device write overlaps, on the worker thread.

Timings per layer: ``reshape`` and ``copy`` (host seconds spent issuing, or on the CPU doing,
them), ``wait`` (worker waiting for the copy), ``write`` (into device HBM), and for the whole
transfer ``exposed`` (time the pipeline waited for the transfer after prefill compute ended,
plus the on-compute-path reshape and copy on the CPU) and ``hidden`` (transfer work that ran
under compute).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from tandem.layout import HBMLayout

from .cuda import Lane, host_buffer
from .reshape import reshape_kv


@dataclass
class LayerTiming:
    layer: int
    nbytes: int
    reshape: float = 0.0
    copy: float = 0.0
    wait: float = 0.0
    write: float = 0.0


@dataclass
class TransferReport:
    layers: list[LayerTiming] = field(default_factory=list)
    exposed: float = 0.0
    hidden: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.layers)

    def total(self, what: str) -> float:
        return sum(getattr(t, what) for t in self.layers)


class KVTransfer:
    """Moves each finished layer's KV prefix to ``device`` (anything with ``write_striped``).

    Parameters
    ----------
    device : a ``tandem.host.device.Device`` (or an ``HBMImage``), loaded
    layout : the model's HBMLayout on the device's geometry
    torch_device : where the prefill runs
    """

    def __init__(self, device, layout: HBMLayout, torch_device: torch.device):
        self.device = device
        self.layout = layout
        self.geom = layout.geom
        self.lane = Lane(torch.device(torch_device))
        self.report = TransferReport()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="tandem-kv-transfer", daemon=True)
        self._worker.start()
        self._finished = False

    def on_layer(self, layer: int, k: torch.Tensor, vt: torch.Tensor) -> None:
        """Prefill callback: queue layer ``layer``'s K [n_head, T, 64] and V^T [n_head, 64, T]
        for the device."""
        if self._error is not None:
            raise RuntimeError(f"KV transfer failed: {self._error!r}") from self._error
        lane, dev = self.lane, self.lane.device
        t0 = time.perf_counter()
        with lane.after(lane.record()):
            kb, vb = reshape_kv(self.geom, k, vt)
            t1 = time.perf_counter()
            hk = host_buffer(kb.shape, torch.uint8, dev)
            hv = host_buffer(vb.shape, torch.uint8, dev)
            hk.copy_(kb, non_blocking=True)
            hv.copy_(vb, non_blocking=True)
            lane.keep_alive(k)
            lane.keep_alive(vt)
            done = lane.event()
        t2 = time.perf_counter()
        timing = LayerTiming(layer, 2 * kb.numel(), reshape=t1 - t0, copy=t2 - t1)
        self.report.layers.append(timing)
        self._queue.put((timing, hk, hv, done))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            timing, hk, hv, done = item
            try:
                t0 = time.perf_counter()
                Lane.synchronize(done)
                t1 = time.perf_counter()
                i = timing.layer
                self.device.write_striped(self.layout[f"h.{i}.k"].base, hk.numpy())
                self.device.write_striped(self.layout[f"h.{i}.v"].base, hv.numpy())
                timing.wait, timing.write = t1 - t0, time.perf_counter() - t1
            except BaseException as err:  # reported by finish()
                self._error = err
                return

    def finish(self) -> TransferReport:
        """Wait until every queued layer is in the device; returns the timing report."""
        if not self._finished:
            self._finished = True
            t0 = time.perf_counter()
            self._queue.put(None)
            self._worker.join()
            wait = time.perf_counter() - t0
            r = self.report
            on_path = 0.0 if self.lane.cuda else r.total("reshape") + r.total("copy")
            r.exposed = wait + on_path
            work = r.total("reshape") + r.total("copy") + r.total("wait") + r.total("write")
            r.hidden = max(0.0, work - r.exposed)
        if self._error is not None:
            raise RuntimeError(f"KV transfer failed: {self._error!r}") from self._error
        return self.report
