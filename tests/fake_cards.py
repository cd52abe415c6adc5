"""What the two fake card runtimes share (tests/fake_opencl.py, tests/fake_xrt.py): the stand-in
xclbin and the kernel, which is the ISA simulator run on the card's channel memories.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence

import numpy as np

from tandem.golden.isasim import IsaSim
from tandem.host.fpga import KERNEL_NAME, PLATFORM
from tandem.layout import HBMImage

XCLBIN_MAGIC = b"xclbin2\0"
"""The first bytes of every xclbin (axlf header magic)."""
BANK_BYTES = 512 << 20
"""One U55C HBM pseudo-channel: 16 GiB over 32 banks."""
HBM_BANKS = 32


def write_xclbin(path, geom, kernel=KERNEL_NAME, *, platform=PLATFORM, banks=None):
    """A stand-in xclbin: the magic, then what the fakes read. ``kernel`` is the kernel's name;
    its arguments are the ``geom`` core's (tandem.regmap). ``platform`` is the platform it was
    linked for. ``banks`` maps a channel to the HBM bank its port is connected to; the default
    is ``hbm<ch>`` on ``HBM[ch]``, as make bitstream's link.cfg does."""
    banks = {**{ch: ch for ch in range(geom.channels)}, **(banks or {})}
    meta = {
        "kernel": kernel,
        "geometry": geom.name,
        "platform": platform,
        "banks": [banks[ch] for ch in range(geom.channels)],
    }
    path.write_bytes(XCLBIN_MAGIC + json.dumps(meta).encode())
    return path


def read_xclbin(raw: bytes) -> dict | None:
    """What :func:`write_xclbin` wrote; None for anything that is not an xclbin."""
    if not isinstance(raw, bytes) or not raw.startswith(XCLBIN_MAGIC):
        return None
    return json.loads(raw[len(XCLBIN_MAGIC) :])


def run_kernel(
    geom,
    memories: Sequence[np.ndarray],
    scalars: dict[str, int],
    gate: threading.Event,
    done: Callable[[bool], None],
) -> None:
    """One run of the decode core on a thread: once ``gate`` is set, :class:`IsaSim` runs on the
    channel memories (uint8 arrays, updated in place), then ``done(ok)``. ``ok`` is False if
    the simulator raised, as a failed kernel command. The ``watchdog`` argument, when non-zero,
    is the instruction budget (the card counts cycles without progress)."""

    def work():
        gate.wait()
        try:
            image = HBMImage(geom, memories[0].size)
            for ch, mem in enumerate(memories):
                image.data[ch] = mem
            steps = scalars["watchdog"] or (1 << 26)
            IsaSim(geom, image, max_steps=steps).run(scalars)
            for ch, mem in enumerate(memories):
                mem[:] = image.data[ch]
        except Exception:
            done(False)
        else:
            done(True)

    threading.Thread(target=work, name="fake-card-kernel", daemon=True).start()
