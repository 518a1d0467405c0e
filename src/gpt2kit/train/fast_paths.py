"""CPU fast paths of training."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kit import kernels


def _rounded(attend: Callable[[torch.Tensor, int], torch.Tensor],
             dtype: torch.dtype) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`attend` with its input and output rounded to `dtype`, as EmulatedAutocast rounds PyTorch's SDPA."""
    def rounded(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        return attend(qkv.to(dtype).float(), n_head).to(dtype).float()
    return rounded


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
