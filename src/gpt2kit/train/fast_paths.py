"""The fast paths training takes: `training_ops` picks the model's GPTOps for the device and precision (what
each does is in gpt2kit/ops.py), `_NormInBackward` sums the clipping norm during backward, and
`tune_cpu_allocator` keeps glibc from handing memory back between steps."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from gpt2kit import kernels
from gpt2kit.model import GPT
from gpt2kit.ops import EmbeddingRowsIntoGrad, GPTOps, PaddedHeadLoss, fused_head_loss, rounded_attention
from gpt2kit.train.precision import Precision


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


class _NormInBackward:
    """The gradient norm for clipping, summed during backward: a hook takes each gradient's sum of squares
    the moment autograd has finished accumulating it, while it is still in cache. Why: after backward, a
    separate pass over a 124M model's 0.5 GB of gradients reads them back from memory, ~15 ms of a 2-core
    CPU step (~32 GB/s); in cache the same sums cost a few ms. Each parameter's slot keeps the latest value
    its hook saw, which is its final gradient however often and in whatever order autograd accumulates
    (gradient checkpointing, accumulation over micro-batches); the slots left empty are summed afterwards.
    The tied embedding's rows, which ops.EmbeddingRowsIntoGrad adds into wte.grad after its hook ran, report
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


def training_ops(model: GPT, device: torch.device, precision: Precision, *, ddp: bool, compiled: bool,
                 cpu_kernels: bool, norm: _NormInBackward | None = None) -> GPTOps:
    """The GPTOps a training forward pass runs with on `device` under `precision`:
    - embedding (CPUs, not under DDP, a trained wte): the looked-up rows' gradients go straight into the tied
      wte/LM-head gradient, reported to `norm` (ops.EmbeddingRowsIntoGrad);
    - attention and GELU (CPUs where gpt2kit's kernels load, not compiled): the float32 kernels. Under native
      autocast (CPUs with AMX/AVX512-BF16) they take their bfloat16 input up to float32 and hand float32 on to
      the next product, which rounds it again: the same roundings of every product's inputs, the two computed
      more precisely than in bfloat16, and faster (124M step on a 2-core Xeon with AMX: PyTorch's bfloat16
      flash attention 79 ms and GELU 36 ms). Emulated autocast rounds attention's input and output as it
      does around PyTorch's SDPA;
    - the LM head and loss: fused on CPUs in float32 (not compiled), padded to a multiple of 64 rows on GPUs."""
    head = model.lm_head
    plain_head = type(head) is nn.Linear and head.bias is None
    embedding = None
    if device.type == "cpu" and not ddp and model.transformer.wte.weight.requires_grad:
        embedding = EmbeddingRowsIntoGrad(report=norm.rows_added if norm is not None else None)
    attention = gelu = None
    if cpu_kernels:
        mode = precision.mode
        if model.config.activation == "gelu_new":  # the kernel computes the tanh form only
            gelu = kernels.gelu_tanh_float32 if mode == "autocast" else kernels.gelu_tanh
        attention = (kernels.causal_attention_float32 if mode == "autocast" else
                     rounded_attention(kernels.causal_attention, precision.dtype) if mode == "emulated" else
                     kernels.causal_attention)
    head_loss = None
    if device.type == "cpu" and precision.mode == "float32" and not compiled and plain_head:
        head_loss = fused_head_loss
    elif device.type == "cuda" and plain_head and head.weight.shape[0] % 64:
        head_loss = PaddedHeadLoss(head.weight.shape[0], head.weight.device)
    return GPTOps(attention=attention, gelu=gelu, embedding=embedding, head_loss=head_loss)
