# amaranth: UnusedElaboratable=no
"""Sampling on the whole core (issue 16): the tiny core on Verilator decodes with the
``sampling`` and ``seed`` kernel arguments, every HBM byte as the ISA simulator (core_tb.py),
whose tokens equal the faithful model's, torch's and the hybrid pipeline's
(tests/test_sampling.py): so the RTL samples the same tokens as every other backend."""

from __future__ import annotations

import pytest
from test_core import _sims, run_cases

from tandem import sampling as S
from tandem.checkpoint import lively_weights
from tandem.config import preset
from tandem.golden.faithful import FaithfulModel

pytestmark = pytest.mark.core

PROMPT = [3, 14]
N_NEW = 6
HOT = S.Sampling.make(1.5, 5, 7)
WIDE = S.Sampling.make(4.0, None, 2**32 - 1)


def test_the_cases_sample_away_from_greedy():
    """The RTL case below is only a test of sampling if its tokens are not the greedy ones."""
    cfg = preset("test-odd")
    fm = FaithfulModel(cfg, lively_weights(cfg))  # core_tb's weights
    greedy = fm.generate(PROMPT, N_NEW)
    hot, wide = fm.generate(PROMPT, N_NEW, HOT), fm.generate(PROMPT, N_NEW, WIDE)
    assert hot != greedy and wide != greedy and hot != wide


@pytest.mark.parametrize("sim", [s for s in _sims() if "verilator" in str(s)])
def test_sampling_with_stalls(sim):
    """test-odd (3 heads, vocab 97), 6 tokens sampled at T 4 with the widest top-k (64) and the
    largest seed, then greedy with no reset in between (the MPU's sampling state must not leak
    into it), then T 1.5 with top-k 5 under random pauses on every AXI channel of all four
    memories and the control port, then greedy again without stalls (core_tb's set_stalls(0)
    must leave no channel paused): every byte, status and token as IsaSim."""
    odd = {"cfg": "test-odd", "prompt": PROMPT, "n_new": N_NEW}
    run_cases(
        sim,
        [
            {**odd, "args": WIDE.args()},
            {**odd, "want": "ok"},
            {**odd, "args": HOT.args(), "stall": 0.3},
            {**odd, "want": "ok"},
        ],
    )
