"""Everything CUDA-specific in the GPU path, in one place: exact matmul settings, streams,
events and pinned memory.

The rest of ``tandem.gpu`` calls these helpers and runs unchanged on the CPU, where each one
degrades to its synchronous equivalent (no stream, no event, pageable memory). On a machine
with CUDA the same calls take the real path; no other module tests for CUDA.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'cpu'``, ``'cuda'``, ``'cuda:N'`` or None (CUDA when available, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for, but this PyTorch ({torch.__version__}) sees no "
                "CUDA GPU; use device='cpu'"
            )
        exact_matmul()
    elif device.type != "cpu":
        raise ValueError(f"unsupported prefill device {str(device)!r}: use 'cpu' or 'cuda'")
    return device


def exact_matmul() -> None:
    """Make float32 matmuls exact for the contract's integer-valued operands.

    TF32 keeps only 10 mantissa bits of each operand; the aligned significands need 11 and the
    partial sums up to 24, so TF32 must be off for the BLAS block sums to be exact.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class Lane:
    """A side lane for copies: a CUDA stream on a GPU, a synchronous stand-in on the CPU.

    ``record()`` marks a point in the compute stream; ``run_after(event, fn)`` runs ``fn`` on the
    side stream after that point (on the CPU: now); ``event()`` marks the side stream and
    ``synchronize(event)`` waits for it on the host.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def record(self):
        """An event at the current point of the compute stream (None on the CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    @contextlib.contextmanager
    def after(self, event):
        """Issue work on the side stream, ordered after ``event``."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(event)
            yield

    def event(self):
        """An event at the current point of the side stream (None on the CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    @staticmethod
    def synchronize(event) -> None:
        if event is not None:
            event.synchronize()

    def keep_alive(self, t: torch.Tensor) -> None:
        """Tell the caching allocator that the side stream uses ``t`` (made on the compute
        stream), so its memory is not reused before the copy finishes."""
        if self.cuda:
            t.record_stream(self.stream)


def host_buffer(shape, dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to copy device results into: pinned when the source is a GPU (so the copy
    is a non-blocking DMA), ordinary memory on the CPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


CPU_THREADS = 1
"""Torch intra-op threads while the contract runs on the CPU (:func:`cpu_threads`). Its ops are
many and small (a decode step of the built-in model calls about 19,000 aten operators, nested
ones counted, most on a few thousand elements or fewer), so a second thread gains little, and
on a shared machine each parallel region waits for a core: ``tandem generate --placement gpu``
on the built-in model decoded at 0.43 s a token (median) with torch's default of 2 threads on
this project's 2-core machine under load, and at 0.09 s with 1, FP16 and W4 alike."""


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = CPU_THREADS):
    """Run the block with at most ``n`` torch intra-op threads when ``device`` is the CPU
    (restored after); on a GPU, unchanged."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU); used around timers."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
