"""GPT-2 BPE from files against tiktoken and transformers; prompt parsing."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
from helpers import byte_level_bpe

from tandem.config import preset
from tandem.tokenizer import (
    GPT2Tokenizer,
    TokenizerError,
    bytes_to_unicode,
    default_tokenizer,
    gpt2_tiktoken_path,
    parse_prompt,
    parse_token_ids,
    tokenizer_for,
)

TEXTS = [
    "Hello, my name is",
    "",
    " ",
    "  leading spaces\n\nand  tabs\t x  \n",
    "naïve café 東京 🤖 emoji ∑ é",
    "I'll've they're she's we'd you'm DON'T 1234567 3.14 $5,000",
    "def f(x):\n    return x**2  # comment\r\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\u00a0non-breaking\u2003spaces and \x00 control \x7f bytes",
    "GPT-2's byte-level BPE never fails: ????!!!!....",
]


@pytest.fixture(scope="module")
def from_files(gpt2_tokenizer_dir):
    return GPT2Tokenizer.from_files(
        gpt2_tokenizer_dir / "vocab.json", gpt2_tokenizer_dir / "merges.txt"
    )


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


def test_known_ids():
    assert default_tokenizer().encode("Hello, my name is") == [15496, 11, 616, 1438, 318]
    assert default_tokenizer().n_vocab == 50257 and default_tokenizer().eot == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_from_files_equals_tiktoken(from_files, text):
    ids = from_files.encode(text)
    assert ids == default_tokenizer().encode(text)
    assert from_files.decode(ids) == text
    assert default_tokenizer().decode(ids) == text


def test_bpe_from_files_equals_transformers(from_files, gpt2_tokenizer_dir):
    import transformers

    hf = transformers.GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    for text in TEXTS:
        assert from_files.encode(text) == hf.encode(text), text
        assert hf.decode(from_files.encode(text)) == text


def test_random_bytes_round_trip(from_files):
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = rng.integers(0, 256, 40, dtype=np.uint8).tobytes().decode("latin-1")
        ids = from_files.encode(text)
        assert ids == default_tokenizer().encode(text)
        assert from_files.decode(ids) == text


def test_special_token(from_files):
    text = "a<|endoftext|>b"
    for tok in (from_files, default_tokenizer()):
        assert tok.eot == 50256
        assert 50256 not in tok.encode(text)
        assert tok.encode(text, allow_special=True) == [64, 50256, 65]
        assert tok.decode([64, 50256, 65]) == text


def test_decode_rejects_unknown_ids(from_files):
    for tok in (from_files, default_tokenizer()):
        with pytest.raises(TokenizerError, match="token id 50257 is not in the vocabulary"):
            tok.decode([1, 50257])


def test_malformed_merges(tmp_path, gpt2_tokenizer_dir):
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nbad line here\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt:3: expected two tokens"):
        GPT2Tokenizer.from_files(gpt2_tokenizer_dir / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerError, match="cannot read tokenizer files"):
        GPT2Tokenizer.from_files(tmp_path / "missing.json", tmp_path / "merges.txt")


def test_tokenizer_for(gpt2_tokenizer_dir, tmp_path):
    gpt2 = preset("embedded")
    assert isinstance(tokenizer_for(gpt2_tokenizer_dir, gpt2), GPT2Tokenizer)
    assert tokenizer_for(None, gpt2) is default_tokenizer()
    assert tokenizer_for(tmp_path, gpt2) is default_tokenizer()  # no vocab files there
    with pytest.raises(TokenizerError, match=r"n_vocab 256.*token ids \(--prompt-ids"):
        tokenizer_for(None, preset("test-tiny"))


def test_missing_asset_says_run_setup(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match=r"run `bash scripts/setup\.sh`"):
        gpt2_tiktoken_path()


def test_parse_prompt():
    tok = default_tokenizer()
    assert parse_prompt("Hello", 50257, tok) == [15496]
    assert parse_prompt([1, 2, np.int64(3)], 4) == [1, 2, 3]
    assert parse_token_ids(" 1, 2 3,") == [1, 2, 3]
    with pytest.raises(TokenizerError, match="token id 4 is out of range"):
        parse_prompt([1, 4], 4)
    with pytest.raises(TokenizerError, match="empty"):
        parse_prompt([], 4)
    with pytest.raises(TokenizerError, match="empty"):
        parse_prompt("", 50257, tok)
    with pytest.raises(TokenizerError, match="needs a tokenizer"):
        parse_prompt("Hello", 50257)
    with pytest.raises(TokenizerError, match=r"must be integers, not 1\.5"):
        parse_prompt([1.5], 4)
    with pytest.raises(TokenizerError, match="must be integers separated by commas"):
        parse_token_ids("1,x")


# --------------------------------------------------------------------------------------------
# tokenizer.json: a byte-level BPE of its own (the built-in model's kind)


@pytest.fixture(scope="module")
def own_bpe(tmp_path_factory):
    """A 400-token byte-level BPE trained on TEXTS by the ``tokenizers`` library, saved as a
    checkpoint folder's tokenizer.json: (folder, the library's tokenizer)."""
    d = tmp_path_factory.mktemp("own-bpe")
    tok = byte_level_bpe(TEXTS * 20, 400)
    tok.save(str(d / "tokenizer.json"))
    return d, tok


@pytest.mark.parametrize("text", [*TEXTS, "ROMEO:\nBut soft, what light through yonder window"])
def test_tokenizer_json_equals_the_tokenizers_library(own_bpe, text):
    d, lib = own_bpe
    tok = GPT2Tokenizer.from_tokenizer_json(d / "tokenizer.json")
    assert tok.n_vocab == 400 and tok.eot == 0
    ids = tok.encode(text)
    assert ids == lib.encode(text).ids
    assert tok.decode(ids) == text == lib.decode(ids)


def test_tokenizer_json_special_token(own_bpe):
    d, lib = own_bpe
    tok = GPT2Tokenizer.from_tokenizer_json(d / "tokenizer.json")
    assert 0 not in tok.encode("a<|endoftext|>b")
    assert tok.encode("a<|endoftext|>b", allow_special=True) == lib.encode("a<|endoftext|>b").ids


def test_tokenizer_for_prefers_the_folders_own(own_bpe, gpt2_tokenizer_dir, tmp_path):
    import shutil

    d, _ = own_bpe
    cfg = preset("test-tiny").replace(n_vocab=400)
    tok = tokenizer_for(d, cfg)
    assert isinstance(tok, GPT2Tokenizer) and tok.n_vocab == 400
    assert tokenizer_for(d, cfg) is tok  # read once per file version
    # vocab.json and merges.txt (a real GPT-2 folder's files) win over tokenizer.json
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, tmp_path / name)
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    assert tokenizer_for(tmp_path, preset("embedded")).n_vocab == 50257
    # a folder's own vocabulary larger than the model's cannot take text
    with pytest.raises(TokenizerError, match="n_vocab 256, smaller than the tokenizer's 400"):
        tokenizer_for(d, preset("test-tiny"))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda d: d["model"].update(type="WordPiece"), "the model is 'WordPiece'"),
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "not ByteLevel"),
        (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "adds a prefix space"),
        (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer (NFC)"),
        (lambda d: d["model"].update(byte_fallback=True), "byte fallback"),
        (lambda d: d["model"].update(end_of_word_suffix="</w>"), "end_of_word_suffix"),
        (lambda d: d["model"].update(merges=[["a", "b", "c"]]), "is not a pair"),
        (lambda d: d["model"].update(merges=[["q", "Z"]]), "not in the vocabulary"),
        (lambda d: d.pop("model"), "cannot read"),
    ],
)
def test_tokenizer_json_refuses_other_kinds(own_bpe, tmp_path, edit, needle):
    d, _ = own_bpe
    data = json.loads((d / "tokenizer.json").read_text())
    data["model"]["vocab"].pop("qZ", None)
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=re.escape(needle)):
        GPT2Tokenizer.from_tokenizer_json(path)
