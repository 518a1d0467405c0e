"""Beam search against transformers' generate(num_beams=N) on the same weights, token for token; contrastive
search against a slow, cache-free reference of Su et al.'s formula written here."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.checkpoints import load_model, save_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import GenerationConfig, Generator
from gpt2kit.search import beam_search, contrastive_steps

PROMPTS = ["Hello there", "The cat sat on the mat and", "A", "In 1999, the city of Paris announced"]


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator(*load_model(tiny_model_dir, device="cpu"))


@pytest.fixture(scope="module")
def eot_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    """The tiny model with <|endoftext|> among the likeliest tokens after many contexts (its embedding, tied
    to the LM head, points where the likeliest tokens' do), so that beams end at many different lengths."""
    model, _ = load_model(tiny_model_dir, device="cpu")
    ids = tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        w = model.transformer.wte.weight
        top = model(torch.tensor([ids]))[0].argmax(-1)  # (T,): the likeliest next tokens along a prompt
        mean = w[top].mean(0)
        w[tokenizer.eot_token] = 0.85 * mean / mean.norm() * w[top].norm(dim=-1).mean()
    return save_model(model, tokenizer, tmp_path_factory.mktemp("eot-model"))


@pytest.fixture(scope="module")
def eot_gen(eot_dir):
    return Generator(*load_model(eot_dir, device="cpu"))


@pytest.fixture(scope="module")
def hf(eot_dir):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(eot_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(gen):
    return [gen.tokenizer.encode(p) for p in PROMPTS]


def hf_beams(hf, prompt, n, length, eos, length_penalty=1.0, early_stopping=False, **kw):
    """transformers' N best beams for one prompt: (generated tokens, each ending at its first EOS), scores."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      num_beams=n, num_return_sequences=n, do_sample=False, max_new_tokens=length,
                      length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                      pad_token_id=eos, return_dict_in_generate=True, output_scores=True, **kw)
    beams = []
    for seq in out.sequences[:, len(prompt):].tolist():
        beams.append(seq[:seq.index(eos) + 1] if eos in seq else seq)
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("n,length,length_penalty,early_stopping", [
    (2, 1, 1.0, False),
    (2, 9, 1.0, False),
    (3, 12, 1.0, True),
    (4, 16, 1.0, True),
    (4, 12, 0.0, "never"),
    (4, 16, 2.0, "never"),
    (4, 16, 1.0, "never"),
    (3, 12, 0.5, "never"),
    (3, 16, 2.0, False),
    (5, 8, -1.0, False),
    (3, 16, 0.5, True),
])
def test_beam_search_matches_transformers_token_for_token(eot_gen, hf, ids, n, length, length_penalty,
                                                          early_stopping):
    eos = eot_gen.tokenizer.eot_token
    # all prompts in one batch (different lengths) against transformers one prompt at a time
    found = beam_search(eot_gen.model, ids, n, length, eos=eos, length_penalty=length_penalty,
                        early_stopping=early_stopping)
    lengths = set()
    for prompt, hyps in zip(ids, found):
        beams, scores = hf_beams(hf, prompt, n, length, eos, length_penalty, early_stopping)
        assert [h.tokens for h in hyps] == beams
        assert [h.score for h in hyps] == pytest.approx(scores, abs=1e-4)
        lengths |= {len(h.tokens) for h in hyps}
    assert length == 1 or length_penalty > 1 or len(lengths) > 1  # beams ended at EOS at different lengths


def test_beam_search_batch_with_left_padding_matches_transformers_batch(eot_gen, hf, ids):
    """transformers' own batch of ragged prompts (left-padded, with an attention mask) agrees too."""
    eos = eot_gen.tokenizer.eot_token
    T = max(len(p) for p in ids)
    x = torch.tensor([[eos] * (T - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ids])
    out = hf.generate(x, attention_mask=mask, num_beams=3, do_sample=False, max_new_tokens=10, eos_token_id=eos,
                      pad_token_id=eos).tolist()
    want = [s[T:s.index(eos, T) + 1] if eos in s[T:] else s[T:] for s in out]
    assert [hyps[0].tokens for hyps in beam_search(eot_gen.model, ids, 3, 10, eos=eos)] == want
    # through the Generator: the text up to <|endoftext|>, which ends the sample
    outs = eot_gen.generate(PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3))
    assert [o.tokens + [eos] * (o.finish_reason == "stop") for o in outs] == want


def test_generator_beam_search_returns_the_best_beams_as_text(gen, ids):
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3, stop_at_eot=False)
    outs = gen.generate(PROMPTS[:2], cfg, nsamples=2, batch_size=2)  # one prompt per batch
    found = beam_search(gen.model, ids[:2], 3, 10, eos=None)
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert [o.tokens for o in outs] == [h.tokens for hyps in found for h in hyps[:2]]
    assert outs[0].text == gen.tokenizer.decode(outs[0].tokens) and outs[0].finish_reason == "length"
    assert gen.generate(PROMPTS[:2], cfg, nsamples=2) == outs  # batching never changes the result


def test_beam_search_ends_beams_at_endoftext_and_stop_strings(gen):
    cfg = GenerationConfig(max_new_tokens=12, num_beams=3, stop_at_eot=False)
    best = gen.generate("Hello there", cfg)[0]
    stop = best.text[8:11]
    assert stop.strip()
    cut = gen.generate("Hello there", cfg, stop=(stop,))[0]
    assert stop not in cut.text and cut.finish_reason == "stop"


def slow_contrastive(model, prompt, k, alpha, length, process=None):
    """Su et al., 2022, eq. 5, straight from the definition: a full forward of every candidate continuation,
    no cache. h is the last hidden state (ln_f's output). `process` (transformers' logits processors: input
    ids (1, T), logits (1, V) -> logits) is applied before the candidates are chosen, as transformers'
    contrastive search applies them."""
    seq = list(prompt)
    for _ in range(length):
        h = model(torch.tensor([seq]), return_hidden=True)[0]  # (T, C)
        logits = model.lm_head(h[-1]).float()
        p = F.softmax(logits if process is None else process(torch.tensor([seq]), logits[None])[0], dim=-1)
        probs, cand = p.topk(k)
        scores = []
        for pv, v in zip(probs.tolist(), cand.tolist()):
            hv = model(torch.tensor([seq + [v]]), return_hidden=True)[0, -1]
            scores.append((1 - alpha) * pv - alpha * F.cosine_similarity(h, hv[None], dim=-1).max().item())
        seq.append(cand[max(range(k), key=lambda i: scores[i])].item())
    return seq[len(prompt):]


@torch.inference_mode()
@pytest.mark.parametrize("k,alpha", [(4, 0.6), (3, 0.9), (6, 0.3)])
def test_contrastive_search_matches_the_papers_formula(gen, ids, k, alpha):
    length = 12
    outs = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=length, penalty_alpha=alpha, top_k=k,
                                                  stop_at_eot=False))
    for prompt, out in zip(ids, outs):
        assert out.tokens == slow_contrastive(gen.model, prompt, k, alpha, length)


@torch.inference_mode()
def test_contrastive_search_degenerates_to_greedy(gen, ids):
    greedy = [o.tokens for o in gen.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_at_eot=False)]
    steps = contrastive_steps(gen.model, ids, 1, 0.5, 128)  # one candidate: nothing to contrast
    tokens = [next(steps)[0] for _ in range(10)]
    assert [list(t) for t in zip(*tokens)] == greedy
    alpha0 = gen.generate(PROMPTS, max_new_tokens=10, penalty_alpha=1e-9, top_k=5, stop_at_eot=False)
    assert [o.tokens for o in alpha0] == greedy


def test_contrastive_search_streams_logprobs_and_stops(gen):
    cfg = GenerationConfig(max_new_tokens=15, penalty_alpha=0.6, top_k=4, stop_at_eot=False, logprobs=2)
    full = gen.generate("Hello there", cfg)[0]
    assert "".join(d.text for d in gen.stream("Hello there", cfg)) == full.text
    assert len(full.token_info) == 15 and all(len(i.top) == 2 for i in full.token_info)
    stop = full.text[10:13]
    cut = gen.generate("Hello there", cfg, stop=(stop,))[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("overrides,msg", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=3, temperature=0.7),
     "beam search (num_beams > 1) does not sample: drop temperature"),
    (dict(num_beams=3, typical_p=0.9), "drop typical_p"),
    (dict(num_beams=3, top_p=0.9), "drop top_p"),
    (dict(num_beams=3, top_k=40), "drop top_k"),
    (dict(num_beams=3, logprobs=1), "beam search does not report logprobs"),
    (dict(num_beams=3, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(penalty_alpha=0.6), "needs top_k candidates"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha must be in [0, 1]"),
    (dict(penalty_alpha=-0.1, top_k=4), "penalty_alpha must be in [0, 1]"),
    (dict(penalty_alpha=0.6, top_k=4, min_p=0.1), "contrastive search (penalty_alpha > 0) does not sample"),
    (dict(penalty_alpha=0.6, top_k=4, num_beams=2), "choose one"),
    (dict(num_beams=3, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(num_beams=3, length_penalty=float("inf")), "length_penalty must be a finite number"),
    (dict(length_penalty=2.0), "length_penalty (--length-penalty) only applies to beam search: add num_beams > 1"),
    (dict(early_stopping=True, length_penalty=0.5),
     "length_penalty (--length-penalty) and early_stopping (--early-stopping) only apply to beam search"),
    (dict(penalty_alpha=0.6, top_k=4, early_stopping="never"), "early_stopping (--early-stopping) only applies"),
])
def test_bad_search_settings_are_one_line_errors(overrides, msg):
    with pytest.raises(Gpt2kitError, match=None) as e:
        GenerationConfig(**overrides).validate()
    assert msg in str(e.value) and "\n" not in str(e.value)


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated after a prompt of `start` tokens, as
    a transformers logits processor: the reference that ours are checked against inside transformers' searches."""

    def __init__(self, start, presence, frequency):
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for i, row in enumerate(input_ids[:, self.start:].tolist()):
            for t in set(row):
                scores[i, t] -= row.count(t) * self.frequency + self.presence
        return scores


def beam_texts(gen, n, length, **kw):
    """Our n best beams per prompt through the Generator, as transformers writes them (EOS kept)."""
    eos = gen.tokenizer.eot_token
    outs = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=length, num_beams=n, **kw), nsamples=n)
    beams = [o.tokens + [eos] * (o.finish_reason == "stop") for o in outs]
    return [beams[i:i + n] for i in range(0, len(beams), n)]


@pytest.fixture(scope="module")
def hf_plain(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("model,ours,theirs", [
    # on the tiny model, whose beams repeat tokens and words
    ("plain", dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=1)),
    ("plain", dict(repetition_penalty=1.3), dict(repetition_penalty=1.3)),
    ("plain", dict(presence_penalty=1.0, frequency_penalty=0.5), "openai"),
    ("plain", dict(bad_words=("Germany", " embarked")), "bad_words"),
    # on the model whose beams end early at <|endoftext|>
    ("eot", dict(min_tokens=8), dict(min_new_tokens=8)),
    ("eot", dict(logit_bias={50256: -2.0, 11: 1.5}), dict(sequence_bias={(50256,): -2.0, (11,): 1.5})),
    ("eot", dict(no_repeat_ngram_size=2, repetition_penalty=1.2, min_tokens=5, frequency_penalty=0.4), "all"),
])
def test_beam_search_with_logits_processors_matches_transformers(request, ids, model, ours, theirs):
    """transformers applies its processors to the beams' log-probabilities (each beam over its own tokens);
    ours too, with each beam's processor state forked from the beam it continues."""
    from transformers import LogitsProcessorList

    from gpt2kit.processors import bad_word_sequences

    gen, hf = (request.getfixturevalue(f) for f in (("gen", "hf_plain") if model == "plain" else ("eot_gen", "hf")))
    tok, n, length = gen.tokenizer, 3, 12
    eos = tok.eot_token
    mine = beam_texts(gen, n, length, **ours)
    changed = False
    for prompt, got in zip(ids, mine):
        kw = dict(theirs) if isinstance(theirs, dict) else {}
        if theirs in ("openai", "all"):
            penalties = OpenAIPenalties(len(prompt), ours.get("presence_penalty", 0), ours["frequency_penalty"])
            kw = dict(logits_processor=LogitsProcessorList([penalties]))
        if theirs == "all":
            kw.update(no_repeat_ngram_size=2, repetition_penalty=1.2, min_new_tokens=5)
        if theirs == "bad_words":
            kw = dict(bad_words_ids=bad_word_sequences(ours["bad_words"], tok.encode))
        want, _ = hf_beams(hf, prompt, n, length, eos, **kw)
        assert got == want
        changed |= want != hf_beams(hf, prompt, n, length, eos)[0]
    assert changed  # the control changes some beams, so the comparison means something


@torch.inference_mode()
def test_contrastive_search_with_logits_processors_matches_the_formula_on_processed_logits(gen, ids):
    from transformers import LogitsProcessorList
    from transformers.generation import logits_process as lp

    length, k, alpha = 12, 4, 0.6
    cfg = GenerationConfig(max_new_tokens=length, penalty_alpha=alpha, top_k=k, stop_at_eot=False,
                           no_repeat_ngram_size=2, repetition_penalty=1.3, presence_penalty=0.8)
    outs = gen.generate(PROMPTS, cfg)
    plain = gen.generate(PROMPTS, dataclasses.replace(cfg, no_repeat_ngram_size=0, repetition_penalty=1.0,
                                                      presence_penalty=0.0))
    assert [o.tokens for o in outs] != [o.tokens for o in plain]
    for prompt, out in zip(ids, outs):
        process = LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3), OpenAIPenalties(len(prompt), 0.8, 0),
                                       lp.NoRepeatNGramLogitsProcessor(2)])
        assert out.tokens == slow_contrastive(gen.model, prompt, k, alpha, length, process)


def test_beam_search_refuses_streaming_endless_and_more_samples_than_beams(gen):
    cfg = GenerationConfig(max_new_tokens=4, num_beams=2)
    with pytest.raises(Gpt2kitError, match="cannot stream"):
        next(gen.stream("Hi", cfg))
    with pytest.raises(Gpt2kitError, match="at most num_beams"):
        gen.generate("Hi", cfg, nsamples=3)
    with pytest.raises(Gpt2kitError, match="endless"):
        next(gen.completions("Hi", cfg, nsamples=0))
    with pytest.raises(Gpt2kitError, match="do not slide the window"):
        gen.generate("Hi " * 100, cfg, max_new_tokens=100)


def test_searches_say_how_many_new_tokens_fit_and_take_that_many(gen, caplog):
    """The context (128 here) holds the prompt + every new token: a short prompt leaves room for more than
    half the context, and a long one is cut as far as half the context leaves room."""
    import logging

    short, long = "Hi", "Hi " * 100  # 1 and 100 tokens
    cfg = GenerationConfig(max_new_tokens=4, num_beams=2, stop_at_eot=False)
    for prompt, room in ((short, 127), (long, 64)):
        for search in (dict(num_beams=2), dict(num_beams=1, penalty_alpha=0.6, top_k=2)):
            with caplog.at_level(logging.WARNING, logger="gpt2kit"):
                caplog.clear()
                with pytest.raises(Gpt2kitError, match=f"ask for at most {room} new tokens"):
                    gen.generate(prompt, cfg, max_new_tokens=room + 1, **search)
                assert not caplog.records  # an error, and no notice about the prompt before it
            assert len(gen.generate(prompt, cfg, max_new_tokens=room, **search)[0].tokens) == room


def test_contrastive_search_refuses_several_or_endless_samples_of_a_prompt(gen):
    cfg = GenerationConfig(max_new_tokens=4, penalty_alpha=0.6, top_k=4)
    with pytest.raises(Gpt2kitError, match="deterministic: every sample"):
        gen.generate("Hi", cfg, nsamples=2)
    with pytest.raises(Gpt2kitError, match="deterministic: every sample"):
        next(gen.completions("Hi", cfg, nsamples=0))


def cli(capsys, *argv):
    from gpt2kit.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_beam_and_contrastive_search_print_what_the_generator_gives(capsys, gen, tiny_model_dir):
    beams = gen.generate("Hello there", GenerationConfig(max_new_tokens=8, num_beams=3, early_stopping="never"),
                         nsamples=2)
    code, out, _ = cli(capsys, "generate", "Hello there", "-m", tiny_model_dir, "-n", 8, "--num-beams", 3,
                       "--early-stopping", "never", "--nsamples", 2, "--format", "jsonl")
    assert code == 0 and [json.loads(line)["tokens"] for line in out.splitlines()] == [b.tokens for b in beams]
    code, out, _ = cli(capsys, "generate", "Hello there", "-m", tiny_model_dir, "-n", 8, "--num-beams", 3,
                       "--length-penalty", 0.5, "--early-stopping")  # one sample, text: printed whole
    want = gen.generate("Hello there", GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.5,
                                                        early_stopping=True))[0].text
    assert code == 0 and out == want + "\n"
    code, out, _ = cli(capsys, "generate", "Hello there", "-m", tiny_model_dir, "-n", 8, "--penalty-alpha", 0.6,
                       "--top-k", 4)
    want = gen.generate("Hello there", GenerationConfig(max_new_tokens=8, penalty_alpha=0.6, top_k=4))[0].text
    assert code == 0 and out == want + "\n"
    # with the repetition controls
    code, out, _ = cli(capsys, "generate", "Hello there", "-m", tiny_model_dir, "-n", 8, "--num-beams", 3,
                       "--no-repeat-ngram-size", 1, "--repetition-penalty", 1.2, "--ban", "Germany")
    want = gen.generate("Hello there", GenerationConfig(max_new_tokens=8, num_beams=3, no_repeat_ngram_size=1,
                                                        repetition_penalty=1.2, bad_words=("Germany",)))[0]
    assert code == 0 and out == want.text + "\n" and len(set(want.tokens)) == len(want.tokens)
    code, out, _ = cli(capsys, "generate", "Hello there", "-m", tiny_model_dir, "-n", 8, "--penalty-alpha", 0.6,
                       "--top-k", 4, "--presence-penalty", 1.5, "--logit-bias", "11=2")
    want = gen.generate("Hello there", GenerationConfig(max_new_tokens=8, penalty_alpha=0.6, top_k=4,
                                                        presence_penalty=1.5, logit_bias={11: 2.0}))[0].text
    assert code == 0 and out == want + "\n"


@pytest.mark.parametrize("argv,msg", [
    (("--num-beams", 0), "num_beams must be an integer >= 1"),
    (("--num-beams", 3, "-t", 0.7), "drop temperature (--temperature)"),
    (("--num-beams", 3, "--top-p", 0.9), "drop top_p (--top-p)"),
    (("--num-beams", 3, "--typical-p", 0.9), "drop typical_p (--typical-p)"),
    (("--num-beams", 2, "--nsamples", 3), "give --nsamples in that range, not 3"),
    (("--num-beams", 2, "--nsamples", 0), "give --nsamples in that range, not 0"),
    (("--penalty-alpha", 0.6), "needs top_k candidates"),
    (("--penalty-alpha", 1.2, "--top-k", 4), "penalty_alpha must be in [0, 1]"),
    (("--length-penalty", 2), "only applies to beam search: add num_beams > 1 (--num-beams N) or drop it"),
    (("--num-beams", 2, "--length-penalty", "nan"), "length_penalty must be a finite number"),
])
def test_cli_bad_search_flags_are_one_line_errors_before_the_model_loads(capsys, tmp_path, argv, msg):
    code, _, err = cli(capsys, "generate", "x", *argv, "-m", tmp_path / "no-model")
    assert code != 0 and msg in err and err.count("\n") == 1 and err.startswith("error: ")


def test_cli_early_stopping_takes_no_value_or_never(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        cli(capsys, "generate", "-m", tmp_path / "no-model", "--early-stopping", "x")
    assert e.value.code == 2 and "takes no value or 'never', got 'x'" in capsys.readouterr().err


def test_searches_give_the_same_tokens_on_the_fast_decoding_paths(tiny_model_dir, gen, ids):
    """prepare_decoding_ (the CPU kernel's one-token step, taken when every row writes the same slot) reads
    the cache rows that select_cache_rows_ moved."""
    from gpt2kit.generate import prepare_decoding_
    fast, _ = load_model(tiny_model_dir, device="cpu")
    prepare_decoding_(fast)
    same_length = [ids[0], ids[0][::-1]]  # one slot per step for every row: the kernel's case
    for contexts in (same_length, ids):
        want = beam_search(gen.model, contexts, 3, 10, eos=None)
        assert [[h.tokens for h in hs] for hs in beam_search(fast, contexts, 3, 10, eos=None)] == \
            [[h.tokens for h in hs] for hs in want]
    cfg = GenerationConfig(max_new_tokens=10, penalty_alpha=0.6, top_k=4, stop_at_eot=False)
    assert Generator(fast, gen.tokenizer).generate(PROMPTS, cfg) == gen.generate(PROMPTS, cfg)


def test_searches_called_directly_refuse_contexts_past_the_models(gen):
    with pytest.raises(Gpt2kitError, match="does not slide the window"):
        beam_search(gen.model, [[1] * 100], 2, 40, eos=None)
    with pytest.raises(Gpt2kitError, match="does not slide the window"):
        next(contrastive_steps(gen.model, [[1] * 100], 4, 0.6, cache_len=200))
