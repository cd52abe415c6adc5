"""Hardware-faithful GPT-2: the decode core's exact arithmetic in its exact operation order.

Tier two of the golden models. Every tensor is a binary16 bit pattern (``np.uint16``) and every
arithmetic step is a ``tandem.numerics`` primitive, so the ISA simulator and the RTL must equal
this model bit for bit. The sequence of steps is normative: the compiler emits exactly these
operations as instructions. docs/numerics.md states the sequence in prose.

Weights are what HBM stores (``tandem.layout.mpu_tensors``): every weight rounded to binary16,
MPU matrices as [out rows, in cols], attention heads padded to ``BLOCK`` (64) lanes so that one
head is one block-floating-point block. With ``P = n_head * 64``, ``c_attn`` is [3P, n_embd]
and the attention ``c_proj`` [n_embd, P], with zero rows / columns in the padding.

Positions: :meth:`FaithfulModel.step` at position ``pos`` writes K row ``pos`` and V^T column
``pos`` of every head and attends over the ``T = pos + 1`` live positions.

Quantized weights (issue 17): any of a block's four MPU matrices, and the LM head, may be a
:class:`tandem.qweights.QuantizedMatrix` (the Weights-dict convention there); its products then
follow the quantized contract (``tandem.numerics.matvec_quant``). Head padding applies to them as
to float weights (``tandem.layout.quantized_mpu_matrix``; it and ``split_quantized`` are
importable from here too).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tandem import numerics as nm
from tandem.config import GPT2Config
from tandem.layout import (  # the quantized keys and head padding live with the layout
    mpu_tensors,
    padded_heads,
    quantized_mpu_matrix,
    split_quantized,
)
from tandem.qweights import LM_HEAD
from tandem.sampling import Sampling, choose

BLOCK = nm.BLOCK

Weights = Mapping[str, np.ndarray]
Matrix = nm.PreparedMatrix | nm.PreparedQuantMatrix


@dataclass(frozen=True)
class FaithfulLayer:
    """One block's weights: binary16 vectors and prepared MPU matrices."""

    ln_1_g: np.ndarray  # [n_embd]
    ln_1_b: np.ndarray
    c_attn: Matrix  # [3P, n_embd]
    c_attn_b: np.ndarray  # [3P]
    attn_proj: Matrix  # [n_embd, P]
    attn_proj_b: np.ndarray  # [n_embd]
    ln_2_g: np.ndarray
    ln_2_b: np.ndarray
    c_fc: Matrix  # [4 n_embd, n_embd]
    c_fc_b: np.ndarray  # [4 n_embd]
    mlp_proj: Matrix  # [n_embd, 4 n_embd]
    mlp_proj_b: np.ndarray  # [n_embd]


@dataclass(frozen=True)
class FaithfulWeights:
    """All weights rounded to binary16, with every static matrix prepared once."""

    cfg: GPT2Config
    wte: np.ndarray  # [n_vocab, n_embd] binary16
    wpe: np.ndarray  # [n_ctx, n_embd]
    layers: tuple[FaithfulLayer, ...]
    ln_f_g: np.ndarray
    ln_f_b: np.ndarray
    lm_head: Matrix  # wte (or a quantized LM head): [n_vocab, n_embd]

    @classmethod
    def from_float(cls, cfg: GPT2Config, weights: Weights) -> FaithfulWeights:
        """Round float weights (checkpoint keys, Conv1D [in, out]) and prepare the matrices.

        The binary16 tensors are ``tandem.layout.mpu_tensors``: what HBM stores, transposed
        to [out, in] and head-padded there (the single definition of that layout). A
        :class:`QuantizedMatrix` entry (module docstring) is prepared for the quantized
        contract instead, head-padded by :func:`quantized_mpu_matrix`.
        """
        view, quant = split_quantized(cfg, weights)
        t = mpu_tensors(cfg, view)

        def mat(key: str) -> Matrix:
            if key in quant:
                return nm.PreparedQuantMatrix(quantized_mpu_matrix(cfg, key, quant[key]))
            return nm.PreparedMatrix(t[key])

        layers = []
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            layers.append(
                FaithfulLayer(
                    ln_1_g=t[p + "ln_1.weight"],
                    ln_1_b=t[p + "ln_1.bias"],
                    c_attn=mat(p + "attn.c_attn.weight"),
                    c_attn_b=t[p + "attn.c_attn.bias"],
                    attn_proj=mat(p + "attn.c_proj.weight"),
                    attn_proj_b=t[p + "attn.c_proj.bias"],
                    ln_2_g=t[p + "ln_2.weight"],
                    ln_2_b=t[p + "ln_2.bias"],
                    c_fc=mat(p + "mlp.c_fc.weight"),
                    c_fc_b=t[p + "mlp.c_fc.bias"],
                    mlp_proj=mat(p + "mlp.c_proj.weight"),
                    mlp_proj_b=t[p + "mlp.c_proj.bias"],
                )
            )
        return cls(
            cfg=cfg,
            wte=t["wte"],
            wpe=t["wpe"],
            layers=tuple(layers),
            ln_f_g=t["ln_f.weight"],
            ln_f_b=t["ln_f.bias"],
            lm_head=mat(LM_HEAD) if LM_HEAD in quant else nm.PreparedMatrix(t["lm_head"]),
        )


# --------------------------------------------------------------------------------------------
# KV cache


class FaithfulCache:
    """The core's KV cache: binary16 bits plus their block-floating-point alignment.

    ``k[l, h]`` is head ``h``'s K of layer ``l``, [n_ctx, 64] (row = position); ``vt[l, h]`` is
    its V transposed, [64, n_ctx] (column = position). Padded lanes (``j >= head_dim``) are zero.
    Only positions ``< n_tokens`` are meaningful. Write through :meth:`write` (or build with
    :meth:`from_heads`) so that the alignment the attention matvecs read stays in step.
    """

    def __init__(self, cfg: GPT2Config):
        L, H, C = cfg.n_layer, cfg.n_head, cfg.n_ctx
        self.cfg = cfg
        self.n_tokens = 0
        self.k = np.zeros((L, H, C, BLOCK), np.uint16)
        self.vt = np.zeros((L, H, BLOCK, C), np.uint16)
        nb = -(-C // BLOCK)
        # Aligned K: one block per row. [L, H, 1, C, 64] so a slice is a PreparedMatrix.q.
        self._kq = np.zeros((L, H, 1, C, BLOCK), np.float32)
        self._ke = np.ones((L, H, 1, C), np.int64)
        self._knf = np.zeros((L, H, C), bool)
        # Aligned V^T: [L, H, n_blocks, 64 rows, 64].
        self._vq = np.zeros((L, H, nb, BLOCK, BLOCK), np.float32)
        self._ve = np.ones((L, H, nb, BLOCK), np.int64)
        self._vnf = np.zeros((L, H, nb, BLOCK), bool)

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store position ``pos`` of every head of ``layer``: ``k``, ``v`` are [n_head, 64].

        K rows are one block each, so a new row is aligned on its own. V^T gains a column in
        block ``pos // 64``: appending to a block realigns only the rows whose block exponent
        grows and aligns the new element of the others; a block's first column or a rewind
        (``pos < n_tokens``) aligns the block's live columns afresh. Either way the result is
        ``bfp_blocks`` of the live columns, which the tests check.
        """
        self.k[layer, :, pos] = k
        self.vt[layer, :, :, pos] = v
        q, e, nf = nm.bfp_blocks(k)  # [H, 64], [H, 1], [H, 1]
        self._kq[layer, :, 0, pos] = q
        self._ke[layer, :, 0, pos] = e[:, 0]
        self._knf[layer, :, pos] = nf[:, 0]
        b, c = divmod(pos, BLOCK)
        vq, ve, vnf = self._vq[layer, :, b], self._ve[layer, :, b], self._vnf[layer, :, b]
        if c == 0 or pos != self.n_tokens:
            live = nm.pad_to_block(self.vt[layer, :, :, b * BLOCK : pos + 1])  # [H, 64, 64]
            q, e, nf = nm.bfp_blocks(live)
            vq[...], ve[...], vnf[...] = q, e[..., 0], nf[..., 0]
            return
        neg, sig, exp = nm.decode(v)  # [H, 64]: element c of every row's block
        grow = exp > ve
        if grow.any():
            hs, rs = np.nonzero(grow)
            rows = nm.pad_to_block(self.vt[layer, hs, rs, b * BLOCK : pos + 1])  # [n, 64]
            q, e, nf = nm.bfp_blocks(rows)
            vq[hs, rs], ve[hs, rs], vnf[hs, rs] = q, e[:, 0], nf[:, 0]
        mag = sig >> np.clip(ve - exp, 0, 63)  # as bfp_blocks aligns; grow rows are done
        vq[:, :, c] = np.where(grow, vq[:, :, c], np.where(neg, -mag, mag))
        vnf |= exp == 31

    def key_blocks(self, layer: int, T: int):
        """Every head's ``k[layer, h, :T]`` aligned as a matrix [T, 64], each row one block:
        (q float32 [H, 1, T, 64], block_exp [H, 1, T], nonfinite rows [H, T])."""
        return self._kq[layer, :, :, :T], self._ke[layer, :, :, :T], self._knf[layer, :, :T]

    def value_blocks(self, layer: int, T: int):
        """Every head's ``vt[layer, h, :, :T]`` aligned as a matrix [64, T] in blocks of 64
        columns: (q float32 [H, nb, 64, 64], block_exp [H, nb, 64], nonfinite rows [H, 64])."""
        nb = -(-T // BLOCK)
        return (
            self._vq[layer, :, :nb],
            self._ve[layer, :, :nb],
            self._vnf[layer, :, :nb].any(axis=1),
        )

    def heads(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s live K and V in the float reference's layout, as binary16 bits:
        ([n_tokens, n_embd], [n_tokens, n_embd]) with heads side by side and padding dropped."""
        T, hd = self.n_tokens, self.cfg.head_dim
        k = self.k[layer, :, :T, :hd].transpose(1, 0, 2).reshape(T, -1)
        v = self.vt[layer, :, :hd, :T].transpose(2, 0, 1).reshape(T, -1)
        return k, v

    @classmethod
    def from_heads(
        cls, cfg: GPT2Config, k: Sequence[np.ndarray], v: Sequence[np.ndarray]
    ) -> FaithfulCache:
        """A cache from per-layer binary16 K and V in the reference layout, [T, n_embd] each
        (e.g. a GPU prefill rounded with ``to_bits``): the inverse of :meth:`heads`."""
        cache = cls(cfg)
        hd, H = cfg.head_dim, cfg.n_head
        if len(k) != cfg.n_layer or len(v) != cfg.n_layer:
            raise ValueError(f"need K and V for {cfg.n_layer} layers, got {len(k)} and {len(v)}")
        T = np.asarray(k[0]).shape[0]
        if not 0 < T <= cfg.n_ctx:
            raise ValueError(f"{T} positions: need 1 to n_ctx = {cfg.n_ctx}")
        kp = np.zeros((cfg.n_layer, T, H, BLOCK), np.uint16)
        vp = np.zeros((cfg.n_layer, T, H, BLOCK), np.uint16)
        for layer in range(cfg.n_layer):
            for name, a, dst in (("K", k[layer], kp), ("V", v[layer], vp)):
                a = np.asarray(a)
                if a.dtype != np.uint16:
                    raise ValueError(
                        f"layer {layer} {name} has dtype {a.dtype}: pass binary16 bit patterns "
                        "(tandem.numerics.to_bits)"
                    )
                if a.shape != (T, cfg.n_embd):
                    raise ValueError(
                        f"layer {layer} {name} has shape {a.shape}, expected {(T, cfg.n_embd)}"
                    )
                dst[layer, :, :, :hd] = a.reshape(T, H, hd)
        for pos in range(T):
            for layer in range(cfg.n_layer):
                cache.write(layer, pos, kp[layer, pos], vp[layer, pos])
            cache.n_tokens = pos + 1
        return cache


# --------------------------------------------------------------------------------------------
# the decode step


def _matvec_heads(wq, we, wnf, x_bits):
    """:func:`tandem.numerics.matvec` for ``H`` independent matrices and vectors at once.

    ``wq``, ``we``, ``wnf`` are the matrices aligned as in ``PreparedMatrix`` (q float32
    [H, nb, rows, 64], block_exp [H, nb, rows], non-finite rows [H, rows]); ``x_bits`` is
    [H, cols]. Returns (acc int64 [H, rows], lam [H], nonfinite [H, rows]), the same numbers as
    ``matvec`` per head; the input split into 32 * hi + lo keeps float32 BLAS exact, as there.
    """
    H, nb = wq.shape[:2]
    xq, xe, xnf = nm.bfp_blocks(nm.pad_to_block(x_bits))  # [H, nb*64], [H, nb], [H, nb]
    mag, sgn = np.abs(xq), np.sign(xq)
    xs = np.stack([sgn * (mag >> 5), sgn * (mag & 31)], axis=-1)
    xs = xs.astype(np.float32).reshape(H, nb, BLOCK, 2)
    sums = np.matmul(wq, xs)  # [H, nb, rows, 2]: block sums, exact
    s = 32 * sums[..., 0].astype(np.int64) + sums[..., 1].astype(np.int64)
    xe_max = xe.max(axis=1)  # [H]
    shift = nm.block_shift(we, xe[:, :, None], xe_max[:, None, None])
    acc = nm.shift_floor(s, shift).sum(axis=1)  # [H, rows]
    return acc, nm.acc_lsb_exponent(xe_max), wnf | xnf.any(axis=1)[:, None]


def _max_rows(bits: np.ndarray) -> np.ndarray:
    """:func:`tandem.numerics.fp16_max` of every row of a [H, T] array: [H]."""
    nan = (((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0)).any(axis=1)
    top = np.take_along_axis(bits, np.argmax(nm.order_key(bits), axis=1)[:, None], axis=1)
    return np.where(nan, np.uint16(nm.CANONICAL_NAN), top[:, 0]).astype(np.uint16)


def _round(acc, lam, nonfinite) -> np.ndarray:
    """Per-head accumulators to binary16, NaN where an operand was non-finite (``matvec_fp16``)."""
    out = nm.acc_to_fp16(acc, lam[:, None])
    return np.where(nonfinite, np.uint16(nm.CANONICAL_NAN), out).astype(np.uint16)


@dataclass(frozen=True)
class StepResult:
    """What one decode step produces.

    ``token`` is ``argmax(acc)`` (lowest index on ties) over the LM head's raw accumulators; the
    exact logits are ``acc * 2**lam``; ``nonfinite`` flags rows that saw an Inf or NaN operand;
    ``hidden16`` is the final LayerNorm's output, the vector the LM head reads, and
    ``residual16`` the residual stream after the last block, its input (both [n_embd]).
    """

    token: int
    acc: np.ndarray  # int64 [n_vocab]
    lam: int
    nonfinite: np.ndarray  # bool [n_vocab]
    hidden16: np.ndarray  # uint16 [n_embd]
    residual16: np.ndarray  # uint16 [n_embd]

    @functools.cached_property
    def logits16(self) -> np.ndarray:
        """The logits rounded to binary16 as ``matvec_fp16`` would (NaN where non-finite);
        computed on first use, since the decode loop itself needs only the argmax."""
        out = nm.acc_to_fp16(self.acc, self.lam)
        return np.where(self.nonfinite, np.uint16(nm.CANONICAL_NAN), out).astype(np.uint16)

    def logits(self) -> np.ndarray:
        """The logits as float64 (exact up to float64's 53 bits)."""
        return self.acc.astype(np.float64) * 2.0**self.lam


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps16: np.uint16) -> np.ndarray:
    """The core's LayerNorm of binary16 ``x`` [n]: two VDOTs, an rsqrt lookup, four IEEE ops."""
    n = x.shape[-1]
    c_n = np.full(n, nm.to_bits(1.0 / n), np.uint16)
    mu = nm.dot_fp16(x, c_n)
    d = nm.fp16_sub(x, mu)
    ds = nm.fp16_mul(d, c_n)
    var = nm.dot_fp16(d, ds)
    rstd = nm.lookup("rsqrt", nm.fp16_add(var, eps16))
    return nm.fp16_add(nm.fp16_mul(nm.fp16_mul(d, rstd), g), b)


class FaithfulModel:
    """GPT-2 decode exactly as the core computes it.

    Parameters
    ----------
    cfg : GPT2Config
    weights : float weights keyed like ``tandem.checkpoint``, or a :class:`FaithfulWeights`
    """

    def __init__(self, cfg: GPT2Config, weights: Weights | FaithfulWeights):
        padded_heads(cfg)  # reject a head wider than one block before rounding anything
        if isinstance(weights, FaithfulWeights):
            if weights.cfg != cfg:
                raise ValueError(f"weights were prepared for {weights.cfg}, not {cfg}")
            self.weights = weights
        else:
            self.weights = FaithfulWeights.from_float(cfg, weights)
        self.cfg = cfg
        self.eps16 = nm.to_bits(cfg.layer_norm_epsilon)
        self.q_scale = nm.to_bits(1.0 / np.sqrt(cfg.head_dim))

    def new_cache(self) -> FaithfulCache:
        return FaithfulCache(self.cfg)

    def _check_token(self, tok) -> int:
        if isinstance(tok, bool) or not isinstance(tok, int | np.integer):
            raise ValueError(f"token id must be an int, not {tok!r}")
        if not 0 <= tok < self.cfg.n_vocab:
            raise ValueError(f"token id {tok} is out of range [0, {self.cfg.n_vocab})")
        return int(tok)

    def attention(self, layer: int, q: np.ndarray, cache: FaithfulCache, T: int) -> np.ndarray:
        """Causal attention of one query over the ``T`` live positions: [P] -> [P].

        Per head ``h`` (slices of 64), in the core's order::

            qs = q_h * to_bits(1/sqrt(hd))      s = K_h[:T] qs          m = max(s)
            e = exp(s - m)                       Z = VDOT(e, ones)       r = recip(Z)
            o_h = (V^T_h[:, :T] e) * r

        so softmax is normalised after S.V. Heads are independent; this computes all of them
        with one call per step (:func:`_matvec_heads`), bit-identical to the per-head
        :meth:`attention_per_head`.
        """
        H = self.cfg.n_head
        qs = nm.fp16_mul(q, self.q_scale).reshape(H, BLOCK)  # [H, 64]
        kq, ke, knf = cache.key_blocks(layer, T)
        s = _round(*_matvec_heads(kq, ke, knf, qs))  # [H, T]
        m = _max_rows(s)  # [H]
        e = nm.lookup("exp", nm.fp16_sub(s, m[:, None]))  # [H, T]
        eq, ee, enf = nm.bfp_blocks(nm.pad_to_block(e))  # e on the weight side of VDOT
        nb = ee.shape[1]
        ones = np.broadcast_to(np.full(T, nm.to_bits(1.0), np.uint16), (H, T))
        z = _round(
            *_matvec_heads(
                eq.reshape(H, nb, 1, BLOCK).astype(np.float32),
                ee[:, :, None],
                enf.any(axis=1)[:, None],
                ones,
            )
        )[:, 0]  # [H]
        r = nm.lookup("recip", z)  # [H]
        vq, ve, vnf = cache.value_blocks(layer, T)
        o = _round(*_matvec_heads(vq, ve, vnf, e))  # [H, 64]
        return nm.fp16_mul(o, r[:, None]).reshape(H * BLOCK)

    def attention_per_head(
        self, layer: int, q: np.ndarray, cache: FaithfulCache, T: int
    ) -> np.ndarray:
        """:meth:`attention` spelled out head by head with the contract's own functions (the
        readable form, and the check on the batched one)."""
        H = self.cfg.n_head
        qs = nm.fp16_mul(q, self.q_scale)  # [P]
        ones = np.full(T, nm.to_bits(1.0), np.uint16)
        out = np.empty(H * BLOCK, np.uint16)
        for h in range(H):
            kh = nm.PreparedMatrix(cache.k[layer, h, :T])  # [T, 64]
            vth = nm.PreparedMatrix(cache.vt[layer, h, :, :T])  # [64, T]
            s = nm.matvec_fp16(kh, qs[h * BLOCK : (h + 1) * BLOCK])  # [T]
            m = nm.fp16_max(s)
            e = nm.lookup("exp", nm.fp16_sub(s, m))  # [T]
            z = nm.dot_fp16(e, ones)
            r = nm.lookup("recip", z)
            o = nm.matvec_fp16(vth, e)  # [64]
            out[h * BLOCK : (h + 1) * BLOCK] = nm.fp16_mul(o, r)
        return out

    def step(self, tok: int, pos: int, cache: FaithfulCache) -> StepResult:
        """Decode ``tok`` at position ``pos``: writes K/V row ``pos`` of every layer and head and
        returns the next token. ``pos`` may be at most ``cache.n_tokens`` (no gaps); a smaller
        ``pos`` rewinds, and the cache then holds ``pos + 1`` tokens."""
        cfg, w = self.cfg, self.weights
        tok = self._check_token(tok)
        if isinstance(pos, bool) or not isinstance(pos, int | np.integer):
            raise ValueError(f"position must be an int, not {pos!r}")
        if not 0 <= pos < cfg.n_ctx:
            raise ValueError(f"position {pos} is outside the context [0, {cfg.n_ctx})")
        if pos > cache.n_tokens:
            raise ValueError(
                f"position {pos} would leave a gap: the cache holds {cache.n_tokens} tokens, "
                f"so the next position is {cache.n_tokens}"
            )
        T = pos + 1
        H, P = cfg.n_head, cfg.n_head * BLOCK
        x = nm.fp16_add(w.wte[tok], w.wpe[pos])  # [n_embd]
        for i, lw in enumerate(w.layers):
            y = layer_norm(x, lw.ln_1_g, lw.ln_1_b, self.eps16)
            qkv = nm.matvec_any_fp16(lw.c_attn, y, lw.c_attn_b)  # [3P]
            q, k, v = qkv[:P], qkv[P : 2 * P], qkv[2 * P :]
            cache.write(i, pos, k.reshape(H, BLOCK), v.reshape(H, BLOCK))
            att = self.attention(i, q, cache, T)  # [P]
            x = nm.fp16_add(x, nm.matvec_any_fp16(lw.attn_proj, att, lw.attn_proj_b))
            y = layer_norm(x, lw.ln_2_g, lw.ln_2_b, self.eps16)
            hmid = nm.matvec_any_fp16(lw.c_fc, y, lw.c_fc_b)  # [4 n_embd]
            g = nm.lookup("gelu", hmid)
            x = nm.fp16_add(x, nm.matvec_any_fp16(lw.mlp_proj, g, lw.mlp_proj_b))
        cache.n_tokens = T
        hidden = layer_norm(x, w.ln_f_g, w.ln_f_b, self.eps16)
        acc, lam, nonfinite = nm.matvec_any(w.lm_head, hidden)  # [n_vocab]
        return StepResult(nm.argmax(acc), acc, lam, nonfinite, hidden, x)

    def prefill(self, ids: Sequence[int], cache: FaithfulCache) -> StepResult:
        """Run the prompt position by position after the ``cache.n_tokens`` already cached;
        returns the last position's result (its ``token`` is the first generated one)."""
        ids = list(ids)
        if not ids:
            raise ValueError("prefill needs at least one token")
        start = cache.n_tokens
        if start + len(ids) > self.cfg.n_ctx:
            raise ValueError(
                f"{start} cached + {len(ids)} prompt tokens exceed the context of "
                f"{self.cfg.n_ctx} for {self.cfg.name!r}"
            )
        for tok in ids:
            self._check_token(tok)
        result = None
        for j, tok in enumerate(ids):
            result = self.step(tok, start + j, cache)
        return result

    def generate(
        self, ids: Sequence[int], n_new: int, sampling: Sampling | None = None
    ) -> list[int]:
        """Greedy decoding, or sampling with ``sampling`` (``tandem.sampling.choose``: the token
        after position ``p`` is keyed by ``p``); returns the ``n_new`` generated ids.

        Positions ``0 .. len(ids) + n_new - 2`` are processed: the prompt, then every generated
        token but the last, which is never fed back. So ``len(ids) + n_new - 1 <= n_ctx``, i.e.
        one token more than the float reference's ``generate_greedy`` allows, whose limit also
        counts the last generated token.
        """
        if isinstance(n_new, bool) or not isinstance(n_new, int | np.integer) or n_new < 0:
            raise ValueError(f"n_new must be a non-negative int, not {n_new!r}")
        ids = list(ids)
        if not ids:
            raise ValueError("generate needs a prompt of at least one token")
        n_ctx = self.cfg.n_ctx
        if len(ids) > n_ctx or len(ids) + n_new - 1 > n_ctx:
            raise ValueError(
                f"prompt of {len(ids)} tokens + {n_new} new tokens needs "
                f"{max(len(ids), len(ids) + n_new - 1)} positions, more than the context of "
                f"{n_ctx} for {self.cfg.name!r}: need len(ids) <= {n_ctx} and "
                f"len(ids) + n_new - 1 <= {n_ctx}"
            )
        for tok in ids:
            self._check_token(tok)
        if n_new == 0:
            return []
        cache = self.new_cache()

        def pick(r: StepResult) -> int:
            return choose(r.acc, r.lam, r.nonfinite, sampling, cache.n_tokens - 1)

        out = [pick(self.prefill(ids, cache))]
        while len(out) < n_new:
            out.append(pick(self.step(out[-1], cache.n_tokens, cache)))
        return out
