"""One layer's K and V reshaped into the core's HBM KV layout, as tensor ops on the device.

This is ``tandem.layout.pack_kv_prefix`` (the single definition of the KV bytes) written in
torch, so the reshape runs where the prefill left K and V (the GPU) and only the result crosses
PCIe. Only the rows the prompt filled are produced, rounded up to whole 64-position groups
(``kv_prefix_bytes``), never the n_ctx-sized region. tests/test_gpu_reshape.py checks the bytes
against the layout function and the round trip back.

Inputs are the prefill's orientation (:mod:`tandem.gpu.prefill`): K [n_head, T, 64] (row =
position) and V **transposed**, V^T [n_head, 64, T] (row = head dimension, column = position),
which is how the layout stores V. Both regions are then the same kind of thing: per 64-position
group ``g`` and head ``h`` a 64x64 tile, ``K[h, g*64 + r, c]`` or ``V^T[h, r, g*64 + c]``,
whose row ``r = tile_row * lanes + lane``, columns ``j*beat .. (j+1)*beat``, is the beat of
channel ``lane * (64 // beat) + j`` at stripe ``(g, h, tile_row)``.

How: every output beat (``geom.beat_elems`` values, 64 bytes on the u55c) is one contiguous run
of the source, for K and V^T alike (nothing is transposed), but no two consecutive beats of the
output are consecutive in the source (on the u55c a channel's next beat is 16 rows further
down), so 64 bytes is the longest run on both sides. When K and V^T are contiguous in one
storage, as the prefill allocates them, both regions are **one gather of whole beats**: a
single ``index_select`` over that storage with a cached index, writing the output front to
back. In a partly filled last group (T not a multiple of 64) the gather reads the V^T beats
that straddle T from their own start (past T they hold the next row's values) and K's rows past
T from anywhere, and one ``bitwise_and_`` with a cached 0/-1 mask over that group's slice of
the output (both regions) keeps only the values before T; when V^T ends the storage, the
straddling runs of its last rows would run past the end and are copied in after. Otherwise (any
strides, separate buffers) K is the same gather on its own, from a view whose rows start at
every element (strides 1, 1; no copy), and V^T is strided copies of views in the region's order
(its head and tile-row strides merge, so the inner loops are long). The same ops run on CUDA.
Measured throughput: docs/performance.md.
"""

from __future__ import annotations

import functools

import torch

from tandem.geometry import CoreGeometry
from tandem.layout import dense_stride, kv_prefix_bytes
from tandem.numerics import BLOCK


def _groups(t_len: int) -> int:
    return -(-t_len // BLOCK)


def _starts(lanes, beat, n_head, t_len, s_head, s_pos, s_row, v_region):
    """Element offset of the first value of every beat of one region, in region order
    ``[lane, j, group, head, tile row]`` (channel ``lane * (64 // beat) + j``, then stripes),
    int64 on the CPU. K (``not v_region``): tile ``g``'s row ``r`` is position ``g*64 + r``, at
    ``h * s_head + (g*64 + r) * s_pos``. V^T: row ``r`` is dimension ``r``, column ``c``
    position ``g*64 + c``, at ``h * s_head + r * s_row + (g*64 + c) * s_pos``.

    Beats not wholly before ``t_len`` point at offset 0: the caller writes them
    (:func:`_straddle`, :func:`_tail`)."""
    jj, st, g_n = BLOCK // beat, BLOCK // lanes, _groups(t_len)
    lane = torch.arange(lanes).view(lanes, 1, 1, 1, 1)
    j = torch.arange(jj).view(1, jj, 1, 1, 1) * beat
    g = torch.arange(g_n).view(1, 1, g_n, 1, 1) * BLOCK
    h = torch.arange(n_head).view(1, 1, 1, n_head, 1) * s_head
    r = torch.arange(st).view(1, 1, 1, 1, st) * lanes + lane
    if v_region:
        start, live = h + r * s_row + (g + j) * s_pos, g + j + beat <= t_len
    else:
        start, live = h + (g + r) * s_pos + j, g + r < t_len
    return torch.where(live, start, 0).expand(lanes, jj, g_n, n_head, st).reshape(-1)


@functools.lru_cache(maxsize=32)
def _joint_plan(lanes, beat, n_head, t_len, k_at, v_at, room, device):
    """The one gather serving both regions, for contiguous K at element ``k_at`` and V^T at
    ``v_at`` of one storage with ``room`` elements after the later of them: (index, rows,
    aligned, mask, spill).

    ``index``: the K region's then the V region's beat starts, in units of ``beat`` values
    when ``aligned`` (every start a whole beat), else of elements; ``rows``: the rows the
    source view needs. In a partly filled last group (else ``mask`` is None), K's beats at
    or past T and V's wholly past T point at offset 0 and V's beats that straddle T at their
    own start (their values past T are the next row's or region's), and :func:`_joint_tail`
    keeps only the values before T with ``mask`` (int16, -1 or 0, [2 * lanes * 64 // beat,
    n_head * 64 * 64 // lanes]: that group's slice of each channel's beats). A straddling run
    that would end past the storage points at 0 too; then ``spill``: the tail copies in the
    values before T of the last head's straddling beats (only there can a run end past it)."""
    jj, st, g_n = BLOCK // beat, BLOCK // lanes, _groups(t_len)
    full, rem = divmod(t_len, BLOCK)
    sk = _starts(lanes, beat, n_head, t_len, t_len * BLOCK, BLOCK, 0, False) + k_at
    sv = _starts(lanes, beat, n_head, t_len, t_len * BLOCK, 1, t_len, True) + v_at
    mask, spill = None, False
    if rem:
        shape = (lanes, jj, g_n, n_head, st)
        lane = torch.arange(lanes).view(lanes, 1, 1, 1, 1)
        j = torch.arange(jj).view(1, jj, 1, 1, 1)
        g = torch.arange(g_n).view(1, 1, g_n, 1, 1)
        h = torch.arange(n_head).view(1, 1, 1, n_head, 1)
        r = torch.arange(st).view(1, 1, 1, 1, st) * lanes + lane
        js, w = divmod(rem, beat)
        if w:  # V's beats that straddle T: at their own start where the run fits
            cross = ((g == full) & (j == js)).expand(shape).reshape(-1)
            start = (h * t_len * BLOCK + r * t_len + g * BLOCK + j * beat).expand(shape)
            start = start.reshape(-1) + v_at
            fits = start + beat <= max(k_at, v_at) + n_head * BLOCK * t_len + room
            spill = bool((cross & ~fits).any())
            sv = torch.where(cross & fits, start, sv)
        e = torch.arange(beat).view(1, 1, 1, 1, beat)  # [lane, j, head, tile row, e]
        k_live = (r < rem).view(lanes, 1, 1, st, 1)
        v_live = j * beat + e < rem
        live = torch.stack([x.expand(lanes, jj, n_head, st, beat) for x in (k_live, v_live)])
        mask = torch.where(live, -1, 0).to(torch.int16).reshape(2 * lanes * jj, -1).to(device)
    index = torch.cat([sk, sv])
    aligned = not (t_len % beat or k_at % beat or v_at % beat)
    if aligned:
        index = index.div(beat, rounding_mode="floor")
    return index.to(device), int(index.max()) + 1, aligned, mask, spill


def _joint_tail(geom, out, vt, mask, spill):
    """The joint gather's partly filled last group (``out`` both regions, contiguous): keep
    the values before T (``mask``, one op over that group of both regions) and, when
    ``spill``, copy in the values before T of the last head's beats that straddle T."""
    n_head, _, t_len = vt.shape
    be, lanes = geom.beat_elems, geom.lanes
    n, x = mask.shape  # [region, lane, j], [head, tile row, e]
    g_n = _groups(t_len)
    out.as_strided(mask.shape, (g_n * x, 1), (g_n - 1) * x).bitwise_and_(mask)
    if spill:
        js, w = divmod(t_len % BLOCK, be)
        st = BLOCK // lanes
        at = vt.storage_offset() + (n_head - 1) * BLOCK * t_len + t_len - w
        part = vt.as_strided((lanes, st, w), (t_len, lanes * t_len, 1), at)
        at = ((n // 2 + js) * g_n + g_n - 1) * x + (n_head - 1) * st * be  # V, j = js
        out.as_strided((lanes, st, w), (BLOCK // be * g_n * x, be, 1), at).copy_(part)


def _joint(k: torch.Tensor, vt: torch.Tensor):
    """(first element, K's and V^T's offsets from it) when one gather can serve both regions:
    K and V^T contiguous in one storage; else None."""
    if not (k.is_contiguous() and vt.is_contiguous()):
        return None
    if k.untyped_storage().data_ptr() != vt.untyped_storage().data_ptr():
        return None
    ko, vo = k.storage_offset(), vt.storage_offset()
    base = min(ko, vo)
    return base, ko - base, vo - base


def _tail(geom: CoreGeometry, out: torch.Tensor, n_head: int, t_len: int, v_region: bool):
    """Zero a region's values (``out`` int16 [n_beats, beat]) of positions at or past T in a
    partly filled last group: K's tile rows ``rb * lanes + lane``, V^T's columns
    ``j * beat + e`` from T % 64 on (sliced ``zero_``; a broadcast mask is much slower)."""
    full, rem = divmod(t_len, BLOCK)
    if not rem:
        return
    be, lanes = geom.beat_elems, geom.lanes
    jj, st = BLOCK // be, BLOCK // lanes
    last = out.view(lanes, jj, full + 1, n_head, st, be)[:, :, full]  # [l, j, h, rb, e]
    if v_region:
        js, w = divmod(rem, be)
        if w:
            last[:, js, :, :, w:].zero_()
            js += 1
        if js < jj:
            last[:, js:].zero_()
    else:
        rb0, l0 = divmod(rem, lanes)
        if rb0 + 1 < st:
            last[:, :, :, rb0 + 1 :].zero_()
        last[l0:, :, :, rb0].zero_()


def _straddle(geom: CoreGeometry, out: torch.Tensor, vt: torch.Tensor) -> None:
    """Copy the values before T of the V beats that straddle T (when T % beat > 0) into the V
    region ``out`` (int16 [n_beats, beat]); their values past T are :func:`_tail`'s."""
    n_head, _, t_len = vt.shape
    full, rem = divmod(t_len, BLOCK)
    be, lanes = geom.beat_elems, geom.lanes
    js, w = divmod(rem, be)
    if w:
        last = out.view(lanes, BLOCK // be, full + 1, n_head, BLOCK // lanes, be)[:, js, full]
        p = full * BLOCK + js * be
        part = vt[:, :, p:t_len].unflatten(1, (-1, lanes)).permute(2, 0, 1, 3)  # [l, h, rb, w]
        last[..., :w].copy_(part)


@functools.lru_cache(maxsize=64)
def _k_index(lanes, beat, n_head, t_len, s_head, s_pos, device):
    """K's beat offsets on ``device`` and the rows its overlapping beat view needs."""
    s = _starts(lanes, beat, n_head, t_len, s_head, s_pos, 0, False)
    return s.to(device), int(s.max()) + 1


def k_region(geom: CoreGeometry, k: torch.Tensor, out: torch.Tensor) -> None:
    """K [H, T, 64] (any strides) -> ``out`` int16 [n_beats, beat] in region order: one
    gather of whole beats from a view of K whose rows start at every element (strides 1, 1;
    no copy), then zeros past T."""
    if k.stride(2) != 1:
        k = k.contiguous()
    be, lanes = geom.beat_elems, geom.lanes
    n_head, t_len, _ = k.shape
    starts, rows = _k_index(lanes, be, n_head, t_len, k.stride(0), k.stride(1), k.device)
    torch.index_select(k.as_strided((rows, be), (1, 1)), 0, starts, out=out)
    _tail(geom, out, n_head, t_len, False)


def v_region(geom: CoreGeometry, vt: torch.Tensor, out: torch.Tensor) -> None:
    """V^T [H, 64, T] (any strides) -> ``out`` int16 [n_beats, beat] in region order by
    strided copies (no index): V^T seen as ``[lane, j, group, head, tile row, beat]``, the
    region's own order; its head and tile-row strides merge (64 rows = 4 tile rows x 16
    lanes), so the copy's inner loops are long. Positions at or past T are zero."""
    if vt.stride(2) != 1:
        vt = vt.contiguous()
    be, lanes = geom.beat_elems, geom.lanes
    jj, st = BLOCK // be, BLOCK // lanes
    n_head, _, t_len = vt.shape
    s_head, s_row = vt.stride(0), vt.stride(1)
    full, rem = divmod(t_len, BLOCK)
    dst = out.view(lanes, jj, full + (rem > 0), n_head, st, be)

    def src(g_n, j_n, at):  # V^T positions at + g*64 + j*beat + e, as dst's dims
        size = (lanes, j_n, g_n, n_head, st, be)
        return vt.as_strided(size, (s_row, be, BLOCK, s_head, lanes * s_row, 1), at)

    at = vt.storage_offset()
    if full:
        dst[:, :, :full].copy_(src(full, jj, at))
    js = rem // be  # whole beats of a partly filled last group
    if js:
        dst[:, :js, full].copy_(src(1, js, at + full * BLOCK)[:, :, 0])
    if rem:
        _straddle(geom, out, vt)
        _tail(geom, out, n_head, t_len, True)


def reshape_kv(geom: CoreGeometry, k: torch.Tensor, vt: torch.Tensor):
    """K [n_head, T, 64] and V transposed, V^T [n_head, 64, T] (int16 bits, the prefill's
    orientation; any strides) -> (k_bytes, v_bytes), uint8 [channels, kv_prefix_bytes(T)] on
    the same device: the prefixes of the layer's ``h.<l>.k`` and ``h.<l>.v`` regions, equal to
    ``pack_kv_prefix(geom, k, vt.transpose(1, 2))``."""
    n_head, t_len, width = k.shape
    if width != BLOCK or vt.shape != (n_head, BLOCK, t_len) or vt.dtype != k.dtype or not t_len:
        raise ValueError(
            f"need K [n_head, T, {BLOCK}] and V^T [n_head, {BLOCK}, T], T >= 1, of one dtype, got "
            f"{tuple(k.shape)} and {tuple(vt.shape)}"
        )
    be, ch = geom.beat_elems, geom.channels
    joint = _joint(k, vt)
    if joint is not None:  # one gather for both regions
        base, k_at, v_at = joint
        room = 0
        if t_len % be:  # elements after the later region, for the runs that straddle T
            room = k.untyped_storage().nbytes() // k.element_size() - base
            room = min(be, room - max(k_at, v_at) - n_head * BLOCK * t_len)
        index, rows, aligned, mask, spill = _joint_plan(
            geom.lanes, be, n_head, t_len, k_at, v_at, room, k.device
        )
        if aligned:  # a contiguous view of whole beats
            src = k.as_strided((1, rows, be), (rows * be, be, 1), base)
            out = torch.index_select(src, 1, index)  # [1, 2 * beats, beat]
        else:  # rows start at every element
            out = torch.index_select(k.as_strided((rows, be), (1, 1), base), 0, index)
        if mask is not None:
            _joint_tail(geom, out, vt, mask, spill)
    else:
        n = ch * _groups(t_len) * n_head * dense_stride(geom)
        out = torch.empty((2, n, be), dtype=k.dtype, device=k.device)
        k_region(geom, k, out[0])
        v_region(geom, vt, out[1])
    return out.view(torch.uint8).view(2, ch, -1).unbind(0)


def unreshape_kv(
    geom: CoreGeometry, k_bytes: torch.Tensor, v_bytes: torch.Tensor, n_head: int, t_len: int
):
    """Inverse of :func:`reshape_kv`: region-prefix bytes -> K [n_head, T, 64] and V^T
    [n_head, 64, T] (int16 bits, contiguous)."""
    n = kv_prefix_bytes(geom, n_head, t_len)
    g, st, lanes = _groups(t_len), dense_stride(geom), geom.lanes

    def tiles(b):
        if b.shape[0] != geom.channels or b.shape[1] < n:
            raise ValueError(f"need uint8 [{geom.channels}, >= {n}], got {tuple(b.shape)}")
        t = b[:, :n].contiguous().view(torch.int16).reshape(geom.channels, -1, geom.beat_elems)
        # [stripe (g, h, tile row), lane, 64 columns]
        return t.transpose(0, 1).reshape(g, n_head, st, lanes, BLOCK)

    k = tiles(k_bytes).permute(1, 0, 2, 3, 4).reshape(n_head, g * BLOCK, BLOCK)
    vt = tiles(v_bytes).permute(1, 2, 3, 0, 4).reshape(n_head, BLOCK, g * BLOCK)
    return k[:, :t_len].contiguous(), vt[:, :, :t_len].contiguous()
