"""The sampling contract (:mod:`tandem.sampling`) on a torch device: the next token of the
``gpu`` placement and of the hybrid pipeline's GPU prefill.

The logits never leave the device: the binary16 rounding (``contract.round_acc``), the fixed-point
values, the top K, the Simon32/64 stream (:func:`tandem.sampling.stream`, whose integer operators
torch shares), the Gumbel table lookup and the scores all run in torch; one token id comes back.
Ties are broken by packing the index into the low bits of the ordering key, so the order is
total and ``topk``/``argmax`` have one answer (lower index first, as the contract says).
"""

from __future__ import annotations

import functools

import torch

from tandem import sampling as S
from tandem.sampling import Sampling

from . import contract as c

_INDEX_BITS = 17
"""Rows are below 2**17; values below 2**42 (scores) leave room in int64 for the index."""


@functools.cache
def _gumbel(device: str) -> torch.Tensor:
    return torch.from_numpy(S.gumbel_table().astype("int64")).to(device)


def _with_index(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``v`` with the index below it, inverted: larger key = larger ``v``, then lower index."""
    return (v << _INDEX_BITS) + ((1 << _INDEX_BITS) - 1 - index)


def choose(
    acc: torch.Tensor, lam, nonfinite: torch.Tensor, sampling: Sampling | None, pos: int
) -> int:
    """The next token from one position's LM-head accumulators ``acc`` [n_vocab] (int64), their
    LSB exponent ``lam`` and non-finite flags: ``tandem.sampling.choose`` on the device."""
    if sampling is None or sampling.greedy:
        return int(torch.argmax(acc))  # lowest index wins a tie
    n = acc.shape[-1]
    if n > 1 << _INDEX_BITS:
        raise ValueError(f"{n} rows exceed the {1 << _INDEX_BITS} this tie-break packs")
    dev = acc.device
    index = torch.arange(n, device=dev, dtype=torch.int64)
    v = S.logit_fixed_u(c._u(c.round_acc(acc, lam, nonfinite)))
    k = min(sampling.top_k, n)
    cand = torch.topk(_with_index(v, index), k).indices
    g = _gumbel(str(dev))[S.stream(sampling.seed, pos, cand) >> (32 - S.GUMBEL_INDEX_BITS)]
    score = v[cand] + 2 * sampling.temperature_q * g
    return int(cand[torch.argmax(_with_index(score, cand))])
