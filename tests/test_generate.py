import logging

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import GenerationConfig, Generator


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


def test_unconditional_starts_from_endoftext(gen):
    out = gen.generate(None, max_new_tokens=8, seed=0, nsamples=2, stop_at_eot=False)
    assert out[0].prompt_tokens == [50256] and len(out) == 2


def test_longer_than_context_slides_the_window_and_says_so_once(gen, caplog):
    ctx = gen.model.config.n_positions
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        out = gen.generate("word " * 200, max_new_tokens=ctx + 50, temperature=0, stop_at_eot=False)[0]
    assert len(out.tokens) == ctx + 50
    assert len([r for r in caplog.records if "sliding the window" in r.message]) == 1


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
