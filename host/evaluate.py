"""Perplexity of a model on a text (``tandem eval``), on any backend and placement.

Teacher forcing over windows of the model's context (:func:`windows`): each window of at most
``n_ctx`` tokens goes through the model at once, and the logits of position ``t`` score token
``t + 1``. Consecutive windows share one token, so every token after the first is scored exactly
once, from the tokens before it in its window (between 1 and ``n_ctx - 1`` of them). The loss
is the mean negative log-likelihood in nats per scored token (softmax in float64 over the
logits the backend produced); the perplexity is ``exp(loss)``.

What produces the logits (:func:`scorer`):

- ``reference``: the float reference (``tandem.golden.reference.forward``, float64).
- a device backend (``model``, ``rtl``, ``fpga``; placement ``fpga``): the program compiled with
  ``logits=True`` (``tandem.compiler``) on that device, one run per window
  (:meth:`tandem.host.runtime.Session.logits`): the core's own binary16 logits.
- placement ``gpu``: the torch prefill under the core's contract with ``logits=True``
  (``tandem.gpu.prefill``), one prefill per window.
- placement ``hybrid``: per window, the torch prefill of its first half, the KV cache handed to
  the device, the core runs the second half
  (:meth:`tandem.host.hybrid.HybridSession.logits`).

The device backends, ``gpu`` and ``hybrid`` all compute the numeric contract, so their logits,
and therefore their losses, are bit for bit the same (``FaithfulModel``'s ``logits16``); the
float reference differs by the contract's rounding (docs/numerics.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tandem.config import GPT2Config
from tandem.geometry import CoreGeometry
from tandem.numerics import from_bits

Logits = Callable[[list[int]], np.ndarray]
"""A scorer: window token ids -> float64 logits [len(window), n_vocab]."""

Progress = Callable[["EvalResult", int], None]
"""``progress(partial result, windows in all)`` after each window."""


def windows(n: int, n_ctx: int) -> list[tuple[int, int]]:
    """Teacher-forced windows ``[a, b)`` over ``n`` tokens: at most ``n_ctx`` tokens each,
    consecutive windows sharing one token, so that every token after the first is predicted
    exactly once (token ``t`` of a window from the ``t - a`` tokens before it in the window)."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, not {n_ctx}")
    out, a = [], 0
    while a < n - 1:
        b = min(n, a + n_ctx)
        out.append((a, b))
        a = b - 1
    return out


def nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Sum over rows of ``-log softmax(logits[i])[targets[i]]``, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float((lse - x[np.arange(len(t)), t]).sum())


@dataclass
class EvalResult:
    """``tokens`` scored (text tokens minus one), summed loss ``nll`` (nats), ``windows`` run,
    ``seconds`` (scoring only), and where it ran (``label``: backend or placement)."""

    label: str
    tokens: int = 0
    nll: float = 0.0
    windows: int = 0
    seconds: float = 0.0
    where: str = ""

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan


def evaluate(
    cfg: GPT2Config,
    ids: Sequence[int],
    logits: Logits,
    label: str = "",
    progress: Progress | None = None,
) -> EvalResult:
    """Teacher-forced loss of ``ids`` under ``logits`` (a :data:`Logits` scorer), window by
    window (:func:`windows`). Raises ValueError for fewer than two tokens or an id outside the
    vocabulary."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError(
            f"the text has {len(ids)} token{'s' if len(ids) != 1 else ''}: perplexity needs at "
            "least 2 (one to predict from, one to predict)"
        )
    bad = [i for i in ids if not 0 <= i < cfg.n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary of {cfg.n_vocab}")
    wins = windows(len(ids), cfg.n_ctx)
    result = EvalResult(label)
    t0 = time.perf_counter()
    for a, b in wins:
        window = ids[a:b]
        out = np.asarray(logits(window))
        if out.shape != (len(window), cfg.n_vocab):
            raise RuntimeError(f"the scorer gave logits {out.shape} for a window of {len(window)}")
        result.nll += nll(out[:-1], window[1:])
        result.tokens += len(window) - 1
        result.windows += 1
        result.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(result, len(wins))
    return result


# ---------------------------------------------------------------------------------------------
# scorers


def reference_scorer(cfg: GPT2Config, weights: Mapping[str, np.ndarray]) -> Logits:
    """The float reference in float64 (quantized matrices dequantized, a quantized LM head
    giving the logits: ``tandem.golden.reference``)."""
    from tandem.golden.reference import float_weights, forward

    w64 = float_weights(weights, np.float64)
    return lambda window: forward(w64, cfg, window, dtype=np.float64)


def gpu_scorer(cfg: GPT2Config, weights: Mapping[str, np.ndarray], device=None) -> Logits:
    """The torch prefill under the contract (``--placement gpu``), every position's logits; on
    the CPU with ``tandem.gpu.cuda.CPU_THREADS`` torch threads."""
    from tandem.gpu.contract import bits_to_numpy
    from tandem.gpu.cuda import cpu_threads
    from tandem.gpu.prefill import PreparedModel, prefill

    model = PreparedModel(cfg, weights, device)

    def run(window):
        with cpu_threads(model.device):
            pre = prefill(cfg, model, window, logits=True)
        return from_bits(bits_to_numpy(pre.logits16)).astype(np.float64)

    run.where = f" on {model.device}"
    return run


class DeviceScorer:
    """The ``logits=True`` program on a device backend (``--placement fpga``), or with
    ``hybrid`` the torch prefill of each window's first half and the device for the rest.
    Close it (or use it in ``with``) to release the device."""

    def __init__(
        self,
        cfg: GPT2Config,
        weights: Mapping[str, np.ndarray],
        geom: CoreGeometry,
        backend: str = "model",
        *,
        hybrid: bool = False,
        prefill_device=None,
        device_options: Mapping | None = None,
        timeout: float | None = None,
    ):
        self.timeout = timeout
        if hybrid:
            from .hybrid import HybridSession

            self.hybrid = HybridSession(
                cfg, weights, geom, backend, prefill_device, device_options, logits=True
            )
            self.session = self.hybrid.session
            self.where = f" on {geom.name}, prefill on {self.hybrid.model.device}"
        else:
            from .runtime import Session

            self.hybrid = None
            self.session = Session(
                cfg, weights, geom, backend, device_options=device_options, logits=True
            )
            self.where = f" on {geom.name}"

    def __call__(self, window: list[int]) -> np.ndarray:
        if self.hybrid is not None:
            bits = self.hybrid.logits(window, max(1, len(window) // 2), timeout=self.timeout)
        else:
            bits = self.session.logits(window, timeout=self.timeout)
        return from_bits(bits).astype(np.float64)

    def close(self) -> None:
        (self.hybrid or self.session).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
