"""The LM head and its cross-entropy as one autograd function, for float32 training on CPUs.

Same loss and gradients as `F.cross_entropy(F.linear(h, W), y)`, computed differently for speed. Why by
hand: on CPUs the (tokens x 50,257) logits product runs ~25% slower than it could, because each row of
the output is 50,257 floats long and MKL's kernel slows down on rows that do not start on a 64-byte
boundary (measured: 0.33 s for 512 tokens at a row length of 50,257 against 0.25 s at 50,304). Here the
logits are written into a buffer whose rows are padded to a multiple of 64 floats, and the backward pass
turns that same buffer into the gradient of the logits in place, so no second 100 MB tensor is
allocated and filled for the softmax or its gradient either. With gpt2kit's CPU kernels loaded, the
softmax is the kernel's (kernels/cpu_train.cpp): one exp per logit, rows read while in cache, where
logsumexp and the backward's sub and exp were ~45 ms of passes over the 100 MB of a 124M step's logits.
"""

from __future__ import annotations

import torch

from gpt2kit import kernels

_SLICE = 2048


def padded_size(n: int, multiple: int = 64) -> int:
    """n rounded up to a multiple of `multiple` (64: whole cache lines of float32, tensor-core friendly)."""
    return (n + multiple - 1) // multiple * multiple


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                reduction: str) -> torch.Tensor:
        N, V = h.shape[0], weight.shape[0]
        logits = torch.empty(N, padded_size(V), dtype=h.dtype, device=h.device)[:, :V]  # (N, V), padded rows
        # in slices of 2,048 vocabulary rows: MKL ran the whole (512 x 768) @ (768 x 50,257) product at ~167
        # GFLOP/s and sliced at ~178 (220 against 235 ms, alternating in one process)
        for s in range(0, V, _SLICE):
            torch.mm(h, weight[s:s + _SLICE].t(), out=logits[:, s:s + _SLICE])
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        # both ways leave in the buffer the softmax times 1 / inv_sum (N,), for the backward pass
        ext = kernels.loaded()
        if ext is not None and logits.dtype == torch.float32 and logits.device.type == "cpu":
            # e^(logits - row max), one exp per logit
            losses, inv_sum = ext.softmax_xent_forward(logits, targets.long().contiguous(), ignore_index)  # (N,) each
        else:
            lse = torch.logsumexp(logits, dim=1)  # (N,)
            losses = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid  # (N,)
            torch.sub(logits, lse[:, None], out=logits).exp_()  # the softmax itself
            inv_sum = torch.ones_like(lse)
        count = valid.sum()
        loss = losses.sum() / count if reduction == "mean" else losses.sum()
        ctx.save_for_backward(h, weight, safe, valid, count, inv_sum)
        ctx.logits, ctx.reduction = logits, reduction
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, safe, valid, count, inv_sum = ctx.saved_tensors
        g, ctx.logits = ctx.logits, None  # the logits buffer becomes their gradient, in place
        if g is None:
            raise RuntimeError("the fused LM-head loss can be back-propagated only once")
        scale = valid * (grad / count if ctx.reduction == "mean" else grad)  # (N,); none at ignored positions
        g.mul_((scale * inv_sum)[:, None])  # the softmax, scaled
        g[torch.arange(g.shape[0], device=g.device), safe] -= scale  # softmax - one-hot, scaled
        need_h, need_w = ctx.needs_input_grad[:2]
        return g @ weight if need_h else None, g.t() @ h if need_w else None, None, None, None


def lm_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(h (N, C) @ weight (V, C)^T, targets (N,)) with reduction "mean" (over targets that
    are not ignore_index) or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    return _LMHeadCrossEntropy.apply(h, weight, targets, ignore_index, reduction)
