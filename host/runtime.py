"""Greedy generation on a decode-core device: compile, load, write the prompt, run, read back.

The explicit pipeline (as in FINN's ``execute``)::

    session = Session(cfg, weights, geom, backend="model")   # compile + load
    result = session.generate(prompt_ids, n_new)             # prompt in, run, tokens out

:func:`generate` does both for one call. Every step is timed (``GenerateResult.timings``).

Errors, the same on every backend (each ``Device.wait`` returns the status record; this module
judges it): a run that stops with error bits, or fails without a status record, raises
:class:`RunError`, which names the bits (``tandem.regmap.describe_status``) and keeps the tokens
produced before the stop. A run that does not finish within ``timeout`` raises
:class:`DecodeTimeout`; the session stays usable and the request can be retried. A request that
does not fit raises ValueError (``tandem.host.request.RequestError``) before any device work; a
device that refuses what it is asked raises ``tandem.host.device.DeviceError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.compiler import Compiled, compile_model, fits
from tandem.config import GPT2Config
from tandem.geometry import GEOMETRIES, CoreGeometry, geometry
from tandem.layout import StatusRecord
from tandem.regmap import describe_status as _describe
from tandem.sampling import Sampling

from .backends import open_device
from .device import Closes, Device, DeviceError
from .request import check_geometry, check_request

Progress = Callable[[int, int], None]
"""``progress(i, token)`` after the ``i``-th generated token (0-based)."""


def describe_status(record: StatusRecord) -> str:
    """A sentence for users: which bits, what they mean, where, and the HALT code
    (``tandem.regmap.describe_status`` of the record)."""
    return _describe(record.status, record.pc, record.halt_code, record.tokens)


class RunError(RuntimeError):
    """The decode run failed on the device: the core stopped with error bits set (``record``
    holds its status record), or the run failed without one (``record`` is None: the simulation
    crashed, the card reported a failed command). ``tokens`` holds what the host could read of
    the run's output (none without a record). The message is one line."""

    def __init__(
        self,
        record: StatusRecord | None,
        tokens: list[int],
        detail: str = "",
        backend: str = "",
    ):
        self.record = record
        self.tokens = tokens
        self.backend = backend
        on = f" on the {backend} device" if backend else ""
        if record is not None:
            msg = f"decode stopped{on}: {describe_status(record)}"
        else:
            msg = f"decode failed{on}"
        if detail:
            msg += f" [{detail}]" if record is not None else f": {detail}"
        super().__init__(" ".join(msg.split()))


class DecodeTimeout(TimeoutError):
    """The device did not finish a request's decode within ``timeout`` seconds.

    Nothing is lost: the run is left going (a device cannot be stopped mid-run), the session
    remembers it, and its next ``generate`` first waits for that run to end and then runs the
    new request from the start, so retrying the same call (with a longer time-out, or none)
    gives the full answer. ``tokens`` holds what the host already has (the hybrid pipeline's
    GPU token; the device's own tokens are not readable while it runs).
    """

    def __init__(
        self,
        backend: str,
        timeout: float | None,
        detail: str,
        tokens: list[int] | None = None,
        previous: bool = False,
    ):
        self.backend = backend
        self.timeout = timeout
        self.tokens = list(tokens or [])
        what = (
            "an earlier request's run, which had timed out, is still going"
            if previous
            else f"the {backend} device did not finish decoding within the time-out of {timeout} s"
        )
        super().__init__(
            f"{what} ({detail}). Nothing is lost: the session stays usable and waits for that "
            "run before the next request; retry with a longer time-out (none waits until done) "
            "or fewer new tokens"
        )


@dataclass
class GenerateResult:
    """Generated ``tokens`` (prompt not included) and how the run went.

    ``timings`` are seconds: ``compile`` and ``load`` (0 when a :class:`Session` is reused),
    ``write`` (prompt into HBM), ``decode`` (start to done), ``read`` (tokens and status back),
    and ``decode_cpu``, the CPU time this process spent during ``decode`` (all threads; for a
    simulator backend it tells the host's share when other jobs compete for the cores).
    ``positions`` counts the positions the core processed. ``stats`` holds backend counters
    when the backend has them (``model``: instructions per unit, HBM bytes read and written).
    """

    tokens: list[int]
    timings: dict[str, float]
    status: StatusRecord
    backend: str
    geometry: str
    positions: int
    stats: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        d = self.timings.get("decode", 0.0)
        return len(self.tokens) / d if d > 0 else float("inf")


def check_fits(cfg: GPT2Config, prompt_ids: Sequence[int], n_new: int) -> list[int]:
    """Validate a greedy request; returns the prompt as ints (``tandem.host.request``'s
    :func:`~tandem.host.request.check_request`, kept under its old name).

    The core processes positions ``0 .. len(prompt) + n_new - 2`` (the last token is never fed
    back), so it needs ``len(prompt) + n_new - 1 <= n_ctx``.
    """
    return check_request(cfg, prompt_ids, n_new)


def resolve_geometry(cfg: GPT2Config, geom: CoreGeometry | str | None) -> CoreGeometry:
    """A geometry by name or object; ``None`` picks the smallest preset the model fits."""
    if isinstance(geom, CoreGeometry):
        return geom
    if geom is not None:
        return geometry(geom)
    reasons = []
    for g in sorted(GEOMETRIES.values(), key=lambda g: (g.channels * g.port_bits, g.vbuf_elems)):
        why = fits(cfg, g)
        if why is None:
            return g
        reasons.append(f"{g.name}: {why}")
    raise ValueError(f"{cfg.name} fits no core geometry: " + "; ".join(reasons))


class Session(Closes):
    """A model compiled for a geometry and loaded on a device, ready for many requests.

    Parameters
    ----------
    cfg, weights
        The model (float weights keyed as in tandem.checkpoint).
    geom : CoreGeometry, geometry name, or None for the smallest that fits
    backend : str
        A name from ``tandem.host.backends.BACKENDS``.
    compiled : Compiled, optional
        Reuse an existing compilation (``weights`` may then be None).
    device_options : mapping, optional
        Passed to the backend's constructor.
    logits : bool
        Compile the program that also stores every position's logits (:meth:`logits`,
        ``tandem eval``); ignored with ``compiled``.
    """

    def __init__(
        self,
        cfg: GPT2Config,
        weights: Mapping[str, np.ndarray] | None,
        geom: CoreGeometry | str | None = None,
        backend: str = "model",
        compiled: Compiled | None = None,
        device_options: Mapping | None = None,
        logits: bool = False,
    ):
        self.cfg = cfg
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if compiled is None:
            geom = resolve_geometry(cfg, geom)
            check_geometry(cfg, geom)  # before the (slow) compilation
            compiled = compile_model(cfg, weights, geom, logits=logits)
        self.compiled = compiled
        t1 = time.perf_counter()
        self.device: Device = open_device(backend, compiled.geom, **(device_options or {}))
        self.device.load(compiled.image)
        t2 = time.perf_counter()
        self.timings = {"compile": t1 - t0, "load": t2 - t1}
        self.backend = backend
        self._fresh = True
        self._running = False  # a run that timed out and may still be going

    @property
    def geom(self) -> CoreGeometry:
        return self.compiled.geom

    def generate(
        self,
        prompt_ids: Sequence[int],
        n_new: int,
        progress: Progress | None = None,
        timeout: float | None = None,
        start_pos: int = 0,
        sampling: Sampling | None = None,
    ) -> GenerateResult:
        """Decoding of ``n_new`` tokens after ``prompt_ids`` (the prompt runs on the core
        too, one position at a time): greedy, or sampled on the core with ``sampling``
        (``tandem.sampling``: the kernel's ``sampling`` and ``seed`` arguments). Raises
        ValueError for requests that do not fit and RunError if the core reports an error.

        With ``start_pos`` > 0 the core starts there: positions below must already be in the
        device's KV regions (the hybrid pipeline writes the GPU prefill's K/V prefix with
        ``layout.pack_kv_prefix`` and passes the prompt plus the GPU's first token, with
        ``start_pos`` = the prompt length).
        """
        ids = check_request(self.cfg, prompt_ids, n_new, timeout=timeout)
        if not 0 <= start_pos < len(ids):
            raise ValueError(f"start_pos {start_pos} must be in [0, {len(ids)}), the prompt")
        c, dev = self.compiled, self.device
        self.settle(timeout)
        timings = dict(self.timings) if self._fresh else {"compile": 0.0, "load": 0.0}
        self._fresh = False
        t0 = time.perf_counter()
        dev.write_tokens(c.layout, "prompt", ids)
        dev.set_args(
            **c.args(prompt_len=len(ids), n_new=n_new, start_pos=start_pos, sampling=sampling)
        )
        t1, c1 = time.perf_counter(), time.process_time()
        dev.start(on_token=progress)
        self._running = True
        try:
            record = dev.wait(timeout)
        except TimeoutError as err:
            n = len(ids) + n_new - 1 - start_pos
            raise DecodeTimeout(
                self.backend, timeout, f"{n} positions from position {start_pos}; {err}"
            ) from err
        except DeviceError as err:
            self._running = False
            raise RunError(None, [], str(err), self.backend) from err
        except KeyboardInterrupt:
            raise  # the run goes on: close() leaves the device to it, as after a time-out
        except BaseException:
            self._running = False
            raise
        self._running = False
        t2, c2 = time.perf_counter(), time.process_time()
        stats = dev.run_stats()
        try:
            tokens = dev.read_tokens(c.layout, record.tokens)
        except DeviceError:
            if not record.status:
                raise
            tokens = []  # a broken record's token count may exceed the output area
        t3 = time.perf_counter()
        timings.update(write=t1 - t0, decode=t2 - t1, read=t3 - t2, decode_cpu=c2 - c1)
        if record.status:
            raise RunError(record, tokens, stats.get("message", ""), self.backend)
        return GenerateResult(
            tokens=tokens,
            timings=timings,
            status=record,
            backend=self.backend,
            geometry=c.geom.name,
            positions=len(ids) + n_new - 1 - start_pos if n_new else 0,
            stats=stats,
        )

    def logits(
        self, ids: Sequence[int], start_pos: int = 0, timeout: float | None = None
    ) -> np.ndarray:
        """Teacher forcing: run positions ``start_pos .. len(ids) - 1`` of ``ids`` on the core and
        return their binary16 logits, uint16 [len(ids) - start_pos, n_vocab] (row ``i`` scores
        the token after position ``start_pos + i``). Needs a program compiled with ``logits=True``
        (``compile_model``); positions below ``start_pos`` must be in the KV cache already (the
        hybrid pipeline's prefix). One run of ``generate(ids, 1)``: its token is dropped."""
        if not self.compiled.layout.logits:
            raise ValueError("Session.logits needs a program compiled with logits=True")
        ids = list(ids)
        self.generate(ids, 1, timeout=timeout, start_pos=start_pos)
        return self.compiled.read_logits(self.device, start_pos, len(ids))

    @property
    def running(self) -> bool:
        """True while a run whose request timed out may still be going on the device."""
        return self._running

    def settle(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout`` s) for a run an earlier request gave up on; its result is
        dropped (that request already raised). Raises :class:`DecodeTimeout` if it is still
        going."""
        if not self._running:
            return
        try:
            self.device.wait(timeout)
        except TimeoutError as err:
            raise DecodeTimeout(self.backend, timeout, str(err), previous=True) from err
        except RuntimeError:
            pass  # the abandoned run's own error bits or failure: not this request's
        self._running = False

    def close(self) -> None:
        """Release the device; a run that timed out and is still going keeps it (closing
        would wait for, or pull the buffers from under, that run)."""
        if not self._running:
            self.device.close()


def generate(
    cfg: GPT2Config,
    weights: Mapping[str, np.ndarray],
    prompt_ids: Sequence[int],
    n_new: int,
    geom: CoreGeometry | str | None = None,
    backend: str = "model",
    progress: Progress | None = None,
    timeout: float | None = None,
    device_options: Mapping | None = None,
    sampling: Sampling | None = None,
) -> GenerateResult:
    """Compile ``cfg``/``weights`` for ``geom``, load it on ``backend`` and decode greedily (or
    sampled on the core with ``sampling``).
    ``device_options`` go to the backend (the ``fpga`` backend's ``xclbin``, for example).

    Returns a :class:`GenerateResult` (tokens, timings incl. compile and load, status). The
    request is checked first (ValueError if it does not fit the context); error bits in the
    status raise :class:`RunError`, a run longer than ``timeout`` s :class:`DecodeTimeout`.
    """
    check_request(cfg, prompt_ids, n_new, timeout=timeout)
    with Session(cfg, weights, geom, backend, device_options=device_options) as session:
        return session.generate(prompt_ids, n_new, progress, timeout=timeout, sampling=sampling)
