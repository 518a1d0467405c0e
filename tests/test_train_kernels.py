"""gpt2kit's compiled training kernels (kernels/cpu_train.cpp) against PyTorch: causal attention and GELU
forward and backward, the cross-entropy softmax, the gradient norm; and the trainer's own embedding
backward, which writes the tied wte gradient in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import kernels
from gpt2kit.config import GPTConfig
from gpt2kit.fused_loss import lm_head_cross_entropy
from gpt2kit.train import TrainConfig, Trainer
from tests.conftest import random_model


def _sdpa(qkv: torch.Tensor, nh: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, nh, C3 // 3 // nh).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)


# lengths 1, below, at and above the kernel's blocks of 6 rows and 16 columns; head sizes 16 to 64
@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 1, 16), (2, 5, 2, 16), (1, 16, 3, 32), (3, 37, 2, 64),
                                       (2, 256, 4, 64), (1, 300, 1, 48)])
def test_causal_attention_equals_sdpa_forward_and_backward(ext, B, T, nh, hs):
    g = torch.Generator().manual_seed(T * 7 + hs)
    qkv0 = torch.randn(B, T, 3 * nh * hs, generator=g) * 2
    dy = torch.randn(B, T, nh * hs, generator=g)
    # against float64: over 300 positions the kernel was closer to it than PyTorch's own float32 SDPA
    got, want = qkv0.clone().requires_grad_(), qkv0.double().requires_grad_()
    y_got, y_want = kernels.causal_attention(got, nh), _sdpa(want, nh)
    assert "CausalAttention" in type(y_got.grad_fn).__name__  # the kernel ran
    torch.testing.assert_close(y_got, y_want.float(), rtol=1e-5, atol=1e-5)
    y_got.backward(dy)
    y_want.backward(dy.double())
    torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=2e-5)


def test_causal_attention_falls_back_for_other_head_sizes(ext):
    qkv = torch.randn(2, 9, 3 * 2 * 8)  # head size 8
    y = kernels.causal_attention(qkv, 2)
    assert y.grad_fn is None and torch.allclose(y, _sdpa(qkv, 2), atol=1e-6)


def test_model_attention_hook_is_used_only_without_dropout(ext):
    config = GPTConfig.from_name("tiny", n_embd=32, n_head=2, n_layer=1, vocab_size=50, n_positions=16)
    model = random_model(config, seed=1).train()
    x = torch.randint(0, 50, (2, 9))
    want = model(x)
    calls = []
    model.transformer.h[0].attn.attend = lambda qkv, nh: calls.append(nh) or kernels.causal_attention(qkv, nh)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [2]
    model.transformer.h[0].attn.dropout = 0.1  # attention dropout: PyTorch's SDPA, which does it
    model(x)
    assert calls == [2]


@pytest.mark.parametrize("n", [8, 13, 4097, 100_003])  # lengths with and without a tail of < 8
def test_gelu_equals_pytorch_forward_and_backward(ext, n):
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, generator=g) * 4
    x0[:4] = torch.tensor([0.0, -30.0, 30.0, -5.0])[: min(4, n)]  # zero and saturated values
    dy = torch.randn(n, generator=g)
    got, want = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y_got, y_want = kernels.gelu_tanh(got), F.gelu(want, approximate="tanh")
    assert y_got.grad_fn is not None and "GeluTanh" in type(y_got.grad_fn).__name__  # the kernel ran
    torch.testing.assert_close(y_got, y_want, rtol=1e-6, atol=1e-6)
    y_got.backward(dy)
    y_want.backward(dy)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_gelu_falls_back_where_the_kernel_does_not_apply(ext):
    x = torch.randn(4, 6).t()  # not contiguous
    assert torch.equal(kernels.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    xd = torch.randn(10, dtype=torch.float64)
    assert torch.equal(kernels.gelu_tanh(xd), F.gelu(xd, approximate="tanh"))


@pytest.mark.parametrize("V", [7, 64, 1000, 50257])
def test_softmax_xent_equals_cross_entropy_on_padded_rows(ext, V):
    g = torch.Generator().manual_seed(V)
    N = 9
    logits = torch.randn(N, V, generator=g) * 6
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2] = -100
    buf = torch.empty(N, V + 13)[:, :V]  # rows padded, as the fused loss lays them out
    buf.copy_(logits)
    loss, inv_sum = ext.softmax_xent_forward(buf, targets, -100)
    want = F.cross_entropy(logits.double(), targets, reduction="none").float()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=2e-6)
    assert loss[2] == 0
    # what it leaves in the buffer times 1 / sum is the softmax
    torch.testing.assert_close(buf * inv_sum[:, None], torch.softmax(logits.double(), 1).float(), rtol=1e-5,
                               atol=1e-7)


def test_softmax_xent_rejects_a_target_outside_the_vocabulary(ext):
    with pytest.raises(RuntimeError, match="outside"):
        ext.softmax_xent_forward(torch.randn(2, 10), torch.tensor([1, 10]), -100)


def test_total_norm_is_the_float64_norm(ext):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in [(3,), (1000, 77), (50_001,), (1 << 20,)]]
    want = torch.stack([t.double().square().sum() for t in tensors]).sum().sqrt()
    assert kernels.total_norm(tensors).item() == pytest.approx(want.item(), rel=1e-6)
    # where it does not apply (a sparse or float64 tensor), PyTorch's own
    mixed = tensors + [torch.randn(5, dtype=torch.float64)]
    assert kernels.total_norm(mixed).item() == pytest.approx(torch.nn.utils.get_total_norm(mixed).item())


@pytest.mark.parametrize("with_kernel", [True, False])
def test_fused_loss_with_and_without_the_kernel(ext, monkeypatch, with_kernel):
    if not with_kernel:
        monkeypatch.setattr(kernels, "_ext", None)
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(11, 16, generator=g), torch.randn(300, 16, generator=g)
    y = torch.randint(0, 300, (11,), generator=g)
    y[4] = -100
    out = []
    for fn in (lambda h, w: F.cross_entropy(F.linear(h, w), y), lambda h, w: lm_head_cross_entropy(h, w, y)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        (loss * 2).backward()
        out.append((loss.detach(), h.grad, w.grad))
    for want, got in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_trainer_gradients_equal_plain_autograd(ext):
    """The trainer routes GELU through the kernel and writes the embedding rows' gradient straight into the
    tied wte gradient: over two micro-batches every gradient equals plain autograd's on a copy."""
    config = GPTConfig.from_name("tiny", n_embd=64, n_head=2, n_layer=2, vocab_size=101, n_positions=16)
    a, b = random_model(config, seed=5).train(), random_model(config, seed=5).train()
    trainer = Trainer(a, TrainConfig(model="x", data=["x"]), torch.device("cpu"))
    assert trainer.cpu_kernels and a.transformer.h[0].mlp.act is kernels.gelu_tanh
    assert a.transformer.h[0].attn.attend is kernels.causal_attention
    seq = torch.randint(0, 101, (4, 13), generator=torch.Generator().manual_seed(0))
    x, y = seq[:, :-1], seq[:, 1:]
    trainer.forward_backward([(x[:2], y[:2]), (x[2:], y[2:])])
    for part in (slice(0, 2), slice(2, 4)):
        (b.loss(x[part], y[part]) / 2).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    # inference through the patched embedding is unchanged
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["autocast", "emulated"])
def test_trainer_uses_the_kernels_in_bfloat16_too(ext, monkeypatch, mode):
    """Under bfloat16 autocast (native bf16 arithmetic, forced here on any CPU) and its float32 emulation,
    the trainer routes attention and GELU through the float32 kernels too: autocast takes their bf16 input
    up to float32, the emulation rounds attention's input and output as it does around SDPA. The loss and
    gradients agree with PyTorch's own kernels under the same precision."""
    import gpt2kit.train.precision as train

    monkeypatch.setattr(train, "_native_cpu", lambda dtype: mode == "autocast")
    config = GPTConfig.from_name("tiny", n_embd=64, n_head=2, n_layer=2, vocab_size=101, n_positions=16)
    seq = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(3))
    x, y = seq[:, :-1], seq[:, 1:]
    results, calls = [], []
    for fn in (kernels._CausalAttention, kernels._GeluTanh):
        monkeypatch.setattr(fn, "apply", (lambda orig, name: lambda *a: calls.append(name) or orig(*a))(
            fn.apply, fn.__name__))
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(kernels, "load", lambda *a, **k: None)
        model = random_model(config, seed=5).train()
        trainer = Trainer(model, TrainConfig(model="x", data=["x"], dtype="bfloat16"), torch.device("cpu"))
        assert trainer.precision.mode == mode and trainer.cpu_kernels == use_kernels
        block = model.transformer.h[0]
        if use_kernels:
            assert block.mlp.act is (kernels.gelu_tanh_float32 if mode == "autocast" else kernels.gelu_tanh)
            qkv = torch.randn(2, 16, 3 * 64)
            out = block.attn.attend(qkv.bfloat16() if mode == "autocast" else qkv, 2)
            assert out.dtype == torch.float32
            if mode == "emulated":  # rounded to bf16 on the way out
                assert torch.equal(out, out.bfloat16().float())
        else:
            assert block.attn.attend is None
        calls.clear()
        loss = trainer.forward_backward([(x, y)])
        # each of the 2 blocks ran both kernels, or neither
        assert sorted(calls) == (["_CausalAttention"] * 2 + ["_GeluTanh"] * 2 if use_kernels else [])
        results.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    (loss_k, grads_k), (loss_ref, grads_ref) = results
    assert abs(loss_k - loss_ref) < 2e-3
    for gk, gr in zip(grads_k, grads_ref):
        assert F.cosine_similarity(gk.flatten(), gr.flatten(), dim=0) > 0.999


def test_trainer_hands_the_model_its_ops_instead_of_patching_modules(ext):
    """The fast paths a training forward pass takes are the model's own GPTOps, set through use_ops: nothing
    is swapped onto wte, and a model built with GPTOps() runs PyTorch's own operations."""
    from gpt2kit.ops import EmbeddingRowsIntoGrad, GPTOps, fused_head_loss

    config = GPTConfig.from_name("tiny", n_embd=64, n_head=2, n_layer=2, vocab_size=101, n_positions=16)
    model = random_model(config, seed=5).train()
    assert model.ops == GPTOps() and model.transformer.h[0].attn.attend is None
    Trainer(model, TrainConfig(model="x", data=["x"]), torch.device("cpu"))
    assert "forward" not in vars(model.transformer.wte) and not hasattr(model.transformer.wte, "grad_rows_added")
    assert isinstance(model.ops.embedding, EmbeddingRowsIntoGrad) and model.ops.head_loss is fused_head_loss
    assert model.ops.attention is kernels.causal_attention and model.ops.gelu is kernels.gelu_tanh
    model.use_ops(GPTOps())
    assert model.transformer.h[0].attn.attend is None and model.transformer.h[0].mlp.act is not kernels.gelu_tanh
