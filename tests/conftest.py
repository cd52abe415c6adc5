"""Shared fixtures: Hugging Face GPT-2 oracles and GPT-2 tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_RTL_DIR = Path(__file__).parent / "rtl"


def pytest_report_header(config):
    from tandem import seeds

    extra = seeds.override()
    if extra is None:
        return f"{seeds.SEED_ENV} unset: randomised tests use the seeds as written"
    return f"{seeds.SEED_ENV}={extra}: randomised tests use seeds derived from it"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/rtl/ is in the ``rtl`` tier (pyproject.toml lists the markers)."""
    for item in items:
        if _RTL_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.rtl)

# Small GPT-2 shapes for the Hugging Face oracle. "odd" has 3 heads of 32 and a prime vocab.
HF_SHAPES = {
    "odd": {"vocab_size": 97, "n_positions": 48, "n_embd": 96, "n_head": 3, "n_layer": 3},
    "tiny": {"vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_head": 2, "n_layer": 2},
}


def _build_hf_model(name: str, directory: Path):
    import torch
    import transformers

    shape = HF_SHAPES[name]
    config = transformers.GPT2Config(
        **shape,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(1234)
    model = transformers.GPT2LMHeadModel(config).eval()
    # HF initialises biases to 0 and LayerNorm to (1, 0). Perturb everything so that the
    # comparison exercises every parameter; a strong position embedding keeps greedy
    # decoding from settling on one repeated token.
    with torch.no_grad():
        for key, p in model.named_parameters():
            scale = 0.3 if key.endswith("wpe.weight") else 0.1
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def lively_checkpoint(tmp_path_factory):
    """``get(preset_name) -> (cfg, weights, folder)``: a checkpoint folder of
    :func:`tandem.checkpoint.lively_weights` (seed 5), saved once per session, for tests that run
    ``tandem generate --checkpoint`` and must see a KV-cache or position bug in the tokens."""
    from tandem.checkpoint import lively_weights, save_checkpoint
    from tandem.config import preset

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cfg = preset(name)
            weights = lively_weights(cfg, seed=5)
            folder = tmp_path_factory.mktemp(f"lively-{name}")
            save_checkpoint(folder, cfg, weights)
            cache[name] = (cfg, weights, folder)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """``get(name) -> (model, checkpoint dir)``; each model is built and saved once per session."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{name}")
            cache[name] = (_build_hf_model(name, directory), directory)
        return cache[name]

    return get


def _gpt2_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover merges.txt from tiktoken ranks.

    Token of rank r (r >= 256) is the merge number r - 256. Its two halves are what BPE
    makes of its bytes using only the tokens ranked below r.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if rank < 256:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            candidates = [
                (ranks[parts[i] + parts[i + 1]], i)
                for i in range(len(parts) - 1)
                if ranks.get(parts[i] + parts[i + 1], rank) < rank
            ]
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with GPT-2's vocab.json and merges.txt, rebuilt from the offline tiktoken ranks."""
    from tiktoken.load import load_tiktoken_bpe

    from tandem.tokenizer import EOT_TEXT, GPT2_EOT, bytes_to_unicode, gpt2_tiktoken_path

    ranks = load_tiktoken_bpe(str(gpt2_tiktoken_path()))
    alphabet = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    vocab[EOT_TEXT] = GPT2_EOT
    merges = [f"{text(a)} {text(b)}" for a, b in _gpt2_merges(ranks)]
    d = tmp_path_factory.mktemp("gpt2-tokenizer")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d
