"""GPT-2 weights: Hugging Face checkpoint loading and saving, validation and random weights.

Weights are a plain ``dict[str, np.ndarray]`` of float32 arrays keyed by the Hugging Face
names without the ``transformer.`` prefix. ``c_attn``, ``c_proj`` and ``c_fc`` are
Conv1D layers, so their weights are stored [in, out] and are used as ``x @ w``:
nothing is transposed on load. The LM head is tied to ``wte.weight``.

A quantized checkpoint (a folder with ``quantize_config.json``, or a ``config.json`` whose
``quantization_config`` says ``"quant_method": "gptq"``) holds, per quantized matrix, the GPTQ
tensors ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` (layout in :mod:`tandem.qweights`) in
place of ``.weight``; it loads as Weights whose quantized entries are
:class:`tandem.qweights.QuantizedMatrix` (that module's docstring), with ``lm_head.weight``
when the LM head is quantized (``lm_head.qweight`` ...). :func:`save_quantized` writes one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tandem.config import GPT2Config, preset
from tandem.qweights import LM_HEAD, QUANTIZED_LAYERS, QuantizationError, QuantizedMatrix

Weights = dict[str, np.ndarray]

_PREFIX = "transformer."
# Causal-mask buffers that older transformers versions saved with the weights.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint folder or weight dict that cannot be used, and why."""


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight name of ``cfg`` with its exact shape, in checkpoint order."""
    e, f = cfg.n_embd, cfg.n_inner
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (cfg.n_vocab, e),
        "wpe.weight": (cfg.n_ctx, e),
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (e,),
                p + "ln_1.bias": (e,),
                p + "attn.c_attn.weight": (e, 3 * e),
                p + "attn.c_attn.bias": (3 * e,),
                p + "attn.c_proj.weight": (e, e),
                p + "attn.c_proj.bias": (e,),
                p + "ln_2.weight": (e,),
                p + "ln_2.bias": (e,),
                p + "mlp.c_fc.weight": (e, f),
                p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, e),
                p + "mlp.c_proj.bias": (e,),
            }
        )
    shapes["ln_f.weight"] = (e,)
    shapes["ln_f.bias"] = (e,)
    return shapes


def _is_ignorable(key: str, weights: Weights) -> bool:
    if key.startswith("h.") and key.endswith(_BUFFER_SUFFIXES):
        return True
    if key == LM_HEAD and isinstance(weights[key], QuantizedMatrix):
        return True  # a quantized LM head (its shape is checked in validate)
    # A saved LM head is fine only if it really is tied to the embedding.
    if key == "lm_head.weight" and "wte.weight" in weights:
        a, b = weights[key], weights["wte.weight"]
        return a.shape == b.shape and np.array_equal(a, b)
    return False


def validate(cfg: GPT2Config, weights: Weights, *, source: str | os.PathLike | None = None) -> None:
    """Check that ``weights`` has exactly the keys and shapes ``cfg`` needs.

    Raises CheckpointError naming the key, the expected and the actual shape, and ``source``.
    """
    where = f" in {source}" if source is not None else ""
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing weights{where}: {', '.join(missing[:5])}{more}")
    unknown = [k for k in weights if k not in shapes and not _is_ignorable(k, weights)]
    if unknown:
        hint = ""
        if "lm_head.weight" in unknown:
            hint = " (lm_head.weight differs from wte.weight; Tandem needs a tied LM head)"
        raise CheckpointError(f"unexpected weights{where}: {', '.join(unknown[:5])}{hint}")
    if LM_HEAD in weights and isinstance(weights[LM_HEAD], QuantizedMatrix):
        shapes = {**shapes, LM_HEAD: (cfg.n_vocab, cfg.n_embd)}
    for key, want in shapes.items():
        w = weights[key]
        if isinstance(w, QuantizedMatrix):
            # quantized: [out, in], the transpose of the Conv1D weight; the LM head as wte
            got = w.shape if key == LM_HEAD else w.shape[::-1]
            what = "quantized weight"
            if not (key == LM_HEAD or key.endswith(QUANTIZED_LAYERS)):
                raise CheckpointError(f"weight {key!r}{where} cannot be quantized (a vector)")
        else:
            got, what = tuple(np.shape(w)), "weight"
        if got != want:
            raise CheckpointError(
                f"{what} {key!r}{where} has shape {got}, expected {want} for config {cfg.name!r}"
            )


def _strip_prefix(raw: dict[str, np.ndarray]) -> Weights:
    return {_strip_key(k): v for k, v in raw.items()}


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: _as_f32(v) for k, v in load_file(path).items()}
    except (SafetensorError, TypeError, ValueError) as numpy_err:
        # NumPy has no bfloat16; PyTorch reads it and converts.
        from safetensors.torch import load_file as load_torch

        try:
            import torch

            tensors = load_torch(path)
            return {k: v.to(torch.float32).numpy() for k, v in tensors.items()}
        except Exception as err:
            raise CheckpointError(f"cannot read {path}: {numpy_err}; {err}") from err


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {
        k: v.detach().to(torch.float32).numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _weight_files(d: Path) -> Iterator[Path]:
    """The weight files of a checkpoint folder, preferring safetensors; sharded ones in order.

    A shard index (``*.index.json``) must be a JSON object whose ``weight_map`` maps tensor names
    to file names inside the folder, and every shard it names must exist."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (d / single).is_file():
            yield d / single
            return
        if (d / index).is_file():
            try:
                weight_map = json.loads((d / index).read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(
                    f"bad shard index {d / index}: {type(err).__name__}: {err}; "
                    "it must be JSON with a 'weight_map' of tensor name -> shard file"
                ) from err
            bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
            if bad:
                raise CheckpointError(f"bad shard index {d / index}: shard names {bad[:3]}")
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{d / index} names {len(names)} shards, but {len(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not in {d}: {', '.join(missing[:3])}"
                )
            yield from (d / name for name in names)
            return
    raise CheckpointError(f"no weights in {d}: expected model.safetensors or pytorch_model.bin")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def check_structure(
    cfg: GPT2Config, shapes: dict[str, tuple[int, ...]], *, source: str | os.PathLike | None = None
) -> None:
    """Cheap checks of ``cfg`` against the names and shapes of the tensors a checkpoint holds
    (from file headers), before anything of the size ``cfg`` claims is built or read: first the
    layer count, then every expected weight's presence and shape."""
    where = f" in {source}" if source is not None else ""
    names = {_strip_key(k): shape for k, shape in shapes.items()}
    layers = {int(k.split(".")[1]) for k in names if re.fullmatch(r"h\.\d+\..+", k)}
    # (set(range(n_layer)) would itself be the allocation this check exists to avoid)
    span = (min(layers), max(layers)) if layers else (0, -1)
    if len(layers) != cfg.n_layer or span != (0, cfg.n_layer - 1):
        raise CheckpointError(
            f"config.json says n_layer = {cfg.n_layer}, but the weights{where} hold "
            f"{len(layers)} layer{'s' if len(layers) != 1 else ''}"
            + (f" (numbered up to {max(layers)})" if layers and max(layers) >= len(layers) else "")
        )
    for key, want in expected_shapes(cfg).items():
        if key not in names:
            raise CheckpointError(f"missing weight {key!r}{where}")
        if tuple(names[key]) != want:
            raise CheckpointError(
                f"weight {key!r}{where} has shape {tuple(names[key])}, expected {want} "
                f"for config {cfg.name!r}"
            )


def _strip_key(k: str) -> str:
    return k[len(_PREFIX) :] if k.startswith(_PREFIX) else k


def check_finite(weights: Weights, *, source: str | os.PathLike | None = None) -> None:
    """Raise CheckpointError naming the first tensor that holds a NaN or an infinity."""
    where = f" in {source}" if source is not None else ""
    for key, w in weights.items():
        if isinstance(w, QuantizedMatrix):
            w = w.scales()  # the integers are finite; a scale may not be
        bad = ~np.isfinite(w)
        if bad.any():
            n = int(bad.sum())
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(
                f"weight {key!r}{where} holds {n} non-finite value{'s' if n != 1 else ''} "
                f"(first at {first}: {w[first]}); the checkpoint is corrupt, or pass "
                "--allow-nonfinite to run it anyway"
            )


def load_config(directory: str | os.PathLike) -> GPT2Config:
    """Read and check ``config.json`` of a Hugging Face GPT-2 checkpoint folder."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint folder {d} does not exist or is not a folder")
    path = d / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a checkpoint folder needs config.json") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    try:
        return GPT2Config.from_hf_dict(raw, name=d.resolve().name)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def load_checkpoint(
    directory: str | os.PathLike, *, allow_nonfinite: bool = False
) -> tuple[GPT2Config, Weights]:
    """Load a Hugging Face GPT-2 checkpoint folder as (config, float32 weights).

    Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, or their
    sharded forms with ``*.index.json``). FP16 and BF16 weights become float32; the
    ``transformer.`` prefix of ``GPT2LMHeadModel`` checkpoints is removed; buffers and a tied
    ``lm_head`` are dropped. The config is checked against the safetensors headers before any
    weight is read, and a weight holding a NaN or an infinity is rejected by name unless
    ``allow_nonfinite``.
    """
    d = Path(directory)
    cfg = load_config(d)
    qcfg = load_quantize_config(d)
    if qcfg is not None:
        return cfg, _load_quantized(d, cfg, qcfg, allow_nonfinite)
    files = list(_weight_files(d))
    source = files[0] if len(files) == 1 else d
    if all(p.suffix == ".safetensors" for p in files):
        shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            shapes.update(_safetensors_shapes(path))
        check_structure(cfg, shapes, source=source)
    weights: Weights = {}
    for path in files:
        raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)
        weights.update(_strip_prefix(raw))
    if not all(p.suffix == ".safetensors" for p in files):
        check_structure(cfg, {k: tuple(np.shape(v)) for k, v in weights.items()}, source=source)
    validate(cfg, weights, source=source)
    weights = {k: weights[k] for k in expected_shapes(cfg)}
    if not allow_nonfinite:
        check_finite(weights, source=source)
    return cfg, weights


# --------------------------------------------------------------------------------------------
# quantized checkpoints (the GPTQ layout: tandem.qweights)

QUANTIZE_CONFIG = "quantize_config.json"


def load_quantize_config(directory: str | os.PathLike) -> dict | None:
    """The quantization settings of a checkpoint folder, checked, or None for a float folder:
    ``quantize_config.json`` (AutoGPTQ), else ``config.json``'s ``quantization_config`` when its
    ``quant_method`` is ``gptq``. Returns ``{"bits", "group_size", "checkpoint_format", "sym",
    "lm_head", "method", "source"}``; CheckpointError for what the core cannot map (bits not 4
    or 8, a group size not a multiple of 64 nor -1, act-order) or a format it does not know."""
    d = Path(directory)
    path = d / QUANTIZE_CONFIG
    raw = None
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
    else:
        try:
            hf = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return None  # load_config reports it
        qc = hf.get("quantization_config") if isinstance(hf, dict) else None
        if qc is None:
            return None
        path = d / "config.json"
        if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise CheckpointError(
                f"{path}: quantization_config quant_method {method!r}: only GPTQ checkpoints "
                "(quant_method 'gptq') are read"
            )
        raw = qc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{path}: quant_method {method!r}: only 'gptq' checkpoints are read")
    bits, group = raw.get("bits"), raw.get("group_size")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise CheckpointError(f"{path}: bits {bits!r}: the core maps 4- or 8-bit weights only")
    if (
        isinstance(group, bool)
        or not isinstance(group, int)
        or not (group == -1 or (group > 0 and group % 64 == 0))
    ):
        raise CheckpointError(
            f"{path}: group_size {group!r}: the core maps groups of whole 64-element blocks "
            "(64, 128, ...) or -1 (one group per output channel)"
        )
    if raw.get("desc_act", False):
        raise CheckpointError(
            f"{path}: desc_act (act-order) is true: its groups are scattered over the inputs, and "
            "the core needs contiguous groups; quantize with desc_act false"
        )
    fmt = raw.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"{path}: checkpoint_format {fmt!r}: 'gptq' (v1, zero - 1 stored) and 'gptq_v2' "
            "are read"
        )
    return {
        "bits": bits,
        "group_size": group,
        "checkpoint_format": fmt,
        "sym": bool(raw.get("sym", False)),
        "lm_head": bool(raw.get("lm_head", False)),
        "method": raw.get("method"),
        "source": path,
    }


def _quantized_files(d: Path) -> list[Path]:
    """A quantized folder's safetensors: model.safetensors (or its shards), else the one
    ``*.safetensors`` file AutoGPTQ names after the model (``gptq_model-4bit-128g...``)."""
    if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
        return list(_weight_files(d))
    found = sorted(d.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointError(
            f"no weights in {d}: a quantized checkpoint needs a .safetensors file"
        )
    names = ", ".join(p.name for p in found[:3])
    raise CheckpointError(f"{d} holds {len(found)} .safetensors files ({names}) and no index")


def _read_raw_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors in their own dtypes (integer GPTQ tensors must not pass through float32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _load_quantized(d: Path, cfg: GPT2Config, qcfg: dict, allow_nonfinite: bool) -> Weights:
    from tandem.qweights import GPTQ_TENSORS, from_gptq

    files = _quantized_files(d)
    source = files[0] if len(files) == 1 else d
    raw: dict[str, np.ndarray] = {}
    for path in files:
        raw.update({_strip_key(k): v for k, v in _read_raw_safetensors(path).items()})
    shapes = expected_shapes(cfg)
    parts: dict[str, dict[str, np.ndarray]] = {}
    weights: Weights = {}
    for key, value in raw.items():
        base, _, kind = key.rpartition(".")
        if kind in GPTQ_TENSORS:
            parts.setdefault(base, {})[kind] = value
        elif np.issubdtype(value.dtype, np.floating):
            weights[key] = _as_f32(value)
        else:
            raise CheckpointError(f"tensor {key!r} in {source} is {value.dtype}, not a float")
    for base, tensors in parts.items():
        key = base + ".weight"
        if key != LM_HEAD and (not key.endswith(QUANTIZED_LAYERS) or key not in shapes):
            raise CheckpointError(
                f"quantized tensors {base}.{{{','.join(tensors)}}} in {source}: {base} is not a "
                "matrix this model quantizes (each block's attn.c_attn, attn.c_proj, mlp.c_fc, "
                "mlp.c_proj, and lm_head)"
            )
        if key in weights:
            raise CheckpointError(f"{base} in {source} has both a float weight and GPTQ tensors")
        if "qweight" not in tensors:
            raise CheckpointError(f"{base} in {source}: {', '.join(tensors)} without qweight")
        cols = cfg.n_embd if key == LM_HEAD else shapes[key][0]
        try:
            weights[key] = from_gptq(
                tensors, qcfg["bits"], qcfg["group_size"], qcfg["checkpoint_format"], cols=cols
            )
        except QuantizationError as err:
            raise CheckpointError(f"{base} in {source}: {err}") from None
    if qcfg["lm_head"] and LM_HEAD not in weights:
        raise CheckpointError(
            f"{qcfg['source']} says lm_head is quantized, but {source} has no lm_head.qweight"
        )
    validate(cfg, weights, source=source)
    keep = [*shapes, LM_HEAD] if LM_HEAD in weights else list(shapes)
    weights = {k: weights[k] for k in keep}
    if not allow_nonfinite:
        check_finite(weights, source=source)
    return weights


def save_quantized(
    directory: str | os.PathLike,
    cfg: GPT2Config,
    weights: Weights,
    *,
    bits: int,
    group: int,
    sym: bool = False,
    method: str | None = None,
    checkpoint_format: str = "gptq_v2",
) -> Path:
    """Write a quantized checkpoint: ``config.json``, ``model.safetensors`` (float tensors as
    float16 when every value fits it exactly, else float32; each :class:`QuantizedMatrix` as its
    GPTQ tensors, with the ``transformer.`` prefix, the LM head as ``lm_head.*``) and
    ``quantize_config.json``. Every quantized matrix must have ``bits`` and ``group`` (-1: one
    group per output channel)."""
    from safetensors.numpy import save_file

    from tandem.qweights import to_gptq

    validate(cfg, weights)
    keys = [*expected_shapes(cfg), LM_HEAD] if LM_HEAD in weights else list(expected_shapes(cfg))
    floats = {
        k: np.asarray(weights[k]) for k in keys if not isinstance(weights[k], QuantizedMatrix)
    }
    exact16 = all(
        np.array_equal(v.astype(np.float16).astype(v.dtype), v, equal_nan=True)
        for v in floats.values()
    )
    tensors: dict[str, np.ndarray] = {}
    for key in keys:
        w = weights[key]
        name = key if key == LM_HEAD else _PREFIX + key
        if not isinstance(w, QuantizedMatrix):
            tensors[name] = np.ascontiguousarray(w, dtype=np.float16 if exact16 else np.float32)
            continue
        if w.bits != bits or not (w.group == group or (group == -1 and w.group == w.cols)):
            raise CheckpointError(
                f"{key} is quantized to {w.bits} bits in groups of {w.group}; this checkpoint is "
                f"{bits} bits, group size {group}"
            )
        base = name[: -len(".weight")]
        try:
            packed = to_gptq(w, checkpoint_format)
        except QuantizationError as err:
            raise CheckpointError(f"{key}: {err}") from None
        tensors.update({f"{base}.{kind}": np.ascontiguousarray(v) for kind, v in packed.items()})
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    qcfg = {
        "bits": bits,
        "group_size": group,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "lm_head": LM_HEAD in weights,
        "method": method,
        "quant_method": "gptq",
    }
    (d / QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
    return d


def save_checkpoint(
    directory: str | os.PathLike,
    cfg: GPT2Config,
    weights: Weights,
    *,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` as ``GPT2LMHeadModel.save_pretrained`` does.

    Keys carry the ``transformer.`` prefix and the tied LM head is left out, so
    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads the folder.
    """
    from safetensors.numpy import save_file

    validate(cfg, weights)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    tensors = {
        _PREFIX + k: np.ascontiguousarray(np.asarray(weights[k], dtype=dtype))
        for k in expected_shapes(cfg)
    }
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def random_weights(cfg: GPT2Config, seed: int = 0) -> Weights:
    """Deterministic GPT-2-style random weights (float32).

    Matrices and embeddings are normal with std 0.02, the residual projections
    (``c_proj``) with std 0.02 / sqrt(2 * n_layer), as in GPT-2's init. Unlike that
    init, biases are normal(0, 0.02) and LayerNorm gains 1 + normal(0, 0.1), so that
    tests exercise every bias and gain.
    """
    rng = np.random.default_rng(seed)
    proj_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    weights: Weights = {}
    for key, shape in expected_shapes(cfg).items():
        if ".ln_" in key or key.startswith("ln_f."):
            if key.endswith(".weight"):
                w = 1.0 + rng.normal(0.0, 0.1, shape)
            else:
                w = rng.normal(0.0, 0.02, shape)
        elif key.endswith("c_proj.weight"):
            w = rng.normal(0.0, proj_std, shape)
        else:
            w = rng.normal(0.0, 0.02, shape)
        weights[key] = w.astype(np.float32)
    return weights


def lively_weights(cfg: GPT2Config, seed: int = 1) -> Weights:
    """:func:`random_weights` with the position embedding and the residual projections
    (``c_proj``) ten times stronger, so that greedy decoding moves between many tokens instead of
    repeating one. Tests that must see a KV-cache or position bug decode with these: under plain
    random weights greedy output is one token repeated, whatever the cache holds."""
    w = random_weights(cfg, seed=seed)
    return {
        k: v * 10 if k == "wpe.weight" or k.endswith("c_proj.weight") else v for k, v in w.items()
    }


def embedded_default() -> tuple[GPT2Config, Weights]:
    """Preset ``embedded`` (GPT-2's vocabulary, a tiny body) with ``random_weights(seed=0)``.

    Its weights are random, so its text is gibberish. It was the built-in model before the
    trained one (:func:`builtin_checkpoint`); tests and benchmarks that want GPT-2's vocabulary
    without a checkpoint use it.
    """
    cfg = preset("embedded")
    return cfg, random_weights(cfg, seed=0)


BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "shakespeare"
"""The built-in model's folder, installed as package data: a small GPT-2 trained on
Shakespeare by ``scripts/train_demo.py`` (its README.md says how), with its own
``tokenizer.json``."""


def builtin_checkpoint() -> Path:
    """The built-in model's checkpoint folder (:data:`BUILTIN_DIR`); CheckpointError if the
    installation lacks it."""
    if not (BUILTIN_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the built-in model is missing from this installation ({BUILTIN_DIR}): reinstall "
            "tandem (pip install .), or pass --checkpoint DIR"
        )
    return BUILTIN_DIR


def load_weights(
    spec: str | os.PathLike | None = None, *, allow_nonfinite: bool = False
) -> tuple[GPT2Config, Weights]:
    """``None`` gives the built-in model (:func:`builtin_checkpoint`); a path gives that
    checkpoint folder."""
    path = builtin_checkpoint() if spec is None else spec
    return load_checkpoint(path, allow_nonfinite=allow_nonfinite)
