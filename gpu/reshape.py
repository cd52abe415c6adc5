"""One layer's K and V reshaped into the core's HBM KV layout, as tensor ops on the device.

This is ``tandem.layout.pack_kv_prefix`` (the single definition of the KV bytes) written in
torch, so the reshape runs where the prefill left K and V (the GPU) and only the result crosses
PCIe. Only the rows the prompt filled are produced, rounded up to whole 64-position groups
(``kv_prefix_bytes``), never the n_ctx-sized region. tests/test_gpu_reshape.py checks the bytes
against the layout function and the round trip back.
"""

from __future__ import annotations

import torch

from tandem.geometry import CoreGeometry
from tandem.layout import dense_stride, kv_prefix_bytes

BLOCK = 64


def _groups(t_len: int) -> int:
    return -(-t_len // BLOCK)


def reshape_kv(geom: CoreGeometry, k: torch.Tensor, v: torch.Tensor):
    """K, V int16 bits [n_head, T, 64] -> (k_bytes, v_bytes), uint8 [channels,
    kv_prefix_bytes(T)] on the same device: the prefixes of the layer's ``h.<l>.k`` and
    ``h.<l>.v`` regions, equal to ``pack_kv_prefix``'s."""
    n_head, t_len, width = k.shape
    if width != BLOCK or v.shape != k.shape:
        raise ValueError(
            f"K/V must be [n_head, T, {BLOCK}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    g, st, lanes = _groups(t_len), dense_stride(geom), geom.lanes
    be = geom.beat_elems
    jj = BLOCK // be  # beats per 64-wide tile row: channel = lane * jj + (column // be)
    pad = g * BLOCK - t_len
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v
    # One permute and one copy each (no intermediate tile-order tensor): the output is
    # [channel = (lane, jj), g, h, rb, e], i.e. per channel the tiles in region order.
    # K rows are positions: [h, g, rb, lane, jj, e] (row = g*64 + rb*lanes + lane, col = jj*be+e)
    kt = kp.reshape(n_head, g, st, lanes, jj, be).permute(3, 4, 1, 0, 2, 5)
    # V^T rows are dims, columns positions: [h, g, jj, e, rb, lane] (position = g*64 + jj*be + e)
    vt = vp.reshape(n_head, g, jj, be, st, lanes).permute(5, 2, 1, 0, 4, 3)

    def out(t):
        return t.contiguous().view(torch.uint8).reshape(geom.channels, -1)

    return out(kt), out(vt)


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
