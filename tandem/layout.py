"""HBM layout: the one definition of where every tensor lives, as (channel, byte offset).

All tensors but the control area are *striped*: they occupy the same byte range in every
pseudo-channel, so one address (a per-channel offset, in 64-byte lines in instructions) names
them and every channel streams its share in parallel. Three striped forms exist:

* **vector** -- element ``i`` lives in channel ``(i // E) % C`` at
  ``base + (i // (E*C)) * beat_bytes + (i % E) * 2`` (``E`` values per beat, ``C`` channels).
* **rows** -- a row-major matrix of vectors (embedding tables); row ``r`` starts at
  ``base + r * row_bytes`` with ``row_bytes`` a whole number of lines.
* **tiled** -- an MPU matrix. A tile is ``lanes`` rows x 64 columns = one beat in every channel;
  within a tile, row ``lane`` column ``j`` is value ``lane*64 + j`` of the beat row across the
  channels. Tiles are ordered by 64x64 block (row group ``g``, column block ``cb``, ``g`` outer),
  and within a block by row block ``rb``: tile ``(g*n_cb + cb)*stride + rb`` with
  ``stride = 64 / lanes`` for a dense matrix. The MPU streams a dense matrix front to back.

**Quantized tiled** (issue 17; ``MATVEC`` with ``wfmt`` INT8 or INT4, ``tandem.isa``): a
weight-only quantized MPU matrix (``tandem.qweights.QuantizedMatrix``, after head padding). The
matrix unit keeps its ``lanes`` rows, and a tile is still exactly one beat in every channel: each
lane's share of the beat row (:data:`LANE_BYTES` = 128 bytes, the 64 binary16 values of an FP16
tile) holds ``k*64`` weights of its row, ``k = 16 / bits`` blocks (2 at INT8, 4 at INT4;
:func:`quant_blocks`), so a tile is ``lanes`` rows x ``k*64`` columns (:func:`quant_span`).
Within a tile, lane ``lane``'s weight for column ``j`` (``0 <= j < k*64``) is at bit ``j * bits``
of the lane's bytes ``lane*128 .. lane*128 + 127`` of the beat row across the channels (lane-major,
as the FP16 tile), low bits first: INT8 one byte per weight; INT4 two per byte, the lower column in
the low nibble. Tiles are ordered as the FP16 form's, with column blocks of ``k*64`` columns:
tile ``(g*n_cb + cb)*stride + rb``, ``n_cb = ceil(cols / (k*64))``, ``stride = 64 / lanes``
(quantized matrices are always dense).

Scales and zero points stream in the same pass: before every run of ``K`` tiles
(:func:`scale_run`) comes one *scale beat* (one beat in every channel). Each lane's 128 bytes of it
hold, for the run's tiles in order, ``e`` entries per tile (:func:`scale_entries`: one per group
of columns the lane's ``k`` blocks of that tile fall in; ``e = k*64 / group`` for a group smaller
than the tile's columns, else 1, the group's entry repeated for every tile of it): entry
``t*e + i`` (tile ``t`` of the run, sub-group ``i``, covering blocks ``i*k/e .. (i+1)*k/e - 1`` of
the tile) has its binary16 scale at bytes ``2*(t*e + i)`` and its zero point at bit
``(t*e + i) * bits`` from byte ``2*K*e``, low bits first as the weights. ``K`` is the largest power
of two with ``K * e * (16 + bits) <= 1024`` bits, which makes ``K*e = 32`` entries in every case
(INT8: K = 32 per row or groups of >= 128, 16 in groups of 64; INT4: K = 32 for groups of >= 256,
16 for 128, 8 for 64): scales in bytes 0..63, zeros from byte 64. So the matrix unit reads one
scale beat, then K tiles, over and over; the beat before tile ``t`` is beat ``t + t // K + 1`` of
the region, the scale beat of run ``r`` beat ``r * (K + 1)`` (:func:`quant_tile_offset`). A last
run may be short; its scale beat's unused entries are zero. The ``MATVEC`` field ``wgroup`` gives
``e`` (64, 128, 256 or whole row: :func:`quant_wgroup`); a group the tile cannot map (not dividing
the tile's columns when smaller, not a multiple of them when larger) is a :class:`LayoutError`.
Padding: columns past ``cols`` hold the zero point of their entry (a weight of 0), entries past
the row's last group and rows past ``rows`` are all zero. The per-block view the ISA simulator
computes with is :func:`unpack_quant_tiled`'s (every block its own scale: the contract,
``tandem.numerics.matvec_quant``, scales per block).

Bandwidth: a scale beat per ``K`` tiles adds ``1/K`` to a matrix's weight bytes. Per gpt2-medium
token on u55c (24 blocks and the LM head of 50,257 rows; :func:`quant_stream_bytes`), FP16
streams 707.0 MB of weight tiles; W8 per channel 353.5 MB of tiles + 11.0 MB of scale beats (K =
32: +3.1%, 364.5 MB, 51.6% of FP16); W4 g128 176.8 + 11.0 MB (K = 16: +6.25%, 187.8 MB, 26.6%);
W4 g64 176.8 + 22.1 MB (K = 8: +12.5%, 198.8 MB, 28.1%). The GPTQ form itself needs ``16 + bits``
bits per group: about 0.3%, 3.9% and 7.8% of the weights; the rest is the power-of-two ``K`` and
the repetition per tile. Per channel, one entry per tile repeats a row's scale ``n_cb`` times; a
form with one scale per row would save at most those 11.0 MB (3%), but the matrix unit would
have to keep ``stride x lanes`` scales per row group and read scale beats on a second rule, so
the one rule stays: one scale beat, then ``K`` tiles.

The KV cache interleaves heads so that the rows a prompt fills form one contiguous prefix per
layer and channel (the hybrid pipeline moves exactly that prefix): head ``h``'s K matrix
``[n_ctx, 64]`` and transposed V matrix ``[64, n_ctx]`` are tiled matrices with base
``layer_base + h * 64/lanes`` tiles and ``stride = n_head * 64/lanes``.

The control area (status record, program, prompt and output tokens) lives in channel 0. The
status record and the program sit at fixed offsets (:data:`STATUS_BYTES` bytes at 0, then the
program at :data:`PROGRAM_BASE`), because the core finds them before it knows anything of the
model; everything else is found through the program.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import CheckpointError, expected_shapes
from .config import GPT2Config
from .geometry import CoreGeometry
from .isa import LINE, WFMT_BITS, WGROUPS, WORD_BYTES, WFmt
from .numerics import BLOCK, to_bits
from .qweights import BITS as QUANT_BITS
from .qweights import LM_HEAD, QUANTIZED_LAYERS, QuantizationError, QuantizedMatrix


class LayoutError(ValueError):
    """The model does not fit the core: the message names the limit that was broken."""


class Kind(enum.Enum):
    CONTROL = "control"
    VECTOR = "vector"
    ROWS = "rows"
    TILED = "tiled"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Region:
    """One tensor's place in HBM.

    ``base`` is the byte offset inside each channel (channel 0 only for ``CONTROL``) and ``nbytes``
    the bytes it takes per channel. ``rows``/``cols`` are the logical shape; ``stride`` is the
    tiled stride (tiles between 64x64 blocks) and ``row_bytes`` the ROWS pitch.
    """

    name: str
    kind: Kind
    base: int
    nbytes: int
    rows: int = 1
    cols: int = 1
    stride: int = 0
    row_bytes: int = 0
    wfmt: int = WFmt.FP16  # TILED: the weight format (tandem.isa.WFmt) and, quantized, wgroup
    wgroup: int = 0

    @property
    def line(self) -> int:
        return self.base // LINE

    @property
    def end(self) -> int:
        return self.base + self.nbytes


# ----------------------------------------------------------------------------------------------
# address functions (vectorised over index arrays)


def dense_stride(geom: CoreGeometry) -> int:
    """Tiles per 64x64 block of a dense tiled matrix."""
    return BLOCK // geom.lanes


def tiled_bytes(geom: CoreGeometry, rows: int, cols: int) -> int:
    """Bytes per channel of a dense tiled matrix."""
    n_tiles = -(-rows // BLOCK) * -(-cols // BLOCK) * dense_stride(geom)
    return _round_up(n_tiles * geom.beat_bytes, LINE)


def tiled_address(geom: CoreGeometry, base: int, cols: int, stride: int, r, c):
    """(channel, byte offset) of element (r, c) of a tiled matrix with ``cols`` allocated columns.

    ``stride`` 0 means dense. Works element-wise on arrays.
    """
    r = np.asarray(r, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    stride = stride or dense_stride(geom)
    n_cb = -(-cols // BLOCK)
    g, rin = np.divmod(r, BLOCK)
    rb, lane = np.divmod(rin, geom.lanes)
    cb, j = np.divmod(c, BLOCK)
    tile = (g * n_cb + cb) * stride + rb
    ch, e = np.divmod(lane * BLOCK + j, geom.beat_elems)
    return ch, base + tile * geom.beat_bytes + e * 2


def vector_bytes(geom: CoreGeometry, n: int) -> int:
    """Bytes per channel of a striped vector of ``n`` values."""
    return _round_up(-(-n // (geom.beat_elems * geom.channels)) * geom.beat_bytes, LINE)


def vector_address(geom: CoreGeometry, base: int, i):
    """(channel, byte offset) of element ``i`` of a striped vector."""
    i = np.asarray(i, dtype=np.int64)
    stripe, k = np.divmod(i, geom.beat_elems * geom.channels)
    ch, e = np.divmod(k, geom.beat_elems)
    return ch, base + stripe * geom.beat_bytes + e * 2


# ----------------------------------------------------------------------------------------------
# packing (tensor -> per-channel bytes) and unpacking


def pack_tiled(geom: CoreGeometry, bits: np.ndarray) -> np.ndarray:
    """A binary16 matrix as dense tiles: uint8 [channels, tiled_bytes]."""
    bits = np.asarray(bits, dtype=np.uint16)
    rows, cols = bits.shape
    g_n, cb_n, st = -(-rows // BLOCK), -(-cols // BLOCK), dense_stride(geom)
    padded = np.zeros((g_n * BLOCK, cb_n * BLOCK), np.uint16)
    padded[:rows, :cols] = bits
    # [g, rb, lane, cb, j] -> [g, cb, rb, lane, j]: tile order, then lane*64+j within the tile
    t = padded.reshape(g_n, st, geom.lanes, cb_n, BLOCK).transpose(0, 3, 1, 2, 4)
    t = t.reshape(-1, geom.channels, geom.beat_elems).transpose(1, 0, 2)  # [ch, tile, e]
    out = np.zeros((geom.channels, tiled_bytes(geom, rows, cols)), np.uint8)
    flat = np.ascontiguousarray(t).view(np.uint8).reshape(geom.channels, -1)
    out[:, : flat.shape[1]] = flat
    return out


def unpack_tiled(geom: CoreGeometry, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_tiled` for uint8 [channels, >= tiled_bytes] starting at the base."""
    g_n, cb_n, st = -(-rows // BLOCK), -(-cols // BLOCK), dense_stride(geom)
    n = g_n * cb_n * st * geom.beat_bytes
    t = (
        np.ascontiguousarray(data[:, :n])
        .view(np.uint16)
        .reshape(geom.channels, -1, geom.beat_elems)
    )
    t = t.transpose(1, 0, 2).reshape(g_n, cb_n, st, geom.lanes, BLOCK).transpose(0, 2, 3, 1, 4)
    return t.reshape(g_n * BLOCK, cb_n * BLOCK)[:rows, :cols]


# ----------------------------------------------------------------------------------------------
# the quantized tiled form (module docstring)

LANE_BYTES = 2 * BLOCK
"""Bytes of one lane's share of a beat row across the channels (64 binary16 values)."""


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise LayoutError(f"quantized weights are 8 or 4 bits, not {bits!r}")
    return int(bits)


def wfmt_for(bits: int) -> WFmt:
    """The ``MATVEC`` weight format of ``bits``-bit weights (16: FP16)."""
    for wfmt, b in WFMT_BITS.items():
        if b == bits:
            return wfmt
    raise LayoutError(f"no weight format stores {bits!r}-bit weights (16, 8 or 4)")


def quant_blocks(bits: int) -> int:
    """Blocks of its row that one lane reads per tile: ``16 / bits`` (2 at INT8, 4 at INT4)."""
    return 16 // _check_bits(bits)


def quant_span(bits: int) -> int:
    """Columns of one quantized tile: ``64 * 16 / bits``."""
    return BLOCK * quant_blocks(bits)


def scale_entries(bits: int, wgroup: int) -> int:
    """Scale-beat entries per lane per tile: one per group the lane's blocks of a tile fall in
    (``span / group`` for a group smaller than the tile's columns, else 1)."""
    size, span = WGROUPS[wgroup], quant_span(bits)
    return 1 if size is None or size >= span else span // size


def scale_run(bits: int, wgroup: int) -> int:
    """``K``, the tiles after each scale beat: the largest power of two whose ``K * e`` entries
    (binary16 scale + ``bits``-bit zero point each) fit a lane's :data:`LANE_BYTES`. The one
    definition; ``K * e`` is 32 for every format and group."""
    e, entry_bits = scale_entries(bits, wgroup), 16 + _check_bits(bits)
    k = 1
    while 2 * k * e * entry_bits <= 8 * LANE_BYTES:
        k *= 2
    return k


def quant_wgroup(bits: int, group: int, cols: int) -> int:
    """The ``wgroup`` code of a ``bits``-bit matrix of ``cols`` columns in groups of ``group``
    (``group >= cols``: one group per row, code 3). LayoutError for a group the tile cannot map:
    one smaller than the tile's ``span`` columns that does not divide it, or a larger one that
    is not a multiple of it (a tile's blocks would straddle two groups)."""
    span = quant_span(bits)
    if group >= cols:
        return WGROUPS.index(None)
    if group < span and span % group == 0:
        return WGROUPS.index(group)
    if group >= span and group % span == 0:
        return WGROUPS.index(group) if group in WGROUPS else WGROUPS.index(None)
    raise LayoutError(
        f"groups of {group} columns do not map onto INT{bits} tiles of {span} columns: a group "
        f"must divide {span} or be a multiple of it (or the whole row of {cols})"
    )


def quant_tiles(geom: CoreGeometry, rows: int, cols: int, bits: int) -> int:
    """Weight tiles of a quantized matrix (scale beats not counted)."""
    return -(-rows // BLOCK) * dense_stride(geom) * -(-cols // quant_span(bits))


def quant_tile_offset(geom: CoreGeometry, bits: int, wgroup: int, t):
    """Byte offset from the region's base of tile ``t`` (element-wise on arrays): beat
    ``t + t // K + 1``, after its run's scale beat."""
    t = np.asarray(t, dtype=np.int64)
    return (t + t // scale_run(bits, wgroup) + 1) * geom.beat_bytes


def quant_scale_offset(geom: CoreGeometry, bits: int, wgroup: int, t):
    """Byte offset from the region's base of the scale beat before tile ``t``: beat
    ``(t // K) * (K + 1)``."""
    k = scale_run(bits, wgroup)
    return np.asarray(t, dtype=np.int64) // k * (k + 1) * geom.beat_bytes


def quant_tiled_bytes(geom: CoreGeometry, rows: int, cols: int, bits: int, wgroup: int) -> int:
    """Bytes per channel of a quantized tiled matrix: its tiles and scale beats."""
    n = quant_tiles(geom, rows, cols, bits)
    return _round_up((n + -(-n // scale_run(bits, wgroup))) * geom.beat_bytes, LINE)


def quant_stream_bytes(geom: CoreGeometry, rows: int, cols: int, bits: int, wgroup: int):
    """(weight bytes, scale-beat bytes) one pass over a quantized matrix streams, all channels."""
    n = quant_tiles(geom, rows, cols, bits)
    beat_row = geom.beat_bytes * geom.channels
    return n * beat_row, -(-n // scale_run(bits, wgroup)) * beat_row


def quant_address(geom: CoreGeometry, base: int, cols: int, bits: int, wgroup: int, r, c):
    """(channel, byte offset, bit shift) of weight (r, c) of a quantized tiled matrix with
    ``cols`` allocated columns (element-wise on arrays)."""
    r = np.asarray(r, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    span = quant_span(bits)
    g, rin = np.divmod(r, BLOCK)
    rb, lane = np.divmod(rin, geom.lanes)
    cb, j = np.divmod(c, span)
    tile = (g * -(-cols // span) + cb) * dense_stride(geom) + rb
    byte, shift = np.divmod(lane * LANE_BYTES * 8 + j * bits, 8)
    ch, e = np.divmod(byte, geom.beat_bytes)
    return ch, base + quant_tile_offset(geom, bits, wgroup, tile) + e, shift


def per_block(m: QuantizedMatrix) -> QuantizedMatrix:
    """``m`` with every 64-column block's own scale and zero point (``group`` = 64): the same
    weights, and the same products under the contract, which scales per block."""
    g = np.arange(-(-m.cols // BLOCK)) * BLOCK // m.group
    return QuantizedMatrix(
        q=m.q, scale=m.scale[:, g].copy(), zero=m.zero[:, g].copy(), bits=m.bits, group=BLOCK
    )


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [..., n] (n * bits a multiple of 8) as bytes [..., n * bits / 8], low bits
    first."""
    v = values.astype(np.uint8)
    return v if bits == 8 else v[..., 0::2] | (v[..., 1::2] << 4)


def _unpack_bits(data: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits`."""
    if bits == 8:
        return data.astype(np.uint8)
    return np.stack([data & 0xF, data >> 4], axis=-1).reshape(*data.shape[:-1], -1)


def pack_quant_tiled(geom: CoreGeometry, m: QuantizedMatrix) -> np.ndarray:
    """A quantized matrix in the quantized tiled form (module docstring), with ``wgroup`` =
    :func:`quant_wgroup`: uint8 [channels, quant_tiled_bytes]."""
    bits, rows, cols = m.bits, m.rows, m.cols
    wgroup = quant_wgroup(bits, m.group, cols)
    k, span, st, lanes = quant_blocks(bits), quant_span(bits), dense_stride(geom), geom.lanes
    e, K = scale_entries(bits, wgroup), scale_run(bits, wgroup)
    per = k // e  # blocks per entry
    g_n, cb_n, nb = -(-rows // BLOCK), -(-cols // span), -(-cols // BLOCK)
    rows_p, nb_p = g_n * BLOCK, cb_n * k
    # each entry's first block, its group, and each block's entry
    first = np.arange(cb_n * e) * per
    real = first < nb
    grp = np.minimum(first, nb - 1) * BLOCK // m.group
    blk = np.arange(nb) * BLOCK // m.group
    if (blk != grp[np.arange(nb) // per]).any():  # quant_wgroup prevents this
        raise LayoutError(f"groups of {m.group} straddle the INT{bits} tiles' scale entries")
    s_ent = np.zeros((rows_p, cb_n * e), np.uint16)
    z_ent = np.zeros((rows_p, cb_n * e), np.uint8)
    s_ent[:rows] = np.where(real, m.scale[:, grp], 0)
    z_ent[:rows] = np.where(real, m.zero[:, grp], 0)
    # weights, padding columns at their entry's zero point (d = 0), padding rows zero
    q = np.zeros((rows_p, nb_p * BLOCK), np.uint8)
    q[:rows] = np.repeat(z_ent[:rows], per * BLOCK, axis=1)
    q[:rows, :cols] = m.q
    # [g, rb, lane, cb, j] -> [g, cb, rb, lane, j]: tile order, lane-major within the tile
    t = q.reshape(g_n, st, lanes, cb_n, span).transpose(0, 3, 1, 2, 4).reshape(-1, lanes, span)
    tiles = _pack_bits(t, bits).reshape(t.shape[0], -1)  # [n_tiles, lanes * 128]
    n = tiles.shape[0]
    runs = -(-n // K)

    def entries(a):  # [rows_p, cb_n * e] -> [runs, lanes, K * e] in tile order
        a = a.reshape(g_n, st, lanes, cb_n, e).transpose(0, 3, 1, 2, 4).reshape(n, lanes, e)
        a = np.concatenate([a, np.zeros((runs * K - n, lanes, e), a.dtype)])
        return a.reshape(runs, K, lanes, e).transpose(0, 2, 1, 3).reshape(runs, lanes, K * e)

    sb = np.zeros((runs, lanes, LANE_BYTES), np.uint8)
    sb[:, :, : 2 * K * e] = np.ascontiguousarray(entries(s_ent).astype("<u2")).view(np.uint8)
    zb = _pack_bits(entries(z_ent), bits)
    sb[:, :, 2 * K * e : 2 * K * e + zb.shape[2]] = zb
    padded = np.zeros((runs * K, lanes * LANE_BYTES), np.uint8)
    padded[:n] = tiles
    beats = np.zeros((runs, K + 1, lanes * LANE_BYTES), np.uint8)
    beats[:, 0] = sb.reshape(runs, -1)
    beats[:, 1:] = padded.reshape(runs, K, -1)
    beats = beats.reshape(-1, geom.channels, geom.beat_bytes)[: n + runs]
    flat = np.ascontiguousarray(beats.transpose(1, 0, 2)).reshape(geom.channels, -1)
    out = np.zeros((geom.channels, quant_tiled_bytes(geom, rows, cols, bits, wgroup)), np.uint8)
    out[:, : flat.shape[1]] = flat
    return out


def unpack_quant_tiled(
    geom: CoreGeometry, data: np.ndarray, rows: int, cols: int, bits: int, wgroup: int
) -> QuantizedMatrix:
    """The matrix a quantized tiled region holds, from uint8 [channels, >= its bytes] starting
    at the base: a :class:`QuantizedMatrix` with every block's scale and zero point (group 64;
    :func:`per_block` of the packed one)."""
    k, span, st, lanes = quant_blocks(bits), quant_span(bits), dense_stride(geom), geom.lanes
    e, K = scale_entries(bits, wgroup), scale_run(bits, wgroup)
    g_n, cb_n, nb = -(-rows // BLOCK), -(-cols // span), -(-cols // BLOCK)
    n = g_n * st * cb_n
    runs = -(-n // K)
    nbytes = (n + runs) * geom.beat_bytes
    beats = np.zeros((runs * (K + 1), geom.channels * geom.beat_bytes), np.uint8)
    raw = np.ascontiguousarray(data[:, :nbytes]).reshape(geom.channels, -1, geom.beat_bytes)
    beats[: n + runs] = raw.transpose(1, 0, 2).reshape(n + runs, -1)
    beats = beats.reshape(runs, K + 1, lanes, LANE_BYTES)
    tiles = beats[:, 1:].reshape(runs * K, lanes, LANE_BYTES)[:n]
    q = _unpack_bits(tiles, bits)  # [n, lanes, span]
    q = q.reshape(g_n, cb_n, st, lanes, span).transpose(0, 2, 3, 1, 4).reshape(g_n * BLOCK, -1)
    sb = beats[:, 0]  # [runs, lanes, 128]
    s_ent = np.ascontiguousarray(sb[:, :, : 2 * K * e]).view("<u2").astype(np.uint16)
    z_ent = _unpack_bits(sb[:, :, 2 * K * e : 2 * K * e + K * e * bits // 8], bits)

    def blocks(a):  # [runs, lanes, K * e] -> per block [rows_p, cb_n * k]
        a = a.reshape(runs, lanes, K, e).transpose(0, 2, 1, 3).reshape(runs * K, lanes, e)[:n]
        a = np.repeat(a, k // e, axis=2)  # [n, lanes, k]
        return a.reshape(g_n, cb_n, st, lanes, k).transpose(0, 2, 3, 1, 4).reshape(g_n * BLOCK, -1)

    return QuantizedMatrix(
        q=np.ascontiguousarray(q[:rows, :cols]),
        scale=np.ascontiguousarray(blocks(s_ent)[:rows, :nb]),
        zero=np.ascontiguousarray(blocks(z_ent)[:rows, :nb]),
        bits=bits,
        group=BLOCK,
    )


def pack_vector(geom: CoreGeometry, bits: np.ndarray) -> np.ndarray:
    """A binary16 vector striped: uint8 [channels, vector_bytes]."""
    bits = np.asarray(bits, dtype=np.uint16).ravel()
    per = geom.beat_elems * geom.channels
    n_stripes = -(-bits.size // per)
    padded = np.zeros(n_stripes * per, np.uint16)
    padded[: bits.size] = bits
    t = padded.reshape(n_stripes, geom.channels, geom.beat_elems).transpose(1, 0, 2)
    out = np.zeros((geom.channels, vector_bytes(geom, bits.size)), np.uint8)
    flat = np.ascontiguousarray(t).view(np.uint8).reshape(geom.channels, -1)
    out[:, : flat.shape[1]] = flat
    return out


def pack_rows(geom: CoreGeometry, bits: np.ndarray) -> np.ndarray:
    """A row-major matrix of striped vectors: uint8 [channels, rows * row_bytes]."""
    bits = np.asarray(bits, dtype=np.uint16)
    rows, cols = bits.shape
    per = geom.beat_elems * geom.channels
    n_stripes = -(-cols // per)
    padded = np.zeros((rows, n_stripes * per), np.uint16)
    padded[:, :cols] = bits
    t = padded.reshape(rows, n_stripes, geom.channels, geom.beat_elems).transpose(2, 0, 1, 3)
    t = np.ascontiguousarray(t).view(np.uint8).reshape(geom.channels, rows, -1)
    row_bytes = vector_bytes(geom, cols)
    out = np.zeros((geom.channels, rows, row_bytes), np.uint8)
    out[:, :, : t.shape[2]] = t
    return out.reshape(geom.channels, -1)


def unpack_rows(geom: CoreGeometry, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: uint8 [channels, >= rows * row_bytes] from the first row's
    base to binary16 bits [rows, cols]."""
    rb = vector_bytes(geom, cols)
    per = geom.beat_elems * geom.channels
    n_stripes = -(-cols // per)
    t = np.ascontiguousarray(data[:, : rows * rb]).reshape(geom.channels, rows, rb)
    t = np.ascontiguousarray(t[:, :, : n_stripes * geom.beat_bytes]).view(np.uint16)
    t = t.reshape(geom.channels, rows, n_stripes, geom.beat_elems).transpose(1, 2, 0, 3)
    return t.reshape(rows, -1)[:, :cols]


def unpack_vector(geom: CoreGeometry, data: np.ndarray, n: int) -> np.ndarray:
    per = geom.beat_elems * geom.channels
    n_stripes = -(-n // per)
    t = np.ascontiguousarray(data[:, : n_stripes * geom.beat_bytes]).view(np.uint16)
    t = t.reshape(geom.channels, n_stripes, geom.beat_elems).transpose(1, 0, 2)
    return t.reshape(-1)[:n]


def pack_kv_prefix(geom: CoreGeometry, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """One layer's K and V for positions 0..T-1 as the bytes of its KV regions' prefixes.

    ``k`` and ``v`` are binary16 [n_head, T, 64] (heads padded to 64). Returns (k_bytes, v_bytes),
    each uint8 [channels, kv_prefix_bytes(T)], to be written at the start of the layer's K and V
    regions. Rows past T inside the last 64-position group are zero.
    """
    k = np.asarray(k, dtype=np.uint16)
    v = np.asarray(v, dtype=np.uint16)
    n_head, t_len, width = k.shape
    if width != BLOCK or v.shape != k.shape:
        raise ValueError(f"K/V must be [n_head, T, {BLOCK}], got {k.shape} and {v.shape}")
    groups = -(-t_len // BLOCK)
    st = dense_stride(geom)
    kp = np.zeros((n_head, groups * BLOCK, BLOCK), np.uint16)
    kp[:, :t_len] = k
    vp = np.zeros((n_head, groups * BLOCK, BLOCK), np.uint16)
    vp[:, :t_len] = v
    # K: rows = positions. [h, g, rb, lane, j] -> [g, h, rb, lane, j]
    kt = kp.reshape(n_head, groups, st, geom.lanes, BLOCK).transpose(1, 0, 2, 3, 4)
    # V^T: rows = dims d, columns = positions. [h, cb, j(pos), rb, lane] -> [cb, h, rb, lane, j]
    vt = vp.reshape(n_head, groups, BLOCK, st, geom.lanes).transpose(1, 0, 3, 4, 2)

    def to_channels(t):
        t = np.ascontiguousarray(t).reshape(-1, geom.channels, geom.beat_elems)
        return np.ascontiguousarray(t.transpose(1, 0, 2)).view(np.uint8).reshape(geom.channels, -1)

    return to_channels(kt), to_channels(vt)


def kv_prefix_bytes(geom: CoreGeometry, n_head: int, t_len: int) -> int:
    """Bytes per channel that positions 0..T-1 of one layer's K (or V) region occupy."""
    return -(-t_len // BLOCK) * n_head * dense_stride(geom) * geom.beat_bytes


# ----------------------------------------------------------------------------------------------
# the model's MPU-form tensors (transposed, heads padded to 64)


def padded_heads(cfg: GPT2Config) -> int:
    """Width of q, k, v and of the attention output once every head is padded to 64."""
    if cfg.head_dim > BLOCK:
        raise LayoutError(
            f"head_dim {cfg.head_dim} exceeds the core's {BLOCK}: a head must fit one MPU block"
        )
    return cfg.n_head * BLOCK


def head_index(cfg: GPT2Config) -> np.ndarray:
    """For each padded slot (h*64 + j), the source index h*hd + j, or -1 for padding: the one
    definition of the head padding (float weights here, quantized ones in
    :func:`quantized_mpu_matrix`)."""
    hd = cfg.head_dim
    h, j = np.divmod(np.arange(cfg.n_head * BLOCK), BLOCK)
    return np.where(j < hd, h * hd + j, -1)


def _pad_take(a: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    out = np.take(a, np.maximum(idx, 0), axis=axis)
    mask_shape = [1] * a.ndim
    mask_shape[axis] = idx.size
    return np.where((idx >= 0).reshape(mask_shape), out, 0).astype(a.dtype)


def mpu_tensors(cfg: GPT2Config, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every parameter as the core stores it: binary16 bits, MPU matrices as [out, in].

    Keys are the layout's region names (e.g. ``h.0.attn.c_attn.weight`` is [3*P, n_embd] with
    P = n_head*64 and each head's q/k/v rows at padded positions). This is the single definition
    of the transposition and head padding; the faithful model, the compiler and the GPU path
    use it.
    """
    e = cfg.n_embd
    idx = head_index(cfg)
    qkv_idx = np.concatenate([np.where(idx >= 0, idx + part * e, -1) for part in range(3)])
    out: dict[str, np.ndarray] = {
        "wte": to_bits(weights["wte.weight"]),
        "wpe": to_bits(weights["wpe.weight"]),
        "ln_f.weight": to_bits(weights["ln_f.weight"]),
        "ln_f.bias": to_bits(weights["ln_f.bias"]),
        "lm_head": to_bits(weights["wte.weight"]),
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = to_bits(weights[p + ln + ".weight"])
            out[p + ln + ".bias"] = to_bits(weights[p + ln + ".bias"])
        w = weights[p + "attn.c_attn.weight"]  # [e, 3e] (in, out)
        out[p + "attn.c_attn.weight"] = to_bits(_pad_take(w, qkv_idx, 1).T)
        out[p + "attn.c_attn.bias"] = to_bits(
            _pad_take(weights[p + "attn.c_attn.bias"], qkv_idx, 0)
        )
        w = weights[p + "attn.c_proj.weight"]  # [e, e] (in, out)
        out[p + "attn.c_proj.weight"] = to_bits(_pad_take(w, idx, 0).T)
        out[p + "attn.c_proj.bias"] = to_bits(weights[p + "attn.c_proj.bias"])
        for name in ("mlp.c_fc", "mlp.c_proj"):
            out[p + name + ".weight"] = to_bits(weights[p + name + ".weight"].T)
            out[p + name + ".bias"] = to_bits(weights[p + name + ".bias"])
    return out


# ----------------------------------------------------------------------------------------------
# quantized MPU matrices (issue 17): which keys, and their head padding


def quantized_shapes(cfg: GPT2Config) -> dict[str, tuple[int, int]]:
    """Every key that may hold a :class:`QuantizedMatrix`, with its (rows, cols) = (out, in)."""
    conv1d = expected_shapes(cfg)  # [in, out]
    keys = [f"h.{i}.{k}" for i in range(cfg.n_layer) for k in QUANTIZED_LAYERS]
    shapes = {k: conv1d[k][::-1] for k in keys}
    shapes[LM_HEAD] = conv1d["wte.weight"]
    return shapes


def split_quantized(
    cfg: GPT2Config, weights: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, QuantizedMatrix]]:
    """Separate the quantized matrices of a Weights dict: (float view, quantized).

    The float view holds every float entry, with a zero stand-in of the Conv1D shape [in, out]
    for each quantized layer and no ``lm_head.weight``, so that ``tandem.checkpoint.validate``
    and :func:`mpu_tensors` read it as a float model. Raises
    :class:`~tandem.checkpoint.CheckpointError` for a quantized matrix under a key that cannot
    be quantized or of the wrong shape."""
    shapes = quantized_shapes(cfg)
    view: dict[str, np.ndarray] = {}
    quant: dict[str, QuantizedMatrix] = {}
    for key, w in weights.items():
        if not isinstance(w, QuantizedMatrix):
            view[key] = w
            continue
        if key not in shapes:
            raise CheckpointError(
                f"weight {key!r} is quantized, but only the blocks' c_attn, c_proj and c_fc "
                f"weights and {LM_HEAD!r} can be"
            )
        if w.shape != shapes[key]:
            raise CheckpointError(
                f"quantized weight {key!r} has shape {w.shape}, expected {shapes[key]} "
                f"([out, in]) for config {cfg.name!r}"
            )
        quant[key] = w
        if key != LM_HEAD:
            view[key] = np.broadcast_to(np.float32(0), shapes[key][::-1])
    return view, quant


def quantized_mpu_matrix(cfg: GPT2Config, key: str, m: QuantizedMatrix) -> QuantizedMatrix:
    """A quantized matrix as the core computes with it, heads padded to 64 as
    ``tandem.layout.mpu_tensors`` pads float weights (no change when ``head_dim`` is 64, or for
    c_fc, the MLP's c_proj and the LM head).

    ``c_attn``'s rows go to their padded places; a padding row is all zero (``q = zero = 0``,
    scale +0), so its product is its bias, as with float weights. The attention ``c_proj``'s
    columns go to their padded places, which makes every head one 64-block: the result is in
    groups of 64, block ``h`` with the scale and zero point of the group that holds head ``h``,
    and padding columns hold the zero point (``d = 0``). A head that straddles two groups (head
    width not dividing the group) has no one scale per block: QuantizationError names it.
    """
    if cfg.head_dim == BLOCK or not key.endswith(("attn.c_attn.weight", "attn.c_proj.weight")):
        return m
    idx = head_index(cfg)
    live = idx >= 0
    src = np.maximum(idx, 0)
    if key.endswith("c_attn.weight"):
        e = cfg.n_embd
        rows = np.concatenate([src + part * e for part in range(3)])
        keep = np.tile(live, 3)[:, None]
        return QuantizedMatrix(
            q=np.where(keep, m.q[rows], 0).astype(np.uint8),
            scale=np.where(keep, m.scale[rows], 0).astype(np.uint16),
            zero=np.where(keep, m.zero[rows], 0).astype(np.uint8),
            bits=m.bits,
            group=m.group,
        )
    hd, group = cfg.head_dim, m.group
    first = np.arange(cfg.n_head) * hd
    g = first // group
    straddle = np.flatnonzero(g != (first + hd - 1) // group)
    if straddle.size:
        h = int(straddle[0])
        raise QuantizationError(
            f"{key}: head {h} (columns {h * hd}..{h * hd + hd - 1}) straddles two groups of "
            f"{group}; with heads padded to {BLOCK} lanes each head must lie in one group"
        )
    zero = m.zero[:, g]  # [rows, n_head]: one group per padded block
    pad_zero = np.repeat(zero, BLOCK, axis=1)
    return QuantizedMatrix(
        q=np.where(live[None, :], m.q[:, src], pad_zero).astype(np.uint8),
        scale=np.ascontiguousarray(m.scale[:, g]),
        zero=np.ascontiguousarray(zero),
        bits=m.bits,
        group=BLOCK,
    )


# ----------------------------------------------------------------------------------------------
# the layout of one model on one geometry


STATUS_BYTES = LINE
"""Status record at channel 0, offset 0: u32 status, u32 pc, u32 tokens done, u32 halt code,
u64 cycles (written by the core when it stops; mirrors the status registers). See
:class:`StatusRecord`."""

PROGRAM_BASE = STATUS_BYTES
"""Byte offset of the program in channel 0. Fixed for every model and geometry: at ap_start the
core fetches ``imem_words`` instructions from here into its instruction memory."""

TOKEN_BYTES = 4
"""Prompt and output tokens are little-endian int32, one per slot, slot ``i`` at byte ``4*i``."""


@dataclass(frozen=True)
class StatusRecord:
    """The status record the core writes at channel 0, offset 0, when it stops.

    ``status`` holds :class:`tandem.regmap.Status` bits, ``pc`` the instruction index of the first
    error (or of the final HALT), ``tokens`` the tokens written to the output area in the run,
    ``halt_code`` the HALT code (:class:`tandem.regmap.HaltCode`; the word the first layout left
    reserved) and ``cycles`` the run time in kernel cycles (0 from simulators without time).
    """

    status: int = 0
    pc: int = 0
    tokens: int = 0
    halt_code: int = 0
    cycles: int = 0

    _FORMAT = "<IIIIQ"

    def pack(self) -> bytes:
        raw = struct.pack(
            self._FORMAT, self.status, self.pc, self.tokens, self.halt_code, self.cycles
        )
        return raw + bytes(STATUS_BYTES - len(raw))

    @classmethod
    def unpack(cls, raw: bytes | np.ndarray) -> StatusRecord:
        raw = bytes(raw)[: struct.calcsize(cls._FORMAT)]
        return cls(*struct.unpack(cls._FORMAT, raw))


def pack_tokens(ids) -> bytes:
    """Token ids as the prompt and output areas store them."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < -(1 << 31) or ids.max() >= 1 << 31):
        raise ValueError(f"token ids must fit int32, got range [{ids.min()}, {ids.max()}]")
    return ids.astype("<i4").tobytes()


def unpack_tokens(raw: bytes | np.ndarray) -> list[int]:
    """Inverse of :func:`pack_tokens`."""
    raw = bytes(raw)
    return np.frombuffer(raw[: len(raw) // TOKEN_BYTES * TOKEN_BYTES], "<i4").tolist()


@dataclass
class HBMLayout:
    """Where everything of one model lives on one core geometry.

    Parameters
    ----------
    cfg : GPT2Config
    geom : CoreGeometry
    logits : bool
        Also place a ``logits`` region after the KV cache: ``n_ctx`` rows of ``n_vocab``
        binary16 values (ROWS form), where a program compiled with ``logits=True`` stores the LM
        head's output of every position it processes (``tandem eval``). Every other region is
        where it is without it.
    formats : Mapping[str, tuple[int, int]]
        Quantized MPU matrices by region name (a block's ``attn.c_attn.weight``, ...,
        ``lm_head``): ``(wfmt, wgroup)`` (``tandem.isa.WFmt``, ``tandem.isa.WGROUPS``), placed in
        the quantized tiled form; every other matrix is FP16 (:func:`quant_formats` makes this
        from quantized weights).

    Raises
    ------
    LayoutError
        When the model breaks one of the core's limits; the message names it.
    """

    cfg: GPT2Config
    geom: CoreGeometry
    regions: dict[str, Region] = field(default_factory=dict)
    _cursor: int = 0
    logits: bool = field(default=False, kw_only=True)
    formats: Mapping[str, tuple[int, int]] = field(default_factory=dict, kw_only=True)

    def __post_init__(self):
        cfg, g = self.cfg, self.geom
        self.formats = dict(self.formats)
        p_width = padded_heads(cfg)
        limits = [
            ("n_vocab", cfg.n_vocab, 0xFFFF, "MATVEC rows field (16 bits)"),
            ("n_ctx", cfg.n_ctx, 0xFFFF, "MATVEC rows/cols field (16 bits)"),
            ("4*n_embd", 4 * cfg.n_embd, 0xFFFF, "MATVEC cols field (16 bits)"),
            ("kv stride", cfg.n_head * dense_stride(g), 0xFFF, "MATVEC stride field (12 bits)"),
        ]
        for what, value, limit, why in limits:
            if value > limit:
                raise LayoutError(f"{what} = {value} exceeds {limit}, the {why}")
        self._add("status", Kind.CONTROL, STATUS_BYTES)
        self._add("program", Kind.CONTROL, g.imem_words * WORD_BYTES)
        assert self.regions["program"].base == PROGRAM_BASE
        self._add("prompt", Kind.CONTROL, TOKEN_BYTES * (cfg.n_ctx + 1))
        self._add("output", Kind.CONTROL, TOKEN_BYTES * (cfg.n_ctx + 1))
        e = cfg.n_embd
        self._rows("wte", cfg.n_vocab, e)
        self._rows("wpe", cfg.n_ctx, e)
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            self._vector(p + "ln_1.weight", e)
            self._vector(p + "ln_1.bias", e)
            self._tiled(p + "attn.c_attn.weight", 3 * p_width, e)
            self._vector(p + "attn.c_attn.bias", 3 * p_width)
            self._tiled(p + "attn.c_proj.weight", e, p_width)
            self._vector(p + "attn.c_proj.bias", e)
            self._vector(p + "ln_2.weight", e)
            self._vector(p + "ln_2.bias", e)
            self._tiled(p + "mlp.c_fc.weight", 4 * e, e)
            self._vector(p + "mlp.c_fc.bias", 4 * e)
            self._tiled(p + "mlp.c_proj.weight", e, 4 * e)
            self._vector(p + "mlp.c_proj.bias", e)
        self._vector("ln_f.weight", e)
        self._vector("ln_f.bias", e)
        self._tiled("lm_head", cfg.n_vocab, e)
        self.weights_end = self._cursor
        kv = -(-cfg.n_ctx // BLOCK) * cfg.n_head * dense_stride(g) * g.beat_bytes
        for i in range(cfg.n_layer):
            for part in ("k", "v"):
                rows, cols = (cfg.n_ctx, BLOCK) if part == "k" else (BLOCK, cfg.n_ctx)
                self._add(
                    f"h.{i}.{part}", Kind.TILED, kv, rows, cols, stride=cfg.n_head * dense_stride(g)
                )
        if self.logits:
            self._rows("logits", cfg.n_ctx, cfg.n_vocab)
        unplaced = set(self.formats) - {r.name for r in self.regions.values() if r.wfmt}
        if unplaced:
            raise LayoutError(
                f"no quantizable matrix region {sorted(unplaced)[0]!r} (quantized: a block's "
                f"{', '.join(QUANTIZED_LAYERS)} and lm_head)"
            )
        if self._cursor > g.channel_bytes:
            raise LayoutError(
                f"{cfg.name} on {g.name} needs {self._cursor:,} bytes per channel, more than the "
                f"{g.channel_bytes:,} bytes of one HBM pseudo-channel"
            )
        if self._cursor // LINE >= 1 << 24:
            raise LayoutError("the layout passes 1 GiB per channel, the reach of a 24-bit line")

    def _add(self, name, kind, nbytes, rows=1, cols=1, stride=0, row_bytes=0, wfmt=0, wgroup=0):
        nbytes = _round_up(nbytes, LINE)
        self.regions[name] = Region(
            name, kind, self._cursor, nbytes, rows, cols, stride, row_bytes, wfmt, wgroup
        )
        self._cursor += nbytes

    def _vector(self, name, n):
        self._add(name, Kind.VECTOR, vector_bytes(self.geom, n), 1, n)

    def _rows(self, name, rows, cols):
        rb = vector_bytes(self.geom, cols)
        self._add(name, Kind.ROWS, rows * rb, rows, cols, row_bytes=rb)

    def _tiled(self, name, rows, cols):
        wfmt, wgroup = self.formats.get(name, (WFmt.FP16, 0))
        if wfmt == WFmt.FP16:
            self._add(name, Kind.TILED, tiled_bytes(self.geom, rows, cols), rows, cols)
            return
        if wfmt not in WFMT_BITS or not 0 <= wgroup < len(WGROUPS):
            raise LayoutError(f"{name}: no weight format {wfmt} with group code {wgroup}")
        nbytes = quant_tiled_bytes(self.geom, rows, cols, WFMT_BITS[WFmt(wfmt)], wgroup)
        self._add(name, Kind.TILED, nbytes, rows, cols, wfmt=int(wfmt), wgroup=int(wgroup))

    # queries ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise KeyError(f"no region {name!r} in the layout") from None

    @property
    def channel_bytes(self) -> int:
        """Bytes each channel's buffer needs (the image size per channel)."""
        return self._cursor

    def kv_head(self, layer: int, head: int, part: str) -> Region:
        """Head ``head``'s K ([n_ctx, 64]) or transposed V ([64, n_ctx]) inside a layer's region."""
        r = self[f"h.{layer}.{part}"]
        base = r.base + head * dense_stride(self.geom) * self.geom.beat_bytes
        return Region(f"h.{layer}.{part}{head}", Kind.TILED, base, 0, r.rows, r.cols, r.stride)

    def weight_bytes(self) -> int:
        """Bytes of static tensors over all channels (what one token streams, plus embeddings)."""
        return self.weights_end * self.geom.channels

    def summary(self) -> list[tuple[str, str, int, int]]:
        return [(r.name, r.kind.value, r.base, r.nbytes) for r in self.regions.values()]


class HBMImage:
    """The contents of every pseudo-channel: uint8 [channels, bytes per channel]."""

    def __init__(self, geom: CoreGeometry, nbytes: int):
        self.geom = geom
        self.data = np.zeros((geom.channels, nbytes), np.uint8)

    @property
    def nbytes(self) -> int:
        return self.data.shape[1]

    def write_striped(self, base: int, chunk: np.ndarray) -> None:
        """Write the same-offset bytes of every channel (uint8 [channels, n])."""
        self._check(base, chunk.shape[1])
        self.data[:, base : base + chunk.shape[1]] = chunk

    def read_striped(self, base: int, n: int) -> np.ndarray:
        self._check(base, n)
        return self.data[:, base : base + n]

    def read_channel(self, ch: int, base: int, n: int) -> bytes:
        self._check(base, n)
        return self.data[ch, base : base + n].tobytes()

    def write_channel(self, ch: int, base: int, raw: bytes | np.ndarray) -> None:
        raw = np.frombuffer(bytes(raw), np.uint8) if not isinstance(raw, np.ndarray) else raw
        self._check(base, raw.size)
        self.data[ch, base : base + raw.size] = raw.view(np.uint8).ravel()

    def _check(self, base: int, n: int) -> None:
        if base < 0 or base + n > self.nbytes:
            raise IndexError(
                f"HBM access [{base:#x}, {base + n:#x}) is outside the "
                f"{self.nbytes:#x}-byte channel"
            )


def quant_region(key: str) -> str:
    """The layout's region name of a quantizable weight key (``lm_head.weight`` -> ``lm_head``)."""
    return "lm_head" if key == LM_HEAD else key


def core_tensors(
    cfg: GPT2Config, weights: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray | QuantizedMatrix], dict[str, tuple[int, int]]]:
    """Every parameter as the core stores it, quantized weights included: (tensors by region
    name, ``formats`` for :class:`HBMLayout`). :func:`mpu_tensors` of the float part, with each
    :class:`QuantizedMatrix` head-padded (:func:`quantized_mpu_matrix`) in its region's place.
    LayoutError for a quantized matrix the core cannot map (a head straddling two groups, a
    group the tiles cannot map: :func:`quant_wgroup`)."""
    view, quant = split_quantized(cfg, weights)
    tensors: dict = mpu_tensors(cfg, view)
    formats = {}
    for key, m in quant.items():
        try:
            m = quantized_mpu_matrix(cfg, key, m)
        except QuantizationError as err:
            raise LayoutError(str(err)) from None
        try:
            formats[quant_region(key)] = (wfmt_for(m.bits), quant_wgroup(m.bits, m.group, m.cols))
        except LayoutError as err:
            raise LayoutError(f"{key}: {err}") from None
        tensors[quant_region(key)] = m
    return tensors, formats


def build_image(layout: HBMLayout, tensors: Mapping[str, np.ndarray]) -> HBMImage:
    """Place :func:`mpu_tensors` (or :func:`core_tensors`) output into a fresh image (KV regions
    zero)."""
    img = HBMImage(layout.geom, layout.channel_bytes)
    g = layout.geom
    for name, region in layout.regions.items():
        if region.kind is Kind.CONTROL or name not in tensors:
            continue
        t = tensors[name]
        if region.kind is Kind.TILED and (region.wfmt or isinstance(t, QuantizedMatrix)):
            want = (region.wfmt, region.wgroup)
            got = (
                (wfmt_for(t.bits), quant_wgroup(t.bits, t.group, t.cols))
                if isinstance(t, QuantizedMatrix)
                else (WFmt.FP16, 0)
            )
            if got != want or t.shape != (region.rows, region.cols):
                raise LayoutError(
                    f"{name}: (wfmt, wgroup) {got} of shape {t.shape}, layout expects {want} of "
                    f"{(region.rows, region.cols)}"
                )
            img.write_striped(region.base, pack_quant_tiled(g, t))
        elif region.kind is Kind.TILED:
            if t.shape != (region.rows, region.cols):
                raise LayoutError(
                    f"{name}: shape {t.shape}, layout expects {(region.rows, region.cols)}"
                )
            img.write_striped(region.base, pack_tiled(g, t))
        elif region.kind is Kind.VECTOR:
            if t.shape != (region.cols,):
                raise LayoutError(f"{name}: shape {t.shape}, layout expects ({region.cols},)")
            img.write_striped(region.base, pack_vector(g, t))
        elif region.kind is Kind.ROWS:
            if t.shape != (region.rows, region.cols):
                raise LayoutError(
                    f"{name}: shape {t.shape}, layout expects {(region.rows, region.cols)}"
                )
            img.write_striped(region.base, pack_rows(g, t))
    missing = [
        n
        for n, r in layout.regions.items()
        if r.kind not in (Kind.CONTROL,)
        and not n.endswith((".k", ".v"))
        and n != "logits"
        and n not in tensors
    ]
    if missing:
        raise LayoutError(f"tensors missing for regions: {missing[:5]}")
    return img
