"""Sampling in the core (tandem.sampling): the contract's pieces, the same tokens from the faithful
model, the ISA simulator, torch (gpu), the hybrid pipeline and the CLI, and the CLI's checks.
The RTL's side is in tests/rtl/test_mpu.py (the MPU alone) and tests/rtl/test_core.py (the
whole core)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tandem import numerics as nm
from tandem import sampling as S
from tandem.checkpoint import lively_weights, random_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.golden.isasim import IsaSim
from tandem.gpu import sampling as gs
from tandem.gpu.decode import generate as gpu_generate
from tandem.gpu.prefill import PreparedModel
from tandem.host.cli import main
from tandem.host.hybrid import HybridSession
from tandem.host.runtime import generate as device_generate
from tandem.sampling import Sampling
from tandem.seeds import seed as seeded

# --------------------------------------------------------------------------------------------
# the contract's pieces


def test_simon_matches_the_papers_test_vector():
    # Simon32/64: key 1918 1110 0908 0100, plaintext 6565 6877 -> ciphertext c69b e9bb
    rk = S.simon_round_keys((0x0100, 0x0908, 0x1110, 0x1918))
    assert S.simon_encrypt(0x6565, 0x6877, rk) == (0xC69B, 0xE9BB)


def test_stream_is_a_permutation_keyed_by_seed_and_position():
    idx = np.arange(1 << 16)
    w = S.stream(7, 3, idx)
    assert np.unique(w).size == idx.size  # a cipher: no two rows share a word
    assert (w >= 0).all() and (w < 1 << 32).all()
    assert not np.array_equal(w, S.stream(8, 3, idx))
    assert not np.array_equal(w, S.stream(7, 4, idx))
    assert S.stream(7, 3, 12345) == w[12345]  # ints and arrays agree
    # the key: seed words then the position; position bits above 16 do not count
    assert S.round_keys(0x12345678, 0x1_0009)[:4] == [0x5678, 0x1234, 0x0009, 0]
    # the top 12 bits are close to uniform over 65,536 rows
    counts = np.bincount(w >> 20, minlength=4096)
    assert counts.min() >= 2 and counts.max() <= 40


def test_gumbel_table_is_the_rounded_gumbel_quantile():
    t = S.gumbel_table()
    assert t.shape == (4096,) and t.dtype == np.int16
    p = (np.arange(4096) + 0.5) / 4096
    want = np.rint(-np.log(-np.log(p)) * 2048)  # no entry is near a tie: float64 agrees
    assert np.array_equal(t, want)
    assert (np.diff(t) > 0).all()
    assert (int(t[0]), int(t[-1])) == (-4502, 18454)


def test_logit_fixed_is_the_exact_value_times_2_24():
    b = np.arange(1 << 16)
    v = S.logit_fixed(b)
    f = nm.from_bits(b).astype(np.float64)
    fin = np.isfinite(f)
    assert np.array_equal(v[fin], (f[fin] * 2.0**24).astype(np.int64))
    assert S.logit_fixed([0x0000, 0x8000]).tolist() == [0, 0]  # +0 == -0
    # exponent 31 reads as a finite number: Inf = 2**16, the canonical NaN = 1.5 * 2**16
    assert S.logit_fixed([0x7C00, 0x7E00, 0xFC00]).tolist() == [2**40, 3 * 2**39, -(2**40)]
    # order of the values = order of the patterns' magnitudes within a sign
    assert (np.diff(v[:0x8000]) > 0).all() and (np.diff(v[0x8000:]) < 0).all()


def test_top_k_breaks_ties_toward_the_lower_index():
    bits = nm.to_bits(np.array([1.0, 2.0, 2.0, -0.0, 0.0, 2.0, 3.0]))
    assert S.top_k(bits, 4).tolist() == [6, 1, 2, 5]
    assert S.top_k(bits, 7).tolist() == [6, 1, 2, 5, 0, 3, 4]
    assert S.top_k(bits, 100).tolist() == [6, 1, 2, 5, 0, 3, 4]


def test_sample_follows_the_softmax_of_the_top_k():
    """Over 40,000 positions the draws follow softmax(L / T) on the K best and never pick
    outside them: a broken stream, table or score fails this. The draws are computed for all
    positions at once from the contract's pieces; :func:`sample` itself equals them on the
    first 500."""
    L = np.array([0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 1.0, 0.25])
    bits = nm.to_bits(L)
    L16 = nm.from_bits(bits).astype(np.float64)
    n = 40_000
    pos = np.arange(n)[:, None]
    for T, k, seed in ((1.0, 8, 11), (0.5, 3, 12), (2.0, 5, 2**31 + 5)):
        tq = S.temperature_q(T)
        top = np.sort(S.top_k(bits, k))  # by index: argmax then takes the lowest on a tie
        g = S.gumbel_table()[S.stream(seed, pos, top[None, :]) >> 20].astype(np.int64)
        score = S.logit_fixed(bits[top])[None, :] + 2 * tq * g
        draws = top[np.argmax(score, axis=1)]
        assert [S.sample(bits, tq, k, seed, p) for p in range(500)] == draws[:500].tolist()
        p = np.zeros(L.size)
        p[top] = np.exp(L16[top] / (tq / 4096))
        p /= p.sum()
        freq = np.bincount(draws, minlength=L.size) / n
        sd = np.sqrt(p * (1 - p) / n)
        assert (np.abs(freq - p) <= 5 * sd + 2e-3).all(), (T, k, freq, p)


def test_sample_edge_cases():
    bits = nm.to_bits(np.array([1.0, 5.0, 5.0, -2.0]))
    # K = 1: the largest value, lowest index, whatever the noise
    assert all(S.sample(bits, S.TEMP_Q_MAX, 1, s, 0) == 1 for s in range(50))
    # the smallest temperature: the noise (at most 2 * 18,454 units of 2**-24) cannot lift
    # row 2 over row 1 (equal logits) unless its Gumbel is larger; both are drawn over seeds
    got = {S.sample(bits, 1, 4, s, 0) for s in range(50)}
    assert got == {1, 2}
    # a score tie goes to the lower index: one candidate row repeated
    same = np.full(5, nm.to_bits(1.0), np.uint16)
    assert S.sample(same, 1, 1, 3, 9) == 0
    with pytest.raises(ValueError, match="temperature_q"):
        S.sample(bits, 0, 4, 0, 0)


def test_choose_is_the_accumulator_argmax_when_greedy():
    rng = np.random.default_rng(seeded(3))
    acc = rng.integers(-(2**40), 2**40, 300)
    acc[[17, 200]] = acc.max() + 5  # a tie: the lower index
    nf = np.zeros(300, bool)
    for smp in (None, S.GREEDY, Sampling(0, 5, 99)):
        assert S.choose(acc, -30, nf, smp, 4) == 17
    assert S.choose_word(acc, -30, nf, 0, 1234, 4) == 17
    assert S.choose_word(acc, -30, nf, S.pack(0, 3), 1234, 4) == 17


def test_parameters_pack_check_and_unpack():
    s = Sampling.make(0.8, None, 1)
    assert (s.temperature_q, s.top_k, s.seed) == (3277, S.TOP_K_MAX, 1)
    assert s.word == 3277 | 64 << 16 and S.unpack(s.word) == (3277, 64)
    assert s.args() == {"sampling": s.word, "seed": 1}
    assert Sampling.make(None).greedy and Sampling.make(None).word == 64 << 16
    assert S.unpack(S.pack(5, 0)) == (5, 64) and S.unpack(0x7F << 16 | 9) == (9, 64)
    assert S.unpack(0xFF80_0000 | 3 << 16 | 7) == (7, 3)  # bits 31:23 ignored
    assert S.temperature_q(1 / 4096) == 1 and S.temperature_q(15.9997) == 65535
    for bad in (0, -1, 0.0001, 16, float("nan"), float("inf"), "x", True, None):
        with pytest.raises(ValueError, match="temperature"):
            S.temperature_q(bad)
    for bad in (0, 65, 2.5, -1, True):
        with pytest.raises(ValueError, match="top-k"):
            Sampling.make(1.0, bad)
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ValueError, match="seed"):
            Sampling.make(1.0, 4, bad)


def test_torch_choose_equals_the_contract():
    """gpu.sampling.choose against tandem.sampling.choose on accumulators with ties, NaN rows,
    overflow to Inf and signed zeros, for many (seed, position, T, K)."""
    rng = np.random.default_rng(seeded(21))
    n = 700
    for trial in range(60):
        lam = int(rng.integers(-40, -20))
        acc = rng.integers(-(2**30), 2**30, n) << int(rng.integers(0, 12))
        acc[rng.integers(0, n, 20)] = acc.max()  # ties
        acc[rng.integers(0, n, 5)] = 0
        if trial % 3 == 0:
            acc[rng.integers(0, n, 3)] = 2**60  # beyond binary16: Inf
        nf = rng.random(n) < (0.01 if trial % 4 == 0 else 0)
        smp = Sampling(
            int(rng.integers(1, 1 << 16)), int(rng.integers(1, 65)), int(rng.integers(0, 2**32))
        )
        pos = int(rng.integers(0, 1 << 16))
        want = S.choose(acc, lam, nf, smp, pos)
        got = gs.choose(torch.from_numpy(acc), torch.tensor(lam), torch.from_numpy(nf), smp, pos)
        assert got == want, (trial, smp, pos)
    assert gs.choose(torch.from_numpy(acc), torch.tensor(lam), torch.from_numpy(nf), None, 0) == (
        S.choose(acc, lam, nf, None, 0)
    )


# --------------------------------------------------------------------------------------------
# every software backend gives the same tokens

SETTINGS = [
    Sampling.make(0.8, None, 1),
    Sampling.make(1.5, 5, 2**32 - 1),
    Sampling.make(0.05, 2, 7),
    Sampling.make(15.9, 64, 0),
]


@pytest.fixture(scope="module", params=["test-tiny", "test-odd"])
def lively(request):
    cfg = preset(request.param)
    weights = lively_weights(cfg, seed=5)
    return cfg, weights, FaithfulModel(cfg, weights)


def test_faithful_isasim_gpu_and_hybrid_sample_the_same_tokens(lively):
    cfg, weights, fm = lively
    ids = np.random.default_rng(2).integers(0, cfg.n_vocab, 3).tolist()
    n_new = 8
    pm = PreparedModel(cfg, weights, "cpu")
    greedy = fm.generate(ids, n_new)
    seen = []
    with HybridSession(cfg, weights, "tiny", "model", "cpu") as hs:
        for smp in SETTINGS:
            want = fm.generate(ids, n_new, smp)
            seen.append(want)
            model = device_generate(cfg, weights, ids, n_new, "tiny", "model", sampling=smp)
            assert model.tokens == want, smp
            assert gpu_generate(cfg, pm, ids, n_new, sampling=smp).tokens == want, smp
            assert hs.generate(ids, n_new, sampling=smp).tokens == want, smp
        # greedy through the same paths is unchanged
        assert hs.generate(ids, n_new).tokens == greedy
    assert device_generate(cfg, weights, ids, n_new, "tiny", "model").tokens == greedy
    assert gpu_generate(cfg, pm, ids, n_new).tokens == greedy
    # the settings draw different streams, and at a high temperature differ from greedy
    assert len({tuple(t) for t in seen}) == len(seen)
    assert seen[3] != greedy


def test_isasim_reads_the_sampling_registers():
    """MATVEC ... ARGMAX with sreg: the word, seed and position come from R[sreg], R[sreg+1],
    R[sreg+2] (mod 16), compared with tandem.sampling on the simulator's own accumulators."""
    from tandem import isa
    from tandem.isa import MatFlag, Op

    cfg = preset("test-tiny")
    geom = geometry("tiny")
    c = compile_model(cfg, lively_weights(cfg, seed=1), geom)
    head = c.layout["lm_head"]
    y = c.vbuf_map["y"].addr
    rng = np.random.default_rng(seeded(8))
    picks = set()
    for sreg, values in (
        (11, (S.pack(4096, 7), 5, 3)),
        (14, (S.pack(300, 64), 2**32 - 1, 65535)),  # position in R0: reads 0
        (15, (S.pack(9000, 20), 77, 41)),  # seed in R0: reads 0
        (3, (S.pack(1, 1), 0, 0)),
    ):
        regs = {(sreg + j) % 16: v for j, v in enumerate(values)}
        read = [v if (sreg + j) % 16 else 0 for j, v in enumerate(values)]
        rd = 9 if sreg == 3 else 2
        prog = [isa.make(Op.SETI, rd=r, imm=v) for r, v in regs.items() if r]
        prog += [
            isa.make(
                Op.MATVEC,
                dst=0,
                src=y,
                line=head.line,
                rows=head.rows,
                cols=head.cols,
                flags=MatFlag.ARGMAX,
                rd=rd,
                sreg=sreg,
            ),
            isa.make(Op.HALT),
        ]
        img = c.image
        img.write_channel(0, c.layout["program"].base, isa.encode_program(prog))
        sim = IsaSim(geom, img)
        sim.vbuf[y : y + cfg.n_embd] = nm.to_bits(rng.normal(0, 1, cfg.n_embd))
        res = sim.run(c.args(1, 1))
        assert res.ok, res.message
        acc, lam = sim.last_argmax
        nf = np.zeros(acc.size, bool)
        want = S.choose_word(acc, lam, nf, *read)
        assert sim.regs[rd] == want
        picks.add(want != S.choose(acc, lam, nf, None, 0))
    assert True in picks  # some draw is not the argmax: the registers were read


# --------------------------------------------------------------------------------------------
# the command line

TINY = ["generate", "--preset", "test-tiny", "--prompt-ids", "1,2", "--no-progress"]


def _err_line(capsys, argv, code=2):
    rc = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temperature", "0"], "--temperature: must be a number greater than 0 and below 16"),
        (["--temperature", "-0.5"], "greater than 0"),
        (["--temperature", "abc"], "'abc'"),
        (["--temperature", "nan"], "'nan'"),
        (["--temperature", "inf"], "'inf'"),
        (["--temperature", "16"], "below 16"),
        (["--temperature", "0.00001"], "at least 1/4096"),
        (["--temperature", "1", "--top-k", "0"], "--top-k: must be a whole number from 1 to 64"),
        (["--temperature", "1", "--top-k", "65"], "from 1 to 64"),
        (["--temperature", "1", "--top-k", "2.5"], "'2.5'"),
        (["--temperature", "1", "--seed", "-1"], "--seed: must be a whole number from 0 to"),
        (["--temperature", "1", "--seed", "4294967296"], "4294967295"),
        (["--temperature", "1", "--seed", "x"], "'x'"),
        (["--top-k", "5"], "--top-k applies to sampling: give --temperature"),
        (["--top-k", "5", "--seed", "0"], "--top-k and --seed apply to sampling"),
        (["--temperature", "1", "--backend", "reference"], "decodes greedily only"),
    ],
)
def test_cli_refuses_bad_sampling_flags(capsys, flags, needle):
    line = _err_line(capsys, [*TINY, *flags])
    assert line.startswith("tandem generate: error: ")
    assert needle in line, line


def _ids(out: str) -> list[int]:
    return [int(t) for t in out.split("|")[1].split(",")]


@pytest.mark.parametrize("extra", [[], ["--placement", "gpu"], ["--placement", "hybrid"]])
def test_cli_samples_the_same_tokens_everywhere(capsys, extra):
    argv = [
        "generate",
        "--preset",
        "test-odd",
        "--weights-seed",
        "3",
        "--prompt-ids",
        "5,6",
        "--max-new-tokens",
        "6",
        "--no-progress",
        "--prefill-device",
        "cpu",
    ]
    if not extra:
        argv.remove("--prefill-device")
        argv.remove("cpu")
    rc = main([*argv, *extra, "--temperature", "3", "--top-k", "40", "--seed", "9"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "temperature 3, top-k 40, seed 9" in err
    cfg = preset("test-odd")
    fm = FaithfulModel(cfg, random_weights(cfg, seed=3))
    ids = [int(t) for t in out.strip().split(",")]  # no tokenizer: the ids on stdout
    assert ids == [5, 6, *fm.generate([5, 6], 6, Sampling.make(3.0, 40, 9))]


def _loops(tokens: list[int], tail: int = 16, max_period: int = 8) -> bool:
    """The last ``tail`` tokens repeat with a period of at most ``max_period``."""
    t = tokens[-tail:]
    return any(all(t[i] == t[i + p] for i in range(len(t) - p)) for p in range(1, max_period + 1))


def test_builtin_model_samples_without_looping(capsys):
    """The issue's goal: greedy decoding of the built-in model loops; with --temperature 0.8
    --seed 1 it does not (the README's sample output)."""
    outs = {}
    for flags in ([], ["--temperature", "0.8", "--seed", "1"]):
        rc = main(
            ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "40", "--no-progress", *flags]
        )
        out, err = capsys.readouterr()
        assert rc == 0, err
        ids_line = next(line for line in err.splitlines() if line.startswith("token ids"))
        outs[bool(flags)] = (out, _ids(ids_line))
    assert _loops(outs[False][1])
    assert not _loops(outs[True][1])
    assert outs[True][0].startswith("ROMEO:\nSo if it be married to them.\n")
    assert math.isclose(3277 / 4096, 0.800048828125)
