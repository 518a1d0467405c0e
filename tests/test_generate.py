import itertools
import logging

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import GenerationConfig, Generator
from tests.conftest import padded_vocab_model


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator(*load_model(tiny_model_dir, device="cpu"))


def texts(outs):
    return [o.text for o in outs]


def test_same_seed_same_text_and_batch_size_does_not_matter(gen):
    cfg = GenerationConfig(max_new_tokens=24, seed=7, top_k=40, temperature=0.9, stop_at_eot=False)
    a = gen.generate("The cat", cfg, nsamples=4, batch_size=4)
    b = gen.generate("The cat", cfg, nsamples=4, batch_size=1)
    c = gen.generate("The cat", cfg, nsamples=4, batch_size=3)
    assert texts(a) == texts(b) == texts(c)
    assert len(set(texts(a))) == 4  # samples differ from each other
    d = gen.generate("The cat", GenerationConfig(**{**cfg.__dict__, "seed": 8}), nsamples=4)
    assert texts(d) != texts(a)


def test_streamed_deltas_add_up_to_the_completion(gen):
    cfg = GenerationConfig(max_new_tokens=30, seed=1, stop_at_eot=False)
    streamed = {}
    for d in gen.stream("Once upon a time", cfg, nsamples=2):
        streamed[d.index] = streamed.get(d.index, "") + d.text
    full = gen.generate("Once upon a time", cfg, nsamples=2)
    assert [streamed[0], streamed[1]] == texts(full)
    assert all(o.finish_reason == "length" and len(o.tokens) == 30 for o in full)


def test_stop_strings_cut_the_text_and_are_never_streamed(gen):
    base = gen.generate("Hello", max_new_tokens=40, temperature=0, stop_at_eot=False)[0].text
    stop = base[10:13]
    assert stop.strip()
    cut = gen.generate("Hello", max_new_tokens=40, temperature=0, stop_at_eot=False, stop=(stop,))[0]
    assert cut.text == base[: base.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(d.text for d in gen.stream("Hello", GenerationConfig(
        max_new_tokens=40, temperature=0, stop_at_eot=False, stop=(stop,))))
    assert streamed == cut.text


def test_stops_at_endoftext_by_default(gen):
    # make <|endoftext|> overwhelmingly likely by biasing the LM head through wte
    model = gen.model
    with torch.no_grad():
        saved = model.transformer.wte.weight[50256].clone()
        saved_bias = model.transformer.ln_f.bias.clone()
        model.transformer.wte.weight[50256] = model.transformer.wte.weight.std() * 0  # neutral first
        model.transformer.ln_f.bias.zero_()
        model.transformer.wte.weight[50256] = model.transformer.ln_f.weight.sign() * 50
    try:
        out = gen.generate("Hello", max_new_tokens=20, temperature=0)[0]
        assert out.finish_reason == "stop" and out.tokens == [] and out.text == ""
        out = gen.generate("Hello", max_new_tokens=5, temperature=0, stop_at_eot=False)[0]
        assert out.tokens == [50256] * 5 and out.finish_reason == "length"
    finally:
        with torch.no_grad():
            model.transformer.wte.weight[50256] = saved
            model.transformer.ln_f.bias.copy_(saved_bias)  # the module's later tests share this model


def test_unconditional_starts_from_endoftext(gen):
    out = gen.generate(None, max_new_tokens=8, seed=0, nsamples=2, stop_at_eot=False)
    assert out[0].prompt_tokens == [50256] and len(out) == 2


def test_longer_than_context_slides_the_window_and_says_so_once(gen, caplog):
    ctx = gen.model.config.n_positions
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        out = gen.generate("word " * 200, max_new_tokens=ctx + 50, temperature=0, stop_at_eot=False)[0]
    assert len(out.tokens) == ctx + 50
    assert len([r for r in caplog.records if "the model sees only the most recent tokens" in r.message]) == 1


def test_start_window_keeps_what_fits_beside_the_output():
    from gpt2kit.generate import start_window
    assert start_window(100, 28, 128) == 100  # all fits
    assert start_window(1000, 100, 1024) == 924  # gpt-2-simple's truncation: no slide while generating
    assert start_window(200, 20, 128) == 108 and start_window(200, 64, 128) == 64
    assert start_window(100, 60, 128) == 68  # a prompt shorter than the window, output fits beside half
    assert start_window(100, 100, 128) == 100 and start_window(200, 100, 128) == 64  # else: slide later / half
    assert start_window(300, 0, 128) == 128  # scoring only: the last whole window


def test_a_prompt_longer_than_the_context_keeps_what_fits_beside_the_output(gen, caplog):
    # 20 new tokens after a prompt longer than the 128-token context: the prompt's last 108 tokens, and
    # nothing slides while generating (the same tokens as full forward passes over that window)
    model, ctx = gen.model, gen.model.config.n_positions
    ids = gen.tokenizer.encode("the cat sat on a mat and then " * 30)
    assert len(ids) > ctx
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        out = gen.generate(gen.tokenizer.decode(ids), max_new_tokens=20, temperature=0, stop_at_eot=False)[0]
    cut = [r for r in caplog.records if "the model sees only the most recent tokens" in r.message]
    assert len(cut) == 1  # the prompt was cut
    window = ids[-(ctx - 20):]
    with torch.inference_mode():
        for _ in range(20):
            window.append(int(model(torch.tensor([window[-(ctx - 1):]]))[0, -1].argmax()))
    assert out.tokens == window[-20:]


def test_logprobs_are_reported(gen):
    out = gen.generate("Hello", max_new_tokens=5, temperature=0, stop_at_eot=False, logprobs=3)[0]
    assert len(out.token_info) == 5
    for info in out.token_info:
        assert info.token == info.top[0][0]  # greedy picks the top alternative
        assert info.logprob == pytest.approx(info.top[0][1])


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), "length"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top-p"),
    (dict(stop=("",)), "stop"),
])
def test_bad_settings_fail_before_generating(gen, kw, msg):
    with pytest.raises(Gpt2kitError, match=msg):
        gen.generate("Hello", **kw)


def test_empty_prompt_is_refused(gen):
    with pytest.raises(Gpt2kitError, match="empty prompt"):
        gen.generate("", max_new_tokens=3)


def test_endless_sampling_gives_the_samples_of_a_finite_run_whatever_the_batch_size(gen):
    cfg = GenerationConfig(max_new_tokens=10, seed=5, top_k=40, stop_at_eot=False)
    finite = gen.generate("The dog", cfg, nsamples=4)
    assert len(set(texts(finite))) == 4
    for bs in (1, 2, 3):
        endless = list(itertools.islice(gen.completions("The dog", cfg, nsamples=0, batch_size=bs), 4))
        assert [c.index for c in endless] == [0, 1, 2, 3]
        assert texts(endless) == texts(finite)
    streamed: dict[int, str] = {}
    for d in gen.stream("The dog", cfg, nsamples=0):
        if d.index == 2:
            break
        streamed[d.index] = streamed.get(d.index, "") + d.text
    assert [streamed[0], streamed[1]] == texts(finite)[:2]


def test_nsamples_errors_name_nsamples(gen):
    with pytest.raises(Gpt2kitError, match=r"^nsamples must be >= 1 for generate\(\).*stream\(\)"):
        gen.generate("x", nsamples=0)
    with pytest.raises(Gpt2kitError, match="nsamples must be >= 0"):
        next(gen.completions("x", GenerationConfig(), nsamples=-1))
    with pytest.raises(Gpt2kitError, match="one prompt"):
        next(gen.completions(["a", "b"], GenerationConfig(), nsamples=0))
    with pytest.raises(Gpt2kitError, match="batch size must be > 0, got 0"):
        next(gen.completions("x", GenerationConfig(), nsamples=2, batch_size=0))


def test_window_notice_comes_once_per_call_not_once_per_batch(gen):
    ctx = gen.model.config.n_positions
    cfg = GenerationConfig(max_new_tokens=ctx + 40, seed=1, stop_at_eot=False)
    calls = []
    outs = list(gen.completions("Hello", cfg, nsamples=3, batch_size=1, on_window_slide=lambda: calls.append(1)))
    assert [len(o.tokens) for o in outs] == [ctx + 40] * 3 and calls == [1]
    calls.clear()
    endless = gen.completions("Hello", cfg, nsamples=0, batch_size=1, on_window_slide=lambda: calls.append(1))
    assert len(list(itertools.islice(endless, 3))) == 3 and calls == [1]


def test_stop_string_cuts_tokens_consistently_with_text(gen, tokenizer):
    cfg = dict(max_new_tokens=40, temperature=0, stop_at_eot=False)
    base = gen.generate("Hello", **cfg)[0]
    ends = [len(tokenizer.decode(base.tokens[:k + 1])) for k in range(len(base.tokens))]
    k = next(i for i in range(4, len(ends) - 1) if ends[i + 1] - ends[i] >= 3)  # token k+1 has >= 3 chars
    # a stop string that starts on a token boundary: the tokens decode to exactly the text
    stop = base.text[ends[k]:ends[k] + 2]
    out = gen.generate("Hello", **cfg, stop=(stop,))[0]
    assert out.finish_reason == "stop" and out.text == base.text[:base.text.index(stop)]
    assert tokenizer.decode(out.tokens) == out.text
    assert out.tokens == base.tokens[:len(out.tokens)]
    # a stop string that starts inside token k+1: that token is dropped, the text keeps its first char
    stop = base.text[ends[k] + 1:ends[k] + 3]
    out = gen.generate("Hello", **cfg, stop=(stop,))[0]
    cut = base.text.index(stop)
    assert out.text == base.text[:cut]
    assert out.tokens == base.tokens[:len(out.tokens)]
    kept = tokenizer.decode(out.tokens)
    assert out.text.startswith(kept)  # no token reaches past the text...
    assert len(tokenizer.decode(base.tokens[:len(out.tokens) + 1])) > cut  # ...and no whole one is missing


@pytest.fixture(scope="module")
def padded_gen(tokenizer):
    return Generator(padded_vocab_model(), tokenizer)


def test_padded_vocabulary_ids_are_never_sampled(padded_gen, tokenizer):
    ids = torch.tensor([tokenizer.encode("Hello")])
    assert int(padded_gen.model(ids)[0, -1].argmax()) >= tokenizer.vocab_size  # the test can fail
    for cfg in (GenerationConfig(max_new_tokens=20, temperature=0, stop_at_eot=False),
                GenerationConfig(max_new_tokens=20, seed=4, stop_at_eot=False, logprobs=3),
                GenerationConfig(max_new_tokens=20, seed=4, top_p=0.5, repetition_penalty=1.3, stop_at_eot=False)):
        for o in padded_gen.generate("Hello", cfg, nsamples=2):
            assert len(o.tokens) == 20 and max(o.tokens) < tokenizer.vocab_size
            assert o.text == tokenizer.decode(o.tokens)
            assert all(t < tokenizer.vocab_size for info in o.token_info for t, _ in info.top)


def test_a_stop_given_as_one_string_is_one_stop_string(gen):
    base = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False)[0].text
    # a stop string one of whose characters comes sooner than the string itself
    stop = next(base[i:i + 4] for i in range(len(base) - 4)
                if min(base.index(c) for c in base[i:i + 4]) < base.index(base[i:i + 4]))
    as_str = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False, stop=stop)[0]
    as_list = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False, stop=[stop])[0]
    assert as_str.text == as_list.text == base[:base.index(stop)]
    assert GenerationConfig(stop=stop).stop == GenerationConfig(stop=[stop]).stop == (stop,)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_error(tokenizer):
    from gpt2kit.config import GPTConfig
    from tests.conftest import random_model
    small = Generator(random_model(GPTConfig(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, n_positions=64)),
                      tokenizer)
    for prompt in ("Hello world", None):  # "Hello" is id 15496; unconditional starts from 50256
        with pytest.raises(Gpt2kitError, match="outside the model's vocabulary of 1000.*--tokenizer"):
            small.generate(prompt, max_new_tokens=2)
