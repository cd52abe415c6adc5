"""GPT2Config: validation, presets and the config.json mapping."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from tandem.config import PRESETS, GPT2Config, preset


def test_presets():
    assert {n: (c.n_vocab, c.n_ctx, c.n_embd, c.n_head, c.n_layer) for n, c in PRESETS.items()} == {
        "gpt2": (50257, 1024, 768, 12, 12),
        "gpt2-medium": (50257, 1024, 1024, 16, 24),
        "gpt2-large": (50257, 1024, 1280, 20, 36),
        "gpt2-xl": (50257, 1024, 1600, 25, 48),
        "test-tiny": (256, 64, 64, 2, 2),
        "test-odd": (97, 48, 96, 3, 3),
        "embedded": (50257, 128, 64, 2, 2),
    }
    assert all(c.name == n and c.layer_norm_epsilon == 1e-5 for n, c in PRESETS.items())
    assert preset("gpt2").head_dim == 64 and preset("test-odd").head_dim == 32
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        preset("gpt3")


def test_param_counts():
    # The published sizes of GPT-2 small and medium, with the LM head tied.
    assert preset("gpt2").n_params() == 124_439_808
    assert preset("gpt2-medium").n_params() == 354_823_168
    medium = preset("gpt2-medium")
    assert medium.weight_bytes_fp16(include_lm_head=True) == 2 * (
        medium.n_params() + medium.n_vocab * medium.n_embd
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be a multiple of n_head \(3\)"),
        ({"n_layer": 0}, "n_layer must be a positive int, not 0"),
        ({"n_vocab": -5}, "n_vocab must be a positive int, not -5"),
        ({"n_ctx": 64.0}, "n_ctx must be a positive int, not 64.0"),
        ({"n_head": True}, "n_head must be a positive int, not True"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be a positive finite"),
        ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be a positive finite"),
    ],
)
def test_validation(kwargs, match):
    base = {"n_vocab": 10, "n_ctx": 8, "n_embd": 12, "n_head": 2, "n_layer": 1}
    with pytest.raises(ValueError, match=match):
        GPT2Config(**{**base, **kwargs})


def test_frozen_and_replace():
    cfg = preset("test-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3
    assert cfg.replace(n_layer=3).n_layer == 3
    with pytest.raises(ValueError):
        cfg.replace(n_head=3)


def test_hf_dict_round_trip_through_transformers():
    cfg = preset("test-odd")
    hf = transformers.GPT2Config(**cfg.to_hf_dict())
    back = GPT2Config.from_hf_dict(hf.to_dict(), name="test-odd")
    assert back == cfg


def test_from_hf_defaults_give_gpt2():
    cfg = GPT2Config.from_hf_dict(transformers.GPT2Config().to_dict(), name="gpt2")
    assert cfg == preset("gpt2")
    # Old configs carry n_ctx instead of n_positions.
    old = {"vocab_size": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    assert GPT2Config.from_hf_dict(old, name="gpt2") == preset("gpt2")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gpt_neo"}, "unsupported model_type 'gpt_neo'"),
        ({"architectures": ["GPT2LMHeadModel", "OPTForCausalLM"]}, "OPTForCausalLM"),
        ({"activation_function": "gelu"}, "unsupported activation_function 'gelu'"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"n_inner": 100}, "unsupported n_inner=100"),
        ({"vocab_size": None}, "n_vocab must be a positive int, not None"),
    ],
)
def test_from_hf_rejects(change, match):
    d = {**preset("test-odd").to_hf_dict(), **change}
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_hf_dict(d)


def test_from_hf_missing_keys():
    with pytest.raises(ValueError, match=r"missing required keys \['n_head', 'n_positions'\]"):
        GPT2Config.from_hf_dict({"vocab_size": 10, "n_embd": 8, "n_layer": 1})
    with pytest.raises(ValueError, match="must be a JSON object"):
        GPT2Config.from_hf_dict([1, 2])
