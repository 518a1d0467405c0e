"""Low-rank adapters (LoRA, Hu et al. 2021): y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank.

Only A (rank, in) and B (out, rank) train; B starts at zero so training starts from the base model
exactly. A LoRALinear *is* an nn.Linear that keeps the base weight and bias under their own names, so the
base model's parameter names (and checkpoints) are unchanged; the adapters add `<module>.lora_A` and
`<module>.lora_B`. On disk an adapter is two small files:

    adapter.safetensors    the A and B tensors, keyed "<module>.lora_A" / "<module>.lora_B"
    adapter_config.json    rank, alpha, dropout, target modules, the base model it was trained on and a
                           fingerprint of that base model's weights

`merge` folds them into the base weights (W + alpha/rank * B A) and writes a plain checkpoint. Loading an
adapter onto its recorded base checks the fingerprint first: a base that has changed since (a run that
trained on, a directory replaced) is refused rather than silently given an adapter trained on other weights."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, checkpoint_dirs, is_adapter_dir, is_run_dir
from gpt2kit.model import GPT
from gpt2kit.weights_io import require_finite, save_safetensors

log = logging.getLogger("gpt2kit")

FORMAT_VERSION = 1  # adapter_config.json's "version": raise it when the meaning of the files changes
# the four projections of every block; a target matches modules whose name ends with it
ALL_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TARGET_ALIASES = {"all": ALL_TARGETS, "attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"),
                  "c_proj": ("attn.c_proj", "mlp.c_proj")}


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float | None = None  # None means 2 * rank (a scale of 2)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    base_model: str | None = None  # where the base weights come from (recorded for `merge`)
    base_fingerprint: str | None = None  # weights_fingerprint() of those weights (None in older adapters)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise Gpt2kitError(f"LoRA rank (--lora-rank) must be >= 1, got {self.rank}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not self.alpha > 0:
            raise Gpt2kitError(f"LoRA alpha (--lora-alpha) must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise Gpt2kitError(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        self.targets = expand_targets(self.targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"format": "gpt2kit-lora", "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        version = d.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            # a newer layout may mean something these fields do not say (other scaling, other targets)
            raise ValueError(f"it is adapter format version {version!r}, and this gpt2kit reads version "
                             f"{FORMAT_VERSION} (and older): upgrade gpt2kit to use this adapter")
        if d.get("format", "gpt2kit-lora") != "gpt2kit-lora":
            raise ValueError(f"its format is {d['format']!r}, not a gpt2kit LoRA adapter (\"gpt2kit-lora\")")
        return cls(rank=int(d["rank"]), alpha=d.get("alpha"), dropout=float(d.get("dropout", 0.0)),
                   targets=list(d.get("targets") or ALL_TARGETS), base_model=d.get("base_model"),
                   base_fingerprint=d.get("base_fingerprint"))


def expand_targets(targets: Sequence[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        for name in TARGET_ALIASES.get(t, (t,)):
            name = {"c_attn": "attn.c_attn", "c_fc": "mlp.c_fc"}.get(name, name)
            if name not in ALL_TARGETS:
                raise Gpt2kitError(f"unknown LoRA target {t!r}; choose from {', '.join(ALL_TARGETS)}, "
                                   "c_attn, c_fc, c_proj, attn, mlp or all")
            if name not in out:
                out.append(name)
    if not out:
        raise Gpt2kitError("no LoRA target modules given")
    return out


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, scale: float, dropout: float) -> LoRALinear:
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, scale, dropout, bias=linear.bias is not None,
                  device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # share, don't copy, the base parameters
        new.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(new.lora_A, a=math.sqrt(5))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        # (.., in) -> (.., rank) -> (.., out): two thin matmuls, never the full (out, in) delta
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, scale={self.scale:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: GPT, cfg: LoraConfig) -> list[str]:
    """Wrap the target projections of every block in place and freeze everything except the adapters.
    Returns the wrapped module names. The random A matrices come from torch's global generator."""
    if lora_modules(model):
        raise Gpt2kitError("this model already has LoRA adapters")
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.endswith(tuple(cfg.targets)) and ".h." in f".{full}":
                if cfg.rank > min(child.in_features, child.out_features):
                    raise Gpt2kitError(f"LoRA rank {cfg.rank} exceeds the smaller side of {full} "
                                       f"({child.out_features} x {child.in_features}); use a rank of at most "
                                       f"{min(child.in_features, child.out_features)}")
                setattr(module, child_name, LoRALinear.wrap(child, cfg.rank, cfg.scale, cfg.dropout))
                wrapped.append(full)
    if not wrapped:
        raise Gpt2kitError(f"no module of this model matches the LoRA targets {', '.join(cfg.targets)}")
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith((".lora_A", ".lora_B")))
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain GPT state dict with every adapter folded into its base weight (the model is untouched)."""
    mods = lora_modules(model)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        owner = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and owner in mods:
            m = mods[owner]
            v = (v.float() + m.delta_weight().detach().float()).to(v.dtype)
        sd[k] = v
    return sd


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold the adapters into the base weights and put plain nn.Linear modules back, in place."""
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter((m.weight.float() + m.delta_weight().float()).to(m.weight.dtype))
        plain.bias = m.bias
        setattr(parent, child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: nn.Module, cfg: LoraConfig, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt", "gpt2kit": "lora"})
    (out / f"{ADAPTER_CONFIG}.tmp").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / f"{ADAPTER_CONFIG}.tmp").replace(out / ADAPTER_CONFIG)
    return out


def read_adapter_config(path: str | Path) -> LoraConfig:
    try:
        return LoraConfig.from_dict(json.loads((Path(path) / ADAPTER_CONFIG).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise Gpt2kitError(f"cannot read {Path(path) / ADAPTER_CONFIG}: {e}") from None


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy adapter tensors from `path` into a model that apply_lora() has already wrapped."""
    try:
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise Gpt2kitError(f"cannot read {Path(path) / ADAPTER_WEIGHTS}: {e}") from None
    require_finite(tensors, Path(path) / ADAPTER_WEIGHTS)
    mods = lora_modules(model)
    expected = {f"{n}.{ab}" for n in mods for ab in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise Gpt2kitError(f"adapter {path} does not fit this model ({missing[0]}); was it trained on "
                           "another base model or with other target modules?")
    with torch.no_grad():
        for k, v in tensors.items():
            owner, _, ab = k.rpartition(".")
            p = getattr(mods[owner], ab)
            if p.shape != v.shape:
                raise Gpt2kitError(f"adapter tensor {k} has shape {tuple(v.shape)}, the model needs "
                                   f"{tuple(p.shape)}; the adapter belongs to another base model")
            p.copy_(v)


def find_adapter(path: str | Path) -> Path:
    """An adapter directory itself, or a LoRA run's best, final or newest checkpoint adapter."""
    p = Path(path)
    if is_adapter_dir(p):
        return p
    if not p.exists():
        raise Gpt2kitError(f"{p} does not exist; pass a LoRA run directory or an adapter directory")
    if is_run_dir(p):
        for c in [p / "best", p / "final"] + [d for _, d in reversed(checkpoint_dirs(p))]:
            if is_adapter_dir(c):
                return c
        raise Gpt2kitError(f"run {p} has no LoRA adapter (was it trained with --lora-rank?)")
    raise Gpt2kitError(f"{p} holds no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}; pass a LoRA run directory or an "
                       "adapter directory")


# Loading an adapter onto its base model is resolving `--model`, which gpt2kit.checkpoints owns; these names
# are kept here for callers of the library (nothing in gpt2kit imports them from here).
