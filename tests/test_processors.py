"""Logits processors (gpt2kit.processors): each control against transformers' processor on the same logits and
ids, end to end against transformers' greedy generate() on the same weights, OpenAI's penalties and logit_bias
against their definitions, mixed batches, the generate CLI's flags."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.cli import main
from gpt2kit.decode import GenerationConfig, Row, advance, decode_step, prefill, usable_vocab
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import Generator
from gpt2kit.processors import (
    ProcessorParams,
    RowProcessors,
    apply_logit_bias,
    apply_presence_frequency,
    apply_processors,
    apply_repetition_penalty,
    bad_word_sequences,
    banned_ngram_tokens,
    follow,
)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402

V = 50257
EOT = 50256


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


def state(tokenizer, prompt: list[int], **kw) -> RowProcessors:
    return RowProcessors(ProcessorParams(**kw).validate(), prompt, EOT, V, tokenizer.encode)


def ours(st: RowProcessors, scores: torch.Tensor) -> torch.Tensor:
    return apply_processors([st], scores[None])[0]


# ---- each control against transformers' processor, step by step -------------------------------------------

def histories(seed: int = 0, n: int = 40) -> tuple[list[int], list[int]]:
    """A prompt and a continuation drawn from few ids, so that n-grams and words repeat."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (n,), generator=g).tolist()
    return [10 + i for i in ids[:12]], [10 + i for i in ids[12:]]


@pytest.mark.parametrize("kw, theirs", [
    (dict(repetition_penalty=1.7), lambda plen: lp.RepetitionPenaltyLogitsProcessor(1.7)),
    (dict(repetition_penalty=0.6), lambda plen: lp.RepetitionPenaltyLogitsProcessor(0.6)),
    (dict(no_repeat_ngram_size=1), lambda plen: lp.NoRepeatNGramLogitsProcessor(1)),
    (dict(no_repeat_ngram_size=3), lambda plen: lp.NoRepeatNGramLogitsProcessor(3)),
    (dict(no_repeat_ngram_size=20), lambda plen: lp.NoRepeatNGramLogitsProcessor(20)),
    (dict(min_tokens=7), lambda plen: lp.MinNewTokensLengthLogitsProcessor(plen, 7, EOT)),
])
def test_each_step_equals_transformers_processor(tokenizer, kw, theirs):
    prompt, cont = histories()
    st = state(tokenizer, prompt, **kw)
    proc = theirs(len(prompt))
    torch.manual_seed(1)
    for step in range(len(cont) + 1):
        ids = torch.tensor([prompt + cont[:step]])
        scores = torch.randn(1, V) * 3
        assert torch.equal(ours(st, scores[0]), proc(ids, scores.clone())[0]), step
        if step < len(cont):
            st.push(cont[step])


def test_bad_words_equal_transformers_no_bad_words(tokenizer):
    words = ["hello world", "cat", " the end of it"]
    seqs = bad_word_sequences(words, tokenizer.encode)
    # both spellings of each word, one-token and multi-token ones
    assert [tokenizer.encode("cat")] in [[s] for s in seqs] and tokenizer.encode(" cat") in seqs
    assert any(len(s) == 1 for s in seqs) and any(len(s) > 2 for s in seqs)
    proc = lp.NoBadWordsLogitsProcessor(seqs, eos_token_id=EOT)
    # a history that passes through each banned sequence's prefix
    history = tokenizer.encode("Say hello world, the end of it, and hello") + tokenizer.encode(" the end of")
    st = state(tokenizer, history[:3], bad_words=tuple(words))
    torch.manual_seed(2)
    hits = 0
    for step in range(3, len(history) + 1):
        scores = torch.randn(1, V)
        theirs = proc(torch.tensor([history[:step]]), scores.clone())[0]
        mine = ours(st, scores[0])
        assert torch.equal(mine, theirs), step
        hits += int(torch.isinf(mine).sum()) > 2  # more than the one-token words banned here
        if step < len(history):
            st.push(history[step])
    assert hits >= 2


def test_the_pure_ngram_scan_agrees_with_the_table():
    prompt, cont = histories(3)
    for n in (1, 2, 3, 4):
        st = RowProcessors(ProcessorParams(no_repeat_ngram_size=n), prompt, EOT, V, lambda s: [])
        for t in cont:
            st.push(t)
            assert st.banned() == banned_ngram_tokens(st.history, n)


def test_beams_that_follow_each_other_keep_the_state_of_their_own_tokens(tokenizer):
    """follow() moves or forks the states as beams continue each other: every beam's state then processes
    logits as a fresh state built from its own prompt + tokens does."""
    import random
    rnd = random.Random(0)
    kw = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, no_repeat_ngram_size=2,
              bad_words=("the cat",), min_tokens=6)
    prompt = tokenizer.encode("the dog and the")
    tokens = [7, 9, 11, 3797, 262, 7, 9, EOT] + tokenizer.encode(" the")  # a few, so that beams repeat them
    root = state(tokenizer, prompt, **kw)
    states, paths = [root] * 4, [[] for _ in range(4)]  # four beams sharing the prompt's state, as at the start
    scores = torch.randn(4, V)
    for _ in range(12):
        src = [rnd.randrange(4) for _ in range(4)]
        new = [rnd.choice(tokens) for _ in range(4)]
        states, paths = follow(states, src, new), [paths[j] + [t] for j, t in zip(src, new)]
        assert len({id(s) for s in states}) == 4
        fresh = [state(tokenizer, prompt, **kw) for _ in paths]
        for f, path in zip(fresh, paths):
            for t in path:
                f.push(t)
        assert torch.equal(apply_processors(states, scores), apply_processors(fresh, scores))
        assert [s.history for s in states] == [f.history for f in fresh]


# ---- OpenAI's penalties and logit_bias: the definitions ------------------------------------------------

def test_presence_and_frequency_penalties_follow_openais_definition_over_generated_tokens(tokenizer):
    prompt = [1, 2, 3, 3]
    st = state(tokenizer, prompt, presence_penalty=0.5, frequency_penalty=0.25)
    torch.manual_seed(3)
    scores = torch.randn(V)
    assert torch.equal(ours(st, scores), scores)  # the prompt's tokens are not penalised
    for t in (3, 7, 7, 9, 7):
        st.push(t)
    counts = {3: 1, 7: 3, 9: 1}
    want = scores.clone()
    for j, c in counts.items():
        want[j] -= c * 0.25 + 0.5
    assert torch.allclose(ours(st, scores), want)
    assert torch.allclose(apply_presence_frequency(scores, counts, 0.5, 0.25), want)
    # negative values encourage repeats
    neg = state(tokenizer, prompt, presence_penalty=-1.0)
    neg.push(5)
    assert ours(neg, scores)[5] == scores[5] + 1.0


def test_logit_bias_adds_and_100_forces_minus_100_bans(tokenizer, loaded):
    scores = torch.zeros(V)
    out = apply_logit_bias(scores, ((5, 2.5), (9, -1.0)))
    assert out[5] == 2.5 and out[9] == -1.0 and out.sum() == 1.5
    model, tok = loaded
    gen = Generator(model, tok)
    base = gen.generate("The cat", max_new_tokens=6, temperature=0, stop_at_eot=False)[0].tokens
    banned = gen.generate("The cat", max_new_tokens=6, temperature=0, stop_at_eot=False,
                          logit_bias={base[0]: -100})[0].tokens
    assert base[0] not in banned
    forced = gen.generate("The cat", max_new_tokens=6, temperature=1.0, seed=0, stop_at_eot=False,
                          logit_bias={42: 100})[0].tokens
    assert forced == [42] * 6


def test_repetition_penalty_follows_the_ctrl_rule():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("kw, words", [
    (dict(presence_penalty=2.1), "presence penalty must be in [-2, 2]"),
    (dict(frequency_penalty=float("nan")), "frequency penalty"),
    (dict(logit_bias={5: 101}), "[-100, 100]"),
    (dict(logit_bias={-1: 1}), "token id must be an integer >= 0"),
    (dict(logit_bias={"13": 1, 5: 2}), "token id must be an integer >= 0, got '13'"),
    (dict(bad_words=("",)), "bad word"),
    (dict(no_repeat_ngram_size=-1), "no-repeat n-gram size"),
    (dict(min_tokens=-1), "min tokens"),
    (dict(min_tokens=11, max_new_tokens=10), "must not exceed the length"),
])
def test_bad_values_are_one_line_errors(kw, words):
    with pytest.raises(Gpt2kitError, match=None) as e:
        GenerationConfig(**kw).validate()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_logit_bias_that_is_not_a_number_is_an_error():
    with pytest.raises(Gpt2kitError, match="logit bias values must be numbers"):
        GenerationConfig(logit_bias={5: "lots"})


def test_config_stays_hashable_with_logit_bias_as_sorted_pairs():
    a = GenerationConfig(logit_bias={9: 1, 3: -2}, bad_words="spam")
    assert a.logit_bias == ((3, -2.0), (9, 1.0)) and a.bad_words == ("spam",)
    assert hash(a) == hash(GenerationConfig(logit_bias=[(3, -2), (9, 1.0)], bad_words=["spam"]))
    assert not GenerationConfig().processing.active and a.processing.active


def test_a_logit_bias_id_outside_the_vocabulary_is_an_error(loaded):
    model, tok = loaded
    with pytest.raises(Gpt2kitError, match="outside the vocabulary"):
        Generator(model, tok).generate("x", max_new_tokens=2, logit_bias={V: -100})


# ---- end to end: transformers' greedy generate() with its processor vs ours with the flag -------------------

def hf_greedy(hf, ids: list[int], n: int, **kw) -> list[int]:
    kw.setdefault("eos_token_id", None)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=EOT, **kw)
    return out[0, len(ids):].tolist()


PROMPTS = ["Once upon a time", "Hello"]  # the tiny model repeats itself within a few tokens after these


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("ours_kw, theirs_kw", [
    (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=2)),
    (dict(no_repeat_ngram_size=3), dict(no_repeat_ngram_size=3)),
    (dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
    (dict(logit_bias={29622: -5.0, 3882: 3.0}), dict(sequence_bias={(29622,): -5.0, (3882,): 3.0})),
])
def test_greedy_generation_equals_transformers(loaded, hf, prompt, ours_kw, theirs_kw):
    model, tok = loaded
    ids = tok.encode(prompt)
    plain = hf_greedy(hf, ids, 32)
    theirs = hf_greedy(hf, ids, 32, **theirs_kw)
    assert theirs != plain  # the control changes the text, so the comparison means something
    mine = Generator(model, tok).generate(prompt, max_new_tokens=32, temperature=0, stop_at_eot=False, **ours_kw)
    assert mine[0].tokens == theirs


def test_banned_words_equal_transformers(loaded, hf):
    model, tok = loaded
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    plain = hf_greedy(hf, ids, 24)
    # ban a one-token word and a two-token phrase that the plain text contains
    words = (tok.decode(plain[:1]).strip(), tok.decode(plain[3:5]))
    seqs = bad_word_sequences(words, tok.encode)
    theirs = hf_greedy(hf, ids, 24, bad_words_ids=seqs)
    assert theirs != plain
    mine = Generator(model, tok).generate(prompt, max_new_tokens=24, temperature=0, stop_at_eot=False,
                                          bad_words=words)[0]
    assert mine.tokens == theirs
    assert all(w not in mine.text for w in words)


def test_min_tokens_equals_transformers_min_new_tokens(loaded, hf):
    # a logit bias makes <|endoftext|> the greedy choice, so only min_tokens keeps the text going
    model, tok = loaded
    ids = tok.encode("Hello there")
    bias = {(EOT,): 30.0}
    assert hf_greedy(hf, ids, 10, eos_token_id=EOT, sequence_bias=bias) == [EOT]
    theirs = hf_greedy(hf, ids, 10, eos_token_id=EOT, sequence_bias=bias, min_new_tokens=6)
    assert theirs[:7] == theirs[:6] + [EOT] and EOT not in theirs[:6]
    mine = Generator(model, tok).generate("Hello there", max_new_tokens=10, temperature=0, min_tokens=6,
                                          logit_bias={EOT: 30.0})[0]
    assert mine.tokens == theirs[:6] and mine.finish_reason == "stop"


def test_stop_strings_do_not_end_a_row_before_min_tokens(loaded):
    model, tok = loaded
    gen = Generator(model, tok)
    base = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False)[0]
    stop = tok.decode(base.tokens[1:2])  # the text of the second token
    early = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False, stop=(stop,))[0]
    assert len(early.tokens) <= 1
    late = gen.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eot=False, stop=(stop,), min_tokens=5)[0]
    assert late.tokens[:5] == base.tokens[:5]
    assert len(late.tokens) >= 5 or late.finish_reason == "length"


# ---- batches: rows with different controls share one batch ---------------------------------------------------

@torch.inference_mode()
def mixed_loop(model, tok, jobs):
    """The decode loop with one GenerationConfig per row (as the server's engine runs it)."""
    rows = [Row(0, p, tok.encode(p), cfg, tok, model.device) for p, cfg in jobs]
    n_vocab = usable_vocab(model, tok)
    model.setup_caches(len(rows), 96)
    for r in rows:
        r.fit_window(model.cache_len)
    logits = prefill(model, [r.context for r in rows])[:, :n_vocab]
    active = list(range(len(rows)))
    while active:
        advance([rows[b] for b in active], logits[active])
        active = [b for b in active if not rows[b].done]
        if active:
            logits = decode_step(model, rows)[:, :n_vocab]
    return [r.out for r in rows]


def test_a_mixed_batch_gives_each_row_its_own_tokens(loaded):
    model, tok = loaded
    base = dict(max_new_tokens=16, stop_at_eot=False)
    jobs = [("The cat sat", GenerationConfig(temperature=0, **base)),
            ("The cat sat", GenerationConfig(temperature=0, no_repeat_ngram_size=2, **base)),
            ("Once upon", GenerationConfig(seed=3, top_k=20, presence_penalty=1.0, frequency_penalty=1.0, **base)),
            ("Once upon", GenerationConfig(seed=3, top_k=20, **base)),
            ("A", GenerationConfig(temperature=0, repetition_penalty=1.4, logit_bias={13: -100}, **base)),
            ("A", GenerationConfig(seed=5, bad_words=("the",), min_tokens=4, **base))]
    together = mixed_loop(model, tok, jobs)
    gen = Generator(model, tok)
    for (p, cfg), out in zip(jobs, together):
        assert out.tokens == gen.generate(p, cfg)[0].tokens


def test_logprobs_report_the_models_own_distribution(loaded):
    model, tok = loaded
    gen = Generator(model, tok)
    plain = gen.generate("Hello", max_new_tokens=1, temperature=0, logprobs=3)[0].token_info[0]
    biased = gen.generate("Hello", max_new_tokens=1, temperature=0, logprobs=3, logit_bias={50: 100})[0]
    info = biased.token_info[0]
    assert info.token == 50 and info.top == plain.top  # the alternatives are the model's, not the biased ones


def test_rows_without_controls_get_the_logits_unchanged(tokenizer):
    logits = torch.randn(2, 10)
    assert apply_processors([None, None], logits) is logits
    st = RowProcessors(ProcessorParams(logit_bias=((1, 1.0),)), [0], 9, 10, tokenizer.encode)
    before = logits.clone()
    out = apply_processors([None, st], logits)
    assert torch.equal(out[0], logits[0]) and out[1, 1] == logits[1, 1] + 1
    assert torch.equal(logits, before)  # the input is left as it was
    assert apply_processors([None, st], logits, inplace=True) is logits and logits[1, 1] == before[1, 1] + 1


# ---- the generate CLI --------------------------------------------------------------------------------------

def test_cli_flags_reach_generation(capsys, tiny_model_dir, loaded):
    model, tok = loaded
    argv = ["generate", "Hello", "-m", str(tiny_model_dir), "-n", "8", "-t", "0", "--no-stop-at-eot",
            "--no-repeat-ngram-size", "2", "--presence-penalty", "0.5", "--frequency-penalty", "0.5",
            "--logit-bias", "13=-100", "--logit-bias", "11=-50", "--ban", "the", "--min-tokens", "3"]
    assert main(argv) == 0
    want = Generator(model, tok).generate("Hello", max_new_tokens=8, temperature=0, stop_at_eot=False,
                                          no_repeat_ngram_size=2, presence_penalty=0.5, frequency_penalty=0.5,
                                          logit_bias={13: -100, 11: -50}, bad_words=("the",), min_tokens=3)[0]
    assert capsys.readouterr().out == want.text + "\n"


@pytest.mark.parametrize("flags, words", [
    (["--logit-bias", "13"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["--logit-bias", "x=1"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["--logit-bias", "13=lots"], "--logit-bias takes TOKEN_ID=BIAS"),
    (["--logit-bias", "13=150"], "[-100, 100]"),
    (["--logit-bias", "99999=1"], "outside the vocabulary"),
    (["--presence-penalty", "3"], "presence penalty must be in [-2, 2]"),
    (["--frequency-penalty", "-2.5"], "frequency penalty must be in [-2, 2]"),
    (["--ban", ""], "bad word"),
    (["--no-repeat-ngram-size", "-2"], "no-repeat n-gram size"),
    (["--min-tokens", "50", "-n", "5"], "min tokens (50) must not exceed the length (5)"),
])
def test_cli_bad_values_are_one_line_errors(capsys, tiny_model_dir, flags, words):
    assert main(["generate", "Hello", "-m", str(tiny_model_dir), *flags]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
