"""The compiled small-batch CPU linear kernel: equal to F.linear, used only where it applies, and a build
that fails leaves PyTorch's kernels in charge with a one-line notice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import kernels
from gpt2kit.config import GPTConfig
from gpt2kit.generate import GenerationConfig, Generator
from tests.conftest import CAN_BUILD, random_model


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 17, 32])
@pytest.mark.parametrize("N,K", [(1, 8), (7, 64), (37, 768), (64, 24), (130, 3072)])
def test_equals_f_linear(ext, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    torch.testing.assert_close(ext.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ext.linear(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)
    # a non-contiguous input (a slice of a longer sequence) gives the same
    xs = torch.randn(M, 2, K, generator=g)[:, 1]
    torch.testing.assert_close(kernels.linear(xs, w, b), F.linear(xs, w, b), atol=1e-4, rtol=1e-5)


def test_dispatch_uses_kernel_only_where_it_applies(ext, monkeypatch):
    calls = []
    spy = type("Spy", (), {"linear": lambda self, *a: calls.append(a) or ext.linear(*a)})
    monkeypatch.setattr(kernels, "_ext", spy())
    w, b = torch.randn(16, 64), torch.randn(16)
    out = kernels.linear(torch.randn(2, 3, 64), w, b)  # (B, T, K) with B*T = 6 rows
    assert out.shape == (2, 3, 16) and len(calls) == 1
    kernels.linear(torch.randn(kernels.MAX_ROWS + 1, 64), w, b)  # large batches: MKL's GEMM
    kernels.linear(torch.randn(1, 64, dtype=torch.float64), w.double(), b.double())  # other dtypes
    kernels.linear(torch.randn(1, 64), w.t().contiguous().t(), b)  # column-major weights
    kernels.linear(torch.randn(1, 60), torch.randn(16, 60), b)  # K not a multiple of 8
    wg = w.clone().requires_grad_()
    y = kernels.linear(torch.randn(1, 64), wg, b)  # autograd needs torch's op
    assert y.requires_grad and len(calls) == 1
    with torch.no_grad():
        kernels.linear(torch.randn(1, 64), wg, b)
    assert len(calls) == 2


def test_accelerated_model_decodes_like_the_plain_one(ext, tokenizer):
    config = GPTConfig.from_name("tiny", n_embd=64, n_head=4, n_layer=2)
    plain, fast = random_model(config, seed=3, std=0.2), random_model(config, seed=3, std=0.2)
    # HuggingFace's layout arrives transposed: the kernel needs, and gets, row-major weights
    fast.transformer.h[0].mlp.c_fc.weight.data = fast.transformer.h[0].mlp.c_fc.weight.data.t().contiguous().t()
    assert kernels.prepare_cpu_decoding_(fast) == "kernel"
    assert all(m.weight.is_contiguous() for m in fast.modules() if isinstance(m, torch.nn.Linear))
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    prompts = ["The meaning of", "A much longer prompt, so that the rows of the batch sit at different positions"]
    a = Generator(plain, tokenizer).generate(prompts, cfg)
    b = Generator(fast, tokenizer).generate(prompts, cfg)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    x = torch.tensor([tokenizer.encode("Kant wrote")])
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)
    # and sampling with a seed gives the same text
    s = GenerationConfig(max_new_tokens=30, temperature=0.9, top_k=40, seed=7)
    texts = [Generator(m, tokenizer).generate("Once", s)[0].text for m in (plain, fast)]
    assert texts[0] == texts[1]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("GPT2KIT_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_failed", None)
    model = random_model(GPTConfig.from_name("tiny", n_embd=32, n_head=2, n_layer=1))
    assert kernels.prepare_cpu_decoding_(model) == "column-major"
    assert "GPT2KIT_CPU_KERNELS=0" in kernels.failure()
    assert model.transformer.h[0].attn.c_attn.forward.__func__ is torch.nn.Linear.forward


def test_failed_build_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    if not CAN_BUILD:
        pytest.skip("no compiler here")
    bad = tmp_path / "cpu_decode.cpp"
    bad.write_text("#include <torch/extension.h>\nthis is not C++;\n")
    monkeypatch.setattr(kernels, "SOURCES", [bad, *kernels.SOURCES[1:]])
    monkeypatch.delenv("GPT2KIT_CPU_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setenv("GPT2KIT_CACHE", str(tmp_path / "cache"))
    model = random_model(GPTConfig.from_name("tiny", n_embd=32, n_head=2, n_layer=1))
    assert kernels.prepare_cpu_decoding_(model) == "column-major"
    err = capsys.readouterr().err
    assert "could not build the CPU kernel" in err and "Traceback" not in err
    notice = [line for line in err.splitlines() if "could not build" in line]
    assert len(notice) == 1


@pytest.mark.parametrize("B,rows,pos", [(1, None, 0), (1, None, 37), (3, None, 20), (2, slice(1, 3), 5)])
def test_decode_step_equals_the_modules_and_fills_the_cache(ext, B, rows, pos):
    config = GPTConfig.from_name("tiny", n_embd=64, n_head=4, n_layer=3)
    plain, fast = random_model(config, seed=5, std=0.2), random_model(config, seed=5, std=0.2)
    assert kernels.prepare_cpu_decoding_(fast) == "kernel" and isinstance(fast.decode_step, kernels.DecodeStep)
    calls = []
    step = fast.decode_step
    fast.decode_step = lambda *a: calls.append(a) or step(*a)
    g = torch.Generator().manual_seed(pos)
    n = 3 if rows is not None else B
    prompt = torch.randint(0, config.vocab_size, (n, pos + 1), generator=g)
    with torch.inference_mode():
        for m in (plain, fast):
            m.setup_caches(n, 64)
            if pos:  # the same earlier keys and values in both caches (the prefill takes the modules' path)
                m(prompt[:, :pos], torch.arange(pos), kv_len=pos)
        sel = rows or slice(None)
        args = (prompt[sel, pos:], torch.tensor([pos]))
        want = plain(*args, kv_len=pos + 1, rows=rows)
        got = fast(*args, kv_len=pos + 1, rows=rows)
    assert len(calls) == 1 and got.shape == want.shape == (len(range(n)[sel]), 1, config.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(plain.transformer.h, fast.transformer.h):
        torch.testing.assert_close(b.attn.kv_cache.k, a.attn.kv_cache.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.attn.kv_cache.v, a.attn.kv_cache.v, atol=1e-5, rtol=1e-5)


def test_decode_step_is_skipped_where_it_does_not_apply(ext):
    config = GPTConfig.from_name("tiny", n_embd=64, n_head=4, n_layer=2)
    model = random_model(config, seed=1)
    assert kernels.prepare_cpu_decoding_(model) == "kernel"
    model.setup_caches(2, 16)
    calls = []
    step = model.decode_step
    model.decode_step = lambda *a: calls.append(a) or step(*a)
    x = torch.randint(0, config.vocab_size, (2, 4))
    with torch.inference_mode():
        model(x, torch.arange(4), kv_len=4)  # a prefill: the modules
        model(x[:, :1], torch.tensor([[4], [2]]), kv_len=5)  # rows at different positions: a mask
    model.train()
    with torch.inference_mode():
        model(x[:, :1], torch.tensor([5]), kv_len=6)  # training mode (dropout): the modules
    assert calls == []
    # with autograd recording, the kernel would drop the gradients: None, and the modules run
    model.eval()
    assert step(torch.randn(2, 64), None, 6) is None
    # a model cast after the kernel was installed takes the modules' path again
    model.double()
    model.setup_caches(2, 16, dtype=torch.float64)
    with torch.inference_mode():
        out = model(x[:, :1], torch.tensor([0]), kv_len=1)
        assert out.dtype == torch.float64 and step(*calls[-1]) is None  # asked, declined, the modules ran
    # and models it cannot run keep the plain path: a layer that is not a plain nn.Linear (an adapter)
    other = random_model(config, seed=1)
    other.transformer.h[1].mlp.c_fc = torch.nn.Sequential(other.transformer.h[1].mlp.c_fc)
    assert kernels.prepare_cpu_decoding_(other) == "kernel" and other.decode_step is None


# n_embd 40: rows of an odd multiple of 8 values (AVX-512 builds read their last 8 as a half vector)
@pytest.mark.parametrize("n_embd,n_head", [(64, 4), (40, 5)])
def test_int8_step_equals_the_modules_on_dequantised_weights(ext, n_embd, n_head):
    """The int8 path computes exactly what the model would with weights q * scale: the kernel's own error
    is float rounding; the drift from float32 is the quantisation's alone."""
    config = GPTConfig.from_name("tiny", n_embd=n_embd, n_head=n_head, n_layer=2)
    fast, ref, plain = (random_model(config, seed=6, std=0.2) for _ in range(3))
    assert kernels.prepare_cpu_decoding_(fast, quantize="int8") == "kernel-int8"
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):  # the LM head too (its weight is wte; lookups stay float32)
                q, s = kernels.quantize_int8(m.weight)
                assert q.dtype == torch.int8 and q.abs().max() == 127
                if m is not ref.lm_head:
                    m.weight.copy_(q.float() * s[:, None])
        q, s = kernels.quantize_int8(ref.lm_head.weight)
        ref.lm_head = torch.nn.Linear(n_embd, config.vocab_size, bias=False)
        ref.lm_head.weight.copy_(q.float() * s[:, None])
    prompt = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = {}
        for m in (fast, ref, plain):
            m.setup_caches(2, 32)
            m(prompt[:, :8], torch.arange(8), kv_len=8)  # the prefill reads float32 weights (the fast model's)
        for a, b in zip(ref.transformer.h, fast.transformer.h):  # so ref continues from the same cache
            a.attn.kv_cache.k.copy_(b.attn.kv_cache.k)
            a.attn.kv_cache.v.copy_(b.attn.kv_cache.v)
        for key, m in (("fast", fast), ("ref", ref), ("plain", plain)):
            out[key] = m(prompt[:, 8:], torch.tensor([8]), kv_len=9)
    torch.testing.assert_close(out["fast"], out["ref"], atol=1e-4, rtol=1e-4)
    drift = (out["fast"] - out["plain"]).abs().max() / out["plain"].abs().max()
    assert 0 < drift < 0.05  # quantised, and close


def test_int8_generation_and_its_errors(ext, tiny_model_dir, monkeypatch, capsys):
    from gpt2kit.cli import main
    from gpt2kit.errors import Gpt2kitError

    gen = Generator.load(str(tiny_model_dir), quantize="int8")
    assert gen.model.decode_step.qweights  # int8 copies in use
    cfg = GenerationConfig(max_new_tokens=24, temperature=0, stop_at_eot=False)
    a = gen.generate("The meaning of", cfg)[0].tokens
    b = Generator.load(str(tiny_model_dir)).generate("The meaning of", cfg)[0].tokens
    assert len(a) == 24 and sum(x == y for x, y in zip(a, b)) >= 12  # drifts a little from float32
    kernels.prepare_cpu_decoding_(gen.model)  # what the server engine does later: the int8 step stays
    assert gen.model.decode_step.qweights
    with pytest.raises(Gpt2kitError, match="unknown quantisation"):
        kernels.prepare_cpu_decoding_(gen.model, quantize="int4")
    # where the kernel cannot run: one line, exit 1
    assert main(["generate", "--model", str(tiny_model_dir), "--dtype", "bfloat16", "--quantize", "int8",
                 "--length", "3", "hello"]) == 1
    err = capsys.readouterr().err
    assert "--quantize int8" in err and "float32 model on the CPU" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("GPT2KIT_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_failed", None)
    with pytest.raises(Gpt2kitError, match="GPT2KIT_CPU_KERNELS=0"):
        Generator.load(str(tiny_model_dir), quantize="int8")
