"""GPT-2 byte-level BPE tokenizer, from a checkpoint's files or from an offline default.

Two implementations share one interface (``encode``, ``decode``, ``n_vocab``, ``eot``):

- ``GPT2Tokenizer``: GPT-2's own algorithm, read from ``vocab.json`` and ``merges.txt``, or from
  a Hugging Face ``tokenizer.json`` that describes a byte-level BPE (GPT-2's kind, such as the
  built-in demo model's own vocabulary).
- ``TiktokenTokenizer``: tiktoken with the GPT-2 ranks that ``openai-whisper`` ships as
  ``whisper/assets/gpt2.tiktoken``, because tiktoken itself would download them at run time.

Both give the standard GPT-2 ids. Special tokens in text are encoded as plain text
unless ``allow_special=True``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import regex

from tandem.config import GPT2Config

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257
GPT2_EOT = 50256


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or input it cannot handle, and why."""


class Tokenizer(Protocol):
    n_vocab: int
    eot: int | None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest are shifted to 256 and up, so
    that BPE never sees whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class GPT2Tokenizer:
    """GPT-2 byte-level BPE.

    Parameters
    ----------
    encoder : dict[str, int]
        ``vocab.json``: token string (in the ``bytes_to_unicode`` alphabet) to id.
    merges : list[tuple[str, str]]
        ``merges.txt`` pairs, highest priority first.
    """

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder):
            raise TokenizerError("vocab.json maps two tokens to the same id")
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.n_vocab = max(self.decoder) + 1
        self.eot = self.encoder.get(EOT_TEXT)
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike):
        """Read ``vocab.json`` and ``merges.txt`` as a GPT-2 checkpoint ships them."""
        try:
            encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as err:
            raise TokenizerError(f"cannot read tokenizer files: {err}") from err
        merges = []
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{merges_txt}:{n}: expected two tokens, got {line!r}")
            merges.append((pair[0], pair[1]))
        return cls(encoder, merges)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike):
        """Read a Hugging Face ``tokenizer.json`` of a byte-level BPE: a ``BPE`` model under a
        ``ByteLevel`` pre-tokenizer with GPT-2's regex and no prefix space, no normalizer. Its
        ``vocab`` and ``merges`` are GPT-2's ``vocab.json`` and ``merges.txt``, so the same
        algorithm applies; added tokens join the vocabulary (``<|endoftext|>`` is the special
        one). Anything else (WordPiece, a normalizer, byte fallback, ...) is refused by name."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            model = d["model"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TokenizerError(f"cannot read {path}: {type(err).__name__}: {err}") from err

        def refuse(what: str):
            raise TokenizerError(
                f"{path}: {what}; Tandem reads byte-level BPE tokenizers (GPT-2's kind) only"
            )

        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            refuse(f"the model is {model.get('type') if isinstance(model, dict) else model!r}")
        pre = d.get("pre_tokenizer") or {}
        if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            pre = pre["pretokenizers"][0]
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            refuse(f"the pre-tokenizer is {pre or None!r}, not ByteLevel with GPT-2's regex")
        if pre.get("add_prefix_space", False):
            refuse("the ByteLevel pre-tokenizer adds a prefix space (GPT-2's does not)")
        if d.get("normalizer"):
            refuse(f"it has a normalizer ({d['normalizer'].get('type')})")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                refuse(f"its BPE model sets {key} = {model[key]!r}")
        if model.get("byte_fallback"):
            refuse("its BPE model uses byte fallback")
        try:
            encoder = {str(k): int(v) for k, v in model["vocab"].items()}
            merges = []
            for m in model.get("merges", []):
                pair = m.split(" ") if isinstance(m, str) else list(m)
                if len(pair) != 2:
                    raise ValueError(f"merge {m!r} is not a pair")
                merges.append((pair[0], pair[1]))
            for added in d.get("added_tokens") or []:
                encoder.setdefault(added["content"], int(added["id"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TokenizerError(f"{path}: bad BPE vocabulary or merges: {err}") from err
        tok = cls(encoder, merges)
        missing = sorted(
            {t for pair in tok.bpe_ranks for t in (*pair, "".join(pair))} - set(encoder)
        )
        if missing:
            raise TokenizerError(f"{path}: merges make tokens not in the vocabulary: {missing[:3]}")
        return tok

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-token, lowest-ranked pair first."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = list(itertools.pairwise(parts))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, math.inf))
            if best not in self.bpe_ranks:
                break
            a, b = best
            merged: list[str] = []
            i = 0
            # Merge every occurrence of the pair, left to right, as GPT-2's encoder.py does.
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for token in self._bpe(word):
                try:
                    ids.append(self.encoder[token])
                except KeyError:
                    raise TokenizerError(
                        f"token {token!r} from merges.txt is not in vocab.json"
                    ) from None
        return ids

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special or self.eot is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for n, chunk in enumerate(text.split(EOT_TEXT)):
            if n:
                ids.append(self.eot)
            ids.extend(self._encode_ordinary(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            text = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as err:
            raise TokenizerError(
                f"token id {err.args[0]} is not in the vocabulary (n_vocab {self.n_vocab})"
            ) from None
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """The same interface over a ``tiktoken.Encoding``."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.n_vocab = encoding.n_vocab
        self.eot = encoding.eot_token

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return self.encoding.encode(
            text, allowed_special="all" if allow_special else set(), disallowed_special=()
        )

    def decode(self, ids: Sequence[int]) -> str:
        bad = [int(i) for i in ids if not 0 <= int(i) < self.n_vocab]
        if bad:
            raise TokenizerError(
                f"token id {bad[0]} is not in the vocabulary (n_vocab {self.n_vocab})"
            )
        return self.encoding.decode([int(i) for i in ids])


def gpt2_tiktoken_path() -> Path:
    """Where ``openai-whisper`` keeps ``gpt2.tiktoken``; found without importing whisper."""
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "assets" / "gpt2.tiktoken"
            if path.is_file():
                return path
    raise TokenizerError(
        "the offline GPT-2 vocabulary (whisper/assets/gpt2.tiktoken from openai-whisper) "
        "is not installed: run `bash scripts/setup.sh`, or pass a checkpoint folder "
        "that has vocab.json and merges.txt"
    )


@lru_cache(maxsize=1)
def default_tokenizer() -> TiktokenTokenizer:
    """The standard GPT-2 tokenizer, built offline from whisper's ``gpt2.tiktoken``."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(gpt2_tiktoken_path()))
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_N_VOCAB,
    )
    return TiktokenTokenizer(encoding)


def tokenizer_for(checkpoint_dir: str | os.PathLike | None, cfg: GPT2Config) -> Tokenizer:
    """The text tokenizer for a model.

    A checkpoint folder with ``vocab.json`` and ``merges.txt`` gives BPE from those files; one
    with ``tokenizer.json`` (and not those) gives BPE from it (the built-in demo model's own
    vocabulary); otherwise, a real GPT-2 folder holding weights only, the offline GPT-2 default.
    Models whose vocabulary is smaller than the tokenizer's (the test presets) cannot take text:
    use token ids instead.
    """
    tok: Tokenizer = (
        default_tokenizer() if checkpoint_dir is None else _folder_tokenizer(Path(checkpoint_dir))
    )
    if tok.n_vocab > cfg.n_vocab:
        raise TokenizerError(
            f"model {cfg.name!r} has n_vocab {cfg.n_vocab}, smaller than the tokenizer's "
            f"{tok.n_vocab}, so it cannot take text: give the prompt as token ids "
            f"(--prompt-ids 1,2,3) below {cfg.n_vocab}"
        )
    return tok


@lru_cache(maxsize=8)
def _tokenizer_json(path: Path, mtime_ns: int) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_tokenizer_json(path)


def _folder_tokenizer(d: Path) -> Tokenizer:
    vocab, merges, tj = d / "vocab.json", d / "merges.txt", d / "tokenizer.json"
    if vocab.is_file() and merges.is_file():
        return GPT2Tokenizer.from_files(vocab, merges)
    if tj.is_file():
        return _tokenizer_json(tj.resolve(), tj.stat().st_mtime_ns)
    return default_tokenizer()


def parse_token_ids(text: str) -> list[int]:
    """Parse ``"1,2,3"`` (commas and/or spaces) into a list of ints."""
    parts = [p for p in regex.split(r"[,\s]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise TokenizerError(
            f"token ids must be integers separated by commas, not {text!r}"
        ) from None


def parse_prompt(
    prompt: str | Sequence[int], n_vocab: int, tokenizer: Tokenizer | None = None
) -> list[int]:
    """Turn a prompt into checked token ids.

    A ``str`` is text and needs ``tokenizer``; a sequence of ints is taken as ids.
    Raises TokenizerError if the result is empty or an id is not below ``n_vocab``.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TokenizerError("a text prompt needs a tokenizer; give token ids instead")
        ids = tokenizer.encode(prompt)
    else:
        ids = []
        for i in prompt:
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise TokenizerError(f"token ids must be integers, not {i!r}")
            ids.append(int(i))
    if not ids:
        raise TokenizerError("the prompt is empty: give at least one token")
    bad = [i for i in ids if not 0 <= i < n_vocab]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is out of range: ids must be in [0, {n_vocab})")
    return ids
