"""CUDA-graph decoding (gpt2kit.cuda_graphs): the recordable step GPT.decode_masked equals the ordinary one,
generation and the batching engine give the same text through the GPT.graph_step hook, and on a GPU (tests
marked cuda, skipped without one) the recorded graphs give the ordinary path's tokens."""

from __future__ import annotations

import pytest
import torch

from gpt2kit import cuda_graphs
from gpt2kit.checkpoints import load_model
from gpt2kit.config import GPTConfig
from gpt2kit.cuda_graphs import GraphStep, prepare_cuda_decoding_
from gpt2kit.generate import GenerationConfig, Generator
from gpt2kit.server.batching import BatchEngine
from tests.conftest import random_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def eager_graph_step(model, span: int = 8):
    """What GraphStep records, run eagerly: decode_masked over kv_len rounded up to `span` slots."""
    calls = []

    def step(idx, pos, kv_len, rows):
        if idx.shape[0] != model.transformer.h[0].attn.kv_cache.k.shape[0]:
            return None  # as GraphStep: whole-batch steps only
        calls.append(idx.shape[0])
        s = min(model.cache_len, -(-(kv_len or model.cache_len) // span) * span)
        return model.decode_masked(idx, pos, s, rows)
    step.calls = calls
    return step


@torch.inference_mode()
def test_decode_masked_equals_the_ordinary_step_for_rows_at_different_positions():
    model = random_model(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64), std=0.2)
    model.setup_caches(3, 40)
    prompts = torch.randint(0, 50257, (3, 12))
    model(prompts, torch.arange(12))  # every row prefilled with 12 tokens
    x = torch.randint(0, 50257, (3, 1))
    pos = torch.tensor([[12], [5], [9]])  # rows at their own positions (as the server's rows are)
    ref = model(x, pos, kv_len=13)  # (3, 1, V)
    assert model.decode_masked(x, pos, 13).shape == ref.shape
    for span in (13, 16, 40):  # more masked slots than needed change nothing
        torch.testing.assert_close(model.decode_masked(x, pos, span), ref, rtol=1e-5, atol=1e-5)
    # a slice of rows, as the engine and a re-prefill use them
    ref2 = model(x[1:], pos[1:], kv_len=13, rows=slice(1, 3))
    torch.testing.assert_close(model.decode_masked(x[1:], pos[1:], 16, rows=slice(1, 3)), ref2,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # the comparison can fail: another position is another answer
        torch.testing.assert_close(model.decode_masked(x, pos + 1, 16), ref, rtol=1e-5, atol=1e-5)


def test_generation_through_the_graph_step_hook_gives_the_same_text(tiny_model_dir):
    gen = Generator(*load_model(tiny_model_dir, device="cpu"))
    greedy = GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    sampled = GenerationConfig(max_new_tokens=40, seed=3, top_k=20, stop_at_eot=False)
    prompts = ["Hello there", "A much longer prompt than the first one, to start elsewhere"]
    before = [[o.tokens for o in gen.generate(prompts, c)] for c in (greedy, sampled)]
    gen.model.graph_step = hook = eager_graph_step(gen.model)
    try:
        after = [[o.tokens for o in gen.generate(prompts, c)] for c in (greedy, sampled)]
    finally:
        gen.model.graph_step = None
    assert hook.calls and after == before  # it was used, and changed nothing


def test_graph_steps_are_installed_on_gpus_only(tiny_model_dir, monkeypatch):
    model, _ = load_model(tiny_model_dir, device="cpu")
    assert prepare_cuda_decoding_(model) == "none" and model.graph_step is None
    step = GraphStep(model)  # on the CPU it declines, and the ordinary path runs
    model.setup_caches(1, 16)
    with torch.inference_mode():
        assert step(torch.tensor([[5]]), torch.tensor([[0]]), 1, None) is None
    monkeypatch.setenv("GPT2KIT_CUDA_GRAPHS", "0")
    assert not cuda_graphs.enabled()


def test_engine_with_a_graph_step_runs_every_row_and_gives_generators_text(tiny_dir):
    ref = Generator(*load_model(tiny_dir, device="cpu"))
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, stop_at_eot=False)
    prompts = ["Hello world", "The quick brown fox", "A"]
    want = [o.text for o in ref.generate(prompts, cfg)]
    model, tok = load_model(tiny_dir, device="cpu")
    model.graph_step = hook = eager_graph_step(model)
    with BatchEngine(model, tok, max_batch=4, max_queue=8) as eng:
        got = ["".join(d.text for d in eng.submit(tok.encode(p), cfg, 0)) for p in prompts]
    assert got == want
    assert set(hook.calls) == {4}  # one batch size: every step runs all rows, free ones riding along


# ---- on a GPU ---------------------------------------------------------------------------------------

@cuda
def test_cuda_graphs_give_the_ordinary_tokens(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "SPAN", 16)  # several attention lengths in one generation
    gen = Generator.load(str(tiny_model_dir), device="cuda", dtype="float32")
    assert isinstance(gen.model.graph_step, GraphStep)
    plain = Generator(*load_model(tiny_model_dir, device="cuda", dtype="float32"))
    assert plain.model.graph_step is None
    for cfg in (GenerationConfig(max_new_tokens=60, temperature=0, stop_at_eot=False),
                GenerationConfig(max_new_tokens=60, seed=5, top_p=0.9, stop_at_eot=False)):
        for prompts in (["Hello"], ["Hello", "A longer prompt, so the rows sit at other positions"]):
            want = [o.tokens for o in plain.generate(prompts, cfg)]
            assert [o.tokens for o in gen.generate(prompts, cfg)] == want
    step = gen.model.graph_step
    cfg = GenerationConfig(max_new_tokens=60, temperature=0, stop_at_eot=False)
    n = step.captures
    gen.generate(["Hello"], cfg)
    assert 0 < step.captures - n <= 4 == len(step.graphs)  # one graph per 16 slots of the 61, not one per step
    n = step.captures
    gen.generate(["Hello"], cfg)
    assert step.captures == n  # the same cache and shapes again: nothing recorded


@cuda
def test_cuda_graphs_follow_a_reallocated_cache_and_in_place_weight_changes(tiny_model_dir):
    gen = Generator.load(str(tiny_model_dir), device="cuda", dtype="float32")
    plain = Generator(*load_model(tiny_model_dir, device="cuda", dtype="float32"))
    cfg = GenerationConfig(max_new_tokens=30, temperature=0, stop_at_eot=False)
    for n in (1, 3, 1):  # each batch size reallocates the cache
        assert ([o.tokens for o in gen.generate(["Hi"] * n, cfg)]
                == [o.tokens for o in plain.generate(["Hi"] * n, cfg)])
    with torch.no_grad():
        for m in (gen.model, plain.model):
            m.transformer.ln_f.bias.add_(0.5)
    assert [o.tokens for o in gen.generate(["Hi"], cfg)] == [o.tokens for o in plain.generate(["Hi"], cfg)]
    assert len(gen.model.graph_step.graphs) == 1  # only graphs on the cache in use are kept


@cuda
def test_cuda_graphs_in_bfloat16_match_the_ordinary_bfloat16_path(tiny_model_dir):
    gen = Generator.load(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    plain = Generator(*load_model(tiny_model_dir, device="cuda", dtype="bfloat16"))
    gen.model.setup_caches(2, 64)
    plain.model.setup_caches(2, 64)
    ids = torch.randint(0, 50257, (2, 10), device="cuda")
    with torch.inference_mode():
        for m in (gen.model, plain.model):
            m(ids, torch.arange(10, device="cuda"))
        x = torch.randint(0, 50257, (2, 1), device="cuda")
        pos = torch.tensor([[10], [4]], device="cuda")
        a = gen.model(x, pos, kv_len=11)
        b = plain.model(x, pos, kv_len=11)
    assert gen.model.graph_step.captures == 1
    assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()
