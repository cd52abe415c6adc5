"""The quantized weight formats' constants as the RTL uses them, derived from
:mod:`tandem.layout` (the one definition) in one place for the MPU and the DMA."""

from __future__ import annotations

from types import SimpleNamespace

from tandem.isa import WFMT_BITS, WGROUPS, WFmt
from tandem.layout import quant_blocks, quant_span, scale_entries, scale_run
from tandem.numerics import BLOCK

__all__ = ["QUANT_FORMATS", "log2_exact", "quant_params", "quant_table"]

QUANT_FORMATS = tuple(w for w in WFmt if w is not WFmt.FP16)
"""The quantized weight formats (:class:`tandem.isa.WFmt` INT8 and INT4)."""


def log2_exact(n: int) -> int:
    """``log2(n)`` of a power of two; AssertionError otherwise (the RTL divides by shifts)."""
    if n < 1 or n & (n - 1):
        raise AssertionError(f"{n} is not a power of two")
    return n.bit_length() - 1


def quant_params(wfmt, wgroup: int) -> SimpleNamespace:
    """One quantized format and group code: ``bits``, ``blocks`` per tile and lane (``k``), the
    tile's ``span`` of columns, the scale beat's ``run`` of tiles (``K``), the ``entries`` per
    tile (``e``), ``per`` = ``k / e`` blocks per entry, and ``span_log2``/``run_log2`` (both
    powers of two)."""
    bits = WFMT_BITS[WFmt(wfmt)]
    k, e = quant_blocks(bits), scale_entries(bits, wgroup)
    span, run = quant_span(bits), scale_run(bits, wgroup)
    assert span == BLOCK * k, (span, k)
    return SimpleNamespace(
        bits=bits,
        blocks=k,
        span=span,
        run=run,
        entries=e,
        per=k // e,
        span_log2=log2_exact(span),
        run_log2=log2_exact(run),
    )


def quant_table() -> dict[tuple[int, int], SimpleNamespace]:
    """:func:`quant_params` of every quantized format and group code, keyed ``(wfmt, wgroup)``."""
    return {
        (int(w), g): quant_params(w, g) for w in QUANT_FORMATS for g in range(len(WGROUPS))
    }
