"""Argument checks shared by every tier: one wording for one kind of mistake."""

from __future__ import annotations


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``lo..hi`` (``hi`` None: no upper bound);
    else ``ValueError`` naming ``name``, the range and the value."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, not {value!r}")
    return value
