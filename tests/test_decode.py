"""The public decoding step API (gpt2kit.decode): a loop written from its parts gives Generator's text, mixed
batches pick each row's own token, and the server reaches generation through it rather than privates."""

import ast
from pathlib import Path

import pytest
import torch

from gpt2kit import kernels
from gpt2kit.checkpoints import load_model
from gpt2kit.decode import (
    GenerationConfig,
    Row,
    advance,
    decode_step,
    next_tokens,
    prefill,
    slide_window,
    usable_vocab,
)
from gpt2kit.generate import Generator
from gpt2kit.processors import apply_processors
from gpt2kit.sampling import sample

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt2kit"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@torch.inference_mode()
def hand_loop(model, tok, prompts, cfg, cache_len):
    """The loop of the decode module's docstring, written out."""
    rows = [Row(i, p, tok.encode(p), cfg, tok, model.device) for i, p in enumerate(prompts)]
    model.setup_caches(len(rows), cache_len)
    for r in rows:
        r.fit_window(model.cache_len)
    n_vocab = usable_vocab(model, tok)
    logits = prefill(model, [r.context for r in rows])[:, :n_vocab]  # (B, V)
    active = list(range(len(rows)))
    while True:
        advance([rows[b] for b in active], logits[active])
        active = [b for b in active if not rows[b].done]
        if not active:
            return [r.out for r in rows]
        for b in active:
            slide_window(model, rows[b], b)
        logits = decode_step(model, rows)[:, :n_vocab]


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(seed=3, top_k=20), dict(seed=4, repetition_penalty=1.3)])
def test_a_loop_built_from_the_step_api_gives_generators_text(loaded, kw):
    model, tok = loaded
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eot=False, **kw)
    prompts = ["The cat sat", "Once upon a time there was"]
    ours = hand_loop(model, tok, prompts, cfg, cache_len=64)
    theirs = Generator(model, tok).generate(prompts, cfg)
    assert [o.tokens for o in ours] == [o.tokens for o in theirs]


def test_a_row_that_fills_its_window_slides_and_goes_on(loaded):
    model, tok = loaded
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    (out,) = hand_loop(model, tok, ["Hello there"], cfg, cache_len=16)  # 2 prompt tokens + 40 > 16 slots
    assert len(out.tokens) == 40 and out.finish_reason == "length"


@pytest.mark.parametrize("kernel", [False, True])
def test_next_tokens_gives_each_row_of_a_mixed_batch_the_token_it_would_get_alone(loaded, kernel, request,
                                                                                   monkeypatch):
    if kernel:
        request.getfixturevalue("ext")
    else:
        monkeypatch.setattr(kernels, "_ext", None)
        monkeypatch.setattr("gpt2kit.sampling._tried_kernel", True)
    model, tok = loaded
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    cfgs = [GenerationConfig(temperature=0), GenerationConfig(seed=1, top_p=0.9), GenerationConfig(seed=2, top_p=0.9),
            GenerationConfig(seed=3, repetition_penalty=1.5), GenerationConfig(seed=4, temperature=0.7, min_p=0.05),
            GenerationConfig(seed=5, top_k=40, temperature=0.8, typical_p=0.9)]
    rows = [Row(i, "", [5, 6, 7], c, tok, torch.device("cpu")) for i, c in enumerate(cfgs)]
    alone = [Row(i, "", [5, 6, 7], c, tok, torch.device("cpu")) for i, c in enumerate(cfgs)]
    # advance()'s order: each row's logits processors (here the repetition penalty), then next_tokens
    for step in range(3):
        picked = next_tokens(rows, apply_processors([r.processors for r in rows], logits))
        for r, lg, t in zip(alone, logits, picked):
            seen = torch.tensor(r.context) if r.cfg.repetition_penalty != 1.0 else None
            assert sample(lg, r.params, r.key, step, seen) == t
            assert next_tokens([r], apply_processors([r.processors], lg[None])) == [t]  # the row alone in its batch
        assert [r.draws for r in rows] == [step + 1] * 6


def _private_imports(path: Path) -> list[str]:
    """`from gpt2kit.x import _name` in a file: reaching into another module's privates."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{node.module}.{a.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpt2kit")
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


@pytest.mark.parametrize("rel", ["generate.py", "decode.py", "cli/generate.py", "cli/serve.py",
                                 *(f"server/{p.name}" for p in sorted((SRC / "server").glob("*.py")))])
def test_generation_and_the_server_use_no_other_modules_privates(rel):
    assert _private_imports(SRC / rel) == []
