import numpy as np
import pytest
import torch

from gpt2kit import kernels
from gpt2kit.errors import Gpt2kitError
from gpt2kit.processors import apply_repetition_penalty
from gpt2kit.sampling import SamplingParams, draw, filter_logits, params_table, sample, uniforms

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 3.0 - 1e-3])


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    """Run a test on both of draw()'s paths: PyTorch's, and the compiled kernel (where it builds)."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_ext", None)
        monkeypatch.setattr("gpt2kit.sampling._tried_kernel", True)
    else:
        request.getfixturevalue("ext")
    return request.param


def draws(params, n=2000, logits=LOGITS, key=0):
    """The first n tokens of a row with `key`, drawn as n rows of one batch."""
    us = uniforms(torch.full((n,), key), torch.arange(n))
    return draw(logits.expand(n, -1).contiguous(), params_table([params] * n, us))


def splitmix64(key: int, step: int) -> float:
    m = (1 << 64) - 1
    z = (key + (step + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return ((z ^ (z >> 31)) >> 11) * 2.0 ** -53


def test_uniforms_are_splitmix64_of_key_and_step():
    keys = [0, 1, 12345, (1 << 63) - 1, 2**62 + 7]
    for key in keys:
        got = uniforms(torch.full((50,), key), torch.arange(50)).tolist()
        assert got == [splitmix64(key, s) for s in range(50)]
    u = uniforms(torch.full((20000,), 3), torch.arange(20000))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_temperature_zero_is_argmax_and_ties_go_to_lowest_id(path):
    assert sample(LOGITS, SamplingParams(temperature=0)) == 1
    assert sample(torch.tensor([2.0, 5.0, 5.0]), SamplingParams(temperature=0)) == 1


def test_top_k_one_and_tiny_top_p_are_argmax(path):
    assert set(draws(SamplingParams(top_k=1), 200).tolist()) == {1}
    assert set(draws(SamplingParams(top_p=1e-6), 200).tolist()) == {1}
    # typical-p keeps the token whose -log p is nearest the entropy (~1.3): 4, just less likely than 1
    assert set(draws(SamplingParams(typical_p=1e-6), 200).tolist()) == {4}


def test_top_k_keeps_exactly_k(path):
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


def test_sampling_matches_the_distribution(path):
    counts = torch.bincount(draws(SamplingParams(temperature=1.0), 20000), minlength=5).float() / 20000
    assert torch.allclose(counts, torch.softmax(LOGITS, 0), atol=0.015)
    hot = torch.bincount(draws(SamplingParams(temperature=0.5), 20000), minlength=5).float() / 20000
    assert torch.allclose(hot, torch.softmax(LOGITS / 0.5, 0), atol=0.015)
    top = torch.bincount(draws(SamplingParams(top_p=0.8), 20000), minlength=5).float() / 20000
    assert torch.allclose(top, torch.softmax(filter_logits(LOGITS, top_p=0.8), 0), atol=0.015)


def test_same_key_same_draws_and_a_row_alone_draws_what_it_draws_in_a_batch(path):
    assert torch.equal(draws(SamplingParams(), 50, key=3), draws(SamplingParams(), 50, key=3))
    assert not torch.equal(draws(SamplingParams(), 50, key=3), draws(SamplingParams(), 50, key=4))
    batch = draws(SamplingParams(top_p=0.9), 30, key=7).tolist()
    assert [sample(LOGITS, SamplingParams(top_p=0.9), key=7, step=s) for s in range(30)] == batch


def test_repetition_penalty_follows_the_ctrl_rule():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert sample(torch.tensor([2.0, 1.9]), SamplingParams(temperature=0, repetition_penalty=1.5),
                  seen=torch.tensor([0])) == 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=2), dict(repetition_penalty=0), dict(typical_p=0),
                                dict(typical_p=1.5)])
def test_bad_parameters_are_rejected(kw):
    with pytest.raises(Gpt2kitError):
        SamplingParams(**kw).validate()


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=1e-300, top_p=0.9),
                                dict(temperature=1e-300, top_k=3), dict(temperature=1e-300, min_p=0.1),
                                dict(temperature=1e-300, typical_p=0.5)])
def test_a_tiny_temperature_that_overflows_float32_is_still_argmax(path, kw):
    # LOGITS / 1e-40 is +-inf in float32: softmax of that is NaN, which sampled token 0 whatever the logits
    assert set(draws(SamplingParams(**kw), 50).tolist()) == {1}


def test_a_repetition_penalty_near_zero_samples_a_seen_token_not_token_0(path):
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])  # positive logits of seen tokens / 1e-300 = inf
    picks = {sample(logits, SamplingParams(repetition_penalty=1e-300), key=0, step=s, seen=torch.tensor([2, 3]))
             for s in range(50)}
    assert picks <= {2, 3}


def _warped(logits, temperature, top_k, top_p, min_p, typical_p):
    """What transformers' warpers keep, in the order generate() applies them."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    warpers += [TypicalLogitsWarper(typical_p)] if typical_p < 1 else []
    for w in warpers:
        logits = w(None, logits)
    return torch.isfinite(logits)


CASES = [(1.0, 0, 0.9, 0.05, 1.0), (1.0, 50, 0.8, 0.1, 1.0), (0.8, 200, 0.95, 0.02, 1.0), (1.0, 0, 0.5, 0.3, 1.0),
         (0.8, 40, 1.0, 0.0, 1.0), (0.9, 0, 0.9, 0.0, 1.0), (1.0, 0, 1.0, 0.1, 1.0), (1.0, 0, 1.0, 0.0, 0.9),
         (0.7, 0, 1.0, 0.0, 0.2), (1.0, 30, 0.9, 0.05, 0.8), (1.0, 1000, 1e-4, 0.0, 1.0), (1.0, 1, 0.9, 0.0, 1.0),
         (1.3, 499, 0.999, 0.0, 0.95), (1.0, 0, 0.3, 0.0, 0.5)]


def _same_kept(kept, want, logits, ties, slack=0):
    """Equal kept sets; with `slack`, up to that many rows may swap a pair of tokens at the boundary (float32
    rounding: on flat logits transformers' typical-p orders near-equal surprises by its cancellation error)."""
    if ties:
        # Tokens tied with the last one top-p keeps: transformers keeps those its (unstable) sort puts last,
        # an order of no meaning; we keep the higher ids. So each row keeps as many tokens of each value.
        return all(torch.equal(lg[k].sort().values, lg[w].sort().values) for lg, k, w in zip(logits, kept, want))
    diff = (kept != want).sum(dim=1)
    return torch.equal(kept.sum(dim=1), want.sum(dim=1)) and int((diff > 0).sum()) <= slack and int(diff.max()) <= 2


@pytest.mark.parametrize("scale", [3.0, 0.02, "ties"])  # peaked, flat (as random weights give), many ties
def test_filters_keep_what_transformers_warpers_keep(ext, scale):
    # top-k, then top-p, then min-p, then typical-p, as transformers orders its warpers: with min-p first,
    # top-p would count its mass over fewer tokens and keep another set
    g = torch.Generator().manual_seed(0)
    ties = scale == "ties"
    logits = torch.randint(0, 6, (64, 500), generator=g).float() if ties else torch.randn(64, 500, generator=g) * scale
    for case in CASES:
        want = _warped(logits, *case)
        table = params_table([SamplingParams(*case[:4], typical_p=case[4])] * 64, torch.zeros(64))
        torch_kept = torch.isfinite(filter_logits(logits / case[0], *case[1:]))
        assert _same_kept(torch_kept, want, logits, ties), case  # the same arithmetic as transformers
        kernel_kept = ext.filter_rows(logits, table) > 0
        assert _same_kept(kernel_kept, want, logits, ties, slack=1), case
        assert _same_kept(kernel_kept, torch_kept, logits, False, slack=1), case  # ties: both keep higher ids


def _vocab_rows(shape: str, n: int = 6, V: int = 50257) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if shape == "flat":  # as random weights give them
        return torch.randn(n, V, generator=g) * 0.2
    if shape == "zipf":  # as trained weights give them: a few likely tokens and a long tail, order scrambled
        rank = torch.arange(1, V + 1).float()
        rows = [(-(1.0 + 0.5 * i / n) * rank.log() + 0.3 * torch.randn(V, generator=g))[torch.randperm(V, generator=g)]
                for i in range(n)]
        return torch.stack(rows)
    if shape == "ties":
        return torch.randint(0, 40, (n, V), generator=g).float() / 8
    # misjudged: every 32nd token (those the kernel's estimate samples) far likelier than the rest, so that
    # its first guess at the cut misses and the row takes the histogram's way
    x = torch.randn(n, V, generator=g) * 0.01 - 3
    x[:, ::32] += 3
    return x


@pytest.mark.parametrize("shape", ["flat", "zipf", "ties", "misjudged"])
def test_top_p_at_full_vocabulary_keeps_exactly_the_smallest_set(ext, shape):
    # the kernel's top-p estimates where its cut lies (from the likeliest tokens and a sample of the rest)
    # and checks the estimate, falling back to a histogram of every token: either way the kept set must be
    # exactly the smallest one, most likely first (ties: higher ids first), whose mass reaches top_p, as a
    # float64 sort of the kernel's own e^z finds it
    logits = _vocab_rows(shape)
    n, V = logits.shape
    for temperature, top_k, top_p in [(0.9, 0, 0.9), (1.0, 0, 0.5), (1.0, 0, 0.999), (1.0, 0, 1e-4), (0.7, 2000, 0.95),
                                      (1.5, 0, 0.9)]:
        def kept_by(p: SamplingParams) -> torch.Tensor:
            return ext.filter_rows(logits, params_table([p] * n, torch.zeros(n)))
        e = kept_by(SamplingParams(temperature, top_k)).double()  # every token's e^z, as the kernel makes it
        kept = kept_by(SamplingParams(temperature, top_k, top_p)) > 0
        x = logits.clamp(max=torch.finfo(torch.float32).max)
        z = (x - x.amax(dim=1, keepdim=True)) * torch.tensor(1 / temperature, dtype=torch.float32)
        for r in range(n):
            er, zr = e[r].numpy(), z[r].numpy()
            order = np.lexsort((-np.arange(V), -zr))  # z descending, then ids descending
            order = order[er[order] > 0]
            last = int((np.cumsum(er[order]) < top_p * er.sum()).sum())
            want = np.zeros(V, dtype=bool)
            want[order[:last + 1]] = True
            assert np.array_equal(kept[r].numpy(), want), (shape, temperature, top_k, top_p, r)


def test_the_kernel_and_pytorch_draw_the_same_tokens(ext, monkeypatch):
    g = torch.Generator().manual_seed(1)
    n, V = 300, 2000
    logits = torch.randn(n, V, generator=g) * torch.rand(n, 1, generator=g) * 4
    params = [SamplingParams(*case[:4], typical_p=case[4]) for case in CASES] + [SamplingParams(temperature=0)]
    rows = [params[i % len(params)] for i in range(n)]
    table = params_table(rows, uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long)))
    ours = ext.sample_rows(logits, table)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr("gpt2kit.sampling._tried_kernel", True)
    assert torch.equal(draw(logits, table), ours)


def test_a_row_with_no_finite_logits_still_gives_a_token_id(path):
    # a row whose every token is banned (-inf) has no distribution; it must not crash or read out of range
    logits = torch.tensor([[float("-inf")] * 5, [0.0, float("-inf"), 1.0, float("-inf"), 2.0]])
    for p in (SamplingParams(top_p=0.9), SamplingParams(typical_p=0.5, min_p=0.1), SamplingParams(top_k=2)):
        toks = draw(logits, params_table([p] * 2, torch.tensor([0.3, 0.7]))).tolist()
        assert 0 <= toks[0] < 5 and toks[1] in (0, 2, 4)


@pytest.mark.parametrize("shape", ["flat", "zipf", "ties"])
def test_rows_narrowed_by_top_k_or_min_p_keep_and_draw_what_pytorch_does(ext, shape, monkeypatch):
    # top-k, and min-p without top-p, bound the kept set before any sum, so the kernel filters and draws on
    # only the tokens they may keep (one pass with a rising threshold for top-k): at the full vocabulary, the
    # kept sets and the drawn tokens must be PyTorch's
    logits = _vocab_rows(shape, n=8)
    n = logits.size(0)
    cases = [(0.8, 40, 1.0, 0.0, 1.0), (1.0, 1000, 1.0, 0.0, 1.0), (1.0, 6000, 0.9, 0.0, 1.0), (1.0, 0, 1.0, 0.1, 1.0),
             (2.0, 0, 1.0, 0.9, 1.0), (1.0, 0, 1.0, 0.05, 0.8), (1.0, 50, 0.95, 0.05, 1.0), (0.7, 200, 1.0, 0.0, 0.9)]
    for case in cases:
        if shape == "flat" and case[4] < 1:
            continue  # PyTorch's typical-p orders a flat row's near-equal surprises by its cancellation error
        p = SamplingParams(*case[:4], typical_p=case[4])
        table = params_table([p] * n, uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long)))
        kept = ext.filter_rows(logits, table) > 0
        want = torch.isfinite(filter_logits(logits / case[0], *case[1:]))
        assert _same_kept(kept, want, logits, shape == "ties", slack=1), (shape, case)
        ours = ext.sample_rows(logits, table)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_ext", None)
            m.setattr("gpt2kit.sampling._tried_kernel", True)
            assert torch.equal(draw(logits, table), ours), (shape, case)


def test_greedy_rows_take_the_first_maximum_on_both_paths(ext):
    from gpt2kit.sampling import argmax
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 5, (16, 50257), generator=g).float()  # many tied maxima
    logits[3, 7] = float("inf")
    logits[4] = float("-inf")
    assert torch.equal(ext.argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    table = params_table([SamplingParams(temperature=0)] * 16, torch.zeros(16))
    assert torch.equal(ext.sample_rows(logits, table), logits.argmax(dim=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("mixed", [False, True])
def test_sampling_a_batch_on_cuda_synchronises_the_host_the_same_number_of_times_for_any_batch(mixed):
    """Issue 18: no host synchronisation per row on CUDA. Counted with PyTorch's sync debug mode: drawing a
    batch of 32 rows waits on the GPU as often as drawing 2 (the parameter table's columns go to the GPU once
    per filter, whatever the number of rows), and the tokens are those of the PyTorch path on the CPU."""
    import warnings

    settings = [SamplingParams(temperature=0.8, top_k=40), SamplingParams(temperature=0.9, top_p=0.9),
                SamplingParams(min_p=0.1), SamplingParams(top_k=50, top_p=0.95, min_p=0.05, typical_p=0.9)]

    def syncs(B: int) -> tuple[int, torch.Tensor, torch.Tensor, list[SamplingParams]]:
        params = [settings[i % len(settings)] if mixed else settings[1] for i in range(B)]
        logits = torch.randn(B, 50257, generator=torch.Generator().manual_seed(B)) * 3
        table = params_table(params, uniforms(list(range(B)), [0] * B))
        on_gpu = logits.cuda()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tokens = draw(on_gpu, table)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return len(caught), tokens, logits, params

    few, _, _, _ = syncs(2 * len(settings) if mixed else 2)
    many, tokens, logits, params = syncs(32)
    assert many == few
    want = torch.tensor([sample(logits[i], params[i], key=i, step=0) for i in range(32)])
    assert (tokens.cpu() == want).float().mean() >= 0.95  # (float sums in another order may move a rare token)
