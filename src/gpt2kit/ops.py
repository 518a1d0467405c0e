"""GPTOps: the operations of a GPT forward pass that have more than one implementation, named in one record
that the model holds (`GPT.ops`) and calls visibly. `GPTOps()` is PyTorch's own everywhere; training picks
faster ones for its device and precision (gpt2kit.train.fast_paths.training_ops) and hands them over with
`model.use_ops(...)`. Each alternative gives the same values (to float32 rounding) and the same gradients.

  attention  (qkv (B, T, 3C), n_head) -> (B, T, C): causal self-attention without dropout or KV cache.
             None: PyTorch's scaled_dot_product_attention (which the cache and attention dropout always use).
  gelu       (x) -> x: the MLP's activation. None: the config's (gelu_new: tanh form; gelu: erf form).
  embedding  (wte, idx (B, T)) -> (B, T, C): the token embedding lookup. None: wte(idx).
  head_loss  (h (B, T, C), lm_head weight (V, C), targets (B, T), reduction) -> loss: the LM head and its
             cross-entropy, when the forward pass is given targets. None: lm_head(h), then F.cross_entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kit.fused_loss import lm_head_cross_entropy, padded_size

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]
ActivationFn = Callable[[torch.Tensor], torch.Tensor]
EmbeddingFn = Callable[[nn.Embedding, torch.Tensor], torch.Tensor]
HeadLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class GPTOps:
    attention: AttentionFn | None = None
    gelu: ActivationFn | None = None
    embedding: EmbeddingFn | None = None
    head_loss: HeadLossFn | None = None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss of logits (B, T, V) against targets (B, T), -100 ignored, computed in float32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


# ---- attention ------------------------------------------------------------------------------------

def rounded_attention(attend: AttentionFn, dtype: torch.dtype) -> AttentionFn:
    """`attend` with its input and output rounded to `dtype`, as gpt2kit.train's EmulatedAutocast rounds
    PyTorch's SDPA (for bfloat16/float16 numerics on CPUs without that arithmetic)."""
    def rounded(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        return attend(qkv.to(dtype).float(), n_head).to(dtype).float()
    return rounded


# ---- embedding ------------------------------------------------------------------------------------

class _RowsIntoGrad(torch.autograd.Function):
    """weight[idx] for an nn.Embedding whose gradient is written by its backward itself: the looked-up
    rows' gradients are added in place into weight.grad (created as zeros if there is none). `weight` is
    not an autograd input, so autograd's AccumulateGrad for it waits on nothing here and runs first (for
    GPT-2's tied wte, as soon as the LM head's dense gradient arrives, which it keeps without a copy);
    `anchor`, a scalar that requires grad, only puts this node into the graph."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, anchor: torch.Tensor, module: nn.Embedding,
                report: Callable[[torch.Tensor, float], None] | None) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.module, ctx.report = module, report
        return F.embedding(idx, module.weight.detach())  # (*idx.shape, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        weight, report = ctx.module.weight, ctx.report
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        rows = idx.reshape(-1).unique() if report is not None else None  # (R,)
        before = weight.grad[rows].double().square().sum() if report is not None else None
        weight.grad.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.grad.dtype))
        if report is not None:
            report(weight, float(weight.grad[rows].double().square().sum() - before))
        return None, None, None, None


_ANCHOR = torch.zeros((), requires_grad=True)


class EmbeddingRowsIntoGrad:
    """The embedding lookup whose backward adds its rows' gradients straight into wte.grad. For GPT-2's tied
    wte/LM head, whose gradient is dense anyway (from the LM head), this saves autograd summing a second
    (vocab x n_embd) gradient into it (~8% of a 124M step on a CPU). Not under DDP, whose reducer must see
    each gradient whole when it is accumulated. `report(weight, change)`: told the change the rows made to
    the sum of squares of weight.grad (the clipping norm summed during backward uses it)."""

    def __init__(self, report: Callable[[torch.Tensor, float], None] | None = None):
        self.report = report

    def __call__(self, wte: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and wte.weight.requires_grad:
            return _RowsIntoGrad.apply(idx, _ANCHOR, wte, self.report)
        return F.embedding(idx, wte.weight)


# ---- LM head and loss -----------------------------------------------------------------------------

def fused_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """The LM head and its cross-entropy as one autograd function, float32 on CPUs (fused_loss.py says why)."""
    return lm_head_cross_entropy(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), reduction=reduction)


class PaddedHeadLoss:
    """The LM head over the vocabulary padded to a multiple of 64 rows, the padding's logits -inf, for GPUs:
    cuBLAS has no fast kernel for an odd dimension like 50,257 (on an H100 the head's three products took ~31
    of a bf16 124M step's 80 ms in fallback kernels). The loss and gradients are the same: the padded columns
    add exp(-inf) = 0 to each softmax and get no gradient."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.bias = torch.zeros(padded_size(vocab_size), device=device)  # (P,): 0, then -inf for the padding
        self.bias[vocab_size:] = float("-inf")

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) -> logits (B, T, P) over the padded vocabulary."""
        return F.linear(h, F.pad(weight, (0, 0, 0, self.bias.shape[0] - weight.shape[0])), self.bias)

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        return cross_entropy(self.logits(h, weight), targets, reduction)
