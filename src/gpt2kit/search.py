"""Deterministic searches over the KV cache: beam search and contrastive search.

Both run a batch of prompts of different lengths together, each prompt's hypotheses in their own cache rows
(prompt b owns rows b*W..b*W+W-1 for W beams or candidates), and move a kept hypothesis's keys and values to
the rows that continue it with GPT.select_cache_rows_. Neither slides the context window: the caller keeps
prompt + new tokens within the cache.

- beam_search follows transformers' generate(num_beams=N, do_sample=False) step for step (its vectorised
  beam search: top 2N continuations, EOS and stop hits go to the finished list with the length penalty, the
  early-stopping heuristic), so that it picks the same tokens. The length penalty divides by the number of
  new tokens, as transformers 5 does (tests/test_search.py checks against the installed version).
- contrastive_steps is Su et al., 2022 ("A Contrastive Framework for Neural Text Generation"): each step takes
  the top-k tokens v and picks argmax (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j), h being ln_f's output
  (the last hidden state) and j running over every earlier token of the row."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2kit.decode import prefill
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.processors import RowProcessors, apply_processors, follow

NEG = -1.0e9  # transformers' "impossible" score: added, not set, so that the order of the rest is kept


@dataclass
class Hypothesis:
    tokens: list[int]  # the generated tokens, the EOS that ended it included
    score: float  # summed log-probability / len(tokens) ** length_penalty


def _prefill_hidden(model: GPT, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """decode.prefill that returns ln_f's output (B, T, C) at every position instead of the last logits."""
    device = model.device
    T = max(len(c) for c in contexts)
    x = torch.tensor([list(c) + [c[-1]] * (T - len(c)) for c in contexts], device=device)  # (B, T)
    return model(x, torch.arange(T, device=device), kv_len=T, rows=slice(0, len(contexts)), return_hidden=True)


def _spread_rows(model: GPT, contexts: Sequence[Sequence[int]], width: int) -> None:
    """Copy cache row b (context b, just prefilled) to rows b*width..b*width+width-1."""
    B = len(contexts)
    model.select_cache_rows_(torch.arange(B, device=model.device).repeat_interleave(width),
                             upto=max(len(c) for c in contexts))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) -> t[b, idx[b, j], ...] (B, J, ...) for idx (B, J)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(model: GPT, contexts: Sequence[Sequence[int]], num_beams: int, max_new_tokens: int, *,
                eos: int | None, length_penalty: float = 1.0, early_stopping: bool | str = False,
                n_vocab: int | None = None, stops: Callable[[int, list[int]], bool] | None = None,
                processors: Sequence[RowProcessors | None] | None = None) -> list[list[Hypothesis]]:
    """Beam search for each context -> its num_beams finished hypotheses, best first.

    A hypothesis ends with token `eos` (None: never), at max_new_tokens, or when stops(b, tokens) says that
    context b's generated tokens hold a stop string. early_stopping: True ends a prompt once num_beams
    hypotheses are finished; False once the best running beam, scored at its current length, cannot beat the
    worst finished one; "never" scores it at max_new_tokens when length_penalty > 0 (transformers' rules).
    Only the first n_vocab logits are candidates (default all). processors: each context's logits processors
    (gpt2kit.processors, its prompt already seen; None for none), applied to every beam's log-probabilities
    before the scores are summed, as transformers applies its logits processors in beam search; each beam
    gets its own copy of the state (`follow`), and the given objects are used up."""
    device = model.device
    B, N, L = len(contexts), num_beams, max_new_tokens
    K = 2 * N  # candidates kept per step: at most N of them end (one EOS per beam), so N always run on
    cache_len = max(len(c) for c in contexts) + L
    if cache_len > model.config.n_positions:
        raise Gpt2kitError(f"a prompt of {cache_len - L} tokens plus {L} new ones exceeds the model's context of "
                           f"{model.config.n_positions}; beam search does not slide the window")
    model.setup_caches(B * N, cache_len)
    logits = prefill(model, contexts, rows=slice(0, B))[:, :n_vocab]  # (B, V)
    _spread_rows(model, contexts, N)
    V = logits.shape[-1]
    logprobs = F.log_softmax(logits.float(), dim=-1).repeat_interleave(N, dim=0)  # (B*N, V)
    lens = torch.tensor([len(c) for c in contexts], device=device)  # (B,)
    rows = torch.arange(B, device=device)[:, None] * N  # (B, 1): each prompt's first cache row

    running = torch.full((B, N, L), -1, dtype=torch.long, device=device)  # generated tokens of each beam
    running_scores = torch.zeros(B, N, device=device)
    running_scores[:, 1:] = NEG  # the N beams start equal: only the first one's continuations count
    # every beam's processors, the N beams of a prompt sharing one state until they differ
    states = [p for p in processors for _ in range(N)] if processors and any(processors) else None
    finished = torch.full((B, N, L), -1, dtype=torch.long, device=device)
    finished_scores = torch.full((B, N), NEG, device=device)
    finished_lens = torch.zeros(B, N, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # may a running beam still do better?
    top_n = (torch.arange(K, device=device) < N)[None, :]  # (1, K): only the best N may finish in a step

    for step in range(L):
        if step > 0:
            x = running[:, :, step - 1].reshape(B * N, 1)  # (B*N, 1): each beam's newest token
            pos = (lens + step - 1).repeat_interleave(N).view(B * N, 1)
            logits = model(x, pos, kv_len=int(lens.max()) + step)[:, -1, :n_vocab]  # (B*N, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)
        if states is not None:
            logprobs = apply_processors(states, logprobs, inplace=True)
        scores = (logprobs.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        top_scores, top_idx = torch.topk(scores, K)  # (B, K)
        src, tokens = top_idx // V, top_idx % V  # the beam each candidate extends, and its token
        cand = _gather(running, src)  # (B, K, L)
        cand[:, :, step] = tokens
        hits = torch.full_like(tokens, step + 1 >= L, dtype=torch.bool)  # (B, K): the candidate ends here
        if eos is not None:
            hits |= tokens == eos
        if stops is not None:
            seqs = cand[:, :, :step + 1].tolist()
            hits |= torch.tensor([[stops(b, s) for s in seqs[b]] for b in range(B)], device=device)

        # the best N candidates that go on are the next running beams
        go_on = top_scores + hits.float() * NEG
        keep = torch.topk(go_on, N)[1]  # (B, N)
        running, running_scores, running_src = _gather(cand, keep), _gather(go_on, keep), _gather(src, keep)

        # the candidates among the best N that end join the finished list if they beat its worst
        ended = top_scores / ((step + 1) ** length_penalty)
        ended = ended + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
        ended = ended + (~improvable).float() * NEG
        ended = ended + (~(hits & top_n)).float() * NEG
        merged = torch.topk(torch.cat((finished_scores, ended), dim=1), N)[1]  # (B, N)
        finished = _gather(torch.cat((finished, cand), dim=1), merged)
        finished_scores = _gather(torch.cat((finished_scores, ended), dim=1), merged)
        finished_lens = _gather(torch.cat((finished_lens, torch.full_like(tokens, step + 1)), dim=1), merged)
        is_finished = _gather(torch.cat((is_finished, hits & top_n), dim=1), merged)

        model.select_cache_rows_((rows + running_src).view(-1), upto=int(lens.max()) + step)  # filled slots
        if states is not None:
            states = follow(states, (rows + running_src).view(-1).tolist(), running[:, :, step].reshape(-1).tolist())

        # transformers' early-stopping heuristic: can the best running beam still beat the worst finished one?
        best_len = L if early_stopping == "never" and length_penalty > 0 else step + 1
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        if (not bool(improvable.any()) or (early_stopping is True and bool(is_finished.all()))
                or bool(hits.all())):
            break

    out = []
    for b in range(B):
        toks, n, sc = finished[b].tolist(), finished_lens[b].tolist(), finished_scores[b].tolist()
        out.append([Hypothesis(t[:k], s) for t, k, s in zip(toks, n, sc)])
    return out


@torch.inference_mode()
def contrastive_steps(model: GPT, contexts: Sequence[Sequence[int]], top_k: int, penalty_alpha: float,
                      cache_len: int, n_vocab: int | None = None,
                      process: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Contrastive search for each context, one token per row per step, for as long as the caller iterates
    (at most cache_len - the longest context steps) -> (the rows' next tokens, their logits (B, V) before the
    choice). Each step runs the top_k candidates of every row through the model at once (B*top_k cache rows);
    the chosen candidate's keys, values and hidden state are kept. process: the rows' logits processors, logits
    (B, V) -> processed logits, applied before the candidates are chosen (as transformers' contrastive search
    applies them); it is called after the caller has seen the previous step's tokens, and the logits yielded
    are the model's own."""
    device = model.device
    B, k = len(contexts), min(top_k, n_vocab or model.config.vocab_size)
    if cache_len > model.config.n_positions or max(len(c) for c in contexts) >= cache_len:
        raise Gpt2kitError(f"contrastive search needs the contexts and new tokens within cache_len ({cache_len}) "
                           f"<= the model's context ({model.config.n_positions}); it does not slide the window")
    model.setup_caches(B * k, cache_len)
    hidden = _prefill_hidden(model, contexts)  # (B, T, C)
    _spread_rows(model, contexts, k)
    T = hidden.shape[1]
    lens = torch.tensor([len(c) for c in contexts], device=device)  # (B,)
    batch = torch.arange(B, device=device)
    # every row's earlier hidden states, unit length (B, S, C), and which slots hold one (B, S)
    ctx = torch.zeros(B, cache_len, hidden.shape[-1], device=device)
    ctx[:, :T] = F.normalize(hidden.float(), dim=-1)
    filled = torch.arange(cache_len, device=device)[None, :] < lens[:, None]
    logits = model.lm_head(hidden[batch, lens - 1])[:, :n_vocab]  # (B, V)
    pos = lens.clone()  # each row's next position
    while True:
        scored = logits if process is None else process(logits)
        probs, cand = torch.topk(F.softmax(scored.float(), dim=-1), k)  # (B, k)
        x = cand.reshape(B * k, 1)
        h = model(x, pos.repeat_interleave(k).view(B * k, 1), kv_len=int(pos.max()) + 1,
                  return_hidden=True)[:, 0]  # (B*k, C)
        cos = torch.einsum("bkc,bsc->bks", F.normalize(h.float(), dim=-1).view(B, k, -1), ctx)  # (B, k, S)
        degeneration = cos.masked_fill(~filled[:, None, :], -1.0).max(dim=-1).values  # (B, k)
        best = ((1.0 - penalty_alpha) * probs - penalty_alpha * degeneration).argmax(dim=-1)  # (B,)
        chosen = batch * k + best  # (B,): the chosen candidate's cache row
        model.select_cache_rows_(chosen.repeat_interleave(k), upto=int(pos.max()) + 1)
        ctx[batch, pos] = F.normalize(h[chosen].float(), dim=-1)
        filled[batch, pos] = True
        yield cand[batch, best].tolist(), logits
        logits = model.lm_head(h[chosen])[:, :n_vocab]  # (B, V)
        pos = pos + 1
