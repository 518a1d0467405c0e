"""Our GPT against transformers' GPT2LMHeadModel on the same weights, and against the shared references."""

import json

import numpy as np
import pytest
import torch

from gpt2kit.checkpoints import load_model, save_model
from gpt2kit.config import GPTConfig
from gpt2kit.generate import GenerationConfig, Generator
from tests.conftest import TF_TINY, random_model

transformers = pytest.importorskip("transformers")


def hf_model(path):
    return transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=50256, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("config", [
    GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128),
    GPTConfig.from_name("gpt2"),  # random-initialised 124M: the real shapes
], ids=["tiny", "gpt2-124M"])
def test_logits_and_greedy_tokens_match_transformers(config, tokenizer, tmp_path):
    save_model(random_model(config, seed=1, std=0.2 if config.n_layer == 2 else 0.05), tokenizer, tmp_path)
    ours, _ = load_model(tmp_path, device="cpu", dtype="float32")
    theirs = hf_model(tmp_path)
    ids = tokenizer.encode("Human reason, in one sphere of its cognition, is called upon to consider")
    x = torch.tensor([ids, ids[::-1]])
    with torch.inference_mode():
        a, b = ours(x), theirs(x).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    expected = hf_greedy(theirs, ids, 64)
    cfg = GenerationConfig(max_new_tokens=64, temperature=0, stop_at_eot=False)
    assert Generator(ours, tokenizer).generate(tokenizer.decode(ids), cfg)[0].tokens == expected
    # the column-major layout used on CPUs without the compiled kernel changes strides only
    ours.column_major_()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), b, atol=1e-4, rtol=1e-4)
    assert Generator(ours, tokenizer).generate(tokenizer.decode(ids), cfg)[0].tokens == expected
    # and what Generator.load does (the compiled small-batch kernel where it builds) keeps parity too
    fast = Generator.load(str(tmp_path), device="cpu", dtype="float32")
    with torch.inference_mode():
        torch.testing.assert_close(fast.model(x), b, atol=1e-4, rtol=1e-4)
    assert fast.generate(tokenizer.decode(ids), cfg)[0].tokens == expected


def test_openai_tf_checkpoint_reproduces_reference():
    ref = json.loads((TF_TINY / "reference.json").read_text())
    model, tok = load_model(TF_TINY / "tf", device="cpu", dtype="float32")
    assert tok.encode(ref["text"]) == ref["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ref["input_ids"]]))[0].numpy()
    np.testing.assert_allclose(logits, np.load(TF_TINY / "reference_logits.npy"), atol=1e-4, rtol=0)
    got = Generator(model, tok).generate(ref["text"], max_new_tokens=32, temperature=0, stop_at_eot=False)
    assert got[0].tokens == ref["greedy_next_32"]
    assert got[0].text == ref["greedy_text"]


def test_batched_greedy_with_ragged_prompts_equals_one_at_a_time(tiny_model_dir, tokenizer):
    model, tok = load_model(tiny_model_dir, device="cpu")
    theirs = hf_model(tiny_model_dir)
    prompts = ["Hi", "A much longer prompt than the first one, to make the batch ragged", "Three words here"]
    outs = Generator(model, tok).generate(prompts, max_new_tokens=20, temperature=0, stop_at_eot=False)
    for p, o in zip(prompts, outs):
        assert o.tokens == hf_greedy(theirs, tok.encode(p), 20)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_stays_close(tiny_model_dir, dtype):
    model32, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    model16, _ = load_model(tiny_model_dir, device="cpu", dtype=dtype)
    assert model16.dtype == getattr(torch, dtype)
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        a, b = model32(x), model16(x).float()
    assert torch.allclose(a, b, atol=0.25 * a.abs().max().item())
