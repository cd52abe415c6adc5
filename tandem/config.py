"""GPT-2 model shape: one frozen dataclass, the named presets and the config.json mapping."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The only activations whose formula is the tanh approximation our numerics implement.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")

# config.json switches that change the math. Each must hold the value stated here.
_REQUIRED_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model.

    Parameters
    ----------
    n_vocab : int
        Vocabulary size (rows of ``wte``).
    n_ctx : int
        Maximum sequence length (rows of ``wpe``), ``n_positions`` in config.json.
    n_embd : int
        Model width.
    n_head : int
        Attention heads; must divide ``n_embd``.
    n_layer : int
        Transformer blocks.
    layer_norm_epsilon : float
        LayerNorm epsilon.
    name : str
        A label for messages and reports; does not affect the math.
    """

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    layer_norm_epsilon: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{field} must be a positive int, not {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        eps = self.layer_norm_epsilon
        if (
            isinstance(eps, bool)
            or not isinstance(eps, int | float)
            or not (math.isfinite(eps) and eps > 0)
        ):
            raise ValueError(
                f"GPT2Config.layer_norm_epsilon must be a positive finite number, not {eps!r}"
            )
        if not isinstance(self.name, str):
            raise ValueError(f"GPT2Config.name must be a str, not {self.name!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_inner(self) -> int:
        """Width of the MLP hidden layer (GPT-2 fixes it at 4 * n_embd)."""
        return 4 * self.n_embd

    def n_params(self, *, include_lm_head: bool = False) -> int:
        """Parameter count. The LM head is tied to ``wte``: by default it is not counted."""
        e, f = self.n_embd, self.n_inner
        per_layer = (
            2 * e  # ln_1
            + e * 3 * e
            + 3 * e  # attn.c_attn
            + e * e
            + e  # attn.c_proj
            + 2 * e  # ln_2
            + e * f
            + f  # mlp.c_fc
            + f * e
            + e  # mlp.c_proj
        )
        total = self.n_vocab * e + self.n_ctx * e + self.n_layer * per_layer + 2 * e
        if include_lm_head:
            total += self.n_vocab * e
        return total

    def weight_bytes_fp16(self, *, include_lm_head: bool = False) -> int:
        """Bytes of all weights stored as FP16."""
        return 2 * self.n_params(include_lm_head=include_lm_head)

    def replace(self, **changes: Any) -> GPT2Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, name: str | None = None) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json`` dict.

        Raises ValueError for anything that is not plain GPT-2 math: another model type,
        an activation other than tanh-GELU, a non-default MLP width, or one of the
        attention variants (inverse-layer-idx scaling, reordered upcast, cross attention).
        """
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, not {type(d).__name__}")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"unsupported model_type {model_type!r}: Tandem runs GPT-2 only")
        archs = d.get("architectures") or []
        bad = [a for a in archs if a not in _GPT2_ARCHITECTURES]
        if bad:
            raise ValueError(
                f"unsupported architectures {bad!r}: expected one of {list(_GPT2_ARCHITECTURES)}"
            )
        act = d.get("activation_function", "gelu_new")
        if act not in _TANH_GELU:
            raise ValueError(
                f"unsupported activation_function {act!r}: expected one of {list(_TANH_GELU)}"
            )
        for flag, want in _REQUIRED_FLAGS.items():
            got = d.get(flag, want)
            if got is None:
                got = want
            if bool(got) != want:
                raise ValueError(f"unsupported config: {flag}={got!r} (Tandem needs {want!r})")
        missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in d]
        if "n_positions" not in d and "n_ctx" not in d:
            missing.append("n_positions")
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        n_embd = d["n_embd"]
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * n_embd:
            raise ValueError(
                f"unsupported n_inner={n_inner!r}: Tandem needs 4 * n_embd = {4 * n_embd}"
            )
        n_ctx = d.get("n_positions", d.get("n_ctx"))
        return cls(
            n_vocab=d["vocab_size"],
            n_ctx=n_ctx,
            n_embd=n_embd,
            n_head=d["n_head"],
            n_layer=d["n_layer"],
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            name=name if name is not None else str(d.get("_name_or_path") or "checkpoint"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.GPT2LMHeadModel`` loads."""
        d: dict[str, Any] = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **_REQUIRED_FLAGS,
        }
        # The GPT-2 end-of-text id exists only in the full vocabulary.
        if self.n_vocab > 50256:
            d["bos_token_id"] = d["eos_token_id"] = 50256
        return d


def _preset(name: str, n_vocab: int, n_ctx: int, n_embd: int, n_head: int, n_layer: int):
    return GPT2Config(n_vocab, n_ctx, n_embd, n_head, n_layer, name=name)


PRESETS: dict[str, GPT2Config] = {
    c.name: c
    for c in (
        _preset("gpt2", 50257, 1024, 768, 12, 12),
        _preset("gpt2-medium", 50257, 1024, 1024, 16, 24),
        _preset("gpt2-large", 50257, 1024, 1280, 20, 36),
        _preset("gpt2-xl", 50257, 1024, 1600, 25, 48),
        # Small shapes for tests; test-odd has a head count and vocab that are not powers of two.
        _preset("test-tiny", 256, 64, 64, 2, 2),
        _preset("test-odd", 97, 48, 96, 3, 3),
        # Full GPT-2 vocabulary so the real tokenizer works, with a tiny body.
        _preset("embedded", 50257, 128, 64, 2, 2),
    )
}


def preset(name: str) -> GPT2Config:
    """The named preset config; see ``PRESETS``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
