"""Sampling in the core, bit for bit: the single definition of Tandem's sampling contract.

Greedy decoding takes the lowest index of the largest raw LM-head accumulator
(:func:`tandem.numerics.argmax`). With a temperature the core samples instead, by Gumbel-max over
the ``K`` largest logits, from a counter-based random stream keyed by (seed, position, index).
Everything is integer arithmetic on the binary16 logits; no step rounds:

1. **Parameters.** The run's ``sampling`` kernel argument packs ``T_q = round(T * 2**12)``
   (bits 15:0, ``T = T_q / 4096``) and ``K`` (bits 22:16); bits 31:23 are ignored.
   ``T_q = 0`` is greedy (the accumulator argmax above, whatever ``K``). ``K`` outside
   ``1 .. TOP_K_MAX`` counts as :data:`TOP_K_MAX` (64). The ``seed`` argument is 32 bits.
2. **Logits.** ``L_i`` = the LM head's binary16 result of row ``i`` (``matvec_fp16``: NaN
   ``0x7E00`` where an operand was non-finite), read as the exact integer ``L_i * 2**24``
   (:func:`logit_fixed`): sign and magnitude, subnormals exact, and exponent field 31 (Inf, NaN)
   decoded like a finite number, as inside the dot products. So every pattern has a value,
   ``+0 == -0``, and ``|value| < 2**41``.
3. **Top K.** The candidates are the ``K`` rows with the largest values; between equal values
   the lower index ranks first (:func:`top_k`). With fewer rows than ``K``, every row.
4. **Noise.** For candidate ``i`` at position ``pos`` (the position whose LM head is being read;
   its token is the next one): ``c = Simon32/64(key = seed, pos; block = i)``
   (:func:`stream`), ``u = c >> 20`` (the top 12 bits of the 32-bit ciphertext), and
   ``g_q = GUMBEL[u]``, where ``GUMBEL[u] = round(2**11 * -ln(-ln((u + 1/2) / 4096)))`` (nearest,
   computed in 50-digit decimal arithmetic; :func:`gumbel_table`), from -4,502 to 18,454.
5. **Score.** ``S_i = L_i * 2**24 + 2 * T_q * g_q``, exactly ``2**24 * (L_i + T * g)`` with
   ``g = g_q / 2**11``: Gumbel-max of ``L / T`` scaled by ``T > 0``. ``|S_i| < 2**42``.
6. **Choice.** The token is the candidate with the largest ``S_i``; on a tie, the lowest index
   (as ARGMAX).

Simon32/64 is the NSA's 2013 lightweight block cipher (16-bit words, 64-bit key, 32 rounds; the
paper's test vector is checked in tests/test_sampling.py). The key words are
``(k0, k1, k2, k3) = (seed & 0xFFFF, seed >> 16, pos & 0xFFFF, 0)``; the plaintext block is
``(x, y) = (i & 0xFFFF, 0)`` and the ciphertext ``c = x << 16 | y``. A cipher is a permutation,
so for one (seed, pos) distinct rows never share a stream word. In hardware every round is one
LUT level per bit (an AND, three XORs and the round key), and the key schedule is XORs and
rotations only.

The functions work on NumPy arrays; the stream, the fixed-point logits and the score use only
integer operators that torch tensors share, so ``tandem.gpu`` calls the same code on the device.
"""

from __future__ import annotations

import decimal
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import numerics as nm

TEMP_FRAC_BITS = 12
"""``T_q = round(T * 2**TEMP_FRAC_BITS)``: the temperature is a 16-bit unsigned fixed-point
number, ``1 / 4096 .. 65535 / 4096``."""
TEMP_Q_MAX = (1 << 16) - 1
TOP_K_MAX = 64
"""Largest ``K``: the core keeps the best ``K`` rows of each MPU lane in a sorted list of this
many entries (rtl/mpu.py)."""
TOP_K_BITS = 7
GUMBEL_INDEX_BITS = 12
GUMBEL_FRAC_BITS = 11
LOGIT_FRAC_BITS = 24
"""``L * 2**24`` is an integer for every binary16 ``L`` (the smallest subnormal is 2**-24)."""
SEED_MAX = (1 << 32) - 1
POS_BITS = 16

SIMON_ROUNDS = 32
_SIMON_C = 0xFFFC
_SIMON_Z0 = "11111010001001010110000111001101111101000100101011000011100110"
_M16 = 0xFFFF


@dataclass(frozen=True)
class Sampling:
    """A run's sampling parameters; ``Sampling()`` is greedy.

    Build one from user values with :meth:`make` (which checks them); ``temperature_q`` and
    ``top_k`` are the values the core sees.
    """

    temperature_q: int = 0
    top_k: int = TOP_K_MAX
    seed: int = 0

    @classmethod
    def make(cls, temperature: float | None, top_k: int | None = None, seed: int = 0) -> Sampling:
        """Checked user values: ``temperature`` None or 0 < T < 16 (:func:`temperature_q`),
        ``top_k`` 1 .. :data:`TOP_K_MAX` (default the maximum), ``seed`` 0 .. 2**32 - 1.
        Raises ValueError naming the value and its range."""
        k = TOP_K_MAX if top_k is None else check_top_k(top_k)
        s = check_seed(seed)
        if temperature is None:
            return cls(0, k, s)
        return cls(temperature_q(temperature), k, s)

    @property
    def greedy(self) -> bool:
        return self.temperature_q == 0

    @property
    def temperature(self) -> float:
        """The exact temperature the core uses, ``T_q / 4096``."""
        return self.temperature_q / (1 << TEMP_FRAC_BITS)

    @property
    def word(self) -> int:
        """The ``sampling`` kernel argument."""
        return pack(self.temperature_q, self.top_k)

    def args(self) -> dict[str, int]:
        """The kernel arguments (``tandem.regmap.SCALAR_ARGS``) of these parameters."""
        return {"sampling": self.word, "seed": self.seed}

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature {self.temperature:g}, top-k {self.top_k}, seed {self.seed}"


GREEDY = Sampling()


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def temperature_q(temperature) -> int:
    """``round(T * 4096)`` (nearest, ties to even) for ``0 < T < 16``; ValueError otherwise, also
    when T is so small that it rounds to 0 (below 1/8192)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, not {temperature!r}") from None
    if isinstance(temperature, bool) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a number greater than 0, not {temperature!r}")
    q = round(t * (1 << TEMP_FRAC_BITS))
    hi = TEMP_Q_MAX / (1 << TEMP_FRAC_BITS)
    if q > TEMP_Q_MAX:
        raise ValueError(f"temperature must be at most {hi:.6g} (16-bit fixed point), not {t:g}")
    if q == 0:
        raise ValueError(
            f"temperature {t:g} rounds to 0 in steps of 1/{1 << TEMP_FRAC_BITS}; the smallest is "
            f"{1 / (1 << TEMP_FRAC_BITS):.6g} (leave it out for greedy decoding)"
        )
    return q


def check_top_k(k) -> int:
    if not _is_int(k) or not 1 <= k <= TOP_K_MAX:
        raise ValueError(f"top-k must be a whole number from 1 to {TOP_K_MAX}, not {k!r}")
    return int(k)


def check_seed(seed) -> int:
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, not {seed!r}")
    return int(seed)


def pack(temperature_q: int, top_k: int) -> int:
    """The ``sampling`` argument word: ``T_q | K << 16``."""
    return (temperature_q & _M16) | ((top_k & ((1 << TOP_K_BITS) - 1)) << 16)


def unpack(word: int) -> tuple[int, int]:
    """``(T_q, K)`` as the core reads the ``sampling`` word (``K`` out of range -> 64)."""
    word = int(word)
    tq = word & _M16
    k = (word >> 16) & ((1 << TOP_K_BITS) - 1)
    return tq, (k if 1 <= k <= TOP_K_MAX else TOP_K_MAX)


# --------------------------------------------------------------------------------------------
# the random stream


def _rol(x, r: int):
    return ((x << r) | (x >> (16 - r))) & _M16


def _ror(x, r: int):
    return ((x >> r) | (x << (16 - r))) & _M16


def simon_round_keys(key) -> list:
    """Simon32/64's 32 round keys from the key words ``(k0, k1, k2, k3)`` (``k0`` is round 0's;
    ints, or integer arrays for many keys at once)."""
    k = [w & _M16 for w in key]
    for i in range(4, SIMON_ROUNDS):
        tmp = _ror(k[i - 1], 3) ^ k[i - 3]
        tmp ^= _ror(tmp, 1)
        k.append(_SIMON_C ^ int(_SIMON_Z0[(i - 4) % 62]) ^ k[i - 4] ^ tmp)
    return k


def simon_encrypt(x, y, round_keys: list[int]):
    """Simon32/64 encryption of the words ``(x, y)`` (ints or integer arrays, numpy or torch)."""
    for k in round_keys:
        x, y = y ^ ((_rol(x, 1) & _rol(x, 8)) ^ _rol(x, 2)) ^ k, x
    return x, y


def round_keys(seed, pos) -> list:
    """The round keys of the stream of (seed, pos) (ints, or integer arrays)."""
    if isinstance(seed, int | np.integer):
        seed = int(seed) & SEED_MAX
    if isinstance(pos, int | np.integer):
        pos = int(pos)
    return simon_round_keys((seed & _M16, (seed >> 16) & _M16, pos & _M16, 0))


def stream(seed, pos, index):
    """The 32-bit stream word of each row ``index`` at (seed, pos): ints or integer arrays that
    broadcast together (numpy or torch)."""
    x, y = simon_encrypt(index & _M16, index * 0, round_keys(seed, pos))
    return (x << 16) | y


@functools.cache
def gumbel_table() -> np.ndarray:
    """``GUMBEL[u] = round(2**11 * -ln(-ln((u + 1/2) / 4096)))``, int16 [4096] (module docstring).
    No entry is within 1e-6 of a rounding tie, so 50 digits settle every one."""
    ctx = decimal.Context(prec=50)
    n = 1 << GUMBEL_INDEX_BITS
    out = np.empty(n, np.int16)
    scale = decimal.Decimal(1 << GUMBEL_FRAC_BITS)
    for u in range(n):
        p = ctx.divide(decimal.Decimal(2 * u + 1), decimal.Decimal(2 * n))
        g = ctx.multiply(-ctx.ln(ctx.minus(ctx.ln(p))), scale)
        out[u] = int(g.to_integral_value(rounding=decimal.ROUND_HALF_EVEN, context=ctx))
    out.setflags(write=False)
    return out


def gumbel_q(seed: int, pos: int, index) -> np.ndarray:
    """``g_q`` of each row ``index`` (NumPy)."""
    u = stream(seed, pos, np.asarray(index, np.int64)) >> (32 - GUMBEL_INDEX_BITS)
    return gumbel_table()[u].astype(np.int64)


# --------------------------------------------------------------------------------------------
# scores and the choice


def logit_fixed_u(u):
    """``L * 2**24`` of binary16 patterns held as int64 values 0..65535 (numpy or torch)."""
    field = (u >> 10) & 0x1F
    sig = (u & 0x3FF) + (field != 0) * 0x400
    mag = sig << (field + (field == 0) - 1)  # subnormals: exponent 1
    return mag - 2 * (u >> 15) * mag


def logit_fixed(bits) -> np.ndarray:
    """``L * 2**24`` as int64 for binary16 patterns ``bits`` (exponent 31 read as finite)."""
    return logit_fixed_u(np.asarray(bits, np.uint16).astype(np.int64))


def top_k(logits16, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits (:func:`logit_fixed`), best first, the lower index
    first between equal values."""
    v = logit_fixed(np.asarray(logits16, np.uint16))
    order = np.lexsort((np.arange(v.size), -v))
    return order[:k]


def scores(logits16, index: np.ndarray, temperature_q: int, seed: int, pos: int) -> np.ndarray:
    """``S_i`` of the rows ``index`` (int64)."""
    v = logit_fixed(np.asarray(logits16, np.uint16)[index])
    return v + 2 * int(temperature_q) * gumbel_q(seed, pos, index)


def sample(logits16, temperature_q: int, k: int, seed: int, pos: int) -> int:
    """The sampled token of the binary16 logits ``logits16`` [n_vocab] (``temperature_q`` > 0)."""
    if not 0 < temperature_q <= TEMP_Q_MAX:
        raise ValueError(f"temperature_q must be 1..{TEMP_Q_MAX} to sample, not {temperature_q}")
    cand = top_k(logits16, k)
    s = scores(logits16, cand, temperature_q, seed, pos)
    best = s.max()
    return int(cand[s == best].min())


def choose(acc, lam, nonfinite, sampling: Sampling | None, pos: int) -> int:
    """The next token from the LM head's raw accumulators ``acc`` (int64 [n_vocab], LSB
    ``2**lam``) and non-finite row flags: greedy (:func:`tandem.numerics.argmax`) unless
    ``sampling`` has a temperature; then :func:`sample` of the binary16 logits."""
    if sampling is None or sampling.greedy:
        return nm.argmax(acc)
    logits16 = np.where(nonfinite, np.uint16(nm.CANONICAL_NAN), nm.acc_to_fp16(acc, lam))
    return sample(logits16, sampling.temperature_q, sampling.top_k, sampling.seed, pos)


def choose_word(acc, lam, nonfinite, word: int, seed: int, pos: int) -> int:
    """:func:`choose` from the kernel arguments as the core reads them (:func:`unpack`)."""
    tq, k = unpack(word)
    return choose(acc, lam, nonfinite, Sampling(tq, k, int(seed) & SEED_MAX), pos)
