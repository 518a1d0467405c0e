import pytest
import torch

from gpt2kit.errors import Gpt2kitError
from gpt2kit.processors import apply_repetition_penalty
from gpt2kit.sampling import SamplingParams, filter_logits, sample

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 3.0 - 1e-3])


def draws(params, n=2000, logits=LOGITS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([sample(logits, params, g) for _ in range(n)])


def test_temperature_zero_is_argmax_and_ties_go_to_lowest_id():
    assert sample(LOGITS, SamplingParams(temperature=0)) == 1
    assert sample(torch.tensor([2.0, 5.0, 5.0]), SamplingParams(temperature=0)) == 1


def test_top_k_one_and_tiny_top_p_are_argmax():
    assert set(draws(SamplingParams(top_k=1), 200).tolist()) == {1}
    assert set(draws(SamplingParams(top_p=1e-6), 200).tolist()) == {1}


def test_top_k_keeps_exactly_k():
    out = filter_logits(LOGITS, top_k=2)
    assert torch.isfinite(out).tolist() == [False, True, False, False, True]
    assert set(draws(SamplingParams(top_k=2)).tolist()) == {1, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, 0)  # ~[.05, .36, .13, .03, .36]
    kept = torch.isfinite(filter_logits(LOGITS, top_p=0.5))
    assert kept.tolist() == [False, True, False, False, True]
    p = float(probs[1] + probs[4] + probs[2]) - 1e-4
    assert torch.isfinite(filter_logits(LOGITS, top_p=p)).sum() == 3


def test_min_p_drops_tokens_below_fraction_of_top():
    kept = torch.isfinite(filter_logits(LOGITS, min_p=0.3))  # e^-1 ~ .37 of top survives, e^-2 does not
    assert kept.tolist() == [False, True, True, False, True]


def test_sampling_matches_the_distribution():
    counts = torch.bincount(draws(SamplingParams(temperature=1.0), 20000), minlength=5).float() / 20000
    assert torch.allclose(counts, torch.softmax(LOGITS, 0), atol=0.015)
    hot = torch.bincount(draws(SamplingParams(temperature=0.5), 20000), minlength=5).float() / 20000
    assert torch.allclose(hot, torch.softmax(LOGITS / 0.5, 0), atol=0.015)


def test_same_seed_same_draws():
    assert torch.equal(draws(SamplingParams(), 50, seed=3), draws(SamplingParams(), 50, seed=3))
    assert not torch.equal(draws(SamplingParams(), 50, seed=3), draws(SamplingParams(), 50, seed=4))


def test_repetition_penalty_follows_the_ctrl_rule():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert sample(torch.tensor([2.0, 1.9]), SamplingParams(temperature=0, repetition_penalty=1.5),
                  seen=torch.tensor([0])) == 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=2), dict(repetition_penalty=0)])
def test_bad_parameters_are_rejected(kw):
    with pytest.raises(Gpt2kitError):
        SamplingParams(**kw).validate()


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=1e-300, top_p=0.9),
                                dict(temperature=1e-300, top_k=3), dict(temperature=1e-300, min_p=0.1)])
def test_a_tiny_temperature_that_overflows_float32_is_still_argmax(kw):
    # LOGITS / 1e-40 is +-inf in float32: softmax of that is NaN, which sampled token 0 whatever the logits
    assert set(draws(SamplingParams(**kw), 50).tolist()) == {1}


def test_a_repetition_penalty_near_zero_samples_a_seen_token_not_token_0():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])  # positive logits of seen tokens / 1e-300 = inf
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(repetition_penalty=1e-300), g, seen=torch.tensor([2, 3])) for _ in range(50)}
    assert picks <= {2, 3}


def test_filters_together_keep_what_transformers_warpers_keep():
    # top-k, then top-p, then min-p, as transformers orders its warpers: with min-p first, top-p would count
    # its mass over fewer tokens and keep another set
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g) * 3
    for top_k, top_p, min_p in ((0, 0.9, 0.05), (50, 0.8, 0.1), (200, 0.95, 0.02), (0, 0.5, 0.3)):
        ref = logits
        for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)]:
            ref = warper(None, ref)
        ours = filter_logits(logits, top_k, top_p, min_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (top_k, top_p, min_p)
