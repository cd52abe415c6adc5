"""Test data more than one test module needs (importable as ``helpers``: pytest puts tests/ on
sys.path)."""

from __future__ import annotations


def thesis_cpu_times(**change) -> dict:
    """CPU times as `tandem bench --thesis --save-times` writes them (made-up values); each
    keyword replaces that key, or removes it when None."""
    data = {
        "model": "gpt2-medium",
        "threads": 1,
        "decode_steps": 2,
        "cpus": 2,
        "loadavg_1_5_15": [[2.0, 2.0, 2.0]],
        "prefill_s": {"64": 1.0, "256": 4.0, "512": 9.0},
        "layer_s": {str(p): [t / 24] * 24 for p, t in ((64, 1.0), (256, 4.0), (512, 9.0))},
        "decode_s": {"64": 0.5, "256": 0.6, "512": 0.7},
    }
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


def byte_level_bpe(texts, vocab: int):
    """A byte-level BPE (the built-in model's kind) trained on ``texts`` by the ``tokenizers``
    library, with ``<|endoftext|>`` as its special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
