"""Decode-core devices behind one interface: load an image, write regions, set arguments, run, wait.

A :class:`Device` is one decode core with its HBM buffers, one per pseudo-channel. The host talks
to every backend the same way, in the order pyxrt uses::

    dev = open_device("model", geom)     # a backend by name (tandem.host.backends)
    dev.load(compiled.image)             # allocate the channel buffers, copy the image in
    dev.write_channel(0, base, raw)      # later writes: prompt tokens, a KV-cache prefix, ...
    dev.set_args(start_pos=0, prompt_len=5, n_new=16, hbm_bytes=...)
    dev.start(on_token=...)              # ap_start
    record = dev.wait(timeout=60)        # ap_done; the status record the core wrote
    dev.read_tokens(layout, record.tokens)

The contract every backend keeps (tests/test_backends.py runs it on each):

- ``wait`` returns the :class:`~tandem.layout.StatusRecord` the core wrote, error bits or not;
  judging it is the caller's job (:mod:`tandem.host.runtime` raises ``RunError``);
- ``wait`` raises ``TimeoutError`` when the run is still going after ``timeout`` seconds (the
  run goes on; a later ``wait`` picks it up), and :class:`DeviceError` when the run failed
  without a status record (the simulation crashed, the card reported a failed command);
- everything else the device refuses (bad arguments, no image, out-of-range access, busy) is a
  :class:`DeviceError` with a message for users;
- :meth:`Device.run_stats` gives the backend's counters for the last run (may be empty).

This module is the base only; the backends live in their own modules (``model``, ``rtldevice``,
``fpga``) and :mod:`tandem.host.backends` names them, so nothing here imports a backend.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from tandem.geometry import CoreGeometry
from tandem.layout import (
    STATUS_BYTES,
    HBMImage,
    HBMLayout,
    StatusRecord,
    pack_tokens,
    unpack_tokens,
)
from tandem.regmap import SCALAR_ARGS

TokenCallback = Callable[[int, int], None]
"""``on_token(i, token)``: the run wrote its ``i``-th output token (backends that can tell)."""


class DeviceError(RuntimeError):
    """A device could not do what was asked (not loaded, busy, out of range...)."""


class Closes:
    """``with`` support for anything with ``close()``: devices and sessions."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Device(Closes, abc.ABC):
    """One decode core and its HBM buffers.

    Subclasses implement the primitives (``load``, the channel reads and writes, ``start``,
    ``wait``); token and status helpers are written once here on top of them.

    Parameters
    ----------
    geom : CoreGeometry
        The core's shape; images must have as many channels.
    """

    name: ClassVar[str] = ""

    def __init__(self, geom: CoreGeometry):
        self.geom = geom
        self.args: dict[str, int] = {n: 0 for n, _ in SCALAR_ARGS}

    # primitives -----------------------------------------------------------------------------

    @abc.abstractmethod
    def load(self, image: HBMImage) -> None:
        """Allocate one buffer per channel of the image's size and copy the image into them."""

    @abc.abstractmethod
    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        """Write uint8 [channels, n] at byte ``base`` of every channel."""

    @abc.abstractmethod
    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        """Write bytes at byte ``base`` of channel ``ch``."""

    @abc.abstractmethod
    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        """Read ``n`` bytes at byte ``base`` of channel ``ch``."""

    @abc.abstractmethod
    def read_striped(self, base: int, n: int) -> np.ndarray:
        """Read uint8 [channels, n] at byte ``base`` of every channel."""

    @abc.abstractmethod
    def start(self, on_token: TokenCallback | None = None) -> None:
        """Start the core with the current arguments (ap_start) and return at once."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> StatusRecord:
        """Wait for the core to stop (ap_done) and return its status record.

        Raises TimeoutError if it is still running after ``timeout`` seconds.
        """

    def close(self) -> None:
        """Release the device's buffers."""

    def run_stats(self) -> dict:
        """Counters of the last run for reports (instructions, HBM bytes, cycles...); ``{}``
        when the backend has none. ``message``, if present, says why the run stopped."""
        return {}

    # shared helpers ---------------------------------------------------------------------------

    def set_args(self, **values: int) -> None:
        """Set scalar kernel arguments by name (``tandem.regmap.SCALAR_ARGS``)."""
        for name, value in values.items():
            if name not in self.args:
                raise DeviceError(
                    f"no scalar argument {name!r}; the kernel has {[n for n, _ in SCALAR_ARGS]}"
                )
            if not 0 <= int(value) < 1 << 32:
                raise DeviceError(f"argument {name} = {value} does not fit 32 bits")
            self.args[name] = int(value)

    def run(self, timeout: float | None = None, on_token: TokenCallback | None = None):
        """``start`` then ``wait``."""
        self.start(on_token)
        return self.wait(timeout)

    def read_status(self) -> StatusRecord:
        """The status record the core wrote at channel 0, offset 0."""
        return StatusRecord.unpack(self.read_channel(0, 0, STATUS_BYTES))

    def write_tokens(self, layout: HBMLayout, area: str, ids: Sequence[int], first: int = 0):
        """Store token ids in the ``prompt`` (or ``output``) area from slot ``first``."""
        region = layout[area]
        raw = pack_tokens(ids)
        if 4 * first + len(raw) > region.nbytes:
            raise DeviceError(
                f"{len(ids)} tokens from slot {first} overflow the {area} area of "
                f"{region.nbytes // 4} slots"
            )
        self.write_channel(0, region.base + 4 * first, raw)

    def read_tokens(self, layout: HBMLayout, n: int, area: str = "output") -> list[int]:
        """The first ``n`` token ids of the ``output`` (or ``prompt``) area."""
        region = layout[area]
        if not 0 <= 4 * n <= region.nbytes:
            raise DeviceError(f"{n} tokens exceed the {area} area of {region.nbytes // 4} slots")
        return unpack_tokens(self.read_channel(0, region.base, 4 * n))


def check_access(geom: CoreGeometry, nbytes: int, ch: int, base: int, n: int) -> None:
    """Raise DeviceError unless channel ``ch`` has bytes [base, base + n) in an ``nbytes``
    buffer (the one wording for every backend)."""
    if not 0 <= ch < geom.channels:
        raise DeviceError(f"no channel {ch}: the {geom.name} core has {geom.channels}")
    if base < 0 or n < 0 or base + n > nbytes:
        raise DeviceError(
            f"HBM access [{base:#x}, {base + n:#x}) is outside the {nbytes:#x}-byte channel buffer"
        )


class HostImageDevice(Device):
    """A device whose HBM is a NumPy :class:`HBMImage` on the host and whose runs are
    simulations on a worker thread, so ``wait(timeout)`` behaves as with hardware. Subclasses
    give :meth:`_run` (one whole run on the image) and may check images (:meth:`_check`), react
    to a load (:meth:`_loaded_image`) or to host writes (:meth:`_written`)."""

    what = "the simulation"  # for error messages

    def __init__(self, geom: CoreGeometry):
        super().__init__(geom)
        self.image: HBMImage | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # hooks ------------------------------------------------------------------------------------

    def _check(self, image: HBMImage) -> None:
        """Raise DeviceError if ``image`` cannot be loaded (beyond the channel count)."""

    def _loaded_image(self) -> None:
        """``self.image`` was just (re)loaded."""

    def _written(self, lo: int, hi: int) -> None:
        """Host bytes [lo, hi) of some channel changed."""

    @abc.abstractmethod
    def _run(self, image: HBMImage, args: dict, on_token: TokenCallback | None) -> None:
        """One whole run on ``image`` (on the worker thread); raise on failure."""

    # Device ----------------------------------------------------------------------------------

    def _loaded(self) -> HBMImage:
        if self.image is None:
            raise DeviceError("no image loaded: call load(image) first")
        return self.image

    def _idle(self) -> HBMImage:
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError("the device is running; wait() for it first")
        return self._loaded()

    def load(self, image: HBMImage) -> None:
        if image.geom.channels != self.geom.channels:
            raise DeviceError(
                f"image has {image.geom.channels} channels, the {self.geom.name} core "
                f"{self.geom.channels}"
            )
        self._check(image)
        if self.image is not None:
            self._idle()
        self.image = HBMImage(self.geom, image.nbytes)
        self.image.data[:] = image.data
        self._loaded_image()

    def _access(self, base: int, n: int, ch: int = 0) -> HBMImage:
        """The idle image, after checking channel ``ch`` bytes [base, base + n) exist."""
        image = self._idle()
        check_access(self.geom, image.nbytes, ch, base, n)
        return image

    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        self._access(base, np.shape(chunk)[-1]).write_striped(base, chunk)
        self._written(base, base + chunk.shape[1])

    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        n = len(raw) if isinstance(raw, bytes | bytearray) else np.asarray(raw).nbytes
        self._access(base, n, ch).write_channel(ch, base, raw)
        self._written(base, base + n)

    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        return self._access(base, n, ch).read_channel(ch, base, n)

    def read_striped(self, base: int, n: int) -> np.ndarray:
        return self._access(base, n).read_striped(base, n).copy()

    def start(self, on_token: TokenCallback | None = None) -> None:
        image = self._idle()
        args = dict(self.args)
        self._error = None

        def work():
            try:
                self._run(image, args, on_token)
            except BaseException as err:  # reported by wait()
                self._error = err

        self._thread = threading.Thread(target=work, name=f"tandem-{self.name}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> StatusRecord:
        if self._thread is None:
            raise DeviceError("the device was not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the {self.name} device is still running after {timeout} s")
        if self._error is not None:
            raise DeviceError(f"{self.what} failed: {self._error!r}") from self._error
        return self.read_status()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.image = None
