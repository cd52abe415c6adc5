"""One layer's K and V reshaped into the core's HBM KV layout, as tensor ops on the device.

This is ``tandem.layout.pack_kv_prefix`` (the single definition of the KV bytes) written in
torch, so the reshape runs where the prefill left K and V (the GPU) and only the result crosses
PCIe. Only the rows the prompt filled are produced, rounded up to whole 64-position groups
(``kv_prefix_bytes``), never the n_ctx-sized region. tests/test_gpu_reshape.py checks the bytes
against the layout function and the round trip back.

How: the region is a sequence of beats (``geom.beat_elems`` binary16 values, 64 bytes on the
u55c), and every beat of K is one contiguous run of a K row. So K is **one gather of whole
beats** (``index_select`` of rows with a cached beat index): each beat is copied as a unit and
the output is written front to back. V is stored transposed (rows are dimensions, columns
positions), so its beats are not runs of V: V takes one transposing copy into 64x64 V^T blocks
(the only element-by-element pass), then the same beat gather. The same ops run on CUDA.
"""

from __future__ import annotations

import functools

import torch

from tandem.geometry import CoreGeometry
from tandem.layout import dense_stride, kv_prefix_bytes

BLOCK = 64


def _groups(t_len: int) -> int:
    return -(-t_len // BLOCK)


@functools.lru_cache(maxsize=64)
def _beat_index(lanes: int, beat: int, n_head: int, rows: int, t_len: int, device: str):
    """For each output beat, in region order ``[channel, group, head, tile row]`` with
    ``channel = lane * (64 // beat) + j``, the beat of a [n_head, rows, 64] source it copies:
    source row ``g*64 + rb*lanes + lane``, columns ``j*beat ..``. Rows at or past ``t_len``
    (padding) point at beat 0 and are listed in the second tensor, to be zeroed."""
    g, st, jj = _groups(t_len), BLOCK // lanes, BLOCK // beat
    lane = torch.arange(lanes).view(lanes, 1, 1, 1, 1)
    j = torch.arange(jj).view(1, jj, 1, 1, 1)
    grp = torch.arange(g).view(1, 1, g, 1, 1)
    h = torch.arange(n_head).view(1, 1, 1, n_head, 1)
    rb = torch.arange(st).view(1, 1, 1, 1, st)
    row = grp * BLOCK + rb * lanes + lane
    shape = (lanes, jj, g, n_head, st)
    src = ((h * rows + row) * jj + j).expand(shape).reshape(-1)
    pad = (row >= t_len).expand(shape).reshape(-1)
    src = torch.where(pad, 0, src)
    return src.to(device), pad.nonzero().reshape(-1).to(device)


def _gather_beats(geom: CoreGeometry, src: torch.Tensor, t_len: int, out: torch.Tensor) -> None:
    """``out`` (int16 [n_beats, beat_elems]) <- the beats of ``src`` [n_head, rows, 64] in
    region order; rows at or past ``t_len`` come out as zeros."""
    n_head, rows, _ = src.shape
    be = geom.beat_elems
    index, pad = _beat_index(geom.lanes, be, n_head, rows, t_len, str(src.device))
    torch.index_select(src.reshape(-1, be), 0, index, out=out)
    if pad.numel():
        out.index_fill_(0, pad, 0)


def reshape_kv(geom: CoreGeometry, k: torch.Tensor, v: torch.Tensor):
    """K, V int16 bits [n_head, T, 64] -> (k_bytes, v_bytes), uint8 [channels,
    kv_prefix_bytes(T)] on the same device: the prefixes of the layer's ``h.<l>.k`` and
    ``h.<l>.v`` regions, equal to ``pack_kv_prefix``'s."""
    n_head, t_len, width = k.shape
    if width != BLOCK or v.shape != k.shape:
        raise ValueError(
            f"K/V must be [n_head, T, {BLOCK}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    g, full = _groups(t_len), t_len // BLOCK
    dev = k.device
    # V^T in 64x64 blocks [h, group, dim, position], zero past T: K's form, rows = dimensions.
    vt = torch.empty((n_head, g, BLOCK, BLOCK), dtype=v.dtype, device=dev)
    if full:
        vt[:, :full].copy_(v[:, : full * BLOCK].reshape(n_head, full, BLOCK, BLOCK).transpose(2, 3))
    if full < g:
        rem = t_len - full * BLOCK
        vt[:, full, :, :rem].copy_(v[:, full * BLOCK :].transpose(1, 2))
        vt[:, full, :, rem:].zero_()
    n = geom.channels * kv_prefix_bytes(geom, n_head, t_len) // geom.beat_bytes
    out = torch.empty((2, n, geom.beat_elems), dtype=k.dtype, device=dev)
    _gather_beats(geom, k.contiguous(), t_len, out[0])
    _gather_beats(geom, vt.view(n_head, g * BLOCK, BLOCK), g * BLOCK, out[1])
    out = out.view(torch.uint8).reshape(2, geom.channels, -1)
    return out[0], out[1]


def unreshape_kv(
    geom: CoreGeometry, k_bytes: torch.Tensor, v_bytes: torch.Tensor, n_head: int, t_len: int
):
    """Inverse of :func:`reshape_kv`: region-prefix bytes -> K, V int16 [n_head, T, 64]."""
    n = kv_prefix_bytes(geom, n_head, t_len)
    g, st, lanes = _groups(t_len), dense_stride(geom), geom.lanes

    def tiles(b):
        if b.shape[0] != geom.channels or b.shape[1] < n:
            raise ValueError(f"need uint8 [{geom.channels}, >= {n}], got {tuple(b.shape)}")
        t = b[:, :n].contiguous().view(torch.int16).reshape(geom.channels, -1, geom.beat_elems)
        return t.transpose(0, 1).contiguous()

    k = tiles(k_bytes).reshape(g, n_head, st, lanes, BLOCK).permute(1, 0, 2, 3, 4)
    v = tiles(v_bytes).reshape(g, n_head, st, lanes, BLOCK).permute(1, 0, 4, 2, 3)
    k = k.reshape(n_head, g * BLOCK, BLOCK)[:, :t_len]
    v = v.reshape(n_head, g * BLOCK, BLOCK)[:, :t_len]
    return k.contiguous(), v.contiguous()
