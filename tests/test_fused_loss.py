"""The fused LM-head cross-entropy equals F.cross_entropy(F.linear(h, W), y): loss and both gradients,
with ignored targets, both reductions, a frozen weight, and a vocabulary that is not a multiple of 64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.fused_loss import lm_head_cross_entropy
from gpt2kit.train import TrainConfig, Trainer
from tests.conftest import random_model


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N,C,V", [(7, 16, 100), (64, 32, 1000), (5, 8, 64)])
def test_equals_linear_then_cross_entropy(reduction, N, C, V):
    g = torch.Generator().manual_seed(N + C + V)
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100  # an ignored position
    grads = []
    for fn in (lambda h, w: F.cross_entropy(F.linear(h, w), y, reduction=reduction),
               lambda h, w: lm_head_cross_entropy(h, w, y, reduction=reduction)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        (loss * 3).backward()  # an upstream gradient other than 1
        grads.append((loss.detach(), h.grad, w.grad))
    (want, want_h, want_w), (got, got_h, got_w) = grads
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert got_h[1].abs().sum() == 0 and got_h[0].abs().sum() > 0  # the ignored position gets no gradient


def test_frozen_weight_and_single_backward():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(50, 8)  # frozen: no gradient is computed for it
    loss = lm_head_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    assert w.grad is None and h.grad is not None
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    with pytest.raises(ValueError, match="reduction"):
        lm_head_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]), reduction="none")


def test_trainer_uses_it_for_float32_on_cpu_only():
    from gpt2kit.config import GPTConfig
    model = random_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32)).train()
    cpu = torch.device("cpu")
    assert Trainer(model, TrainConfig(model="x", data=["x"], dtype="float32"), cpu).fused_head
    assert not Trainer(model, TrainConfig(model="x", data=["x"], dtype="bfloat16"), cpu).fused_head
