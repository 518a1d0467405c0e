"""One process's optimisation: the optimizer and its parameter groups, the learning-rate schedule, --freeze,
and Trainer (loss, backward with accumulation, clipping, the AdamW step, evaluation loss)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2kit import kernels
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.ops import PaddedHeadLoss, fused_head_loss
from gpt2kit.train.config import TrainConfig, frozen_names
from gpt2kit.train.fast_paths import _NormInBackward, training_ops, tune_cpu_allocator
from gpt2kit.train.fsdp import shard_model
from gpt2kit.train.precision import Precision


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


def freeze(model: GPT, specs: Sequence[str]) -> list[str]:
    """Set requires_grad=False on the named parts (train/config.py's frozen_names says which); returns the
    frozen parameter names."""
    chosen = frozen_names([n for n, _ in model.named_parameters()], specs, model.config.n_layer)
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


class Trainer:
    """One process's optimisation: loss, backward (with accumulation and DDP sync on the last
    micro-batch), clipping and the AdamW step. The training loop, the benchmark and the parity test all
    use this, so they measure and test the same code."""

    def __init__(self, model: GPT, cfg: TrainConfig, device: torch.device, *, ddp: bool = False,
                 fsdp: bool = False):
        self.model, self.cfg, self.device = model, cfg, device
        if ddp and fsdp:
            raise ValueError("Trainer: ddp or fsdp, not both")
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_contiguous():
                    # checkpoint loading may keep HF's (in, out) storage as a transposed view; training wants
                    # row-major weights so that gradients and optimizer state need no layout copies (~3%)
                    p.data = p.data.contiguous()
        self.precision = Precision(cfg.dtype, device)
        self.fsdp = fsdp
        if fsdp:  # (before the optimizer, which must hold the sharded parameters)
            if self.precision.scaler is not None:
                raise Gpt2kitError("--fsdp trains in float32 or bfloat16: float16's loss scaling is not supported "
                                   "on sharded gradients; use --dtype bfloat16")
            shard_model(model, self.precision, cpu_offload=cfg.fsdp_cpu_offload)
        # gradients averaged over the processes (DDP's reducer, FSDP's reduce-scatter), losses summed over them
        self.distributed = ddp or fsdp
        self.optimizer = build_optimizer(model, cfg, device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ddp = ddp
        self.fwd: nn.Module = model  # what the forward pass is called through: the model, DDP's wrapper, compiled
        if ddp:
            self.fwd = self.ddp_module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.fwd = torch.compile(self.fwd)
        # on CPUs: attention, GELU, the loss's softmax and the gradient norm through gpt2kit's kernels, where
        # this machine can build them (kernels/cpu_train.cpp says why)
        self.cpu_kernels = (device.type == "cpu" and not cfg.compile and kernels.load() is not None)
        # the clipping norm summed during backward, where optimizer_step hands it to fused AdamW (not under DDP,
        # whose reducer averages the gradients after their hooks ran)
        self.norm_in_backward: _NormInBackward | None = None
        if (self.cpu_kernels and cfg.grad_clip > 0 and self.precision.scaler is None and not self.distributed
                and self.optimizer.defaults.get("fused")):
            self.norm_in_backward = _NormInBackward(self.params)
        # the model's forward pass with the fast paths for this device and precision (fast_paths.py says which)
        model.use_ops(training_ops(model, device, self.precision, ddp=self.distributed, compiled=cfg.compile,
                                   cpu_kernels=self.cpu_kernels, norm=self.norm_in_backward))
        if device.type == "cpu" and not self.distributed:
            # not under torch.distributed, where it has not been measured
            tune_cpu_allocator()

    # which LM head and loss the model runs (GPTOps.head_loss); settable, so that a test can force either path
    @property
    def fused_head(self) -> bool:
        return self.model.ops.head_loss is fused_head_loss

    @fused_head.setter
    def fused_head(self, on: bool) -> None:
        if on != self.fused_head:
            self.model.use_ops(replace(self.model.ops, head_loss=fused_head_loss if on else None))

    @property
    def pad_head(self) -> bool:
        return isinstance(self.model.ops.head_loss, PaddedHeadLoss)

    @pad_head.setter
    def pad_head(self, on: bool) -> None:
        if on != self.pad_head:
            w = self.model.lm_head.weight
            self.model.use_ops(replace(self.model.ops, head_loss=PaddedHeadLoss(w.shape[0], w.device) if on else None))

    def loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self.precision.forward():
            return self.fwd(x, targets=y, reduction=reduction)

    def _padded_head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, P) over the vocabulary padded to P (a multiple of 64), the padding at -inf."""
        head = self.model.ops.head_loss
        w = self.model.lm_head.weight  # (V, C)
        if not isinstance(head, PaddedHeadLoss):
            head = PaddedHeadLoss(w.shape[0], w.device)
        return head.logits(self.fwd(x, return_hidden=True), w)  # (B, T, P)

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
            if self.distributed:
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
        # fewer than scaling them in place first. (Sharded gradients: clip_grad_norm_ sums every shard's norm.)
        in_adamw = clip and scaler is None and bool(self.optimizer.defaults.get("fused")) and not self.fsdp
        norm = None
        if in_adamw:
            norm = (self.norm_in_backward.total() if self.norm_in_backward is not None and self.norm_in_backward.ready
                    else kernels.total_norm([p.grad for p in self.params if p.grad is not None]))
            self.optimizer.grad_scale = ((norm + 1e-6) / self.cfg.grad_clip).clamp(min=1.0)
        elif clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            if hasattr(norm, "full_tensor"):  # (a DTensor under --fsdp: the norm of every shard together)
                norm = norm.full_tensor()
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
        if self.distributed:
            both = torch.stack([total, count])
            dist.all_reduce(both)
            total, count = both[0], both[1]
        return float(total), int(count)

    def state_dict(self) -> dict[str, Any]:
        # (under --fsdp the optimizer state is sharded: the checkpoint's DCP shards hold it, fsdp.save_sharded)
        return {"optimizer": None if self.fsdp else self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
