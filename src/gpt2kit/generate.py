"""The decode loop and the Generator API: batches of samples built from gpt2kit.decode's step API
(rows, prefill, decode step), streamed as text deltas, with stop sequences and a sliding window.

A row's text depends only on its prompt, its seed and its parameters, never on the batch it ran in."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from dataclasses import replace

import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.decode import (
    Completion,
    Delta,
    GenerationConfig,
    Row,
    TokenInfo,
    advance,
    check_prompts,
    decode_step,
    prefill,
    prepare_decoding_,
    slide_window,
    start_window,
    token_info,
    usable_vocab,
    window_notice,
)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.processors import apply_processors
from gpt2kit.search import beam_search, contrastive_steps
from gpt2kit.tokenizer import Tokenizer

# the step API's types and helpers, importable from here as they always were
__all__ = ["Completion", "Delta", "GenerationConfig", "Generator", "TokenInfo", "once", "prepare_decoding_",
           "run_stream", "start_window", "stream_rows", "window_notice"]


def once(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    """`fn` wrapped to run on its first call only (one window notice per run, not per batch)."""
    if fn is None:
        return None
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()
    return call


@torch.inference_mode()
def stream_rows(model: GPT, tok: Tokenizer, prompts: Sequence[str], cfg: GenerationConfig,
                first_index: int = 0, prompt_ids: Sequence[list[int]] | None = None,
                on_window_slide: Callable[[], None] | None = window_notice,
                ) -> Generator_[Delta, None, list[Completion]]:
    """Generate one sample per prompt, all in one batch, yielding text as it is produced; returns the
    finished completions."""
    cfg.validate()
    n_vocab = usable_vocab(model, tok)
    if prompt_ids is None:
        prompt_ids = [tok.encode(p) for p in prompts]
    rows = [Row(first_index + i, p, ids, cfg, tok, model.device)
            for i, (p, ids) in enumerate(zip(prompts, prompt_ids))]
    check_prompts(model, tok, [r.context for r in rows])
    if cfg.search == "contrastive":
        return (yield from _contrastive_rows(model, tok, rows, cfg, n_vocab, on_window_slide))
    B = len(rows)
    # a cache just long enough for this job: less memory and shorter attention
    model.setup_caches(B, min(max(len(r.context) for r in rows) + cfg.max_new_tokens, model.config.n_positions))
    notice = once(on_window_slide) or (lambda: None)  # one notice per batch
    if any([r.fit_window(model.cache_len) for r in rows]):
        notice()
    logits = prefill(model, [r.context for r in rows])[:, :n_vocab]  # (B, V)
    active = list(range(B))
    while True:
        advance([rows[b] for b in active], logits if len(active) == B else logits[active])
        for b in active:
            d = rows[b].delta()
            if d is not None:
                yield d
        active = [b for b in active if not rows[b].done]
        if not active:
            return [r.out for r in rows]
        for b in active:
            if slide_window(model, rows[b], b):
                notice()
        # finished rows ride along, rewriting their last slot; their logits are ignored
        logits = decode_step(model, rows)[:, :n_vocab]  # (B, V)


def _search_window(model: GPT, rows: Sequence[Row], cfg: GenerationConfig,
                   on_window_slide: Callable[[], None] | None) -> int:
    """Fit the rows' prompts into a window for a search, which never slides it -> the window's length."""
    window = min(max(len(r.context) for r in rows) + cfg.max_new_tokens, model.config.n_positions)
    longest = max(len(r.context) for r in rows)
    cut = [r.fit_window(window) for r in rows]  # (a prompt is cut only as far as half the window)
    if any(r.pos + cfg.max_new_tokens > window for r in rows):
        # what fits: the room the longest prompt leaves, or half the window once a prompt may be cut
        most = max(window - longest, window - window // 2)
        raise Gpt2kitError(f"{cfg.max_new_tokens} new tokens after a prompt of {longest} tokens do not fit the "
                           f"model's context of {window}, and beam and contrastive search do not slide the window: "
                           f"ask for at most {most} new tokens")
    if any(cut) and on_window_slide is not None:
        on_window_slide()
    return window


def _contrastive_rows(model: GPT, tok: Tokenizer, rows: list[Row], cfg: GenerationConfig, n_vocab: int,
                      on_window_slide: Callable[[], None] | None) -> Generator_[Delta, None, list[Completion]]:
    """stream_rows for contrastive search (gpt2kit.search.contrastive_steps): finished rows ride along."""
    window = _search_window(model, rows, cfg, on_window_slide)
    states = [r.processors for r in rows]
    process = (lambda logits: apply_processors(states, logits)) if any(states) else None
    steps = contrastive_steps(model, [r.context for r in rows], cfg.top_k, cfg.penalty_alpha, window, n_vocab,
                              process)
    try:
        for tokens, logits in steps:
            for i, (r, t) in enumerate(zip(rows, tokens)):
                if r.done:
                    continue
                r.push(t, None if cfg.logprobs is None else token_info(logits[i], t, cfg.logprobs))
                if (d := r.delta()) is not None:
                    yield d
            if all(r.done for r in rows):
                return [r.out for r in rows]
    finally:
        steps.close()
    raise AssertionError("contrastive_steps ended")  # it yields until closed


@torch.inference_mode()
def beam_rows(model: GPT, tok: Tokenizer, prompts: Sequence[str], cfg: GenerationConfig, nsamples: int,
              first_index: int = 0, on_window_slide: Callable[[], None] | None = window_notice,
              ) -> list[Completion]:
    """Beam search (gpt2kit.search.beam_search) for each prompt -> its best `nsamples` (<= num_beams) beams
    as completions, best first; sample i of prompt j gets index first_index + j * nsamples + i."""
    cfg.validate()
    if not 1 <= nsamples <= cfg.num_beams:
        raise Gpt2kitError(f"beam search returns at most num_beams ({cfg.num_beams}) samples per prompt, "
                           f"got nsamples={nsamples}")
    n_vocab = usable_vocab(model, tok)
    ids = [tok.encode(p) for p in prompts]
    heads = [Row(first_index + j * nsamples, p, c, cfg, tok, model.device)  # one per prompt: its window
             for j, (p, c) in enumerate(zip(prompts, ids))]
    check_prompts(model, tok, [r.context for r in heads])
    _search_window(model, heads, cfg, on_window_slide)
    stops = None
    if cfg.stop:
        def stops(b: int, tokens: list[int]) -> bool:  # as Row.push: no stop string before min_tokens
            text = tok.decode(tokens)
            return len(tokens) >= cfg.min_tokens and any(s in text for s in cfg.stop)
    found = beam_search(model, [r.context for r in heads], cfg.num_beams, cfg.max_new_tokens,
                        eos=tok.eot_token if cfg.stop_at_eot else None, length_penalty=cfg.length_penalty,
                        early_stopping=cfg.early_stopping, n_vocab=n_vocab, stops=stops,
                        processors=[r.processors for r in heads])
    out = []
    for j, (p, c) in enumerate(zip(prompts, ids)):
        for i, hyp in enumerate(found[j][:nsamples]):
            r = Row(first_index + j * nsamples + i, p, c, cfg, tok, model.device)
            for t in hyp.tokens:  # Row.push ends the row at EOT, a stop string or the length limit
                r.push(t)
                if r.done:
                    break
            if not r.done:
                r.finish("length")
            out.append(r.out)
    return out


def _finished(completions: list[Completion]) -> Generator_[Delta, None, list[Completion]]:
    """Completions made in one go, as a stream_rows()-shaped generator that yields nothing."""
    return completions
    yield  # a generator function


def run_stream(stream: Generator_[Delta, None, list[Completion]], on_delta: Callable[[Delta], None] | None = None,
               ) -> list[Completion]:
    """Drain a stream_rows() generator, optionally handing each delta to a callback."""
    while True:
        try:
            d = next(stream)
        except StopIteration as stop:
            return stop.value
        if on_delta is not None:
            on_delta(d)


class Generator:
    """A loaded model plus tokenizer with a convenient generation API."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, dtype: str | None = None,
             tokenizer_dir: str | None = None, quantize: str | None = None) -> Generator:
        """quantize="int8": decoding steps read int8 copies of the weights (CPU kernel only; see
        gpt2kit.kernels.prepare_cpu_decoding_)."""
        model, tok = load_model(name_or_path, device=device, dtype=dtype, tokenizer_dir=tokenizer_dir)
        prepare_decoding_(model, quantize)
        return cls(model, tok)

    def _prompts(self, prompt: str | Sequence[str] | None) -> list[str]:
        """The distinct prompts (each is then sampled nsamples times)."""
        if prompt is None:  # unconditional: start from <|endoftext|>
            return ["<|endoftext|>"]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for p in prompts:
            if p == "":
                raise Gpt2kitError("empty prompt: give some text, or use --unconditional to start from <|endoftext|>")
        return prompts

    def _batches(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int,
                 batch_size: int | None, on_window_slide: Callable[[], None] | None = window_notice,
                 ) -> Iterator[Generator_[Delta, None, list[Completion]]]:
        cfg.validate()
        if nsamples < 0:
            raise Gpt2kitError(f"nsamples must be >= 0 (0 means endless), got {nsamples}")
        if batch_size is not None and batch_size <= 0:
            raise Gpt2kitError(f"batch size must be > 0, got {batch_size}")
        if cfg.search == "contrastive" and nsamples != 1:
            raise Gpt2kitError(f"contrastive search is deterministic: every sample of a prompt would be the same; "
                               f"give nsamples 1 (--nsamples 1), not {nsamples}")
        notice = once(on_window_slide)  # one notice for the whole call, however many batches
        if cfg.search == "beam":
            yield from self._beam_batches(prompt, cfg, nsamples, batch_size, notice)
            return
        if nsamples == 0:
            # endless: sample i is exactly sample i of a finite run (same index, so the same seed stream)
            prompts = self._prompts(prompt)
            if len(prompts) != 1:
                raise Gpt2kitError(f"endless sampling (nsamples=0) takes one prompt, got {len(prompts)}; "
                                   "give a finite nsamples for several prompts")
            bs = batch_size or 1
            for start in itertools.count(0, bs):
                yield stream_rows(self.model, self.tokenizer, prompts * bs, cfg, first_index=start,
                                  on_window_slide=notice)
        prompts = self._prompts(prompt)
        if not prompts:
            raise Gpt2kitError("no prompts given: pass a prompt, a list of prompts, or None for unconditional")
        # sample k is prompt k // nsamples; each batch's prompts are made when it starts, so memory stays that of
        # one batch however large nsamples is, and the first samples come at once
        total = len(prompts) * nsamples
        bs = batch_size or min(total, 32)
        for start in range(0, total, bs):
            batch = [prompts[k // nsamples] for k in range(start, min(start + bs, total))]
            yield stream_rows(self.model, self.tokenizer, batch, cfg, first_index=start, on_window_slide=notice)

    def _beam_batches(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int,
                      batch_size: int | None, notice: Callable[[], None] | None,
                      ) -> Iterator[Generator_[Delta, None, list[Completion]]]:
        """Beam search, whole prompts per batch: batch_size samples (each prompt's nsamples best beams; default
        up to 32) -> about batch_size / nsamples prompts, each running num_beams cache rows."""
        if nsamples == 0:
            raise Gpt2kitError("beam search is deterministic: endless sampling (nsamples=0) would repeat it; "
                               "give nsamples from 1 to num_beams")
        prompts = self._prompts(prompt)
        if not prompts:
            raise Gpt2kitError("no prompts given: pass a prompt, a list of prompts, or None for unconditional")
        per_batch = max(1, (batch_size or 32) // nsamples)
        for start in range(0, len(prompts), per_batch):
            yield _finished(beam_rows(self.model, self.tokenizer, prompts[start:start + per_batch], cfg, nsamples,
                                      first_index=start * nsamples, on_window_slide=notice))

    def stream(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int = 1,
               batch_size: int | None = None,
               on_window_slide: Callable[[], None] | None = window_notice) -> Iterator[Delta]:
        """Text deltas for every sample, in batches of `batch_size` (default: all at once, at most 32).
        Sample i of prompt j has index j * nsamples + i and uses seed (cfg.seed, that index), so the
        batch size never changes the text. nsamples=0 samples one prompt forever (default batch size 1),
        sample i equal to sample i of any finite nsamples. `on_window_slide` runs once per call when a
        sample outgrows the context. Beam search cannot stream (the best beam is known at the end only)."""
        if cfg.search == "beam":
            raise Gpt2kitError("beam search knows its best beam only when it ends, so it cannot stream: use "
                               "completions() or generate()")
        for batch in self._batches(prompt, cfg, nsamples, batch_size, on_window_slide):
            yield from batch

    def completions(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int = 1,
                    batch_size: int | None = None,
                    on_window_slide: Callable[[], None] | None = window_notice) -> Iterator[Completion]:
        """Finished completions in index order, batch by batch (bulk generation with progress); nsamples=0
        is endless, as in stream()."""
        for batch in self._batches(prompt, cfg, nsamples, batch_size, on_window_slide):
            yield from run_stream(batch)

    def generate(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig | None = None,
                 nsamples: int = 1, batch_size: int | None = None, **overrides) -> list[Completion]:
        """Finished completions; `prompt=None` is unconditional. Keyword overrides patch `cfg`."""
        if nsamples < 1:
            raise Gpt2kitError(f"nsamples must be >= 1 for generate(), which returns a list, got {nsamples}; "
                               "for endless sampling (nsamples=0) iterate stream() or completions()")
        return list(self.completions(prompt, replace(cfg or GenerationConfig(), **overrides), nsamples, batch_size))
