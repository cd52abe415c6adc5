"""GPT-2 decode in PyTorch under the core's numeric contract (``--placement gpu``).

After :func:`tandem.gpu.prefill.prefill`, each new token runs one position through the same
contract ops with the K/V cache kept on the device. Attention is the prefill's
:func:`~tandem.gpu.prefill.attention` with the one new query over the whole cache: exactly the
core's single-query attention, so the tokens equal ``FaithfulModel.generate``'s, at O(T) cost
per token (the weight matmuls, one row each, dominate at GPT-2 sizes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tandem.config import GPT2Config
from tandem.sampling import Sampling

from . import contract as c
from .cuda import cpu_threads, synchronize
from .prefill import BLOCK, PreparedModel, attention, layer_norm, prefill, qkv
from .sampling import choose


@dataclass
class TorchGenerateResult:
    tokens: list[int]
    timings: dict = field(default_factory=dict)  # prefill, decode, decode_per_token (s)


def decode_step(
    cfg: GPT2Config, model: PreparedModel, token: int, k, vt, sampling: Sampling | None = None
) -> tuple[int, list, list]:
    """One position: ``token`` at position ``T = k[0].shape[1]``; per layer ``k`` [H, T, 64] and
    ``vt`` (V transposed, as the prefill returns it) [H, 64, T] bits. Returns
    (next token, k, vt) with the new position appended; the next token is greedy, or sampled
    with ``sampling`` keyed by position ``T`` (:func:`tandem.gpu.sampling.choose`)."""
    dev = model.device
    H, P = cfg.n_head, cfg.n_head * BLOCK
    pos = k[0].shape[1]
    if pos >= cfg.n_ctx:
        raise ValueError(f"position {pos} is past the context of {cfg.n_ctx}")
    x = c.fp16_add(model.wte[torch.tensor([token], device=dev)], model.wpe[pos : pos + 1])
    k2, vt2 = [], []
    for i, lw in enumerate(model.layers):
        y = layer_norm(x, lw.ln_1_g, lw.ln_1_b, model.c_n, model.eps16)
        q, kn, vtn = qkv(lw, y, H)  # [H, 1, 64], [H, 1, 64], [H, 64, 1]
        kc = torch.cat([k[i], kn], dim=1)
        vtc = torch.cat([vt[i], vtn], dim=2)
        k2.append(kc)
        vt2.append(vtc)
        att = attention(q, kc, vtc, model.q_scale).transpose(0, 1).reshape(1, P)
        x = c.fp16_add(x, c.matmul_fp16(lw.attn_proj, att, lw.attn_proj_b))
        y = layer_norm(x, lw.ln_2_g, lw.ln_2_b, model.c_n, model.eps16)
        hmid = c.lookup("gelu", c.matmul_fp16(lw.c_fc, y, lw.c_fc_b))
        x = c.fp16_add(x, c.matmul_fp16(lw.mlp_proj, hmid, lw.mlp_proj_b))
    hidden = layer_norm(x, model.ln_f_g, model.ln_f_b, model.c_n, model.eps16)
    acc, lam, nonfinite = c.matmul(model.lm_head, hidden)
    return choose(acc[0], lam[0], nonfinite[0], sampling, pos), k2, vt2


def generate(
    cfg: GPT2Config,
    model: PreparedModel,
    ids: Sequence[int],
    n_new: int,
    progress=None,
    sampling: Sampling | None = None,
) -> TorchGenerateResult:
    """Prefill ``ids`` then ``n_new - 1`` decode steps, all in torch; greedy, or sampled with
    ``sampling`` (``tandem.sampling``). On the CPU with ``tandem.gpu.cuda.CPU_THREADS`` torch
    threads (:func:`~tandem.gpu.cuda.cpu_threads`)."""
    if n_new == 0:
        return TorchGenerateResult([])
    t0 = time.perf_counter()
    with torch.no_grad(), cpu_threads(model.device):
        pre = prefill(cfg, model, ids, sampling=sampling)
        synchronize(model.device)
        t1 = time.perf_counter()
        tokens = [pre.first_token]
        if progress is not None:
            progress(0, tokens[0])
        k = list(pre.k.unbind(0))
        vt = list(pre.v.unbind(0))  # V transposed, [H, 64, T] per layer
        for i in range(1, n_new):
            tok, k, vt = decode_step(cfg, model, tokens[-1], k, vt, sampling)
            tokens.append(tok)
            if progress is not None:
                progress(i, tok)
        synchronize(model.device)
    t2 = time.perf_counter()
    per = (t2 - t1) / (n_new - 1) if n_new > 1 else 0.0
    return TorchGenerateResult(
        tokens, {"prefill": t1 - t0, "decode": t2 - t1, "decode_per_token": per}
    )
