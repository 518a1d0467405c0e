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

import hashlib
import json
import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kit import runs
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.run_numbers import resolve_run_ref

log = logging.getLogger("gpt2kit")

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
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
    from gpt2kit.checkpoints.hf import save_safetensors
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_safetensors(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt", "gpt2kit": "lora"})
    (out / f"{ADAPTER_CONFIG}.tmp").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / f"{ADAPTER_CONFIG}.tmp").replace(out / ADAPTER_CONFIG)
    return out


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_WEIGHTS).is_file() and (p / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> LoraConfig:
    try:
        return LoraConfig.from_dict(json.loads((Path(path) / ADAPTER_CONFIG).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise Gpt2kitError(f"cannot read {Path(path) / ADAPTER_CONFIG}: {e}") from None


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy adapter tensors from `path` into a model that apply_lora() has already wrapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise Gpt2kitError(f"cannot read {Path(path) / ADAPTER_WEIGHTS}: {e}") from None
    from gpt2kit.checkpoints import require_finite
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
    from gpt2kit.runs import checkpoint_dirs, is_run_dir
    if is_run_dir(p):
        for c in [p / "best", p / "final"] + [d for _, d in reversed(checkpoint_dirs(p))]:
            if is_adapter_dir(c):
                return c
        raise Gpt2kitError(f"run {p} has no LoRA adapter (was it trained with --lora-rank?)")
    raise Gpt2kitError(f"{p} holds no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}; pass a LoRA run directory or an "
                       "adapter directory")


# ---- the base an adapter was trained on ---------------------------------------------------------------

def weights_fingerprint(model_dir: str | Path) -> str | None:
    """A cheap content fingerprint of a model directory's weights (HuggingFace, sharded or OpenAI TF files):
    the same wherever the directory is copied, different once training has changed the weights. None when
    the directory holds no weight files of a known kind."""
    from gpt2kit.checkpoints.hf import shard_names, weights_source
    d = Path(model_dir)
    src = weights_source(d) if d.is_dir() else None
    if d.is_file():  # a single-file checkpoint: nanoGPT's ckpt.pt, llm.c's .bin
        files = [d]
    elif src is not None:
        files = [d / n for n in shard_names(src)] if src.name.endswith(".index.json") else [src]
    else:  # OpenAI TF: model.ckpt.index + model.ckpt.data-*
        files = sorted(f for f in d.iterdir() if f.is_file() and (f.suffix == ".index" or ".data-" in f.name))
    if not files or not all(f.is_file() for f in files):  # a missing shard: the loader names it, in its words
        return None
    h = hashlib.sha256(b"gpt2kit-weights-v1\0")
    try:
        for f in files:
            runs.hash_file(h, f)
    except OSError:  # replaced while read: _read_fingerprinted's second look tells
        return None
    return "v1:" + h.hexdigest()[:32]


def _merged_fingerprint(adapter: Path, cfg: LoraConfig, base_fp: str | None) -> str | None:
    """The fingerprint of `adapter` merged onto the base whose fingerprint is `base_fp`."""
    if base_fp is None:
        return None
    h = hashlib.sha256(b"gpt2kit-lora-merged-v1\0")
    h.update(json.dumps([cfg.rank, cfg.alpha, cfg.targets, base_fp]).encode())
    runs.hash_file(h, adapter / ADAPTER_WEIGHTS)
    return "v1:" + h.hexdigest()[:32]


def _read_fingerprinted(fingerprint, load, what: Path):
    """(load(), fingerprint()), the fingerprint taken before and after reading: a directory replaced
    meanwhile (a run writing best/ again) is an error, never a fingerprint of other weights than those read."""
    before = fingerprint()
    out = load()
    if fingerprint() != before:
        raise Gpt2kitError(f"{what} changed while it was read (is a run writing it?); try again")
    return out, before


def _run_tokenizer(adapter: Path) -> Path | None:
    """The vocabulary a run keeps beside its adapters (RUN/best, RUN/checkpoints/step-N), if any."""
    from gpt2kit.runs import is_run_dir
    from gpt2kit.tokenizer import find_vocab_files
    for run in (adapter.parent, adapter.parent.parent):
        if is_run_dir(run) and find_vocab_files(run / "tokenizer") is not None:
            return run / "tokenizer"
    return None


def adapter_named(path: str | Path) -> Path | None:
    """The adapter `path` names when it is no model itself: an adapter directory (RUN/checkpoints/step-N of a
    LoRA run), or a LoRA run with adapter checkpoints only (its newest). None for anything else."""
    from gpt2kit.checkpoints import is_model_dir
    from gpt2kit.runs import adapter_only_checkpoint
    p = Path(str(resolve_run_ref(path))).expanduser()
    return p if is_adapter_dir(p) and not is_model_dir(p) else adapter_only_checkpoint(p)


def open_base(base: str | Path, device: str | torch.device | None = "cpu",
              dtype: str | torch.dtype | None = "float32", tokenizer_dir: str | Path | None = None,
              fingerprint: bool = True, _depth: int = 0, flag: str = "--model"):
    """Load the weights `base` names and say exactly which they were: (GPT, Tokenizer, fingerprint or None,
    the directory read). `base` is anything `--model` takes (a model directory or name, a run: its best/,
    final/ or newest checkpoint), or an adapter directory, which is merged onto its own base (in float32, then
    cast). A LoRA run with adapter checkpoints only gives its newest adapter checkpoint merged the same way,
    and that checkpoint directory is what is returned: see _Run._load_model. `flag` names the option that
    gave `base` in errors (`--base` for merge)."""
    from gpt2kit.checkpoints import load_model, pick_device, pick_dtype, resolve_model_dir
    from gpt2kit.tokenizer import Tokenizer
    adapter = adapter_named(base)
    if adapter is not None:
        if _depth > 8:
            raise Gpt2kitError(f"{adapter}: adapters on adapters more than 8 deep (does one name itself as its "
                               f"base in {ADAPTER_CONFIG}?)")
        model, tok, fp = _load_adapted(adapter, None, device, torch.float32, fingerprint, _depth + 1)
        merge_lora(model)
        model = model.to(dtype=pick_dtype(dtype, pick_device(device))).eval()
        own = Path(tokenizer_dir) if tokenizer_dir else _run_tokenizer(adapter)
        return model, (Tokenizer.from_dir(own) if own else tok), fp, adapter
    d = resolve_model_dir(base, flag=flag, local_hint=None if flag == "--model" else
                          f"pass {flag} a local directory holding config.json and model.safetensors")
    (model, tok), fp = _read_fingerprinted(lambda: weights_fingerprint(d) if fingerprint else None,
                                           lambda: load_model(d, device=device, dtype=dtype,
                                                              tokenizer_dir=tokenizer_dir), d)
    return model, tok, fp, d


def _load_adapted(path: Path, base: str | None, device, dtype, fingerprint: bool, depth: int = 0):
    """(the base with the adapter at `path` applied, its tokenizer, fingerprint of the two merged or None)."""
    cfg = read_adapter_config(path)
    merge = f"`gpt2kit merge {shlex.quote(str(path))} --base MODEL --out DIR`"  # --base is merge's alone
    if not (base or cfg.base_model):
        raise Gpt2kitError(f"{path / ADAPTER_CONFIG} does not name its base model; merge the adapter onto it: "
                           f"{merge}")
    if not base and Path(cfg.base_model).is_absolute() and not Path(cfg.base_model).exists():
        raise Gpt2kitError(f"the base model recorded in {path / ADAPTER_CONFIG}, {cfg.base_model}, is gone; "
                           f"move it back, or merge the adapter onto it where it is now: {merge}")
    recorded = cfg.base_fingerprint
    model, tok, fp, _ = open_base(base or cfg.base_model, device=device, dtype=dtype,
                                  fingerprint=fingerprint or bool(recorded), _depth=depth,
                                  flag="--base" if base else "--model")
    if recorded and fp is not None and fp != recorded:
        if not base:
            raise Gpt2kitError(f"adapter {path} was trained on {cfg.base_model}, whose weights have changed since "
                               f"(fingerprint {fp}, recorded {recorded}; the same weights saved again in another form "
                               f"count as changed too); merge it onto the weights it was trained on, "
                               f"{merge}, or onto these anyway with --base {shlex.quote(cfg.base_model)}")
        log.warning(f"adapter {path} was trained on other weights than {base} (fingerprint {recorded}, these "
                    f"are {fp}); applying it to them as --base asks")
    apply_lora(model, cfg)
    _, merged = _read_fingerprinted(lambda: _merged_fingerprint(path, cfg, fp) if fingerprint else None,
                                    lambda: load_adapter_weights(model, path), path)
    return model, tok, merged


def load_lora_model(adapter: str | Path, base: str | None = None, device: str | torch.device | None = "cpu",
                    dtype: str | torch.dtype | None = "float32"):
    """The base model with the adapter applied (not merged), plus its tokenizer. Without `base`, the recorded
    base model is used, and refused if its weights are no longer those the adapter was trained on (adapters
    from before fingerprints were recorded are not checked); an explicit `base` is used as given."""
    model, tok, _ = _load_adapted(find_adapter(adapter), base, device, dtype, fingerprint=False)
    return model.eval(), tok


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None,
                  dtype: str | None = None) -> Path:
    """What `gpt2kit merge` does: base model + adapter -> a plain HuggingFace-format checkpoint."""
    from gpt2kit.checkpoints import new_model_dir, pick_dtype
    from gpt2kit.checkpoints.hf import write_hf_dir
    dt = pick_dtype(dtype, torch.device("cpu")) if dtype not in (None, "auto") else torch.float32
    find_adapter(adapter)  # a missing adapter is named before --out is created
    if base and base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise Gpt2kitError(f"--base {base} does not exist; pass the base model's directory (or its name)")
    with new_model_dir(out) as stage:  # a new or empty directory: never over a model or a run
        model, tok = load_lora_model(adapter, base)
        sd = {k: v.to(dt) for k, v in merged_state_dict(model).items()}
        write_hf_dir(stage, model.config, sd)
        tok.save(stage)
    return Path(out).expanduser()
