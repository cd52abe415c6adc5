"""GPT-2 prefill in PyTorch under the decode core's numeric contract, batched over positions.

The prefill runs the whole prompt at once but computes every position exactly as
``tandem.golden.faithful.FaithfulModel.step`` would (docs/numerics.md gives the sequence), so its
K/V cache and first token are bit-identical to the core's: the hybrid pipeline hands that cache
to the core and decoding continues as if the core had consumed the prompt itself.

V is kept transposed, as the core stores it: ``vt`` [n_head, head_dim=64, T] (row = dimension,
column = position). The c_attn product is computed as two row slices of the same prepared
matrix, Q and K in the usual [T, rows] orientation and V in the product's natural [rows, T]
orientation (:func:`~tandem.gpu.contract.matmul` with ``transposed=True``), so V^T costs no
transposing copy, here or in the KV reshape. Rows are independent, so the values are exactly
those of the whole product.

Layer by layer, as soon as a layer's K and V are final, ``on_layer(layer, k, vt)`` is called
(int16 binary16 bits on the device: k [n_head, T, 64], vt [n_head, 64, T]), so that the reshape
and the transfer to the decode device overlap the next layer's compute
(:mod:`tandem.gpu.transfer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tandem import numerics as nm
from tandem.checkpoint import validate
from tandem.config import GPT2Config
from tandem.layout import mpu_tensors, padded_heads
from tandem.sampling import Sampling

from . import contract as c
from .cuda import cpu_threads, resolve_device, synchronize
from .sampling import choose

BLOCK = c.BLOCK
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class PreparedLayer:
    ln_1_g: torch.Tensor
    ln_1_b: torch.Tensor
    c_attn: c.PreparedMatrix
    c_attn_b: torch.Tensor
    attn_proj: c.PreparedMatrix
    attn_proj_b: torch.Tensor
    ln_2_g: torch.Tensor
    ln_2_b: torch.Tensor
    c_fc: c.PreparedMatrix
    c_fc_b: torch.Tensor
    mlp_proj: c.PreparedMatrix
    mlp_proj_b: torch.Tensor


class PreparedModel:
    """The core's binary16 weights (``tandem.layout.mpu_tensors``) on a torch device, with
    every MPU matrix aligned once.

    Parameters
    ----------
    cfg : GPT2Config
    weights : float weights keyed like ``tandem.checkpoint`` (checked against ``cfg``; any
        quantized matrices, ``tandem.qweights``, are prepared by
        ``tandem.golden.faithful.FaithfulWeights`` and computed under the quantized contract),
        or a ``FaithfulWeights`` whose alignment is reused
    device : 'cpu', 'cuda', 'cuda:N' or None (CUDA when available)
    """

    def __init__(self, cfg: GPT2Config, weights, device=None):
        # aligning the matrices is many small ops too: 1.0 s for the built-in model with one
        # thread here, 6.3 s with two under load (tandem.gpu.cuda.CPU_THREADS)
        with cpu_threads(resolve_device(device)):
            self._prepare(cfg, weights, device)

    def _prepare(self, cfg: GPT2Config, weights, device) -> None:
        from tandem.golden.faithful import FaithfulWeights, split_quantized

        padded_heads(cfg)
        self.cfg = cfg
        self.device = dev = resolve_device(device)

        def vec(a):
            return c.bits_from_numpy(a, dev)

        if not isinstance(weights, FaithfulWeights):
            view, quant = split_quantized(cfg, weights)
            validate(cfg, view)
            if quant:  # prepared (and head-padded) once, by the faithful model's definition
                weights = FaithfulWeights.from_float(cfg, weights)
        if isinstance(weights, FaithfulWeights):
            if weights.cfg != cfg:
                raise ValueError(f"weights were prepared for {weights.cfg}, not {cfg}")
            fw = weights

            def mat(pm):
                return c.PreparedMatrix.from_numpy(pm, dev)

            self.layers = [
                PreparedLayer(
                    *(
                        mat(getattr(lw, f))
                        if isinstance(getattr(lw, f), nm.PreparedMatrix | nm.PreparedQuantMatrix)
                        else vec(getattr(lw, f))
                        for f in PreparedLayer.__dataclass_fields__
                    )
                )
                for lw in fw.layers
            ]
            self.wte, self.wpe = vec(fw.wte), vec(fw.wpe)
            self.ln_f_g, self.ln_f_b = vec(fw.ln_f_g), vec(fw.ln_f_b)
            self.lm_head = mat(fw.lm_head)
        else:
            t = mpu_tensors(cfg, dict(weights))

            def mat(bits):
                return c.PreparedMatrix.from_bits(vec(bits))

            self.layers = []
            for i in range(cfg.n_layer):
                p = f"h.{i}."
                self.layers.append(
                    PreparedLayer(
                        vec(t[p + "ln_1.weight"]),
                        vec(t[p + "ln_1.bias"]),
                        mat(t[p + "attn.c_attn.weight"]),
                        vec(t[p + "attn.c_attn.bias"]),
                        mat(t[p + "attn.c_proj.weight"]),
                        vec(t[p + "attn.c_proj.bias"]),
                        vec(t[p + "ln_2.weight"]),
                        vec(t[p + "ln_2.bias"]),
                        mat(t[p + "mlp.c_fc.weight"]),
                        vec(t[p + "mlp.c_fc.bias"]),
                        mat(t[p + "mlp.c_proj.weight"]),
                        vec(t[p + "mlp.c_proj.bias"]),
                    )
                )
            self.wte, self.wpe = vec(t["wte"]), vec(t["wpe"])
            self.ln_f_g, self.ln_f_b = vec(t["ln_f.weight"]), vec(t["ln_f.bias"])
            self.lm_head = mat(t["lm_head"])
        self.eps16 = c.const(int(nm.to_bits(cfg.layer_norm_epsilon)), device=dev)
        self.q_scale = c.const(int(nm.to_bits(1.0 / np.sqrt(cfg.head_dim))), device=dev)
        self.c_n = c.const(int(nm.to_bits(1.0 / cfg.n_embd)), (cfg.n_embd,), dev)


@dataclass
class PrefillResult:
    """``first_token`` (argmax of the LM head's raw accumulators at the last position, lowest
    index on ties; or sampled, with ``prefill(..., sampling=...)``), the cache as int16
    binary16 bits on the prefill device (heads padded to 64 lanes): ``k`` [n_layer, n_head, T,
    64] (row = position) and ``v`` **transposed**,
    [n_layer, n_head, 64, T] (row = head dimension, column = position; the core's and
    ``FaithfulCache.vt``'s orientation); and ``timings`` in seconds (``prepare`` when the
    weights were prepared in the call, ``layers`` per layer, ``head``, ``total``). With
    ``prefill(..., logits=True)``, ``logits16`` holds the binary16 logits of every position
    [T, n_vocab] (``StepResult.logits16`` of each; the core's ``logits=True`` program stores the
    same bits); otherwise None."""

    first_token: int
    k: torch.Tensor
    v: torch.Tensor
    timings: dict = field(default_factory=dict)
    logits16: torch.Tensor | None = None

    def kv_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s K [n_head, T, 64] and V^T [n_head, 64, T] as NumPy uint16."""
        return c.bits_to_numpy(self.k[layer]), c.bits_to_numpy(self.v[layer])


def layer_norm(x, g, b, c_n, eps16):
    """The core's LayerNorm for every row of ``x`` [T, n]: ``faithful.layer_norm`` batched."""
    mu = c.dot_fp16(x, c_n)  # [T]: x on the weight side, as VDOT(x, c_n)
    d = c.fp16_sub(x, mu[:, None])
    ds = c.fp16_mul(d, c_n)
    var = c.dot_fp16(d, ds)
    rstd = c.lookup("rsqrt", c.fp16_add(var, eps16))
    return c.fp16_add(c.fp16_mul(c.fp16_mul(d, rstd[:, None]), g), b)


def qkv(lw: PreparedLayer, y: torch.Tensor, n_head: int):
    """The c_attn product of ``y`` [T, n_embd] split per head: q, k [H, T, 64] and v
    *transposed*, vt [H, 64, T] (bits). Q/K and V are two row slices of the one prepared matrix
    (rows are independent, so each value equals the whole product's); V's slice is taken in the
    product's natural [rows, T] orientation, so V^T needs no transposing copy."""
    T, P = y.shape[0], n_head * BLOCK
    qk = c.matmul_fp16(lw.c_attn.row_slice(0, 2 * P), y, lw.c_attn_b[: 2 * P])  # [T, 2P]
    vt = c.matmul_fp16(lw.c_attn.row_slice(2 * P, 3 * P), y, lw.c_attn_b[2 * P :], True)
    q, k = (qk[:, j * P : (j + 1) * P].reshape(T, n_head, BLOCK).transpose(0, 1) for j in (0, 1))
    return q, k, vt.view(n_head, BLOCK, T)


def attention(q, k, vt, q_scale) -> torch.Tensor:
    """Causal attention of every query, each exactly as the core attends one query.

    ``k``: [H, T, 64] bits; ``vt``: V transposed, [H, 64, T] bits (the core's orientation);
    ``q``: [H, Tq, 64] bits, the queries of the *last* ``Tq`` positions ``T - Tq .. T - 1`` (the
    prefill passes all ``T``; a decode step only the new position, so its cost is O(T), not
    O(T^2)). Query at position ``t`` sees positions
    ``u <= t``, and its products are those of ``faithful.FaithfulModel.attention`` at
    ``T = t + 1``:

    * scores ``K[:t+1] qs``: each K row is one block, so its alignment does not depend on ``t``;
    * ``e = exp(s - max s)`` over the live positions, +0 elsewhere (padding, as in the core);
    * ``Z = VDOT(e, ones)``; ``o = V^T[:, :t+1] e``; ``o * recip(Z)``.

    ``V^T``'s blocks are 64 positions wide and aligned to the largest exponent among the *live*
    positions, so a block's alignment depends on ``t`` only while ``t`` lies inside it: blocks
    wholly before ``t`` use their full alignment (one batched matmul), and the block holding
    ``t`` is aligned per query with the running (cumulative) maximum of exponents.
    Returns [H, Tq, 64] bits.
    """
    H, Tq, _ = q.shape
    T = k.shape[1]
    q0 = T - Tq  # position of the first query
    if q0 < 0 or vt.shape != (H, BLOCK, T) or k.shape != (H, T, BLOCK):
        raise ValueError(f"queries {tuple(q.shape)} for K {tuple(k.shape)}, V^T {tuple(vt.shape)}")
    dev = q.device
    qs = c.fp16_mul(q, q_scale)
    kq, ke, knf = c.bfp_blocks(k)  # [H, T, 64], [H, T, 1], [H, T, 1]
    qq, qe, qnf = c.bfp_blocks(qs)
    hi, lo = c.split_input(qq)
    xs = torch.cat([hi, lo], dim=1).transpose(1, 2)  # [H, 64, 2Tq]
    sums = torch.bmm(kq.to(torch.float32), xs)  # [H, U, 2Tq], exact
    s = sums[:, :, :Tq].double() * 32 + sums[:, :, Tq:].double()
    # one input block, so xe == xe_max and the shift is the K row's exponent alone
    acc = c.floor_scale(s, ke + c._SHIFT_OFFSET)  # [H, U, Tq]
    lam = qe[:, :, 0] + nm.LAM_OFFSET  # [H, Tq]
    nf = knf + qnf[:, :, 0][:, None, :]  # bool or
    s16 = c.round_acc(acc, lam[:, None, :], nf.bool()).transpose(1, 2)  # [H, Tq(t), U(u)]
    pos = torch.arange(T, device=dev)
    qpos = pos[q0:]
    live = pos[None, :] <= qpos[:, None]  # [t, u]
    m = c.fp16_max(s16, live)  # [H, Tq]
    e = c.lookup("exp", c.fp16_sub(s16, m[:, :, None]))
    e = torch.where(live, e, torch.zeros((), dtype=torch.int16, device=dev))  # [H, Tq, U]
    ones = c.const(int(nm.to_bits(1.0)), (T,), dev)
    z = c.dot_fp16(e, ones)  # [H, Tq]
    r = c.lookup("recip", z)

    # S.V: e is the input side, V^T [64, t+1] the matrix side.
    ep = c.pad_to_block(e)  # [H, Tq, Upad]
    eq, ee, enf = c.bfp_blocks(ep)  # [H, Tq, Upad], [H, Tq, nb], [H, Tq, nb]
    nb = ee.shape[2]
    ee_max = ee.amax(dim=2)  # [H, Tq]
    # V^T [H, d, Upad] as blocks [h, b, u', d]: a permuted view of V^T's own layout, so the
    # matmul's [d, u'] operand below (vq) needs no transposing copy
    neg, sig, exp = (
        x.reshape(H, BLOCK, nb, BLOCK).permute(0, 2, 3, 1) for x in c.decode(c.pad_to_block(vt))
    )
    full_e = exp.amax(dim=2)  # [H, nb, d]
    tblock = qpos // BLOCK  # block of each query
    # wholly earlier blocks: full alignment, e masked to those blocks
    mag = sig >> torch.clamp(full_e[:, :, None, :] - exp, max=63)
    vq = torch.where(neg, -mag, mag).transpose(2, 3).to(torch.float32)  # [H, nb, d, u']
    ublock = torch.arange(nb * BLOCK, device=dev) // BLOCK
    early = ublock[None, :] < tblock[:, None]  # [t, u]
    e_off = torch.where(early, eq, 0).reshape(H, Tq, nb, BLOCK).permute(0, 2, 3, 1)  # [H,nb,u',t]
    ohi, olo = c.split_input(e_off)
    osum = torch.matmul(vq, torch.cat([ohi, olo], dim=3))  # [H, nb, d, 2Tq], exact
    so = osum[..., :Tq].double() * 32 + osum[..., Tq:].double()
    shift = full_e[..., None] + (ee - ee_max[:, :, None]).permute(0, 2, 1)[:, :, None, :]
    acc = c.floor_scale(so, shift + c._SHIFT_OFFSET).sum(dim=1)  # [H, d, Tq]
    acc = acc.transpose(1, 2).contiguous()  # [H, Tq, d]
    # the block holding t, aligned to the running maximum over its live positions
    run_e = torch.cummax(exp, dim=2).values  # [H, nb, j, d]
    for b in range(nb):
        t0, t1 = max(b * BLOCK, q0), min(T, (b + 1) * BLOCK)  # this block's queries
        if t0 >= t1:
            continue
        j0, j1, r0, r1 = t0 - b * BLOCK, t1 - b * BLOCK, t0 - q0, t1 - q0
        ce = run_e[:, b, j0:j1]  # [H, J, d]
        sh = torch.clamp(ce[:, :, None, :] - exp[:, b, None], 0, 63)  # [H, J, u', d]
        m_b = sig[:, b, None] >> sh
        vq_t = torch.where(neg[:, b, None], -m_b, m_b)
        e_d = eq[:, r0:r1, b * BLOCK : (b + 1) * BLOCK]  # [H, J, u']: positions past t are +0
        sd = (vq_t * e_d[..., None]).sum(dim=2)  # [H, J, d], exact int64
        shd = ce + ee[:, r0:r1, b, None] - ee_max[:, r0:r1, None] + c._SHIFT_OFFSET
        acc[:, r0:r1] += c.shift_floor(sd, shd)
    # a non-finite V at or before t poisons query t's output (exponent field 31)
    vnf = torch.cummax(((vt & 0x7C00) == 0x7C00).to(torch.int8), dim=2).values  # [H, d, T]
    nf = vnf[:, :, q0:T].transpose(1, 2).bool() | enf.any(dim=2)[:, :, None]  # [H, Tq, d]
    o = c.round_acc(acc, (ee_max + nm.LAM_OFFSET)[:, :, None], nf)
    return c.fp16_mul(o, r[:, :, None])


def _check_ids(cfg: GPT2Config, ids) -> list[int]:
    ids = list(ids)
    if not ids:
        raise ValueError("the prompt must have at least one token")
    if len(ids) > cfg.n_ctx:
        raise ValueError(
            f"prompt of {len(ids)} tokens exceeds the context of {cfg.n_ctx} for {cfg.name!r}"
        )
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise ValueError(f"token id must be an int, not {t!r}")
        if not 0 <= t < cfg.n_vocab:
            raise ValueError(f"token id {t} is out of range [0, {cfg.n_vocab})")
    return [int(t) for t in ids]


def prefill(
    cfg: GPT2Config,
    model: PreparedModel | Mapping[str, np.ndarray],
    ids: Sequence[int],
    device=None,
    on_layer: LayerCallback | None = None,
    logits: bool = False,
    sampling: Sampling | None = None,
) -> PrefillResult:
    """Run the prompt ``ids`` through the model on ``device``; see the module docstring.

    ``model`` is a :class:`PreparedModel` (reused across prompts) or float weights, prepared
    here. With ``logits``, every position goes through the LM head, not only the last (teacher-
    forced evaluation; :attr:`PrefillResult.logits16`). ``sampling`` picks ``first_token``
    (``tandem.sampling``; None: greedy). Raises ValueError for an empty prompt,
    one longer than the context, or bad ids.
    """
    ids = _check_ids(cfg, ids)
    timings: dict = {}
    if not isinstance(model, PreparedModel):
        t0 = time.perf_counter()
        model = PreparedModel(cfg, model, device)
        timings["prepare"] = time.perf_counter() - t0
    elif model.cfg != cfg:
        raise ValueError(f"the prepared model is {model.cfg}, not {cfg}")
    elif device is not None and resolve_device(device) != model.device:
        raise ValueError(f"the model was prepared on {model.device}, not {device}")
    dev = model.device
    T, H, P = len(ids), cfg.n_head, cfg.n_head * BLOCK
    t_start = time.perf_counter()
    with torch.no_grad():
        idx = torch.tensor(ids, device=dev)
        x = c.fp16_add(model.wte[idx], model.wpe[:T])  # [T, n_embd]
        # each layer's K and V^T side by side in one buffer: the KV reshape then gathers both
        # with one index (tandem.gpu.reshape)
        kv = torch.empty((cfg.n_layer, 2, H * T * BLOCK), dtype=torch.int16, device=dev)
        k_all = kv[:, 0].view(cfg.n_layer, H, T, BLOCK)
        vt_all = kv[:, 1].view(cfg.n_layer, H, BLOCK, T)
        layer_times = []
        for i, lw in enumerate(model.layers):
            t0 = time.perf_counter()
            y = layer_norm(x, lw.ln_1_g, lw.ln_1_b, model.c_n, model.eps16)
            q, k, vt = qkv(lw, y, H)
            k_all[i], vt_all[i] = k, vt
            if on_layer is not None:
                on_layer(i, k_all[i], vt_all[i])
            att = attention(q, k_all[i], vt_all[i], model.q_scale).transpose(0, 1).reshape(T, P)
            if i == cfg.n_layer - 1 and not logits:
                # only the last position feeds the LM head; its K/V are already out
                x, att = x[-1:], att[-1:]
            x = c.fp16_add(x, c.matmul_fp16(lw.attn_proj, att, lw.attn_proj_b))
            y = layer_norm(x, lw.ln_2_g, lw.ln_2_b, model.c_n, model.eps16)
            hmid = c.lookup("gelu", c.matmul_fp16(lw.c_fc, y, lw.c_fc_b))
            x = c.fp16_add(x, c.matmul_fp16(lw.mlp_proj, hmid, lw.mlp_proj_b))
            synchronize(dev)
            layer_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hidden = layer_norm(x, model.ln_f_g, model.ln_f_b, model.c_n, model.eps16)
        acc, lam, nonfinite = c.matmul(model.lm_head, hidden)
        # greedy: the lowest index wins a tie; or sampled, keyed by the last position
        first = choose(acc[-1], lam[-1], nonfinite[-1], sampling, T - 1)
        logits16 = c.round_acc(acc, lam[:, None], nonfinite) if logits else None
        timings["head"] = time.perf_counter() - t0
    timings["layers"] = layer_times
    timings["total"] = time.perf_counter() - t_start
    return PrefillResult(first, k_all, vt_all, timings, logits16)
