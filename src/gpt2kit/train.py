"""Fine-tuning (and training from scratch): the loop, checkpoints, resume and data-parallel training.

`finetune(TrainConfig(...)) -> RunResult` is the whole feature; `gpt2kit finetune` is a thin wrapper.

Determinism, which exact resume rests on: the batch of micro-step j is a pure function of (seed, j)
(data.Batcher), the dropout generator is re-seeded from (seed, step, rank) before every optimizer step,
evaluation and sampling use no global random state, and a checkpoint holds the weights, optimizer,
loss scaler, step and best-validation bookkeeping. So a run killed at any moment (even with SIGKILL) and
resumed from its last checkpoint recomputes the lost steps bit for bit and ends with the same model.

Data parallelism: under `torchrun`, rank r of W takes micro-batches j*W + r (see data.Batcher), and
gradients are averaged across ranks, so W processes with batch B and accumulation A compute the same
update as one process with batch B and accumulation A*W."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from dataclasses import field as _field  # TrainConfig has a data option named `field`
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gpt2kit import kernels, memory, runs
from gpt2kit.data import DataSpec, cache_identity, check_inputs, plural
from gpt2kit.errors import Gpt2kitError
from gpt2kit.fused_loss import lm_head_cross_entropy, padded_size
from gpt2kit.model import GPT
from gpt2kit.progress import progress_bar, safe_stderr
from gpt2kit.run_numbers import new_run_dir, resolve_run_ref
from gpt2kit.tokenizer import Tokenizer, find_vocab_files

log = logging.getLogger("gpt2kit")

SCHEDULES = ("cosine", "linear", "constant")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
TRAINER_STATE = "trainer.pt"
TRAINER_STATE_VERSION = 1
DEFAULT_PROMPTS = ("<|endoftext|>",)  # unconditional: shows what the model writes on its own


def _resume_hint(run_dir: str | Path, world: int = 1) -> str:
    """How to continue a run, for callers of the command line and of the Python API alike; a run of several
    processes resumes with as many."""
    if world > 1:
        return f"`torchrun --nproc_per_node {world} -m gpt2kit finetune --resume {shlex.quote(str(run_dir))}`"
    return f"`gpt2kit finetune --resume {shlex.quote(str(run_dir))}` (Python: resume({str(run_dir)!r}))"


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved, with every automatic value resolved, as RUN/config.json;
    `--resume RUN` restarts from that file alone."""
    # where the model comes from
    model: str | None = None  # model name, model directory or run directory to start from
    init: str = "pretrained"  # "pretrained": start from --model; "scratch": random weights
    config: str | None = None  # scratch: a preset name (gpt2, gpt2-medium, ..., tiny) or a config.json
    tokenizer: str | None = None  # directory with vocab.json + merges.txt (default: the model's)
    # data (see gpt2kit.data)
    data: list[str] = _field(default_factory=list)
    val_data: list[str] = _field(default_factory=list)
    val_fraction: float | None = None  # None: hold out 5% when no val_data is given
    column: str | None = None
    field: str | None = None
    encoding: str = "utf-8"
    line_by_line: bool = False
    skip_bad_rows: bool = False  # .csv/.tsv rows with the wrong number of fields: skipped with a warning, not an error
    # output
    out: str = "runs/finetune"
    # length of training
    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float | None = None  # passes over the training data (default 1 when steps is not given)
    # batch: global batch = batch_size * grad_accum * processes sequences of block_size tokens
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int | None = None  # default: the model's context (at most 1024)
    # optimizer and schedule
    lr: float | None = None  # default 1e-4 (full fine-tuning), 1e-3 (LoRA), 6e-4 (from scratch)
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    schedule: str = "cosine"
    warmup_steps: int | None = None  # default: 5% of the steps, at most 100
    weight_decay: float = 0.01  # on matrices and embeddings; never on biases and layer norms
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # numerics and memory
    dtype: str = "auto"  # float32 | bfloat16 | float16 (autocast; float16 with loss scaling) | auto
    device: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    dropout: float = 0.0
    freeze: list[str] = _field(default_factory=list)
    seed: int = 0
    # LoRA
    lora_rank: int = 0  # > 0 trains low-rank adapters only
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    lora_targets: list[str] = _field(default_factory=lambda: ["all"])
    # evaluation, samples, checkpoints
    # (defaults for these four: default_cadence, a small share of the training whatever its length)
    eval_every: int | None = None  # steps; default: 10 times per run, less often in runs under 200 steps (0: never)
    eval_batches: int | None = None  # validation batches per evaluation; default: ~32K tokens, at most 50
    # (line_by_line: every validation document while they hold fewer than ~32K target tokens)
    early_stop: int = 0  # stop after this many evaluations without a new best (0: never)
    sample_every: int | None = None  # steps; default: with every second evaluation (0: never)
    sample_tokens: int = 64
    prompts: list[str] = _field(default_factory=list)
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    save_every: int | None = None  # steps; default: with every evaluation, at most every 1000 steps
    keep: int = 2  # checkpoints kept besides best/ and final/
    tensorboard: bool | None = None  # None: log to RUN/tensorboard when tensorboard is installed
    # sharing: Weights & Biases (gpt2kit.tracking), a push to the Hub at the end (gpt2kit.push)
    wandb: bool = False
    wandb_project: str | None = None  # default "gpt2kit"
    wandb_run_name: str | None = None  # default: the run directory's name
    push_to_hub: str | None = None  # ORG/NAME
    push_private: bool = False

    def __post_init__(self) -> None:
        # paths as str, so that config.json stays JSON; a single data path is a list of one
        for name in ("model", "config", "tokenizer", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if isinstance(v, (str, os.PathLike)):
                v = [v]
            if isinstance(v, (list, tuple)):
                setattr(self, name, [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v])

    def data_spec(self) -> DataSpec:
        """How the text inputs are read: --column, --field, --encoding, --line-by-line, --skip-bad-rows."""
        return DataSpec(column=self.column, field=self.field, encoding=self.encoding, line_by_line=self.line_by_line,
                        skip_bad_rows=self.skip_bad_rows)

    def validate(self) -> TrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise Gpt2kitError(msg)
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # (the CLI's parser already typed them; this is for the Python API)
            value = getattr(self, f.name)
            need(_has_type(value, hints[f.name]), f"TrainConfig.{f.name} must be {_type_name(hints[f.name])}, not "
                 f"{value!r}")
            need(not isinstance(value, float) or math.isfinite(value) or f.name == "epochs",
                 f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        # (--init, --schedule and --dtype are choices the CLI's parser checks: these messages reach API callers only)
        need(self.init in ("pretrained", "scratch"),
             f"TrainConfig.init must be pretrained or scratch, not {self.init!r}")
        if self.init == "pretrained":
            need(bool(self.model), "no model to fine-tune: pass --model NAME_OR_DIR (e.g. gpt2), or "
                 "--init scratch --config NAME to train from random weights")
        else:
            need(bool(self.config or self.model), "--init scratch needs --config NAME (gpt2, gpt2-medium, "
                 "gpt2-large, gpt2-xl, distilgpt2, tiny) or a --model whose architecture to copy")
        need(bool(self.data), "no training data: pass --data FILE (text, .csv, .jsonl, a folder, a glob or a "
             ".tokens cache)")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.epochs is None or 0 < self.epochs < math.inf, f"--epochs must be a number > 0, got {self.epochs}")
        need(0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        need(self.block_size is None or self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}")
        need(self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, f"TrainConfig.schedule must be one of {', '.join(SCHEDULES)}, not "
             f"{self.schedule!r}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must be in [0, 1)")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        need(self.eps > 0, f"Adam's eps must be > 0, got {self.eps}")
        need(self.dtype in DTYPE_NAMES, f"TrainConfig.dtype must be one of {', '.join(DTYPE_NAMES)}, not "
             f"{self.dtype!r}")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.val_fraction is None or 0.0 <= self.val_fraction < 1.0,
             f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0, got {self.lora_rank}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        need(not (self.lora_rank and self.init == "scratch"),
             "LoRA adapts a pretrained model; with --init scratch train all weights (drop --lora-rank)")
        need(not (self.lora_rank and self.freeze), "--freeze and --lora-rank don't mix: LoRA already "
             "freezes every base weight")
        need(bool(self.lora_rank) or (self.lora_alpha is None and self.lora_dropout == 0.05
                                      and self.lora_targets == ["all"]),
             "--lora-alpha, --lora-dropout and --lora-targets shape LoRA adapters: add --lora-rank R (e.g. 8)")
        need(not (self.config and self.init == "pretrained"), f"--config {self.config} sets the architecture of "
             "a model trained from scratch; add --init scratch, or drop --config to fine-tune --model as it is")
        need(all(self.prompts), "a sample --prompt is empty; give it some text")
        for name in ("eval_every", "sample_every", "save_every"):
            v = getattr(self, name)
            need(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
        need(self.eval_batches is None or self.eval_batches >= 1, "--eval-batches must be >= 1")
        need(self.early_stop >= 0, "--early-stop must be >= 0")
        need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        need(self.sample_tokens >= 1, "--sample-tokens must be >= 1")
        need(bool(self.push_to_hub) or not self.push_private, "--push-private makes the --push-to-hub repository "
             "private: add --push-to-hub ORG/NAME")
        need(self.wandb or (self.wandb_project is None and self.wandb_run_name is None),
             "--wandb-project and --wandb-run-name name the Weights & Biases run: add --wandb")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise Gpt2kitError(f"unknown training option {unknown[0]!r} in the run's config.json")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not _has_type(value, hints[key]):
                raise Gpt2kitError(f"{key!r} in the run's config.json is {value!r}, which is not "
                                   f"{_type_name(hints[key])}; correct it (or delete the line to use the default)")
        return cls(**d)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _has_type(value: Any, hint: Any) -> bool:
    """A JSON value against a TrainConfig annotation (int | None, float, list[str], ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | interrupted
    step: int
    total_steps: int
    last_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    model_dir: Path | None  # best/ if validation chose one, else final/ (or the newest checkpoint)
    tokens_per_sec: float
    stopped_early: bool = False
    pushed: str | None = None  # the Hub repository's URL after --push-to-hub
    push_error: str | None = None  # why --push-to-hub failed (the run itself finished)


# ---------------------------------------------------------------------------------------------------
# numerics


def _native_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matrix products in hardware (AVX512-BF16/AMX, AVX512-FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


_ROUNDED_OPS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
                torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}


class EmulatedAutocast(TorchFunctionMode):
    """Autocast's numerics on CPUs without bfloat16/float16 arithmetic, at float32 speed.

    Autocast rounds the inputs of every matrix product (and attention) to the low-precision type,
    multiplies with float32 accumulation and rounds the result. Without AVX512-BF16/AMX, PyTorch runs
    those products on a slow fallback (20-60x slower than float32 on the benchmark machine). A product of
    two bfloat16 numbers is exact in float32, so rounding the inputs, multiplying in float32 and rounding
    the output gives the same values up to summation order. Gradients get the same roundings through the
    autograd of the casts. Active around forward and backward (so gradient-checkpoint recomputation is
    rounded too)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _r(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            return t.to(self.dtype).to(torch.float32)
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ROUNDED_OPS:
            return self._r(func(*[self._r(a) for a in args], **{k: self._r(v) for k, v in kwargs.items()}))
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            return self._r(func(self._r(q), self._r(k), self._r(v), *rest, **kwargs))
        return func(*args, **kwargs)


def _rounded(attend: Callable[[torch.Tensor, int], torch.Tensor],
             dtype: torch.dtype) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`attend` with its input and output rounded to `dtype`, as EmulatedAutocast rounds PyTorch's SDPA."""
    def rounded(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        return attend(qkv.to(dtype).float(), n_head).to(dtype).float()
    return rounded


class Precision:
    """float32, or mixed precision with float32 master weights: torch.autocast where the hardware has
    the low-precision type, EmulatedAutocast on CPUs without it; float16 adds dynamic loss scaling."""

    def __init__(self, name: str, device: torch.device):
        from gpt2kit.checkpoints import pick_dtype
        self.dtype = pick_dtype(name, device)
        self.device = device
        if self.dtype == torch.float32:
            self.mode = "float32"
        elif device.type == "cpu" and not _native_cpu(self.dtype):
            self.mode = "emulated"
        else:
            self.mode = "autocast"
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self._emulating = False

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        if self.mode == "float32":
            return "float32"
        if self.mode == "emulated":
            return (f"{self.name} autocast numerics with float32 kernels (this CPU has no native {self.name} "
                    "arithmetic, where PyTorch's own would be far slower)")
        return f"{self.name} autocast" + (" with loss scaling" if self.scaler else "")

    def forward(self) -> contextlib.AbstractContextManager:
        """Around the forward pass."""
        if self.mode == "autocast":
            return torch.autocast(self.device.type, dtype=self.dtype)
        if self.mode == "emulated":
            return self._emulate()
        return contextlib.nullcontext()

    def backward(self) -> contextlib.AbstractContextManager:
        """Around forward and backward (autocast itself must not cover the backward pass)."""
        return self._emulate() if self.mode == "emulated" else contextlib.nullcontext()

    @contextlib.contextmanager
    def _emulate(self) -> Iterator[None]:
        if self._emulating:  # already inside: rounding twice is harmless but costs copies
            yield
            return
        self._emulating = True
        try:
            with EmulatedAutocast(self.dtype):
                yield
        finally:
            self._emulating = False


# ---------------------------------------------------------------------------------------------------
# optimisation


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr, then the schedule
    down to cfg.lr * cfg.min_lr_ratio at the last step."""
    base, warm = float(cfg.lr), int(cfg.warmup_steps or 0)
    if step < warm:
        return base * (step + 1) / warm
    if cfg.schedule == "constant":
        return base
    progress = min(1.0, (step - warm) / max(1, total_steps - warm - 1))
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates, samples and saves (steps between; 0: never) and how many validation batches
    one evaluation scores."""
    eval_every: int
    sample_every: int
    save_every: int
    eval_batches: int


def default_cadence(total_steps: int, *, has_val: bool, batch_size: int, block_size: int, grad_accum: int = 1,
                    world: int = 1, eval_every: int | None = None, sample_every: int | None = None,
                    save_every: int | None = None, eval_batches: int | None = None) -> Cadence:
    """The evaluation, sample and checkpoint cadence of a run of `total_steps`, for the values not given
    (given ones win), chosen so that they cost a small share of the training whatever its length:
    - 10 report points per run, or one per 20 steps in a run under 200 steps (at least 2): evaluation
      there (and at step 0);
    - samples at every second point (and at step 0 and the end), as decoding one token at a time is slow;
    - a checkpoint at every point, the interval at most 1000 steps (and always at the end);
    - an evaluation scores about 32K tokens (at most 50 batches), fewer when the run is short: all
      evaluations together score at most 0.3x the tokens trained on, about 10% of the training's compute
      (a forward pass alone costs about a third of a training step)."""
    interval = math.ceil(total_steps / min(10, max(2, total_steps // 20)))
    ev = (interval if eval_every is None else eval_every) if has_val else 0
    sample = 2 * (ev or interval) if sample_every is None else sample_every
    save = min(1000, interval) if save_every is None else save_every
    if eval_batches is None:
        n_evals = 1 + (math.ceil(total_steps / ev) if ev else 0)  # step 0, every ev steps, and the last step
        budget = int(0.3 * total_steps * grad_accum * world / n_evals)  # in batches of batch_size sequences
        eval_batches = max(1, min(50, 32768 // (batch_size * block_size), budget))
    return Cadence(eval_every=ev, sample_every=sample, save_every=save, eval_batches=eval_batches)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings, not on biases and layer-norm gains (GPT-2, nanoGPT and
    HF Trainer's rule). Tied parameters appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise Gpt2kitError("nothing to train: every parameter is frozen; loosen --freeze")
    kw = dict(lr=cfg.lr or 1e-4, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        # one fused kernel per step instead of ~10 passes over every tensor (CPU, CUDA, MPS)
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type != "cpu", **kw)


FREEZE_GROUPS = {
    "embeddings": ("transformer.wte.", "transformer.wpe."),  # wte is also the (tied) output layer
    "wte": ("transformer.wte.",),
    "wpe": ("transformer.wpe.",),
    "ln_f": ("transformer.ln_f.",),
    "blocks": ("transformer.h.",),
}


def freeze(model: GPT, specs: Sequence[str]) -> list[str]:
    """Set requires_grad=False on the named parts; returns the frozen parameter names.

    A spec is a group (embeddings, wte, wpe, ln_f, blocks), a block range `blocks:A-B` (0-based,
    inclusive) or `blocks:N`, a kind inside every block (attn, mlp, ln), or a glob over parameter names
    (`transformer.h.0.*`). `--freeze embeddings,ln_f` trains the transformer blocks only."""
    import fnmatch
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    n_layer = model.config.n_layer
    for spec in (s.strip() for item in specs for s in item.split(",")):
        if not spec:
            continue
        if spec in FREEZE_GROUPS:
            hit = {n for n in names if n.startswith(FREEZE_GROUPS[spec])}
        elif spec.startswith("blocks:"):
            rng = spec[len("blocks:"):]
            try:
                lo, _, hi = rng.partition("-")
                lo_i, hi_i = int(lo), int(hi or lo)
            except ValueError:
                raise Gpt2kitError(f"--freeze {spec}: write blocks:A-B with block numbers, e.g. blocks:0-5") from None
            if not 0 <= lo_i <= hi_i < n_layer:
                raise Gpt2kitError(f"--freeze {spec}: the model has blocks 0-{n_layer - 1}")
            hit = {n for n in names for i in range(lo_i, hi_i + 1) if n.startswith(f"transformer.h.{i}.")}
        elif spec in ("attn", "mlp", "ln"):
            parts = (".ln_1.", ".ln_2.") if spec == "ln" else (f".{spec}.",)
            hit = {n for n in names if n.startswith("transformer.h.") and any(p in n for p in parts)}
        else:
            hit = set(fnmatch.filter(names, spec))
            if not hit:
                raise Gpt2kitError(f"--freeze {spec} matches no parameter; use embeddings, wte, wpe, ln_f, "
                                   "blocks, blocks:A-B, attn, mlp, ln or a glob like 'transformer.h.0.*'")
        chosen |= hit
    for n, p in model.named_parameters():
        if n in chosen:
            p.requires_grad_(False)
    return sorted(chosen)


def set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):  # attention dropout inside SDPA
            m.dropout = p
    if hasattr(model, "config"):
        model.config.dropout = p


def tune_cpu_allocator() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing every large block back to the
    OS and faulting it in again on the next step. A training step on the CPU allocates and frees ~1 GB of
    activations and gradients in blocks of up to ~150 MB; by default glibc maps each block above 32 MB
    (and, once its threshold adapts, above a few MB) fresh from the kernel, which then zeroes every page
    again: 120-280k page faults a 124M step, ~10% of its time. The cost is that the process's memory stays
    at its peak rather than shrinking between steps, which for a training process it does anyway.
    Process-wide; Linux/glibc only (elsewhere a no-op, False); GPT2KIT_MALLOC_TUNING=0 turns it off."""
    if not sys.platform.startswith("linux") or os.environ.get("GPT2KIT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold, most = -1, -3, 2**31 - 1
    return bool(mallopt(m_mmap_threshold, most)) and bool(mallopt(m_trim_threshold, most))


def _peer_failed(e: BaseException) -> bool:
    """A collective call failed because another process of the job went away (gloo's and NCCL's words)."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "remote process exited or there was a network error"))


def _out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory error, the CPU allocator's (a plain RuntimeError), or numpy's MemoryError."""
    return memory.is_out_of_memory(e)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _EmbeddingRowsIntoGrad(torch.autograd.Function):
    """weight[idx] for an nn.Embedding whose gradient is written by its backward itself: the looked-up
    rows' gradients are added in place into weight.grad (created as zeros if there is none). `weight` is
    not an autograd input, so autograd's AccumulateGrad for it waits on nothing here and runs first (for
    GPT-2's tied wte, as soon as the LM head's dense gradient arrives, which it keeps without a copy);
    `anchor`, a scalar that requires grad, only puts this node into the graph."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, anchor: torch.Tensor, module: nn.Embedding) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.module = module
        return F.embedding(idx, module.weight.detach())  # (*idx.shape, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        weight = ctx.module.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        report = getattr(ctx.module, "grad_rows_added", None)  # a _NormInBackward's, when one watches
        rows = idx.reshape(-1).unique() if report is not None else None  # (R,)
        before = weight.grad[rows].double().square().sum() if report is not None else None
        weight.grad.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.grad.dtype))
        if report is not None:
            report(weight, float(weight.grad[rows].double().square().sum() - before))
        return None, None, None


_ANCHOR = torch.zeros((), requires_grad=True)


def _embedding_rows_into_grad(self: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and self.weight.requires_grad:
        return _EmbeddingRowsIntoGrad.apply(idx, _ANCHOR, self)
    return F.embedding(idx, self.weight)


class _NormInBackward:
    """The gradient norm for clipping, summed during backward: a hook takes each gradient's sum of squares
    the moment autograd has finished accumulating it, while it is still in cache. Why: after backward, a
    separate pass over a 124M model's 0.5 GB of gradients reads them back from memory, ~15 ms of a 2-core
    CPU step (~32 GB/s); in cache the same sums cost a few ms. Each parameter's slot keeps the latest value
    its hook saw, which is its final gradient however often and in whatever order autograd accumulates
    (gradient checkpointing, accumulation over micro-batches); the slots left empty are summed afterwards.
    The tied embedding's rows, which _EmbeddingRowsIntoGrad adds into wte.grad after its hook ran, report
    the change they made through `rows_added`."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.slots: list[float | None] = [None] * len(params)
        self.watching = False  # during the backward whose gradients the next optimizer step uses
        self.ready = False  # the slots belong to the gradients there are now
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(functools.partial(self._accumulated, i))

    def _accumulated(self, i: int, p: torch.Tensor) -> None:
        if self.watching:
            self.slots[i] = kernels.squared_norm(p.grad)

    def rows_added(self, weight: torch.Tensor, change: float) -> None:
        i = self.index.get(id(weight))
        if self.watching and i is not None and self.slots[i] is not None:
            self.slots[i] += change

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self.slots, self.watching, self.ready = [None] * len(self.params), True, False
        try:
            yield
            self.ready = True
        finally:
            self.watching = False

    def total(self) -> torch.Tensor:
        """The L2 norm of all gradients together (what kernels.total_norm gives), then forgets the slots."""
        rest = [p.grad for p, s in zip(self.params, self.slots) if s is None and p.grad is not None]
        squares = sum(s for s in self.slots if s is not None) + (float(kernels.total_norm(rest)) ** 2 if rest else 0.0)
        self.ready = False
        return torch.tensor(squares ** 0.5, dtype=torch.float32)


class Trainer:
    """One process's optimisation: loss, backward (with accumulation and DDP sync on the last
    micro-batch), clipping and the AdamW step. The training loop, the benchmark and the parity test all
    use this, so they measure and test the same code."""

    def __init__(self, model: GPT, cfg: TrainConfig, device: torch.device, *, ddp: bool = False):
        self.model, self.cfg, self.device = model, cfg, device
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_contiguous():
                    # checkpoint loading may keep HF's (in, out) storage as a transposed view; training wants
                    # row-major weights so that gradients and optimizer state need no layout copies (~3%)
                    p.data = p.data.contiguous()
        self.precision = Precision(cfg.dtype, device)
        self.optimizer = build_optimizer(model, cfg, device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ddp = ddp
        wte = model.transformer.wte
        if device.type == "cpu" and not ddp and wte.weight.requires_grad:
            # The tied wte/lm_head weight gets a dense gradient from the output layer anyway; the embedding
            # lookup adds its few rows straight into it (_EmbeddingRowsIntoGrad) instead of autograd summing
            # a second (vocab x n_embd) tensor with it, dense (~8% of a 124M step on CPU) or sparse (a 154 MB
            # copy, 13-40 ms). Not under DDP: its reducer must see each gradient whole when it is accumulated.
            wte.forward = types.MethodType(_embedding_rows_into_grad, wte)
        self.fwd: nn.Module = model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.fwd = self.ddp_module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.fwd = torch.compile(self.fwd)
        # float32 on CPUs: the LM head and its loss as one function (fused_loss.py says why)
        head = model.lm_head
        self.fused_head = (device.type == "cpu" and self.precision.mode == "float32" and not cfg.compile
                           and type(head) is nn.Linear and head.bias is None)
        # on GPUs: the LM head over the vocabulary padded to a multiple of 64 rows, the padding's logits -inf.
        # cuBLAS has no fast kernel for an odd dimension like 50,257: on an H100 the head's three products
        # took ~31 of a bf16 124M step's 80 ms in Turing-era fallback kernels. The loss and gradients are the
        # same (the padded columns add exp(-inf) = 0 to each softmax and get no gradient).
        V = head.weight.shape[0]
        self.pad_head = (device.type == "cuda" and type(head) is nn.Linear and head.bias is None
                         and V % 64 != 0)
        self._pad_bias = torch.zeros(padded_size(V), device=head.weight.device)  # (P,): 0, then -inf for the padding
        self._pad_bias[V:] = float("-inf")
        # on CPUs: attention, GELU, the loss's softmax and the gradient norm through gpt2kit's kernels
        # (kernels/cpu_train.cpp says why), where this machine can build them. The kernels are float32; under
        # native autocast (CPUs with AMX/AVX512-BF16) attention and GELU take their bfloat16 input up to
        # float32 and hand float32 on to the next product, which rounds it again: the same roundings of every
        # product's inputs, the two computed more precisely than in bfloat16, and faster (124M step on a
        # 2-core Xeon with AMX: PyTorch's bfloat16 flash attention 79 ms and GELU 36 ms). Emulated autocast
        # rounds attention's inputs and output as it does around PyTorch's SDPA.
        self.cpu_kernels = (device.type == "cpu" and not cfg.compile and kernels.load() is not None)
        if self.cpu_kernels:
            mode = self.precision.mode
            for block in model.transformer.h:
                if model.config.activation == "gelu_new":  # the kernel computes the tanh form only
                    block.mlp.act = kernels.gelu_tanh_float32 if mode == "autocast" else kernels.gelu_tanh
                block.attn.attend = (kernels.causal_attention_float32 if mode == "autocast" else
                                     _rounded(kernels.causal_attention, self.precision.dtype) if mode == "emulated"
                                     else kernels.causal_attention)
        # the clipping norm summed during backward, where optimizer_step hands it to fused AdamW (not under DDP,
        # whose reducer averages the gradients after their hooks ran)
        self.norm_in_backward: _NormInBackward | None = None
        if (self.cpu_kernels and cfg.grad_clip > 0 and self.precision.scaler is None and not ddp
                and self.optimizer.defaults.get("fused")):
            self.norm_in_backward = _NormInBackward(self.params)
        wte.grad_rows_added = self.norm_in_backward.rows_added if self.norm_in_backward is not None else None
        if device.type == "cpu" and not ddp:
            # not under torch.distributed: with it, 2-process gloo runs aborted at interpreter exit ("terminate
            # called without an active exception") in 2 of 13 runs. The likelier cause, found later, was the
            # DDP wrapper outliving its process group (_finish now frees it first); the tuning stays off
            # under DDP until it is measured again there
            tune_cpu_allocator()

    def loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.fused_head:
            h = self.fwd(x, return_hidden=True)  # (B, T, C)
            return lm_head_cross_entropy(h.reshape(-1, h.size(-1)), self.model.lm_head.weight, y.reshape(-1),
                                         reduction=reduction)
        with self.precision.forward():
            logits = self._padded_head_logits(x) if self.pad_head else self.fwd(x)  # (B, T, V or padded V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                               reduction=reduction)

    def _padded_head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, P) over the vocabulary padded to P (a multiple of 64), the padding at -inf."""
        h = self.fwd(x, return_hidden=True)  # (B, T, C)
        w = self.model.lm_head.weight  # (V, C)
        return F.linear(h, F.pad(w, (0, 0, 0, self._pad_bias.shape[0] - w.shape[0])), self._pad_bias)  # (B, T, P)

    def forward_backward(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Accumulate gradients of the mean loss per target token of all the micro-batches (of every process,
        under DDP); returns that mean (detached). Each micro-batch is weighted by its share of the target
        tokens, so that accumulation equals one batch of them all even when padding (--line-by-line) leaves
        the micro-batches with different numbers of targets; with equal numbers, as windows of the stream
        always have, that is the mean of the micro-batch means."""
        n = len(batches)
        weights: list[torch.Tensor] | None = None
        if self.cfg.line_by_line:
            # counted on the device, without a host sync; float32 counts are exact up to 2**24 targets a step
            # (and MPS has no float64)
            counts = [(y != -100).sum().float() for _, y in batches]
            total_count = torch.stack(counts).sum()
            world = 1
            if self.ddp:
                import torch.distributed as dist
                dist.all_reduce(total_count)  # (SUM) every process's targets; DDP then averages over the world
                world = dist.get_world_size()
            # (a step whose micro-batches hold no target at all has zero gradient, not NaN)
            weights = [c * world / total_count.clamp(min=1) for c in counts]
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            sync = not self.ddp or i == n - 1
            watch = (self.norm_in_backward.watch() if self.norm_in_backward is not None and i == n - 1
                     else contextlib.nullcontext())
            with contextlib.nullcontext() if sync else self.ddp_module.no_sync(), self.precision.backward(), watch:
                loss = self.loss(x, y)
                scaled = loss / n if weights is None else loss * weights[i]
                if self.precision.scaler is not None:
                    scaled = self.precision.scaler.scale(scaled)
                scaled.backward()
            total += loss.detach() if weights is None else loss.detach() * weights[i]
        return total / n if weights is None else total

    def optimizer_step(self, lr: float) -> torch.Tensor | None:
        """Unscale, clip, step, zero the gradients. Returns the gradient norm before clipping (when
        clipping)."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        clip = self.cfg.grad_clip > 0
        # without loss scaling, fused AdamW applies clip_grad_norm_'s factor itself, max_norm / (norm + 1e-6)
        # when below 1, as it reads each gradient (it divides by `grad_scale`): one pass over the gradients
        # fewer than scaling them in place first
        in_adamw = clip and scaler is None and bool(self.optimizer.defaults.get("fused"))
        norm = None
        if in_adamw:
            norm = (self.norm_in_backward.total() if self.norm_in_backward is not None and self.norm_in_backward.ready
                    else kernels.total_norm([p.grad for p in self.params if p.grad is not None]))
            self.optimizer.grad_scale = ((norm + 1e-6) / self.cfg.grad_clip).clamp(min=1.0)
        elif clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        try:
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        finally:
            if in_adamw:
                del self.optimizer.grad_scale
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def eval_loss(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Summed loss and number of target tokens over `batches` (model in eval mode meanwhile)."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for x, y in batches:
                with self.precision.forward():
                    logits = self.model(x)
                total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1),
                                         ignore_index=-100, reduction="sum").double()
                count += (y != -100).sum()
        finally:
            self.model.train(was_training)
        if self.ddp:
            import torch.distributed as dist
            both = torch.stack([total, count])
            dist.all_reduce(both)
            total, count = both[0], both[1]
        return float(total), int(count)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------------------------------
# processes and devices


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist
            dist.barrier()

    def agree(self, fn: Callable[[], Any] | None) -> Any:
        """Run `fn` in this process (None: nothing) and share the outcome with every process: when it
        failed anywhere, it fails everywhere with the same one-line error, instead of leaving the others
        waiting at their next collective call (a gloo traceback, or an NCCL hang). Every process must call
        this at the same point; use it around work only some processes do (writing files)."""
        err: Exception | None = None
        result = None
        try:
            result = fn() if fn is not None else None
        except Exception as e:  # noqa: BLE001 - shared below, then raised again
            err = e
        if self.initialized:
            import torch.distributed as dist
            msgs: list[str | None] = [None] * self.world
            dist.all_gather_object(msgs, None if err is None else _one_line(err, self.rank))
            first = next((m for m in msgs if m is not None), None)
            if err is None and first is not None:
                raise Gpt2kitError(first)
        if err is not None:
            raise err
        return result

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.initialized:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.initialized:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def _one_line(e: Exception, rank: int) -> str:
    if isinstance(e, Gpt2kitError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"process {rank}: {e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return f"process {rank} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _init_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device, str]:
    """Process group (under torchrun) and this process's device, plus a sentence saying why."""
    from gpt2kit.checkpoints import pick_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = pick_device(cfg.device)
        return _Dist(), dev, _device_reason(cfg.device, dev)
    import torch.distributed as dist
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device in ("auto", None):
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = pick_device(cfg.device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    reason = f"{_device_reason(cfg.device, dev)}; {world} processes, {backend}"
    return _Dist(rank, world, local, True), dev, reason


_EVAL_TOKENS = 32768  # validation targets an evaluation scores by default


def _device_reason(asked: str | None, dev: torch.device) -> str:
    if asked not in (None, "auto"):
        return f"{dev} (as asked)"
    if dev.type == "cpu":
        return "cpu (no CUDA GPU or Apple MPS found; training on CPU is slow for large models)"
    return f"{dev} (found)"


def _memory_warning(model: GPT, cfg: TrainConfig, block: int, device: torch.device, trainable: int) -> str | None:
    """A rough peak-memory estimate, to warn before the OS kills the process (CPU) or CUDA runs out; a run
    that needs more than the device's whole memory is refused (a Gpt2kitError) before it starts."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    state = 4 * n + 12 * trainable  # weights + grads + Adam moments, float32
    tokens = cfg.batch_size * block
    per_layer = 34 * c.n_embd * 4 if not cfg.grad_checkpointing else c.n_embd * 4
    acts = tokens * (c.n_layer * per_layer + 3 * c.vocab_size * 4)
    need = state + acts
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free, total = _available_ram(), memory.meminfo("MemTotal")
        if free is None:
            return None
    else:
        return None
    if total is not None and need > total:  # cannot fit even with everything else freed
        raise Gpt2kitError(f"--batch-size {cfg.batch_size} x --block-size {block} needs roughly {memory.gib(need)}, "
                           f"more than the {memory.gib(total)} of memory on {device.type}; lower --batch-size (raise "
                           "--grad-accum to keep the batch), add --grad-checkpointing, or use --lora-rank 8")
    if need > 0.9 * free:
        return (f"this run needs roughly {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free on "
                f"{device.type}; if it runs out, lower --batch-size (raise --grad-accum to keep the batch), "
                "add --grad-checkpointing, or use --lora-rank 8")
    return None


def _available_ram() -> int | None:
    return memory.meminfo("MemAvailable")


# ---------------------------------------------------------------------------------------------------
# samples


def _sample_texts(model: GPT, tok: Tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int,
                  temperature: float = 0.8, top_k: int = 40) -> list[str]:
    """One completion per prompt (prompt included), seeded, without touching global random state."""
    from gpt2kit.generate import GenerationConfig, Generator
    was_training = model.training
    model.eval()
    try:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        outs = Generator(model, tok).generate(list(prompts), cfg)
    finally:
        model.clear_caches()
        model.train(was_training)
    return [(o.prompt if o.prompt != "<|endoftext|>" else "") + o.text for o in outs]


# ---------------------------------------------------------------------------------------------------
# the run


class _Interrupt:
    """First Ctrl-C (or SIGTERM): finish the step, save, exit cleanly. Second Ctrl-C: stop at once."""

    def __init__(self, say):
        self.flag = False
        self.say = say
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.say("stopping: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


_STAGING = ".tmp-data"  # a new run's data caches, until it replaces what --out held (see _Run._commit)


class _Run:
    """One training process's run. Order matters for what a failure leaves behind: the run's lock is taken
    before anything else touches the directory; then everything that can fail is checked (model, data, block
    size, optimizer, the checkpoint's state) while the directory stays as it was; then `_commit` replaces what
    --out held (--overwrite) and records the run; then it trains. A new run that fails before `_commit` leaves
    nothing behind (not even the directory, if it made it); a resume that fails before it leaves the run as
    it was."""

    def __init__(self, cfg: TrainConfig, *, resume: bool, progress: bool, overwrite: bool = False,
                 moved_base: bool = False, lock: runs.RunLock | None = None, extending: bool = False):
        self.cfg = cfg
        self.resuming = resume
        self.lock = lock  # held by the main process (resume() takes it before reading the run)
        self.extending = extending  # resuming with a new --steps/--epochs total
        self.committed = False  # run.json and config.json now describe this process's run
        self._replaced = False  # _commit has removed what --out held
        self.created: list[Path] = []  # folders this start made, outermost first (removed if it fails before training)
        self._record: dict[str, Any] = {}  # run.json fields found during setup, written by _commit
        self.moved_base = moved_base  # resuming a LoRA run with its base model at a new cfg.model
        self.overwrite = overwrite
        self.progress = progress
        self.dir = Path(cfg.out)
        self.bar = None
        self.tb = None
        from gpt2kit.tracking import Trackers
        self.trackers = Trackers()  # W&B etc.; the main process's only
        self._plotted = -1e9
        self._write_warned: set[str] = set()
        self.dist, self.device, self.device_reason = _init_distributed(cfg)

    # ---- output ----
    def say(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---- setup ----
    def _prepare_dir(self) -> None:
        if not self.dist.main:
            return
        if self.resuming:
            if self.lock is None:  # (resume() takes it; a caller of _Run without one)
                self.lock = runs.RunLock.acquire(self.dir)
            try:  # a read-only run would fail at its first write, after loading the model and data
                tempfile.TemporaryFile(dir=self.dir).close()
            except OSError as e:
                raise Gpt2kitError(f"cannot resume {self.dir}: cannot write in it ({e.strerror or e}); a run "
                                   "directory must be writable to resume: make it writable, or copy it elsewhere "
                                   "and resume the copy") from None
            runs.recover_dirs(self.dir)
            return
        # gpt2kit deletes only what it wrote: --out is a new path, an empty folder, or a run of ours. The lock
        # first (so the folder is made first), then the checks; nothing is deleted here (see _commit)
        d = self.dir
        if d.exists() and not d.is_dir():
            raise Gpt2kitError(f"--out {d} is a file; give a directory for the run")
        if self.lock is None:
            self.created += [p for p in (d, *d.absolute().parents) if not p.exists()][::-1]
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Gpt2kitError(f"cannot create --out {d} ({e.strerror or e}); choose a writable place") from None
            self.lock = runs.RunLock.acquire(d)
        if runs.is_run_dir(d):
            # an unreadable run.json is a one-line error here; the lock is ours, so "running" means killed
            info = runs.run_info(d, locked=False)
            if not (self.overwrite or self._aborted_start(info)):
                go_on = (f"start a new run from its model with --model {shlex.quote(str(d))}"
                         if info.status == "finished" else f"continue it with {_resume_hint(d)}")
                raise Gpt2kitError(f"{d} already holds a run ({info.status} at step {info.step}); {go_on}, "
                                   "replace it with --overwrite (Python: finetune(..., overwrite=True)), or choose "
                                   "another --out")
        elif any(not runs.is_leftover(p.name) for p in d.iterdir()):
            raise Gpt2kitError(f"--out {d} is a folder with other files in it, not a gpt2kit run"
                               + (" (--overwrite only replaces runs)" if self.overwrite else "")
                               + "; choose another --out or an empty folder")
        shutil.rmtree(d / _STAGING, ignore_errors=True)  # an earlier start's, killed before it trained

    def _commit(self) -> None:
        """Everything has been checked: replace what --out held (an earlier run: its own entries only) with this
        run, and record it. A resume records that it runs again."""
        d = self.dir
        if not self.resuming:
            runs.remove_run(d, keep=(_STAGING,))
            self._replaced = True  # (from here on, a failure before training removes this run's entries too)
            if (d / _STAGING).exists():
                os.replace(d / _STAGING, d / "data")
            self.tok.save(d / "tokenizer")  # the run keeps its own vocabulary (checkpoints come and go)
            self._record.update(step=0, started=runs.now(), model=self.cfg.model, lora=bool(self.cfg.lora_rank))
        # run.json before config.json: a run killed between the two is a run (dead at step 0, replaced by the
        # next start), not a folder of unknown files
        runs.update_run_json(d, status="running", total_steps=self.cfg.steps, error=None,  # (a failed start's)
                             **self._record, **runs.process_stamp())
        runs.write_json(d / runs.CONFIG_JSON, self.cfg.to_dict())
        # from step 0 the loop evaluates step 0 again: keep none of the earlier start's records
        runs.truncate_metrics(d, self.step if self.step else -1)
        self.committed = True

    def _abandon(self) -> None:
        """A new run that failed before _commit ended: remove what it wrote (its staged data, or if _commit had
        begun, its run entries); the lock file and the folders it made go when the lock is released (run's
        finally)."""
        shutil.rmtree(self.dir / _STAGING, ignore_errors=True)
        if self._replaced:
            runs.remove_run(self.dir)

    def _aborted_start(self, info: runs.RunInfo) -> bool:
        return (info.status in ("failed", "dead", "interrupted") and info.step == 0
                and not runs.checkpoint_dirs(self.dir) and runs.model_dir(self.dir) is None)

    def _load_model(self, ckpt: Path | None) -> tuple[GPT, Tokenizer, str | None, str | None]:
        """fp32 master weights on the device: from the checkpoint, the pretrained model, or random. Also the
        directory the base weights came from and their fingerprint (LoRA runs record both in their adapters)."""
        from gpt2kit import lora
        from gpt2kit.checkpoints import load_model, read_checkpoint, resolve_model_dir, vocab_dir
        from gpt2kit.config import GPTConfig
        cfg = self.cfg
        # the run keeps its own copy of the vocabulary (checkpoints come and go; the base may move)
        own = self.dir / "tokenizer"
        own_tok = self.resuming and find_vocab_files(own) is not None
        full_ckpt = ckpt is not None and not cfg.lora_rank  # needs nothing from the base model
        needs_base = cfg.model and not (full_ckpt and (own_tok or cfg.tokenizer))
        base_dir = base_fp = None
        if needs_base and cfg.init == "pretrained" and not full_ckpt:
            src, expect = cfg.model, None
            if ckpt is not None:  # resuming a LoRA run: its adapters go on the weights they were trained on
                rec = lora.read_adapter_config(ckpt)
                if rec.base_model and not self.moved_base and (Path(rec.base_model).exists()
                                                               or Path(cfg.model).is_absolute()):
                    src = rec.base_model
                expect = rec.base_fingerprint
            if self.resuming and not self.moved_base and Path(src).is_absolute() and not Path(src).exists():
                raise Gpt2kitError(f"cannot resume {self.dir}: the base model {src} of this LoRA run is gone; pass "
                                   "--model WHERE_IT_IS_NOW with --resume (Python: resume(..., model=...))")
            # The base is read once, here, and base_dir names exactly what was read: a model directory, or for
            # a LoRA run with adapter checkpoints only, the adapter checkpoint merged onto its base (not the run,
            # whose newest adapter changes as it trains on). The fingerprint catches what a path cannot: weights
            # replaced under the same name (a run resumed, best/ rewritten).
            model, tok, base_fp, src_dir = lora.open_base(
                src, device=self.device, dtype=torch.float32, tokenizer_dir=str(own) if own_tok else cfg.tokenizer,
                fingerprint=bool(cfg.lora_rank))
            if expect and base_fp != expect:
                raise Gpt2kitError(f"cannot resume {self.dir}: its adapters were trained on {src}, whose weights have "
                                   f"changed since (fingerprint {base_fp}, recorded {expect}; the same weights saved "
                                   "again in another form count as changed too); put those weights back, or start a "
                                   "new run")
            base_dir = str(src_dir.resolve())
        else:
            base_dir = str(resolve_model_dir(cfg.model).resolve()) if needs_base else None
            # a single-file base (nanoGPT ckpt.pt, llm.c .bin) has its vocabulary beside it or uses GPT-2's
            tok_dir = str(own) if own_tok else cfg.tokenizer or (str(vocab_dir(Path(base_dir))) if base_dir else None)
            if tok_dir is None:
                raise Gpt2kitError("training from scratch needs a tokenizer: pass --tokenizer DIR (a directory "
                                   "with vocab.json + merges.txt, e.g. a GPT-2 model directory)")
            if full_ckpt:
                model, tok = load_model(ckpt, device=self.device, dtype=torch.float32, tokenizer_dir=tok_dir)
            else:
                if cfg.config and Path(cfg.config).is_file():
                    gcfg = GPTConfig.from_json_file(cfg.config)
                elif cfg.config:
                    gcfg = GPTConfig.from_name(cfg.config)
                elif Path(base_dir).is_file():
                    gcfg = read_checkpoint(Path(base_dir))[0]
                else:
                    gcfg = GPTConfig.from_json_file(Path(base_dir) / "config.json")
                tok = Tokenizer.from_dir(tok_dir)
                torch.manual_seed(cfg.seed)
                model = GPT(gcfg).to(self.device)
        if tok.vocab_size > model.config.vocab_size:
            raise Gpt2kitError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                               f"{model.config.vocab_size}; pass the model's own --tokenizer")
        model.train()
        set_dropout(model, cfg.dropout)
        return model, tok, base_dir, base_fp

    def _prepare_data(self, tok: Tokenizer):
        from gpt2kit.data import TokenCache, TooLittleData, prepare_data
        cfg = self.cfg
        info = runs.read_run_json(self.dir) if runs.is_run_dir(self.dir) else {}
        recorded = info.get("train_tokens"), info.get("val_tokens")
        if self.resuming and recorded[0] and Path(recorded[0]).is_file():
            # the caches this run trained on: the same tokens even if the raw files changed or moved
            train = TokenCache.open(recorded[0])
            val = TokenCache.open(recorded[1]) if recorded[1] and Path(recorded[1]).is_file() else None
            self._same_data(info.get("data_ids") or {}, train, val)
            return train, val
        spec = cfg.data_spec()
        frac = cfg.val_fraction if cfg.val_fraction is not None else (0.0 if cfg.val_data else 0.05)
        if cfg.eval_every == 0 and not cfg.val_data and cfg.val_fraction is None:
            frac = 0.0

        # a new run stages its caches, so that the run it replaces stays whole until every check has passed
        cache_dir = self.dir / ("data" if self.resuming else _STAGING)

        def prep():
            try:
                return prepare_data(cfg.data, tok, spec, val_data=cfg.val_data or None, val_fraction=frac,
                                    seed=cfg.seed, cache_dir=cache_dir)
            except TooLittleData as e:
                if not (frac and cfg.val_fraction is None):  # the user asked for this split
                    raise TooLittleData(e.n_tokens, "pass --val-data FILE, or --val-fraction 0") from None
                self.say(f"warning: the data has only {e.n_tokens} tokens, too few to hold out validation data; "
                         "training without validation (add --val-data FILE to validate)")
                return prepare_data(cfg.data, tok, spec, cache_dir=cache_dir)
        # the main process writes the caches (the others wait for its outcome, a data error included), then
        # the others open them
        first = self.dist.agree(prep if self.dist.main else None)
        second = self.dist.agree(None if self.dist.main else prep)
        train, val = first if self.dist.main else second
        checked = self.resuming and "data_ids" in info
        if checked:
            self._same_data(info["data_ids"], train, val)
        if self.dist.main:  # (a resume that prepared the data again records where its caches now are)
            own, data = cache_dir.resolve(), (self.dir / "data").resolve()

            def where(c) -> str:  # where the cache is once _commit has moved the staged ones into RUN/data
                p = c.path.resolve()
                return str(data / p.relative_to(own)) if own in p.parents else str(p)
            paths = dict(train_tokens=where(train), val_tokens=where(val) if val is not None else None)
            # caches read in place (not the run's own copies in RUN/data) may be replaced under the same name
            ids = {k: cache_identity(c) for k, c in (("train", train), ("val", val))
                   if c is not None and own not in c.path.resolve().parents}
            self._record.update(paths, **({} if checked else {"data_ids": ids}))
        return train, val

    def _same_data(self, recorded: dict[str, Any], train, val) -> None:
        for key, what, cache in (("train", "training", train), ("val", "validation", val)):
            then = recorded.get(key)
            if cache is None or not then:
                continue
            now = cache_identity(cache)
            if now != then:
                raise Gpt2kitError(f"cannot resume {self.dir}: its {what} data {cache.path} has changed since the "
                                   f"run started ({then['tokens']:,} tokens then, {now['tokens']:,} now); put the "
                                   "original back, or start a new run")

    def _resolve(self, model: GPT, train, val) -> TrainConfig:
        """Fill every automatic value, so config.json records exactly what runs."""
        cfg = self.cfg
        ctx = model.config.n_positions
        block = cfg.block_size or min(ctx, 1024)
        if block > ctx:
            raise Gpt2kitError(f"--block-size {block} exceeds the model's context of {ctx} tokens")
        if not cfg.line_by_line and 2 <= len(train) < block + 1:  # (Batcher would shrink it; record it here)
            self.say(f"warning: the training data has only {len(train)} tokens, fewer than block size {block} + 1; "
                     f"using blocks of {len(train) - 1} (pass --block-size {len(train) - 1} or less, or add data, "
                     "to silence this)")
            block = len(train) - 1
        units = train.n_docs if cfg.line_by_line else len(train)
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world * (1 if cfg.line_by_line else block)
        steps_per_epoch = max(1, math.ceil(units / per_step))
        total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
        lr = cfg.lr or (1e-3 if cfg.lora_rank else 6e-4 if cfg.init == "scratch" else 1e-4)
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 20)
        has_val = val is not None
        cadence = default_cadence(total, has_val=has_val, batch_size=cfg.batch_size, block_size=block,
                                  grad_accum=cfg.grad_accum, world=self.dist.world, eval_every=cfg.eval_every,
                                  sample_every=cfg.sample_every, save_every=cfg.save_every,
                                  eval_batches=cfg.eval_batches)
        tb = cfg.tensorboard
        if tb is None:
            import importlib.util
            tb = importlib.util.find_spec("tensorboard") is not None
        def absolute(p: str | None) -> str | None:  # so that --resume works from any directory
            return str(Path(p).resolve()) if p and Path(p).exists() else p
        eval_batches = cadence.eval_batches
        if cfg.eval_batches is None and cfg.line_by_line and val is not None:
            # validation covers what the run says it has: every document while they hold ~32K target tokens
            # (which short documents spread over many more padded batches than windows of the stream), else an
            # even spread of them; the run's notes say how much each evaluation scores
            targets = np.maximum(np.minimum(np.diff(val.doc_offsets), block + 1) - 1, 0)
            docs = min(val.n_docs, math.ceil(val.n_docs * _EVAL_TOKENS / max(1, int(targets.sum()))))
            per_batch = cfg.batch_size * self.dist.world
            eval_batches = self.dist.world * max(1, math.ceil(docs / per_batch))  # (divisible by the world)
        from gpt2kit.checkpoints import pick_dtype
        dtype = str(pick_dtype(cfg.dtype, self.device)).removeprefix("torch.")  # "auto" as chosen on this device
        return replace(cfg, dtype=dtype, eval_batches=eval_batches, model=absolute(cfg.model),
                       tokenizer=absolute(cfg.tokenizer),
                       config=absolute(cfg.config), data=[absolute(d) for d in cfg.data],
                       val_data=[absolute(d) for d in cfg.val_data], block_size=block, steps=total, lr=lr,
                       warmup_steps=warm, eval_every=cadence.eval_every,
                       sample_every=cadence.sample_every, save_every=cadence.save_every, tensorboard=tb,
                       prompts=list(cfg.prompts) or list(DEFAULT_PROMPTS),
                       val_fraction=cfg.val_fraction if cfg.val_fraction is not None else
                       (0.0 if cfg.val_data or not has_val else 0.05),
                       epochs=cfg.epochs if cfg.steps is None else None)

    # ---- checkpoints ----
    def _trainer_state(self, step: int) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "version": TRAINER_STATE_VERSION, "step": step, "world_size": self.dist.world,
            **self.trainer.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "step": step, "total_steps": self.cfg.steps},
            "batcher": self.batcher.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "python": random.getstate()},
            "best_val_loss": self.best_val, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "tokens": self.tokens_seen, "train_time": self.train_time, "last_loss": self.last_loss,
        }

    def _write_model(self, out: Path) -> None:
        """The model in HF format (LoRA: adapter only for checkpoints, adapter + merged for best/final)."""
        from gpt2kit.checkpoints import save_model
        if self.lora_cfg is None:
            save_model(self.model, self.tok, out)
            return
        from gpt2kit import lora
        lora.save_adapter(self.model, self.lora_cfg, out)

    def _write_full_model(self, out: Path) -> None:
        from gpt2kit.checkpoints.hf import write_hf_dir
        self._write_model(out)
        if self.lora_cfg is not None:
            from gpt2kit import lora
            write_hf_dir(out, self.model.config, lora.merged_state_dict(self.model))
            self.tok.save(out)

    @contextlib.contextmanager
    def _writing(self, tmp: Path, final: Path) -> Iterator[None]:
        """A failed write of `tmp` (disk full, no permission) becomes one line naming `final`, the checkpoint
        `--resume` would continue from (or that there is none yet), and the fix; the half-written `tmp` is
        removed, and the previous `final` was never touched."""
        import shutil

        from safetensors import SafetensorError
        try:
            yield
        except (OSError, RuntimeError, SafetensorError) as e:
            if _out_of_memory(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.strerror:
                why = e.strerror
            else:  # PyTorch and safetensors word a full disk their own way ("unexpected pos ..."): look at it
                try:
                    free = shutil.disk_usage(final.parent if final.parent.is_dir() else self.dir).free
                except OSError:
                    free = None
                # what a checkpoint holds: the weights and Adam's two moments, plus a margin
                need = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) + 2**20
                why = (f"no space left on device, {free / 1e6:,.0f} MB free" if free is not None and free < need
                       else (str(e).strip().splitlines() or [""])[-1])
            ckpts = runs.checkpoint_dirs(self.dir)
            kept = (f"the last checkpoint, {ckpts[-1][1]}, is kept: free some disk space, then "
                    f"{_resume_hint(self.dir, self.dist.world)} to continue from it" if ckpts else
                    "no checkpoint has been written yet: free some disk space, then "
                    f"{_resume_hint(self.dir, self.dist.world)} to start the run again from step 0")
            raise Gpt2kitError(f"cannot write {final} ({why[:200]}); {kept} (or start again with another --out)"
                               ) from None

    def save_checkpoint(self, step: int) -> None:
        state = self._trainer_state(step)  # every rank's state is identical here; the main one writes
        self.dist.agree(lambda: self._write_checkpoint(step, state) if self.dist.main else None)

    def _write_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        root = self.dir / "checkpoints"
        tmp = root / f".tmp-step-{step}"
        with self._writing(tmp, root / f"step-{step}"):
            root.mkdir(exist_ok=True)
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            tmp.mkdir()
            self._write_model(tmp)
            torch.save(state, tmp / f"{TRAINER_STATE}.tmp")
            os.replace(tmp / f"{TRAINER_STATE}.tmp", tmp / TRAINER_STATE)
        runs.replace_dir(tmp, root / f"step-{step}")
        for _, old in runs.checkpoint_dirs(self.dir)[:-self.cfg.keep]:
            import shutil
            shutil.rmtree(old, ignore_errors=True)
        runs.update_run_json(self.dir, step=step, checkpoint=f"checkpoints/step-{step}",
                             **self._best(), last_loss=self.last_loss)
        self._plot()

    def _save_named(self, name: str) -> Path:
        out = self.dir / name
        self.dist.agree(lambda: self._write_named(name, out) if self.dist.main else None)
        return out

    def _write_named(self, name: str, out: Path) -> None:
        tmp = self.dir / f".tmp-{name}"
        with self._writing(tmp, out):
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            self._write_full_model(tmp)
        runs.replace_dir(tmp, out)

    def _load_checkpoint_state(self, ckpt: Path) -> None:
        try:
            from gpt2kit.checkpoints.hf import load_pickle
            state = load_pickle(ckpt / TRAINER_STATE, map_location=self.device)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise Gpt2kitError(f"cannot read {ckpt / TRAINER_STATE} ({type(e).__name__}); delete {ckpt} to "
                               "resume from the checkpoint before it") from None
        if state.get("version") != TRAINER_STATE_VERSION:
            raise Gpt2kitError(f"{ckpt / TRAINER_STATE} has format v{state.get('version')}; this gpt2kit "
                               f"reads v{TRAINER_STATE_VERSION}")
        world = state.get("world_size", self.dist.world)  # (absent from older checkpoints)
        if world != self.dist.world:
            q = shlex.quote(str(self.dir))
            how = (f"`torchrun --nproc_per_node {world} -m gpt2kit finetune --resume {q}`" if world > 1 else
                   f"without torchrun: `gpt2kit finetune --resume {q}`")
            raise Gpt2kitError(f"cannot resume {self.dir}: it was trained with {world} process"
                               f"{'es' if world > 1 else ''} and this job has {self.dist.world} (the global batch "
                               f"and the data each step reads depend on it); resume it with {how}")
        self.trainer.load_state_dict(state)
        self.batcher.load_state_dict(state["batcher"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np_state = rng["numpy"]  # its key array comes back on the run's device (map_location), a GPU too
        np.random.set_state((np_state[0], np_state[1].cpu().numpy().astype(np.uint32), *np_state[2:]))
        random.setstate(rng["python"])
        self.step = int(state["step"])
        self.best_val, self.best_step = state["best_val_loss"], state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.tokens_seen, self.train_time = int(state["tokens"]), float(state["train_time"])
        self.last_loss = state.get("last_loss")

    # ---- evaluation, samples, plots ----
    def _eval_batches_per_rank(self) -> int | None:
        # eval_batches counts global batches: each of W processes scores 1/W of them (the same windows as
        # one process when W divides eval_batches)
        return None if self.cfg.eval_batches is None else max(1, self.cfg.eval_batches // self.dist.world)

    def _eval_coverage(self) -> str:
        """What each evaluation scores, exactly, for the start-up notes."""
        cfg = self.cfg
        scored, of, t_scored, t_all = self.val_batcher.eval_coverage(self._eval_batches_per_rank())
        unit = "document" if cfg.line_by_line else "window"
        if scored == of:
            return f"validation: each evaluation scores all {plural(of, unit)} ({t_all:,} target tokens)"
        per_batch = cfg.batch_size * self.dist.world
        return (f"validation: each evaluation scores {scored:,} of {plural(of, unit)} ({t_scored:,} of {t_all:,} "
                f"target tokens), spread evenly, to keep evaluation quick; --eval-batches "
                f"{self.dist.world * math.ceil(of / per_batch)} scores them all")

    def evaluate(self, step: int) -> float:
        total, count = self.trainer.eval_loss(self.val_batcher.eval_batches(self._eval_batches_per_rank()))
        loss = total / max(1, count)
        ppl = math.exp(loss) if loss < 700 else math.inf  # (exp overflows a float64 past ~709)
        # the starting model's loss (step 0) is the baseline: only a step that beats it becomes best/
        improved = step > 0 and (self.best_val is None or loss < self.best_val)
        if self.dist.main:
            self._keep_going(runs.METRICS, lambda: runs.append_metrics(
                self.dir, [{"step": step, "val_loss": loss, "val_ppl": ppl if ppl < math.inf else None,
                            "val_tokens": count}]))
            self.trackers.log_metrics(step, {"val_loss": loss, "val_ppl": ppl if ppl < math.inf else None})
            if self.tb is not None:
                self.tb.add_scalar("val/loss", loss, step)
                self.tb.add_scalar("val/perplexity", ppl, step)
        if step > 0:
            if improved:
                self.best_val, self.best_step, self.bad_evals = loss, step, 0
                self._save_named("best")
                if self.dist.main:
                    self._keep_going(runs.RUN_JSON, lambda: runs.update_run_json(
                        self.dir, best_val_loss=loss, best_step=step, step=step))
            else:
                self.bad_evals += 1
        elif self.best_val is None:
            self.best_val, self.best_step = loss, 0
        mark = " (best)" if improved else ""
        shown = f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"
        self.say(f"step {step}: validation loss {loss:.4f}, perplexity {shown}{mark}")
        self._plot()
        return loss

    def _best(self) -> dict[str, Any]:
        """best/'s validation loss and step, for run.json and RunResult: None while no step has beaten the
        starting model (whose step-0 loss self.best_val then holds, as the baseline)."""
        has = bool(self.best_step)
        return {"best_val_loss": self.best_val if has else None, "best_step": self.best_step if has else None}

    def sample(self, step: int) -> None:
        if not self.dist.main:
            return
        texts = _sample_texts(self.model, self.tok, self.cfg.prompts, self.cfg.sample_tokens,
                              seed=self.cfg.seed + step, temperature=self.cfg.sample_temperature,
                              top_k=self.cfg.sample_top_k)
        out = self.dir / "samples"
        sep = "\n" + "=" * 40 + "\n"
        self._keep_going("samples", lambda: (out.mkdir(exist_ok=True),
                                             runs.atomic_write_text(out / f"step-{step}.txt", sep.join(texts) + "\n")))
        shown = "\n".join(f"  | {line}" for t in texts for line in (t.strip() or "(empty)").splitlines()[:6])
        self.trackers.log_samples(step, self.cfg.prompts, texts)
        self.say(f"step {step}: samples (samples/step-{step}.txt)\n{shown}")

    def _keep_going(self, what: str, write: Callable[[], Any]) -> None:
        """Bookkeeping that only the main process writes (metrics, samples, run.json fields): a failure, such
        as a full disk, is a warning (once per file), not the end of training. Under torchrun the other
        processes would otherwise be left waiting at their next collective call. Checkpoints, which matter,
        fail on every process alike (_Dist.agree), with the previous one kept."""
        try:
            write()
        except OSError as e:
            if what not in self._write_warned:
                self._write_warned.add(what)
                self.say(f"warning: cannot write {self.dir / what} ({e.strerror or e}); training goes on, but "
                         "the next checkpoint will fail the same way unless you free some disk space")

    def _plot(self, force: bool = False) -> None:
        # redrawn at evaluations and checkpoints, at most every 30 s (drawing takes a moment), and at the end
        if self.dist.main and (force or time.monotonic() - self._plotted > 30):
            self._plotted = time.monotonic()
            from gpt2kit.plot import plot_run
            try:
                plot_run(self.dir)
            except Exception as e:  # noqa: BLE001 - a plot must never stop training
                log.warning("could not draw loss.png: %s", e)

    # ---- main ----
    def run(self) -> RunResult:
        status, stopped_early = "running", False
        try:
            with safe_stderr():  # a closed or broken stderr (`| head`, a killed `tee`) never stops training
                self.dist.agree(self._prepare_dir)
                self._setup()
                with _Interrupt(self.say) as interrupt:
                    status, stopped_early = self._loop(interrupt)
        except BaseException as e:
            peer = self.dist.initialized and _peer_failed(e)
            if self.dist.main and self.committed:
                st = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                why = ("another process of the torchrun job failed (its error is in the job's output)" if peer else
                       f"{type(e).__name__}: {e}"[:500])
                got = {"step": self.step} if hasattr(self, "step") else {}  # how far it got
                with contextlib.suppress(OSError, Gpt2kitError):  # e.g. the disk is full: report `e`, not this
                    runs.update_run_json(self.dir, status=st, error=None if st == "interrupted" else why, **got)
            elif self.dist.main and not self.resuming and self.lock is not None:
                self._abandon()
            if peer:  # the process that failed has said why; a transport traceback here would only hide it
                raise Gpt2kitError(f"process {self.dist.rank}: stopping, because another process of this torchrun "
                                   "job failed (its error is printed above, or in its node's output)") from None
            if _out_of_memory(e):
                raise Gpt2kitError(f"out of memory on {self.device} at batch {self.cfg.batch_size} x "
                                   f"{self.cfg.block_size} tokens; lower --batch-size (raise --grad-accum to keep "
                                   "the global batch), add --grad-checkpointing, or use --lora-rank 8") from None
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.tb is not None:
                self.tb.close()
            self.trackers.finish(status)
            if self.lock is not None:  # the last thing: run.json says how it ended before another may start
                self.lock.release()
            if self.dist.main and not self.committed:
                for d in reversed(self.created):  # a new run that never trained leaves no folder it made
                    try:
                        d.rmdir()
                    except OSError:
                        break

        model_dir = None
        if self.dist.main:
            # (a LoRA checkpoint holds adapters only, which --model RUN also loads)
            ckpts = runs.checkpoint_dirs(self.dir)
            model_dir = runs.model_dir(self.dir) or (ckpts[-1][1] if ckpts else None)
        tps = self.tokens_seen / self.train_time if self.train_time > 0 else 0.0
        best = self._best()
        return RunResult(self.dir, status, self.step, self.cfg.steps, self.last_loss, best["best_val_loss"],
                         best["best_step"], model_dir, tps, stopped_early)

    def _build_model(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        self.model, self.tok, base_dir, base_fp = self._load_model(ckpt)
        self.lora_cfg = None
        if cfg.lora_rank:
            from gpt2kit import lora
            self.lora_cfg = lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                            targets=cfg.lora_targets, base_model=base_dir,
                                            base_fingerprint=base_fp)
            torch.manual_seed(cfg.seed)
            lora.apply_lora(self.model, self.lora_cfg)
            if ckpt is not None:
                lora.load_adapter_weights(self.model, ckpt)
        if cfg.freeze:
            frozen = freeze(self.model, cfg.freeze)
            self.say(f"frozen: {plural(len(frozen), 'parameter tensor')} ({', '.join(cfg.freeze)})")
        self.model.gradient_checkpointing = cfg.grad_checkpointing

    def _setup(self) -> None:
        cfg = self.cfg
        if self.resuming:
            ckpts = runs.checkpoint_dirs(self.dir)
            ckpt = ckpts[-1][1] if ckpts else None
        else:
            ckpt = None
        self.dist.agree(lambda: self._build_model(ckpt))
        train, val = self._prepare_data(self.tok)
        asked_eval = cfg.eval_every
        self.cfg = cfg = self._resolve(self.model, train, val)

        from gpt2kit.data import Batcher
        kw = dict(seed=cfg.seed, line_by_line=cfg.line_by_line, rank=self.dist.rank, world_size=self.dist.world,
                  device=self.device, eot_token=self.tok.eot_token)
        self.batcher = Batcher(train, cfg.block_size, cfg.batch_size, **kw)
        self.val_batcher = None
        if val is not None:
            val_block = cfg.block_size
            if not cfg.line_by_line and 2 <= len(val) < val_block + 1:  # what Batcher would do, said plainly
                val_block = len(val) - 1
                self.say(f"warning: the validation data has only {len(val)} tokens; validating on blocks of "
                         f"{val_block}")
            self.val_batcher = Batcher(val, val_block, cfg.batch_size, **kw)
        if cfg.line_by_line:
            lengths = np.diff(train.doc_offsets)  # (n_docs,), each with its closing <|endoftext|>
            long = lengths > cfg.block_size + 1
            if long.any():
                unused = int((lengths[long] - (cfg.block_size + 1)).sum())
                self.say(f"warning: --line-by-line: {int(long.sum()):,} of {len(lengths):,} documents are longer than "
                         f"block size {cfg.block_size} + 1 tokens and are cut to it ({unused / len(train):.0%} of "
                         "the training tokens unused); raise --block-size, or drop --line-by-line to train on "
                         "windows of the whole text")
        if cfg.early_stop and self.val_batcher is None:
            self.say(f"warning: --early-stop {cfg.early_stop} needs validation data and this run has none; it will "
                     "run all its steps")
        if asked_eval and self.val_batcher is None:
            self.say(f"warning: --eval-every {asked_eval} needs validation data and this run has none; it will not "
                     "evaluate")
        self.trainer = Trainer(self.model, cfg, self.device, ddp=self.dist.initialized)
        self.step, self.best_val, self.best_step, self.bad_evals = 0, None, None, 0
        self.tokens_seen, self.train_time, self.last_loss = 0, 0.0, None
        if ckpt is not None:
            self._load_checkpoint_state(ckpt)
        if self.step >= cfg.steps and self.extending:
            raise Gpt2kitError(f"cannot continue {self.dir} to {plural(cfg.steps, 'step')}: it has done "
                               f"{self.step} already (--steps and --epochs with --resume give the new total)")
        # a batch that cannot fit is refused before the commit, so it leaves no run (and --overwrite deletes nothing)
        warn = _memory_warning(self.model, cfg, cfg.block_size, self.device,
                               sum(p.numel() for p in self.trainer.params))
        self.dist.agree(self._commit if self.dist.main else None)
        if warn:
            self.say(f"warning: {warn}")

        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trainer.params)
        prec = self.trainer.precision
        self.say(f"gpt2kit finetune: device {self.device_reason}; {prec.describe()}")
        what = (f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else
                "all weights" if n_train == n_params else "partly frozen")
        trained = f"{n_train:,}" if n_train < 1e6 else f"{n_train / 1e6:.2f}M"
        self.say(f"model: {n_params / 1e6:.1f}M parameters, {trained} trained ({what}); data: "
                 f"{plural(len(train), 'token')} in {plural(train.n_docs, 'document')}"
                 + (f", validation {len(val):,} tokens" if val is not None else ", no validation"))
        if self.val_batcher is not None and cfg.eval_every:
            self.say(self._eval_coverage())
        glob_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.say(f"steps: {cfg.steps} of {plural(glob_batch, 'sequence')} x {cfg.block_size} tokens, lr {cfg.lr:g} "
                 f"({cfg.schedule}, {cfg.warmup_steps} warmup); run directory {self.dir}"
                 + (f"; resuming at step {self.step}" if self.step else ""))
        if cfg.compile and self.device.type == "cpu":
            self.say("warning: --compile made CPU training slower in our measurements (4.1 vs 2.9 s a step for "
                     "124M, after a long compile); it is meant for GPUs")
        if cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.say("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
        if cfg.wandb and self.dist.main:
            from gpt2kit.tracking import open_trackers
            self.trackers = open_trackers(cfg.to_dict(), self.dir, use_wandb=True, wandb_project=cfg.wandb_project,
                                          wandb_run_name=cfg.wandb_run_name)

    def _loop(self, interrupt: _Interrupt) -> tuple[str, bool]:
        cfg = self.cfg
        if self.dist.main and self.progress:
            self.bar = progress_bar(total=cfg.steps, initial=self.step, unit="step", desc="finetune")
        if self.step == 0:
            if self.val_batcher is not None and cfg.eval_every:
                self.evaluate(0)
            if cfg.sample_every:
                self.sample(0)
        last_write = time.monotonic()
        pending: list[dict[str, Any]] = []
        stopped_early = False
        while self.step < cfg.steps:
            step = self.step
            torch.manual_seed(_step_seed(cfg.seed, step, self.dist.rank))  # dropout masks depend on (seed, step)
            lr = lr_at(step, cfg, cfg.steps)
            t0 = time.perf_counter()
            batches = [self.batcher.next() for _ in range(cfg.grad_accum)]
            n_tok = sum(int((y != -100).sum()) for _, y in batches)
            loss_t = self.trainer.forward_backward(batches)
            norm = self.trainer.optimizer_step(lr)
            loss = self.dist.mean(float(loss_t), self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step = step + 1
            n_tok *= self.dist.world
            self.tokens_seen += n_tok
            self.train_time += dt
            self.last_loss = loss
            if not math.isfinite(loss) and self.trainer.precision.scaler is None:
                raise Gpt2kitError(
                    f"the loss became {loss} at step {self.step}; start a new run with a lower --lr (now {cfg.lr:g})"
                    + (" or --dtype float32" if self.trainer.precision.mode != "float32" else "")
                    + " (--resume would repeat the same steps)")
            rec = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                   "tok_per_s": n_tok / dt, "time": round(self.train_time, 3)}
            if norm is not None:
                rec["grad_norm"] = float(norm)
            pending.append(rec)
            if self.dist.main:
                self.trackers.log_metrics(self.step, rec)
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f}, {n_tok / dt:,.0f} tok/s, lr {lr:.2e}", refresh=False)
                self.bar.update(1)
            if self.tb is not None:
                self.tb.add_scalar("train/loss", loss, self.step)
                self.tb.add_scalar("train/lr", lr, self.step)
            stop = self.dist.any_flag(interrupt.flag, self.device)
            last = self.step == cfg.steps
            due = lambda every: bool(every) and (self.step % every == 0)  # noqa: E731
            if self.dist.main and (pending and (time.monotonic() - last_write > 5 or stop or last
                                                 or due(cfg.eval_every) or due(cfg.save_every))):
                self._keep_going(runs.METRICS, functools.partial(runs.append_metrics, self.dir, pending))
                pending = []
                last_write = time.monotonic()
            if self.val_batcher is not None and (due(cfg.eval_every) or (last and cfg.eval_every)):
                self.evaluate(self.step)
                if cfg.early_stop and self.bad_evals >= cfg.early_stop:
                    self.say(f"early stop: no better validation loss in {plural(cfg.early_stop, 'evaluation')} "
                             f"(best {self.best_val:.4f} at step {self.best_step})")
                    stopped_early = True
            if due(cfg.sample_every) or (last and cfg.sample_every):
                self.sample(self.step)
            if stop:
                self.save_checkpoint(self.step)
                self._plot(force=True)
                if self.dist.main:
                    runs.update_run_json(self.dir, status="interrupted", step=self.step)
                self.say(f"interrupted: saved {self.dir}/checkpoints/step-{self.step}; continue with "
                         f"{_resume_hint(self.dir, self.dist.world)}")
                return "interrupted", False
            if due(cfg.save_every) and not last and not stopped_early:
                self.save_checkpoint(self.step)
            if stopped_early:
                break
        if self.dist.main and pending:
            self._keep_going(runs.METRICS, functools.partial(runs.append_metrics, self.dir, pending))
        self.save_checkpoint(self.step)
        final = self._save_named("final")
        if self.dist.main:
            runs.update_run_json(self.dir, status="finished", step=self.step, finished=runs.now(),
                                 stopped_early=stopped_early, last_loss=self.last_loss,
                                 **self._best())
        self._plot(force=True)
        best = ""
        if self.best_step == 0:
            best = (f"; no step beat the starting model's validation loss ({self.best_val:.4f}), so there is no "
                    "best/ (lower --lr?)")
        elif self.best_step is not None:
            best = f"; best validation loss {self.best_val:.4f} at step {self.best_step} in best/"
        tps = self.tokens_seen / max(self.train_time, 1e-9)
        if self.bar is not None:  # the finished bar first, once, then the summary under it
            self.bar.close()
            self.bar = None
        self.say(f"done: {plural(self.step, 'step')}, {tps:,.0f} tokens/s; model in {final}{best}")
        return "finished", stopped_early


def finetune(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False,
             runs_dir: str | os.PathLike | None = None, name: str | None = None) -> RunResult:
    """Train a new run into cfg.out: a new path, an empty folder, or (with `overwrite`, or after a start
    that failed before training) an earlier run that is not running, whose own files are replaced only once
    everything has been checked; a folder holding anything else is refused. `runs_dir`: train into the next
    numbered run there instead (`runs/0007`, with `name`: `runs/0007-name`; cfg.out is set to it). A start
    that fails before training leaves no run behind. Under torchrun, every process calls this."""
    if not isinstance(cfg, TrainConfig):
        raise Gpt2kitError(f"finetune() takes a TrainConfig, not {type(cfg).__name__}")
    if name is not None and runs_dir is None:
        raise Gpt2kitError("--name names a numbered run: give it with --runs-dir DIR (not with --out)")
    if cfg.model:
        cfg.model = os.fspath(resolve_run_ref(cfg.model))  # (`--model runs/7`: recorded as the run's real path)
    if cfg.steps is not None and cfg.epochs is not None:  # (a resolved config.json holds both: resume is fine)
        raise Gpt2kitError(f"give --steps ({cfg.steps}) or --epochs ({cfg.epochs:g}), not both")
    if cfg.early_stop and cfg.eval_every == 0:  # (a resolved config.json may hold both: resume is fine)
        raise Gpt2kitError(f"--early-stop {cfg.early_stop} counts evaluations, and --eval-every 0 turns them off; "
                           "give --eval-every N, or drop --early-stop")
    cfg.validate()
    # (a numbered run is a new folder in runs_dir: what matters is whether a data folder holds runs_dir)
    _check_inputs(cfg if runs_dir is None else replace(cfg, out=os.fspath(Path(runs_dir) / "0")))
    # the data, before the model (which may mean a long download, or a download error offline)
    check_inputs(cfg.data, cfg.data_spec(), val_inputs=cfg.val_data or None)
    _check_sharing(cfg)
    run = _Run(cfg, resume=False, progress=progress, overwrite=overwrite)
    if runs_dir is not None:
        number, made = None, not Path(runs_dir).expanduser().exists()
        if run.dist.main:  # the main process picks the number; under torchrun the others learn it
            cfg.out = run.cfg.out = str(new_run_dir(runs_dir, name))
            number = cfg.out
        if run.dist.initialized:
            import torch.distributed as dist
            got = [number]
            dist.broadcast_object_list(got, src=0)
            cfg.out = run.cfg.out = got[0]
        run.dir = Path(cfg.out)
        # (made empty by new_run_dir, as was runs_dir if it was new: removed again if the start fails)
        run.created = [run.dir.parent] * made + [run.dir]
    return _finish(run)


def _check_sharing(cfg: TrainConfig) -> None:
    """Before training, not after it: --wandb's package is installed, --push-to-hub names a repository and a
    token is there to push with."""
    if cfg.wandb:
        from gpt2kit.tracking import check_available
        check_available(True)
    if cfg.push_to_hub:
        from gpt2kit.push import check_ready
        check_ready(cfg.push_to_hub)


def _check_inputs(cfg: TrainConfig) -> None:
    """Replacing a run in --out deletes its own entries before the new run reads its inputs: an input among
    them is refused before anything is deleted. So is a data folder holding --out, which would read the run's
    own files (tokenizer/merges.txt, samples/) as training text."""
    out = Path(cfg.out).expanduser().resolve()
    named = [("--model", cfg.model), ("--config", cfg.config), ("--tokenizer", cfg.tokenizer)]
    named += [("--data", d) for d in cfg.data] + [("--val-data", d) for d in cfg.val_data]
    for opt, value in named:
        if not value:
            continue
        path = Path(value).expanduser()
        found = [path] if path.exists() or not glob.has_magic(value) else \
            [Path(m) for m in glob.glob(os.path.expanduser(value), recursive=True)]
        for p in (f.resolve() for f in found if f.exists()):
            if p == out or (out in p.parents and p.relative_to(out).parts[0] in runs.RUN_ENTRIES):
                fix = "" if opt == "--model" else f"copy it out of {cfg.out} first, or "
                raise Gpt2kitError(f"{opt} {value} is inside --out {cfg.out}: a new run cannot replace the one it "
                                   f"{'starts from' if opt == '--model' else 'reads from'}; {fix}choose another --out")
            if (opt in ("--data", "--val-data") and p.is_dir() and p in out.parents
                    and not any(part.startswith(".") for part in out.relative_to(p).parts)):  # (hidden: skipped)
                raise Gpt2kitError(f"{opt} {value} holds --out {cfg.out}, whose own files (tokenizer, samples) would "
                                   "be read as training text; choose an --out outside it")


def resume(run_dir: str | Path, *, progress: bool = True, device: str | None = None,
           model: str | os.PathLike | None = None, steps: int | None = None, epochs: float | None = None
           ) -> RunResult:
    """Continue a run from its newest checkpoint, with the configuration it was started with. A run that
    had not reached its first checkpoint starts over (with the same result, since every step is
    deterministic). `model`: where a LoRA run's base model is now, if it moved (its weights must be the
    ones the run trained on). `steps` or `epochs`: a new total length, to continue a finished run for longer
    (or change an unfinished one's), with its optimizer state; the learning-rate schedule becomes the one of
    a run of the new length. The run's lock is taken before anything is read: a run another process trains
    is refused at once."""
    run_dir = Path(resolve_run_ref(run_dir))
    lock = None
    if os.environ.get("RANK", "0") == "0" and run_dir.is_dir():
        lock = _lock_for_resume(run_dir)
    try:
        run = _resume_run(run_dir, lock, progress=progress, device=device, model=model, steps=steps,
                          epochs=epochs)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return _finish(run)


def _lock_for_resume(run_dir: Path) -> runs.RunLock:
    try:
        return runs.RunLock.acquire(run_dir)
    except OSError as e:
        raise Gpt2kitError(f"cannot resume {run_dir}: cannot write in it ({e.strerror or e}); a run directory "
                           "must be writable to resume: make it writable, or copy it elsewhere and resume the copy"
                           ) from None


def _resume_run(run_dir: Path, lock: runs.RunLock | None, *, progress: bool, device: str | None,
                model: str | os.PathLike | None, steps: int | None, epochs: float | None) -> _Run:
    info = runs.read_run_json(run_dir)
    try:
        d = json.loads((run_dir / runs.CONFIG_JSON).read_text())
    except (OSError, ValueError) as e:
        raise Gpt2kitError(f"cannot read {run_dir / runs.CONFIG_JSON} ({e}); the run cannot be resumed") from None
    if not isinstance(d, dict):
        raise Gpt2kitError(f"{run_dir / runs.CONFIG_JSON} does not hold a JSON object; the run cannot be resumed")
    cfg = TrainConfig.from_dict(d)
    cfg.out = str(run_dir)
    if device is not None:
        cfg.device = device
    if model is not None:
        if not cfg.lora_rank:
            raise Gpt2kitError(f"run {run_dir} trains all weights and resumes from its own checkpoints; drop "
                               "--model (it can only point a LoRA run at its moved base model)")
        cfg.model = os.fspath(model)
    if steps is not None and epochs is not None:
        raise Gpt2kitError(f"give --steps ({steps}) or --epochs ({epochs:g}), not both")
    extending = steps is not None or epochs is not None
    if extending:  # the new total; _Run._resolve turns epochs into steps, and _setup checks it is more
        cfg.steps, cfg.epochs = steps, epochs
    if info.get("status") == "finished" and info.get("stopped_early"):
        raise Gpt2kitError(f"run {run_dir} already finished: it stopped early at step {info.get('step')} (no "
                           f"better validation loss); its model is in {runs.model_dir(run_dir)}. Start a new run "
                           f"from it with --model {shlex.quote(str(run_dir))}")
    if info.get("status") == "finished":
        ckpts = runs.checkpoint_dirs(run_dir)
        step = ckpts[-1][0] if ckpts else info.get("step")
        # the target: --steps when the config names it (raising it extends a finished run), else the total
        # this run computed and recorded (so an edited or epoch-based config can't restart a finished run)
        target = cfg.steps if cfg.steps is not None else None if epochs is not None else info.get("total_steps")
        if isinstance(target, int) and isinstance(step, int) and step >= target:
            more = (f"--steps {target} is no more than that (it is the new total)" if extending else
                    f"continue it for longer with --resume {shlex.quote(str(run_dir))} --steps N (the new total), "
                    f"or start a new run from it with --model {shlex.quote(str(run_dir))}")
            raise Gpt2kitError(f"run {run_dir} already finished ({plural(step, 'step')}); its model is in "
                               f"{runs.model_dir(run_dir)}. {more[0].upper()}{more[1:]}")
        if extending and not ckpts:
            raise Gpt2kitError(f"run {run_dir} has no checkpoint left to continue from (checkpoints/ is empty); "
                               f"start a new run from its model with --model {shlex.quote(str(run_dir))}")
    cfg.validate()
    _check_sharing(cfg)
    return _Run(cfg, resume=True, progress=progress, moved_base=model is not None, lock=lock, extending=extending)


def _push(run: _Run, result: RunResult) -> None:
    """--push-to-hub, after a finished run: a failure is recorded in result.push_error with how to retry (the
    run itself stays finished)."""
    from gpt2kit.push import push
    repo = run.cfg.push_to_hub
    retry = shlex.join(["gpt2kit", "push", str(result.run_dir), "--repo", repo]
                       + (["--private"] if run.cfg.push_private else []))
    try:
        result.pushed = push(result.run_dir, repo, private=run.cfg.push_private)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the run is safe on disk and can be pushed again
        why = str(e) if isinstance(e, Gpt2kitError) else f"{type(e).__name__}: {e}"
        result.push_error = f"the run finished, but pushing it to {repo} failed: {why}; retry with `{retry}`"
        return
    run.say(f"pushed to {result.pushed}")


def _finish(run: _Run) -> RunResult:
    try:
        result = run.run()
    finally:
        if run.dist.initialized:
            import gc

            import torch.distributed as dist
            # The DDP wrapper's reducer holds the process group. Left to the interpreter's teardown, gloo's
            # threads could be destroyed while still joinable: the process aborted after training had
            # finished ("terminate called without an active exception"). Free it, then the group, now.
            trainer = getattr(run, "trainer", None)
            if trainer is not None:
                trainer.fwd = trainer.ddp_module = None
            gc.collect()
            dist.destroy_process_group()
    if result.status == "finished" and run.cfg.push_to_hub and run.dist.main:
        _push(run, result)
    return result
