"""BatchEngine without HTTP: batched text equals Generator's, rows join and leave, cancellation,
deadlines, the bounded queue, and a worker that survives a failing step."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import GenerationConfig, Generator
from gpt2kit.model import GPT
from gpt2kit.server.batching import BatchEngine, QueueFull, QueueTimeout

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"  # ../shared/data from the root

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "A",
           "Once upon a time, in a land far away, there lived", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def reference(tiny_dir) -> Generator:
    # its own copy: the engine's thread owns the other model's KV cache
    return Generator(*load_model(tiny_dir))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    model, tok = load_model(tiny_dir)
    with BatchEngine(model, tok, max_batch=3, max_queue=32) as eng:
        yield eng


def collect(stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    for d in stream:
        texts[d.index] = texts.get(d.index, "") + d.text
    return texts


def run_all(engine: BatchEngine, cfg: GenerationConfig, nsamples: int = 1) -> dict[tuple[str, int], str]:
    """Every prompt x sample submitted at once (more rows than the batch has: rows join as others leave)."""
    tok = engine.tokenizer
    streams = {(p, i): engine.submit(tok.encode(p), cfg, i) for p in PROMPTS for i in range(nsamples)}
    return {k: collect(s)[k[1]] for k, s in streams.items()}


def expected(gen: Generator, cfg: GenerationConfig, nsamples: int = 1) -> dict[tuple[str, int], str]:
    return {(p, c.index): c.text for p in PROMPTS for c in gen.generate(p, cfg, nsamples=nsamples)}


def test_greedy_batched_equals_unbatched(engine, reference):
    cfg = GenerationConfig(max_new_tokens=30, temperature=0)
    steps = engine.stats.steps
    assert run_all(engine, cfg) == expected(reference, cfg)
    assert engine.stats.steps - steps < 5 * 30  # forward passes were shared


def test_seeded_sampling_matches_generate(engine, reference):
    cfg = GenerationConfig(max_new_tokens=25, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    assert run_all(engine, cfg, nsamples=3) == expected(reference, cfg, nsamples=3)


def test_penalty_min_p_and_stop_strings_match_generate(engine, reference):
    cfg = GenerationConfig(max_new_tokens=25, temperature=1.2, min_p=0.01, repetition_penalty=1.3, seed=5)
    ref = expected(reference, cfg, nsamples=2)
    # stop at a piece of each reference text that is really produced
    stop = tuple(sorted({t[5:7] for t in ref.values() if len(t) > 8}))
    cfg = replace(cfg, stop=stop)
    ref = expected(reference, cfg, nsamples=2)
    assert run_all(engine, cfg, nsamples=2) == ref


def test_requests_with_different_logits_controls_share_batches_and_match_generate(engine, reference):
    # submitted together, so rows with and without controls run in the same decode steps
    base = dict(max_new_tokens=20, stop_at_eot=False)
    cfgs = [GenerationConfig(temperature=0, **base),
            GenerationConfig(temperature=0, no_repeat_ngram_size=2, logit_bias={13: -100}, **base),
            GenerationConfig(seed=3, top_k=40, presence_penalty=1.5, frequency_penalty=0.5, **base),
            GenerationConfig(seed=3, top_k=40, **base),
            GenerationConfig(seed=4, bad_words=("the", "and"), min_tokens=10, repetition_penalty=1.2, **base)]
    tok = engine.tokenizer
    jobs = [(p, cfg) for p in PROMPTS[:2] for cfg in cfgs]
    steps = engine.stats.steps
    streams = [engine.submit(tok.encode(p), cfg) for p, cfg in jobs]
    got = [collect(s)[0] for s in streams]
    assert got == [reference.generate(p, cfg)[0].text for p, cfg in jobs]
    assert engine.stats.steps - steps < len(jobs) * 20 / 2  # rows share decode steps (3 at a time)


def test_window_slides_like_generate(engine, reference):
    # a 100-token prompt plus 60 new tokens overflows the 128-token context
    cfg = GenerationConfig(max_new_tokens=60, temperature=0.8, seed=3)
    prompt = " ".join(["word"] * 100)
    ids = engine.tokenizer.encode(prompt)
    got = collect(engine.submit(ids, cfg, 0))[0]
    assert got == reference.generate(prompt, cfg)[0].text


def test_a_prompt_longer_than_the_window_is_cut_like_generate(engine, reference):
    # 200 tokens and 20 new ones in 128 positions: both keep the prompt's last 108 tokens
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.8, seed=4)
    prompt = " ".join(["word"] * 200)
    got = collect(engine.submit(engine.tokenizer.encode(prompt), cfg, 0))[0]
    assert got == reference.generate(prompt, cfg)[0].text


def test_logprobs_match_generate(engine, reference):
    cfg = GenerationConfig(max_new_tokens=8, temperature=0, logprobs=3)
    ids = engine.tokenizer.encode("Hello")
    infos = [i for d in engine.submit(ids, cfg) for i in d.token_info]
    ref = reference.generate("Hello", cfg)[0].token_info
    assert [i.token for i in infos] == [i.token for i in ref]
    for a, b in zip(infos, ref):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == 3
        assert a.top[0][0] == a.token  # greedy picks the most likely


def test_prompt_logprobs_and_scoring(engine):
    tok = engine.tokenizer
    ids = tok.encode("The cat sat on the mat")
    stream = engine.submit(ids, GenerationConfig(max_new_tokens=0), prompt_logprobs=2)
    deltas = list(stream)
    assert [(d.text, d.finish_reason) for d in deltas] == [("", "length")]
    info = stream.prompt_info[0]
    assert info[0] is None and len(info) == len(ids)
    with torch.no_grad():
        lp = torch.log_softmax(engine_free_forward(engine, ids).float(), dim=-1)  # (T, V)
    # float32 on a CPU; a GPU gives the engine bfloat16 weights (device auto), which round more
    tol = 1e-4 if engine.model.dtype == torch.float32 else 0.05
    for t in range(1, len(ids)):
        assert info[t].token == ids[t]
        assert info[t].logprob == pytest.approx(float(lp[t - 1, ids[t]]), abs=tol)
        assert len(info[t].top) == 2


def engine_free_forward(engine: BatchEngine, ids: list[int]) -> torch.Tensor:
    """Plain causal forward (no KV cache involved) on a copy of the engine's weights."""
    m = GPT(engine.model.config).to(engine.model.device, engine.model.dtype)
    m.load_state_dict(engine.model.state_dict())
    return m.eval()(torch.tensor([ids], device=engine.model.device))[0]


def test_cancel_frees_the_row(engine):
    ids = engine.tokenizer.encode("Tell me a long story")
    stream = engine.submit(ids, GenerationConfig(max_new_tokens=1000, temperature=1.0, stop_at_eot=False))
    next(stream)
    assert engine.stats.active >= 1
    stream.cancel()
    assert list(stream) == []  # a cancelled stream ends at once
    deadline = time.monotonic() + 10
    while engine.stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.active == 0


def test_cancel_wakes_a_waiting_consumer(tiny_dir):
    model, tok = load_model(tiny_dir)
    eng = BatchEngine(model, tok, max_batch=1)  # not started: no delta ever comes

    async def main() -> list:
        stream = eng.submit([1, 2, 3], GenerationConfig(max_new_tokens=5))
        consumer = asyncio.ensure_future(asyncio.wait_for(_drain(stream), 5))
        await asyncio.sleep(0.05)  # the consumer is now waiting on the queue
        stream.cancel()  # e.g. the client went away
        return await consumer  # returns instead of waiting forever

    assert asyncio.run(main()) == []
    eng.close()


async def _drain(stream) -> list:
    return [d async for d in stream]


def test_deadline_ends_with_length(engine):
    ids = engine.tokenizer.encode("Tell me a long story")
    cfg = GenerationConfig(max_new_tokens=1000, temperature=1.0, stop_at_eot=False)
    deltas = list(engine.submit(ids, cfg, timeout=0.2))
    assert deltas[-1].finish_reason == "length"
    assert sum(len(d.tokens) for d in deltas) < 1000


def test_a_row_that_times_out_in_the_queue_raises_queue_timeout(tiny_dir):
    model, tok = load_model(tiny_dir)
    with BatchEngine(model, tok, max_batch=1) as eng:
        long = GenerationConfig(max_new_tokens=100_000, stop_at_eot=False)
        hog = eng.submit([1, 2], long)  # holds the only row, no deadline
        next(hog)
        waiting = eng.submit_many([([3], 0), ([4], 1)], GenerationConfig(max_new_tokens=4), timeout=0.2)
        with pytest.raises(QueueTimeout, match=r"waited its whole timeout of 0\.2 s \(--request-timeout\) for "
                                               r"one of the 1 rows \(--max-batch\)"):
            list(waiting)
        hog.cancel()
        assert eng.stats.queued == 0
        for bad in (float("nan"), float("inf"), 0, -1):
            with pytest.raises(Gpt2kitError, match="timeout must be a finite number of seconds > 0"):
                eng.submit([1], GenerationConfig(max_new_tokens=1), timeout=bad)


def test_async_iteration(engine, reference):
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)

    async def main() -> list[str]:
        tok = engine.tokenizer
        streams = [engine.submit(tok.encode(p), cfg) for p in PROMPTS[:3]]

        async def text(s) -> str:
            return "".join([d.text async for d in s])

        return list(await asyncio.gather(*(text(s) for s in streams)))

    assert asyncio.run(main()) == [reference.generate(p, cfg)[0].text for p in PROMPTS[:3]]


def test_queue_is_bounded(tiny_dir):
    model, tok = load_model(tiny_dir)
    eng = BatchEngine(model, tok, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    cfg = GenerationConfig(max_new_tokens=4)
    eng.submit([1, 2], cfg)
    eng.submit([1, 2], cfg)
    with pytest.raises(QueueFull, match="busy"):
        eng.submit([1, 2], cfg)
    with pytest.raises(Gpt2kitError, match=r"exceeds the server.s queue of \d+ \(its --max-queue\): ask for at most"):
        eng.submit_many([([1], i) for i in range(3)], cfg)
    eng.close()


def test_invalid_input_is_refused(engine):
    cfg = GenerationConfig(max_new_tokens=4)
    with pytest.raises(Gpt2kitError, match="empty prompt"):
        engine.submit([], cfg)
    with pytest.raises(Gpt2kitError, match="token ids"):
        engine.submit([50257], cfg)
    with pytest.raises(Gpt2kitError, match="seed"):
        engine.submit([1], replace(cfg, seed=-1))
    with pytest.raises(Gpt2kitError, match="temperature"):
        engine.submit([1], replace(cfg, temperature=-1))
    with pytest.raises(Gpt2kitError, match="length"):
        engine.submit([1], replace(cfg, max_new_tokens=0))


def test_worker_survives_a_failing_step(engine, reference):
    model = engine.model
    real = model.forward
    failed = []

    def flaky(idx, *a, **kw):
        if idx.shape[1] == 1 and not failed:  # the first decode step
            failed.append(True)
            raise RuntimeError("simulated out of memory")
        return real(idx, *a, **kw)

    model.forward = flaky
    try:
        with pytest.raises(Gpt2kitError, match="simulated out of memory"):
            collect(engine.submit(engine.tokenizer.encode("Hi"), GenerationConfig(max_new_tokens=5)))
    finally:
        del model.forward
    assert failed and engine.running
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)
    got = collect(engine.submit(engine.tokenizer.encode("Hi"), cfg))[0]
    assert got == reference.generate("Hi", cfg)[0].text


def test_padded_vocabulary_ids_are_never_picked_or_reported(tokenizer):
    # a checkpoint's vocabulary padded past the tokenizer's (50257 -> 50304) with the pad ids made by far
    # the likeliest: the engine must pick, and report among the top logprobs, only ids that have text
    from tests.conftest import padded_vocab_model
    model = padded_vocab_model()
    ids = tokenizer.encode("Hello there")
    with torch.no_grad():
        assert int(model(torch.tensor([ids]))[0, -1].argmax()) >= tokenizer.vocab_size  # the test can fail
    with BatchEngine(model, tokenizer, max_batch=2) as eng:
        for cfg in (GenerationConfig(max_new_tokens=12, temperature=0, stop_at_eot=False, logprobs=3),
                    GenerationConfig(max_new_tokens=12, seed=4, stop_at_eot=False),
                    GenerationConfig(max_new_tokens=12, seed=4, top_p=0.5, repetition_penalty=1.3,
                                     stop_at_eot=False)):
            deltas = list(eng.submit(ids, cfg))
            toks = [t for d in deltas for t in d.tokens]
            assert len(toks) == 12 and max(toks) < tokenizer.vocab_size
            assert all(t < tokenizer.vocab_size for d in deltas for info in d.token_info for t, _ in info.top)
        stream = eng.submit(ids, GenerationConfig(max_new_tokens=0), prompt_logprobs=3)
        list(stream)
        assert all(t < tokenizer.vocab_size for info in stream.prompt_info[0][1:] for t, _ in info.top)
        with pytest.raises(Gpt2kitError, match=r"prompt token ids must be in \[0, 50257\)"):
            eng.submit([50300, 50301], GenerationConfig(max_new_tokens=0), prompt_logprobs=1)  # ids with no text


def test_scoring_a_prompt_that_fills_the_context(engine, reference):
    """max_tokens 0 (echo + logprobs) on a prompt of exactly the context: every token after the first is
    scored with its full left context, as one forward pass over the prompt gives (nothing slides)."""
    ctx = engine.max_len
    ids = [(7 * i + 100) % 50000 for i in range(ctx)]
    cfg = GenerationConfig(max_new_tokens=0)
    stream = engine.submit(ids, cfg, prompt_logprobs=0)
    assert [d.finish_reason for d in stream] == ["length"]
    info = stream.prompt_info[0]
    assert len(info) == ctx and info[0] is None and all(x is not None for x in info[1:])
    with torch.inference_mode():
        logits = reference.model(torch.tensor([ids]))[0].float()
    want = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert [x.logprob for x in info[1:]] == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_rows_sampled_at_a_tiny_temperature_take_each_rows_argmax(temperature):
    # logits / 1e-40 overflow float32: softmax gave NaN and every row token 0; sample() has the same guard
    from gpt2kit.sampling import SamplingParams, draw, params_table, sample, uniforms
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, -1.0, 0.0, 4.5], [-3.0, -2.0, -2.5, -1.0]])
    params = SamplingParams(temperature=temperature, top_k=3)
    us = uniforms(torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert draw(logits, params_table([params] * 3, us)).tolist() == [1, 3, 3]
    assert [sample(row, params, key=i) for i, row in enumerate(logits)] == [1, 3, 3]


def test_one_wake_up_per_step_for_all_streams_of_a_loop(engine, reference):
    # the engine wakes an event loop once per step for every stream it wrote to, not once per token: with 3
    # rows decoding together, the loop gets about a third of the thread-safe calls it would get per token
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    calls = []

    async def main() -> list[list]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(*a, **kw):
            calls.append(a[0])
            return real(*a, **kw)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        tok = engine.tokenizer
        streams = [engine.submit(tok.encode(p), cfg) for p in PROMPTS[:3]]

        async def deltas(s) -> list:
            return [d async for d in s]

        return list(await asyncio.gather(*(deltas(s) for s in streams)))

    steps = engine.stats.steps
    got = asyncio.run(main())
    steps = engine.stats.steps - steps
    # every token in order, each row's finish on its last delta only
    assert ["".join(d.text for d in ds) for ds in got] == [reference.generate(p, cfg)[0].text for p in PROMPTS[:3]]
    for ds in got:
        assert [d.finish_reason for d in ds[:-1]] == [None] * (len(ds) - 1) and ds[-1].finish_reason
        assert sum(len(d.tokens) for d in ds) == 20
    assert len(calls) <= steps + 3  # one per decode step (+ the prefills' steps), never one per token
    assert len(calls) < 60 / 2


def test_next_batch_returns_what_arrived_then_the_error(engine, reference):
    # a consumer that falls behind takes every delta that arrived at once, in order; an error mid-stream is
    # raised after the deltas produced before it
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    model = engine.model
    real = model.forward
    n_steps = []

    def fail_late(idx, *a, **kw):
        if idx.shape[1] == 1:
            n_steps.append(1)
            if len(n_steps) == 6:
                raise RuntimeError("simulated failure mid-stream")
        return real(idx, *a, **kw)

    async def main() -> tuple[list, list]:
        ok = engine.submit_many([(engine.tokenizer.encode(p), i) for i, p in enumerate(PROMPTS[:2])], cfg)
        await asyncio.sleep(0.3)  # let several steps pile up
        batches = []
        while b := await ok.next_batch():
            batches.append(b)
        model.forward = fail_late
        try:
            bad = engine.submit(engine.tokenizer.encode("Hi"), cfg)
            seen = []
            with pytest.raises(Gpt2kitError, match="simulated failure mid-stream"):
                while b := await bad.next_batch():
                    seen += b
        finally:
            del model.forward
        return batches, seen

    batches, seen = asyncio.run(main())
    assert len(batches) < sum(len(b) for b in batches)  # several deltas per batch: coalesced
    texts = {0: "", 1: ""}
    for b in batches:
        for d in b:
            texts[d.index] += d.text
    assert [texts[0], texts[1]] == [reference.generate(p, cfg)[0].text for p in PROMPTS[:2]]
    assert 1 <= sum(len(d.tokens) for d in seen) <= 6 and all(d.finish_reason is None for d in seen)
