"""Request validation: the one place a greedy-generation request is checked.

Every placement and backend goes through :func:`check_request` before any prefill, compilation
or decode: ``Session.generate`` and ``HybridSession.generate`` (the ``fpga`` and ``hybrid``
placements, every device backend), :func:`tandem.host.placement.generate_gpu` and
:func:`~tandem.host.placement.choose` (``gpu`` and ``auto``), and ``tandem generate`` (all four,
and the ``reference`` backend) before it loads or runs anything. So the same bad request gives
the same error whatever the placement.

The checks, in order (the first that fails raises :class:`RequestError`, a ``ValueError`` whose
message is one line for users):

1. the number of new tokens: a whole number, at least ``min_new`` (0 for the library, 1 for the
   CLI, whose ``--max-new-tokens`` is checked by argparse with the same function);
2. the prompt: at least one token, every id a whole number in ``[0, n_vocab)``;
3. the context: ``len(prompt) + n_new - 1 <= n_ctx`` (the last token is never fed back);
4. the time-out: ``None`` (wait until done), or seconds, finite, ``> 0`` and at most
   :data:`MAX_TIMEOUT_S`.

:func:`check_geometry` (the model fits the core geometry: HBM, VBUF, instruction memory) is the
device placements' extra check, made before anything is prepared or compiled.

Messages name what the caller calls things: :data:`API` names the Python parameters
(``n_new``, ``timeout``), :data:`CLI` the command-line flags (``--max-new-tokens``,
``--timeout``, ``--geometry``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.config import GPT2Config
from tandem.geometry import CoreGeometry

MAX_TIMEOUT_S = 1e6
"""The longest time-out accepted (about 11.6 days); leave the time-out out to wait until done.
(Thread and event waits overflow past ``threading.TIMEOUT_MAX``, about 9.2e9 s on Linux.)"""


class RequestError(ValueError):
    """A request that cannot run: the message is one line naming the parameter or flag."""


@dataclass(frozen=True)
class Names:
    """What the caller calls the parts of a request, for messages."""

    n_new: str = "n_new"
    prompt: str = "the prompt"
    timeout: str = "timeout"
    geometry: str = "geometry"


API = Names()
"""Names of the Python API's parameters."""
CLI = Names(n_new="--max-new-tokens", timeout="--timeout", geometry="--geometry")
"""Names of ``tandem generate``'s flags."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int if it is a whole number ``>= minimum``, else RequestError."""
    if not _is_int(value) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise RequestError(f"{name} must be {what}, not {value!r}")
    return int(value)


def check_timeout(timeout, name: str = "timeout") -> float | None:
    """``None``, or ``timeout`` as seconds if finite, ``> 0`` and ``<= MAX_TIMEOUT_S``."""
    if timeout is None:
        return None
    ok = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
    if not ok or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise RequestError(
            f"{name} must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:.0e}, not "
            f"{timeout!r} (leave it out to wait until the decode is done)"
        )
    return float(timeout)


def check_prompt(cfg: GPT2Config, prompt_ids: Sequence[int], names: Names = API) -> list[int]:
    """The prompt as a list of ints: at least one token, every id in ``[0, n_vocab)``."""
    ids = list(prompt_ids)
    if not ids:
        raise RequestError(f"{names.prompt} must have at least one token")
    for t in ids:
        if not _is_int(t):
            raise RequestError(f"token ids must be whole numbers, not {t!r}")
        if not 0 <= t < cfg.n_vocab:
            raise RequestError(
                f"token id {t} is out of range [0, {cfg.n_vocab}) for {cfg.name!r}: ids must be "
                f"below its vocabulary of {cfg.n_vocab}"
            )
    return [int(t) for t in ids]


def check_context(cfg: GPT2Config, n_prompt: int, n_new: int, names: Names = API) -> None:
    """``n_prompt + n_new - 1 <= n_ctx``: the core processes positions ``0 .. n_prompt + n_new
    - 2`` (the last token is never fed back); the torch decode the same."""
    need = max(n_prompt, n_prompt + n_new - 1)
    if need <= cfg.n_ctx:
        return
    if n_prompt > cfg.n_ctx:
        todo = f"shorten {names.prompt} to at most {cfg.n_ctx} tokens"
    else:
        todo = f"ask for at most {cfg.n_ctx - n_prompt + 1} new tokens ({names.n_new})"
    raise RequestError(
        f"a prompt of {_n(n_prompt, 'token')} + {_n(n_new, 'new token')} needs {need} "
        "positions: it exceeds "
        f"the context of {cfg.n_ctx} for {cfg.name!r} (prompt + new tokens - 1 <= {cfg.n_ctx}); "
        f"{todo}"
    )


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def check_request(
    cfg: GPT2Config,
    prompt_ids: Sequence[int],
    n_new: int,
    *,
    timeout: float | None = None,
    names: Names = API,
    min_new: int = 0,
) -> list[int]:
    """Check a greedy request (module docstring: new tokens, prompt, context, time-out, in that
    order) and return the prompt as ints. Raises :class:`RequestError`."""
    n_new = check_count(n_new, names.n_new, min_new)
    ids = check_prompt(cfg, prompt_ids, names)
    check_context(cfg, len(ids), n_new, names)
    check_timeout(timeout, names.timeout)
    return ids


def check_geometry(cfg: GPT2Config, geom: CoreGeometry, names: Names = API) -> None:
    """The model fits the core geometry (``compiler.fits``), else RequestError saying what to
    choose; made before anything is prepared or compiled."""
    from tandem.compiler import fits

    why = fits(cfg, geom)
    if why is not None:
        raise RequestError(
            f"{cfg.name} does not fit the {geom.name} core geometry: {why}; choose a larger "
            f"{names.geometry} (or none, for the smallest that fits)"
        )
