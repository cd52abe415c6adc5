"""Seeds of randomised tests, overridable from the environment.

Randomised tests (stall patterns on every stream and AXI channel, random operands) take their
seeds through :func:`seed`. Unset, ``TANDEM_SEED`` leaves every seed as written, so a run is
reproducible by default; set to an integer, it moves every seed to another stream of the same
test, so repeated runs with different values explore more of the input space::

    TANDEM_SEED=7 python -m pytest -q tests/rtl/test_dma.py

A failure under a seed is reproduced by running with the same value (pytest prints it in its
header, and the cocotb testbenches inherit it through the environment).
"""

from __future__ import annotations

import hashlib
import os

SEED_ENV = "TANDEM_SEED"


def override() -> int | None:
    """The integer in ``TANDEM_SEED``, or None when it is unset or empty."""
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be an integer, not {raw!r}") from None


def seed(base: int) -> int:
    """``base`` as written, or with ``TANDEM_SEED`` set, a 63-bit seed derived from both."""
    extra = override()
    if extra is None:
        return base
    digest = hashlib.blake2b(f"{base}:{extra}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
