"""GPT-2 model configuration and the named presets."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import is_hf_dir


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length (block size)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # one rate for embeddings, attention and residuals (HF's three pdrops)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # the MLP's GELU, by HF's activation_function names: "gelu_new" is GPT-2's tanh approximation, "gelu" the
    # exact erf form that nanoGPT's nn.GELU() computes
    activation: str = "gelu_new"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            v = getattr(self, name)
            if not (v is None and name == "n_inner") and not (_is_int(v) and v > 0):
                raise Gpt2kitError(f"{name} must be a positive integer, not {v!r}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 0):
                raise Gpt2kitError(f"{name} must be a token id (an integer >= 0), not {v!r}")
        for name in ("layer_norm_epsilon", "dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
                raise Gpt2kitError(f"{name} must be a number in [0, 1), not {v!r}")
        if self.activation not in ACTIVATIONS:
            raise Gpt2kitError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_embd % self.n_head != 0:
            raise Gpt2kitError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise Gpt2kitError(f"unknown config name {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_embeddings: bool = True) -> int:
        d, L, f = self.n_embd, self.n_layer, self.n_inner
        per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        n = L * per_block + 2 * d
        if include_embeddings:
            n += self.vocab_size * d + self.n_positions * d
        return n

    # HuggingFace config.json <-> GPTConfig
    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": self.activation,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None if self.n_inner == 4 * self.n_embd else self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attn_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "resid_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json",
                     fix: str = "fix the file or re-download the model") -> GPTConfig:
        """`source` names the file in error messages, `fix` says what to do about a bad one. Other keys are
        ignored (HF config.json files hold many), but a near miss of a
        setting's name ('n_position') is an error rather than a setting silently left at its default."""
        if not isinstance(d, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(d), "a number")
            raise Gpt2kitError(f"{source} holds {kind}, not a JSON object of settings: it is not a model "
                               f"config; {fix}")
        if d.get("model_type", "gpt2") != "gpt2":  # first: another architecture's names are no typos of ours
            raise Gpt2kitError(f"{source} describes a {d.get('model_type')!r} model, not GPT-2")
        for key in d:
            near = difflib.get_close_matches(str(key), _SETTING_NAMES, n=1, cutoff=0.85)
            if near and key not in _KNOWN_KEYS:
                raise Gpt2kitError(f"{source}: unknown key {key!r} (did you mean {near[0]!r}?)")
        act = d.get("activation_function", "gelu_new")
        if act not in _HF_ACTIVATIONS:
            raise Gpt2kitError(f"{source}: unsupported activation_function {act!r} (GPT-2 uses gelu_new; "
                               "nanoGPT's exact GELU is gelu)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if d.get(flag):
                raise Gpt2kitError(f"{source} sets {flag}, which gpt2kit does not support")
        try:
            return cls(
                vocab_size=d.get("vocab_size", 50257),
                n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
                n_embd=d.get("n_embd", 768),
                n_layer=d.get("n_layer", 12),
                n_head=d.get("n_head", 12),
                n_inner=d.get("n_inner"),
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                bos_token_id=d.get("bos_token_id") if d.get("bos_token_id") is not None else 50256,
                eos_token_id=d.get("eos_token_id") if d.get("eos_token_id") is not None else 50256,
                activation=_HF_ACTIVATIONS[act],
            )
        except Gpt2kitError as e:
            raise Gpt2kitError(f"{source}: {e}; {fix}") from None

    @classmethod
    def from_openai_hparams(cls, d: dict[str, Any]) -> GPTConfig:
        return cls(
            vocab_size=d["n_vocab"], n_positions=d["n_ctx"], n_embd=d["n_embd"],
            n_layer=d["n_layer"], n_head=d["n_head"],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Gpt2kitError(f"cannot read model config {path}: {e}") from None
        in_model = Path(path).name == "config.json" and is_hf_dir(Path(path).parent)  # else a file of the user's
        return cls.from_hf_dict(d, source=str(path),
                                fix="fix the file or re-download the model" if in_model else "fix the file")


ACTIVATIONS = ("gelu_new", "gelu")
# HF's activation_function values that are one of ours (gelu_pytorch_tanh computes gelu_new's formula)
_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),  # for tests and smoke runs
}

# The keys of a config.json that gpt2kit reads, and those it writes: a near miss of one of the first that is
# neither is taken for a typo. (No key of HF's GPT2Config is such a near miss: tests/test_checkpoints.py.)
_SETTING_NAMES = sorted({f.name for f in fields(GPTConfig)} - {"dropout", "activation"}
                        | {"n_ctx", "activation_function"})  # what from_hf_dict reads
_KNOWN_KEYS = set(_SETTING_NAMES) | set(GPTConfig().to_hf_dict())

# OpenAI's original release names map onto the HF names.
OPENAI_NAMES = {"117M": "gpt2", "124M": "gpt2", "345M": "gpt2-medium", "355M": "gpt2-medium",
                "774M": "gpt2-large", "1558M": "gpt2-xl"}
