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
from dataclasses import dataclass, field

import numpy as np

from .config import GPT2Config
from .geometry import CoreGeometry
from .isa import LINE, WORD_BYTES
from .numerics import BLOCK, to_bits


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


def _head_index(cfg: GPT2Config) -> np.ndarray:
    """For each padded slot (h*64 + j), the source index h*hd + j, or -1 for padding."""
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
    idx = _head_index(cfg)
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

    def __post_init__(self):
        cfg, g = self.cfg, self.geom
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
        if self._cursor > g.channel_bytes:
            raise LayoutError(
                f"{cfg.name} on {g.name} needs {self._cursor:,} bytes per channel, more than the "
                f"{g.channel_bytes:,} bytes of one HBM pseudo-channel"
            )
        if self._cursor // LINE >= 1 << 24:
            raise LayoutError("the layout passes 1 GiB per channel, the reach of a 24-bit line")

    def _add(self, name, kind, nbytes, rows=1, cols=1, stride=0, row_bytes=0):
        nbytes = _round_up(nbytes, LINE)
        self.regions[name] = Region(name, kind, self._cursor, nbytes, rows, cols, stride, row_bytes)
        self._cursor += nbytes

    def _vector(self, name, n):
        self._add(name, Kind.VECTOR, vector_bytes(self.geom, n), 1, n)

    def _rows(self, name, rows, cols):
        rb = vector_bytes(self.geom, cols)
        self._add(name, Kind.ROWS, rows * rb, rows, cols, row_bytes=rb)

    def _tiled(self, name, rows, cols):
        self._add(name, Kind.TILED, tiled_bytes(self.geom, rows, cols), rows, cols)

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


def build_image(layout: HBMLayout, tensors: dict[str, np.ndarray]) -> HBMImage:
    """Place :func:`mpu_tensors` output into a fresh image (KV regions zero)."""
    img = HBMImage(layout.geom, layout.channel_bytes)
    g = layout.geom
    for name, region in layout.regions.items():
        if region.kind is Kind.CONTROL or name not in tensors:
            continue
        t = tensors[name]
        if region.kind is Kind.TILED:
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
