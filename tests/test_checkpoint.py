"""Checkpoint loading, saving and validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tandem.checkpoint import (
    CheckpointError,
    embedded_default,
    expected_shapes,
    load_checkpoint,
    load_weights,
    random_weights,
    save_checkpoint,
    validate,
)
from tandem.config import preset


@pytest.fixture(scope="module")
def odd():
    cfg = preset("test-odd")
    return cfg, random_weights(cfg, seed=7)


def _write_bin(directory, cfg, state):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, directory / "pytorch_model.bin")


def test_expected_shapes_count_matches_n_params():
    for name in ("gpt2", "test-odd"):
        cfg = preset(name)
        shapes = expected_shapes(cfg)
        assert len(shapes) == 12 * cfg.n_layer + 4
        assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.n_params()
    assert expected_shapes(preset("test-odd"))["h.2.attn.c_attn.weight"] == (96, 288)


def test_random_weights_are_deterministic_and_exercise_biases(odd):
    cfg, weights = odd
    validate(cfg, weights)
    again = random_weights(cfg, seed=7)
    other = random_weights(cfg, seed=8)
    assert all(np.array_equal(weights[k], again[k]) for k in weights)
    assert not np.array_equal(weights["wte.weight"], other["wte.weight"])
    assert all(w.dtype == np.float32 for w in weights.values())
    assert np.std(weights["h.0.attn.c_attn.bias"]) > 0.01
    assert abs(np.mean(weights["h.1.ln_2.weight"]) - 1) < 0.05
    assert np.std(weights["h.0.mlp.c_proj.weight"]) == pytest.approx(0.02 / np.sqrt(6), rel=0.1)


def test_embedded_default():
    cfg, weights = embedded_default()
    assert cfg == preset("embedded") and cfg.n_vocab == 50257
    validate(cfg, weights)
    cfg2, weights2 = embedded_default()
    assert cfg2 == cfg and np.array_equal(weights2["wte.weight"], weights["wte.weight"])


def test_save_load_round_trip(tmp_path, odd):
    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, weights)
    cfg2, weights2 = load_weights(tmp_path)
    assert cfg2.replace(name=cfg.name) == cfg
    assert list(weights2) == list(expected_shapes(cfg))
    for k, w in weights.items():
        assert weights2[k].dtype == np.float32
        np.testing.assert_array_equal(weights2[k], w, err_msg=k)


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    import transformers

    from tandem.golden.reference import forward

    cfg = preset("test-tiny")
    weights = random_weights(cfg, seed=9)
    save_checkpoint(tmp_path, cfg, weights)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(forward(weights, cfg, ids), theirs, atol=1e-5)


def test_fp16_checkpoint_is_widened(tmp_path, odd):
    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, weights, dtype=np.float16)
    _, loaded = load_checkpoint(tmp_path)
    w = loaded["h.0.mlp.c_fc.weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, weights["h.0.mlp.c_fc.weight"].astype(np.float16))


def test_bf16_safetensors(tmp_path, odd):
    from safetensors.torch import save_file as save_torch

    cfg, weights = odd
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_torch(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()},
        tmp_path / "model.safetensors",
    )
    _, loaded = load_checkpoint(tmp_path)
    want = torch.from_numpy(weights["wpe.weight"]).to(torch.bfloat16).float().numpy()
    assert loaded["wpe.weight"].dtype == np.float32
    np.testing.assert_array_equal(loaded["wpe.weight"], want)


def test_pytorch_bin_with_prefix_tied_head_and_buffers(tmp_path, odd):
    cfg, weights = odd
    state = {"transformer." + k: v for k, v in weights.items()}
    state["lm_head.weight"] = weights["wte.weight"].copy()
    state["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))
    state["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    _write_bin(tmp_path, cfg, state)
    _, loaded = load_checkpoint(tmp_path)
    assert list(loaded) == list(expected_shapes(cfg))
    np.testing.assert_array_equal(loaded["ln_f.bias"], weights["ln_f.bias"])


def test_pytorch_bin_without_prefix(tmp_path, odd):
    # The original gpt2 files on the Hub are GPT2Model state dicts: no prefix, no lm_head.
    cfg, weights = odd
    _write_bin(tmp_path, cfg, weights)
    _, loaded = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded["h.2.ln_1.weight"], weights["h.2.ln_1.weight"])


def test_untied_lm_head_is_rejected(tmp_path, odd):
    cfg, weights = odd
    _write_bin(tmp_path, cfg, {**weights, "lm_head.weight": weights["wte.weight"] + 1})
    with pytest.raises(CheckpointError, match="tied LM head"):
        load_checkpoint(tmp_path)


def test_sharded_safetensors(tmp_path, odd):
    cfg, weights = odd
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    keys = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[:20],
        "model-00002-of-00002.safetensors": keys[20:],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({"transformer." + k: weights[k] for k in part}, tmp_path / name)
        weight_map.update({"transformer." + k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, loaded = load_checkpoint(tmp_path)
    assert all(np.array_equal(loaded[k], weights[k]) for k in weights)


def test_safetensors_preferred_over_bin(tmp_path, odd):
    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, weights)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    load_checkpoint(tmp_path)


def test_missing_folder_and_files(tmp_path, odd):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(tmp_path)
    cfg, _ = odd
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"expected model\.safetensors or pytorch_model\.bin"):
        load_checkpoint(tmp_path)


def test_bad_json_and_bad_weight_file(tmp_path, odd):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json"):
        load_checkpoint(tmp_path)
    cfg, _ = odd
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        load_checkpoint(tmp_path)


def test_wrong_shape_names_key_shapes_and_file(tmp_path, odd):
    cfg, weights = odd
    bad = dict(weights)
    bad["h.1.mlp.c_fc.weight"] = bad["h.1.mlp.c_fc.weight"].T.copy()  # [out, in]: a Linear
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    msg = str(info.value)
    assert "'h.1.mlp.c_fc.weight'" in msg and "(384, 96)" in msg and "(96, 384)" in msg
    assert "model.safetensors" in msg


def test_missing_and_unknown_keys(odd):
    cfg, weights = odd
    with pytest.raises(CheckpointError, match=r"missing weights: h\.0\.ln_1\.bias"):
        validate(cfg, {k: v for k, v in weights.items() if k != "h.0.ln_1.bias"})
    with pytest.raises(CheckpointError, match=r"unexpected weights: h\.3\.ln_1\.bias"):
        validate(cfg, {**weights, "h.3.ln_1.bias": weights["h.0.ln_1.bias"]})
    # A config with fewer layers than the weights is caught the same way.
    with pytest.raises(CheckpointError, match="unexpected weights"):
        validate(cfg.replace(n_layer=2), weights)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architectures"),
        ({"activation_function": "relu"}, "unsupported activation_function 'relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_architecture(tmp_path, odd, change, match):
    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, weights)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_transformers_sharded_checkpoint_loads(tmp_path, hf_gpt2):
    """A checkpoint transformers itself shards (model.safetensors.index.json and its shards)
    loads to the same weights as the single-file save."""
    model, single = hf_gpt2("tiny")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg_a, a = load_checkpoint(tmp_path)
    cfg_b, b = load_checkpoint(single)
    assert cfg_a.replace(name="x") == cfg_b.replace(name="x")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _sharded(tmp_path, cfg, weights):
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    keys = list(weights)
    weight_map = {}
    for n, part in enumerate((keys[:20], keys[20:])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({"transformer." + k: weights[k] for k in part}, tmp_path / name)
        weight_map.update({"transformer." + k: name for k in part})
    return weight_map


@pytest.mark.parametrize(
    "index,match",
    [
        (None, r"names 2 shards, but 1 is not in .*: model-00002-of-00002\.safetensors"),
        ([1, 2], r"bad shard index .*'weight_map'"),
        ({"weights": {}}, r"bad shard index .*'weight_map'"),
        ({"weight_map": {"a": "../x.safetensors"}}, r"bad shard index .*shard names"),
        ({"weight_map": {"a": 3}}, r"bad shard index .*shard names"),
    ],
)
def test_bad_shard_index_is_one_clear_error(tmp_path, odd, index, match):
    cfg, weights = odd
    weight_map = _sharded(tmp_path, cfg, weights)
    if index is None:  # the index names a shard that is not there
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
        index = {"weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("key,at", [("h.1.attn.c_proj.weight", (5, 7)), ("ln_f.weight", (3,))])
def test_nonfinite_weight_is_rejected_by_name(tmp_path, odd, key, at, value):
    cfg, weights = odd
    bad = {k: v.copy() for k, v in weights.items()}
    bad[key][at] = value
    save_checkpoint(tmp_path, cfg, bad)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    msg = str(info.value)
    assert f"'{key}'" in msg and "1 non-finite value" in msg and str(at) in msg
    assert "--allow-nonfinite" in msg
    # loads when explicitly allowed, and the folder is untouched either way
    _, loaded = load_weights(tmp_path, allow_nonfinite=True)
    assert not np.isfinite(loaded[key][at])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_all_nan_ln_f_is_rejected(tmp_path, odd):
    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, {**weights, "ln_f.weight": np.full(cfg.n_embd, np.nan)})
    with pytest.raises(CheckpointError, match=r"'ln_f.weight' .* holds 96 non-finite values"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("n_layer", [100_000_000, 4, 2])
def test_config_layer_count_is_checked_before_allocating(tmp_path, odd, n_layer):
    """An absurd (or merely wrong) n_layer in config.json is one error, found from the file
    headers in well under a second, not a MemoryError after minutes of allocation."""
    import time

    cfg, weights = odd
    save_checkpoint(tmp_path, cfg, weights)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "n_layer": n_layer}))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"n_layer = {n_layer}, but the weights .* 3 layers"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - t0 < 5
