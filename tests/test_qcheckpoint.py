"""Quantized checkpoints (issue 17): the GPTQ layout checked against an independent unpacker
written here from the format's definition, v1 and v2 zero points, an AutoGPTQ-style folder
written by hand, every error, and ``tandem quantize`` / ``tandem generate --checkpoint QDIR``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from tandem.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    random_weights,
    save_checkpoint,
    save_quantized,
)
from tandem.config import preset
from tandem.host.cli import main
from tandem.qweights import (
    LM_HEAD,
    QuantizationError,
    QuantizedMatrix,
    from_gptq,
    quantize_weights,
    quantized_keys,
    to_gptq,
)

# ---------------------------------------------------------------------------------------------
# the format, from its definition: 32 / bits values per 32-bit word, value k in bits
# [k * bits, (k + 1) * bits); qweight packs inputs (down a column), qzeros outputs (along a row)


def field(word: int, k: int, bits: int) -> int:
    return (int(word) & 0xFFFFFFFF) >> (k * bits) & ((1 << bits) - 1)


def unpack_qweight(qweight: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    """[n_in, out] integers from qweight [words, out]."""
    per = 32 // bits
    out = np.zeros((n_in, qweight.shape[1]), dtype=np.int64)
    for i in range(n_in):
        for o in range(qweight.shape[1]):
            out[i, o] = field(qweight[i // per, o], i % per, bits)
    return out


def unpack_qzeros(qzeros: np.ndarray, bits: int, n_out: int) -> np.ndarray:
    """[n_groups, n_out] stored zero fields from qzeros [n_groups, words]."""
    per = 32 // bits
    return np.array(
        [
            [field(qzeros[g, o // per], o % per, bits) for o in range(n_out)]
            for g in range(len(qzeros))
        ]
    )


def pack_along(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Independent packer (int32 words) along ``axis`` of a 2-D array, lengths padded."""
    per = 32 // bits
    v = values if axis == 0 else values.T
    n = -(-v.shape[0] // per)
    words = np.zeros((n, v.shape[1]), dtype=np.int64)
    for i in range(v.shape[0]):
        words[i // per] += (v[i].astype(np.int64) & ((1 << bits) - 1)) << (bits * (i % per))
    words = ((words + 2**31) % 2**32 - 2**31).astype(np.int32)
    return words if axis == 0 else words.T.copy()


def random_matrix(rng, rows, cols, bits, group) -> QuantizedMatrix:
    top = 1 << bits
    g = cols if group == -1 else group
    n_groups = -(-cols // g)
    return QuantizedMatrix(
        q=rng.integers(0, top, (rows, cols), dtype=np.uint8),
        scale=np.float16(rng.uniform(1e-3, 0.1, (rows, n_groups))).view(np.uint16),
        zero=rng.integers(1, top, (rows, n_groups), dtype=np.uint8),
        bits=bits,
        group=g,
    )


@pytest.mark.parametrize(
    ("bits", "rows", "cols", "group"),
    [(4, 24, 192, 64), (4, 97, 200, 128), (8, 40, 96, -1), (8, 16, 256, 64)],
)
def test_packing_round_trip_against_an_independent_unpacker(bits, rows, cols, group):
    rng = np.random.default_rng(bits * rows + cols)
    m = random_matrix(rng, rows, cols, bits, group)
    t = to_gptq(m)  # v2
    per = 32 // bits
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (-(-cols // per), rows)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (m.n_groups, -(-rows // per))
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (m.n_groups, rows)
    np.testing.assert_array_equal(t["g_idx"], np.arange(cols) // m.group)
    np.testing.assert_array_equal(unpack_qweight(t["qweight"], bits, cols), m.q.T)
    np.testing.assert_array_equal(unpack_qzeros(t["qzeros"], bits, rows), m.zero.T)
    np.testing.assert_array_equal(t["scales"].view(np.uint16), m.scale.T)
    # and the other way: words packed here read back as the same matrix
    mine = {
        "qweight": pack_along(m.q.T, bits, 0),
        "qzeros": pack_along(m.zero.T, bits, 1),
        "scales": m.scale.T.view(np.float16),
    }
    np.testing.assert_array_equal(mine["qweight"], t["qweight"])
    np.testing.assert_array_equal(mine["qzeros"], t["qzeros"])
    back = from_gptq(mine, bits, group, "gptq_v2", cols=cols)
    for name in ("q", "scale", "zero"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))


def test_v1_stores_zero_minus_one():
    rng = np.random.default_rng(7)
    m = random_matrix(rng, 16, 128, 4, 64)
    v1, v2 = to_gptq(m, "gptq"), to_gptq(m, "gptq_v2")
    np.testing.assert_array_equal(unpack_qzeros(v1["qzeros"], 4, 16), m.zero.T.astype(int) - 1)
    np.testing.assert_array_equal(v1["qweight"], v2["qweight"])
    for fmt, t in (("gptq", v1), ("gptq_v2", v2)):
        np.testing.assert_array_equal(from_gptq(t, 4, 64, fmt).zero, m.zero)
    # read as the wrong version, every zero point is off by one
    np.testing.assert_array_equal(from_gptq(v1, 4, 64, "gptq_v2").zero, m.zero - 1)
    zero0 = QuantizedMatrix(m.q, m.scale, np.zeros_like(m.zero), 4, 64)
    with pytest.raises(QuantizationError, match="zero point of 0 cannot be stored in the v1"):
        to_gptq(zero0, "gptq")
    # a v1 field of all ones (zero - 1 = 15) is zero 16: past the 4-bit range
    bad = dict(v1, qzeros=pack_along(np.full((2, 16), 15), 4, 1))
    with pytest.raises(
        QuantizationError,
        match=r"zero point 16 at \(output, group\) \(0, 0\), past the 4-bit range",
    ):
        from_gptq(bad, 4, 64, "gptq")


# ---------------------------------------------------------------------------------------------
# a folder written by hand the way AutoGPTQ writes GPT-2


def autogptq_folder(
    d,
    cfg,
    weights,
    qw,
    *,
    prefix="transformer.",
    fmt=None,
    bits=4,
    group=64,
    lm_head=True,
    config=None,
    drop=(),
    change=None,
):
    """An AutoGPTQ-style folder: fp16 float tensors, the GPTQ tensors packed by this file's
    packer, ``gptq_model-4bit-64g.safetensors``, quantize_config.json."""
    tensors = {}
    for key, w in weights.items():
        if key in qw and isinstance(qw[key], QuantizedMatrix):
            continue
        tensors[prefix + key] = np.asarray(w, dtype=np.float16)
    for key in quantized_keys(cfg.n_layer, lm_head=lm_head):
        m = qw[key]
        base = "lm_head" if key == LM_HEAD else prefix + key[: -len(".weight")]
        zero = m.zero.astype(int) - (1 if fmt in (None, "gptq") else 0)
        tensors[base + ".qweight"] = pack_along(m.q.T, m.bits, 0)
        tensors[base + ".qzeros"] = pack_along(zero.T, m.bits, 1)
        tensors[base + ".scales"] = m.scale.T.copy().view(np.float16)
        tensors[base + ".g_idx"] = (np.arange(m.cols) // m.group).astype(np.int32)
    for name in drop:
        del tensors[name]
    for name, value in (change or {}).items():
        tensors[name] = value
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(tensors, d / f"gptq_model-{bits}bit-{group}g.safetensors", metadata={"format": "pt"})
    qc = {
        "bits": bits,
        "group_size": group,
        "damp_percent": 0.01,
        "desc_act": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": f"gptq_model-{bits}bit-{group}g",
    }
    if fmt is not None:
        qc["checkpoint_format"] = fmt
    if lm_head:
        qc["lm_head"] = True
    qc.update(config or {})
    (d / "quantize_config.json").write_text(json.dumps(qc))
    return d


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("test-tiny")
    w = random_weights(cfg, seed=11)
    return cfg, w, quantize_weights(w, cfg, bits=4, group=64, sym=True)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], QuantizedMatrix):
            assert isinstance(b[k], QuantizedMatrix), k
            for name in ("q", "scale", "zero"):
                np.testing.assert_array_equal(getattr(a[k], name), getattr(b[k], name), err_msg=k)
            assert (a[k].bits, a[k].group) == (b[k].bits, b[k].group)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
@pytest.mark.parametrize("fmt", [None, "gptq", "gptq_v2"])
def test_a_hand_written_autogptq_folder_loads(tmp_path, tiny, prefix, fmt):
    cfg, w, qw = tiny
    d = autogptq_folder(tmp_path / "q", cfg, w, qw, prefix=prefix, fmt=fmt)
    cfg2, got = load_checkpoint(d)
    assert cfg2.n_layer == cfg.n_layer
    want = {
        k: (v if isinstance(v, QuantizedMatrix) else np.float32(np.float16(v)))
        for k, v in qw.items()
    }
    assert_same(want, got)


def test_save_quantized_round_trip_and_config(tmp_path, tiny):
    cfg, w, qw = tiny
    d = save_quantized(tmp_path / "q", cfg, qw, bits=4, group=64, sym=True, method="rtn")
    assert json.loads((d / "quantize_config.json").read_text()) == {
        "bits": 4,
        "group_size": 64,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq_v2",
        "lm_head": True,
        "method": "rtn",
        "quant_method": "gptq",
    }
    _, got = load_checkpoint(d)
    assert_same(qw, got)  # random weights are float32: written as float32, exact
    from safetensors import safe_open

    with safe_open(d / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert {
        "transformer.h.0.attn.c_attn.qweight",
        "lm_head.qweight",
        "lm_head.g_idx",
        "transformer.wte.weight",
    } <= names
    assert "transformer.h.0.attn.c_attn.weight" not in names
    # per channel, LM head float, v1
    pc = quantize_weights(w, cfg, bits=8, group=-1, lm_head=False, sym=True)
    d = save_quantized(tmp_path / "pc", cfg, pc, bits=8, group=-1, checkpoint_format="gptq")
    _, got = load_checkpoint(d)
    assert LM_HEAD not in got
    assert_same(pc, got)


def error_cases(cfg):
    pre = "transformer.h.0.attn.c_attn"
    return [
        ({"config": {"bits": 3}}, "bits 3: the core maps 4- or 8-bit weights only"),
        (
            {"config": {"group_size": 32}},
            "group_size 32: the core maps groups of whole 64-element blocks",
        ),
        ({"config": {"desc_act": True}}, "desc_act (act-order) is true"),
        ({"config": {"checkpoint_format": "marlin"}}, "checkpoint_format 'marlin'"),
        ({"change": {pre + ".g_idx": np.arange(64, dtype=np.int32) % 2}}, "h.0.attn.c_attn in"),
        ({"drop": [pre + ".scales"]}, "scales missing"),
        ({"drop": [pre + ".qzeros"]}, "qzeros missing"),
        ({"drop": [pre + ".qweight"]}, "without qweight"),
        (
            {"drop": ["lm_head.qweight", "lm_head.qzeros", "lm_head.scales", "lm_head.g_idx"]},
            "says lm_head is quantized, but",
        ),
        (
            {"change": {pre + ".qweight": np.zeros((7, 192), np.int32)}},
            "qweight has shape (7, 192), expected (8, 192)",
        ),
        (
            {"change": {pre + ".scales": np.full((1, 192), np.inf, np.float16)}},
            "scales hold inf at (0, 0): not a finite binary16",
        ),
        (
            {"change": {pre + ".scales": np.zeros((1, 100), np.float16)}},
            "qweight has shape (8, 192), expected (8, 100)",
        ),
        (
            {"change": {"transformer.wte.qweight": np.zeros((8, 256), np.int32)}},
            "wte is not a matrix this model quantizes",
        ),
        (
            {"change": {pre + ".qzeros": np.full((1, 24), -1, np.int32)}},
            "zero point 16 at (output, group) (0, 0), past the 4-bit range",
        ),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_quantized_checkpoints_are_refused_by_name(tmp_path, tiny, case):
    cfg, w, qw = tiny
    kwargs, message = error_cases(cfg)[case]
    d = autogptq_folder(tmp_path / "q", cfg, w, qw, **kwargs)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(d)


def test_act_order_g_idx_message(tmp_path, tiny):
    cfg, w, qw = tiny
    g_idx = np.arange(64, dtype=np.int32) % 1  # all group 0 is trivial for 64 inputs ...
    d = autogptq_folder(
        tmp_path / "ok", cfg, w, qw, change={"transformer.h.0.attn.c_attn.g_idx": g_idx}
    )
    load_checkpoint(d)
    g_idx = np.arange(256, dtype=np.int32)[::-1] // 64  # mlp.c_proj: 256 inputs, scattered
    d = autogptq_folder(
        tmp_path / "bad", cfg, w, qw, change={"transformer.h.1.mlp.c_proj.g_idx": g_idx.copy()}
    )
    with pytest.raises(
        CheckpointError,
        match=r"h\.1\.mlp\.c_proj in .*g_idx is not input // group_size: an act-order",
    ):
        load_checkpoint(d)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_quantize_rtn_builtin_then_generate(tmp_path, capsys):
    out = tmp_path / "w4"
    assert (
        main(["quantize", "--bits", "4", "--group", "64", "--method", "rtn", "--out", str(out)])
        == 0
    )
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: shakespeare W4 groups of 64, RTN, 17 matrices quantized")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "quantize_config.json",
        "tokenizer.json",
    ]
    cfg, float_w = load_weights()
    _, got = load_weights(out)
    assert_same(quantize_weights(float_w, cfg, bits=4, group=64), got)
    # the float reference runs it, and the ISA simulator (every backend and placement:
    # tests/test_quant_isasim.py; the RTL: tests/rtl/test_core_quant.py)
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--backend",
                "reference",
                "--prompt-ids",
                "1,2",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    from tandem.golden.reference import generate_greedy

    want = generate_greedy(got, cfg, [1, 2], 3)
    assert capsys.readouterr().out == ",".join(map(str, [1, 2, *want])) + "\n"


def test_cli_quantize_gptq_tiny_preset(tmp_path, capsys):
    cfg = preset("test-tiny")
    src = save_checkpoint(tmp_path / "float", cfg, random_weights(cfg, seed=4))
    out = tmp_path / "g"
    assert (
        main(
            [
                "quantize",
                "--checkpoint",
                str(src),
                "--bits",
                "8",
                "--method",
                "gptq",
                "--no-lm-head",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert (
        "[quantize] layer 1/2 quantized (GPTQ" in cap.err
        and "[quantize] layer 2/2 quantized" in cap.err
    )
    assert "W8 per channel, GPTQ, 8 matrices quantized (LM head float)" in cap.out
    _, got = load_weights(out)
    assert LM_HEAD not in got and got["h.1.mlp.c_fc.weight"].group == cfg.n_embd


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "4", "--group", "100"], "argument --group: must be a multiple of 64"),
        (["--bits", "3"], "argument --bits: invalid choice"),
        (
            ["--bits", "4", "--method", "rtn", "--calib", "x.txt"],
            "--calib is GPTQ's calibration text",
        ),
        (["--bits", "4", "--calib", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
        (["--bits", "4", "--checkpoint", "/nonexistent"], "does not exist"),
    ],
)
def test_cli_quantize_errors(tmp_path, capsys, argv, message):
    assert main(["quantize", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_quantize_refuses_a_full_folder_and_a_quantized_source(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main(["quantize", "--bits", "4", "--out", str(full)]) == 2
    assert "--out " + str(full) + " is not empty" in capsys.readouterr().err
    q = tmp_path / "q"
    assert main(["quantize", "--bits", "4", "--method", "rtn", "--out", str(q)]) == 0
    assert (
        main(
            [
                "quantize",
                "--checkpoint",
                str(q),
                "--bits",
                "4",
                "--method",
                "rtn",
                "--out",
                str(tmp_path / "qq"),
            ]
        )
        == 2
    )
    assert "is already quantized" in capsys.readouterr().err
