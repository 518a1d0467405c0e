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
    usable_vocab,
    window_notice,
)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
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
        notice = once(on_window_slide)  # one notice for the whole call, however many batches
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

    def stream(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int = 1,
               batch_size: int | None = None,
               on_window_slide: Callable[[], None] | None = window_notice) -> Iterator[Delta]:
        """Text deltas for every sample, in batches of `batch_size` (default: all at once, at most 32).
        Sample i of prompt j has index j * nsamples + i and uses seed (cfg.seed, that index), so the
        batch size never changes the text. nsamples=0 samples one prompt forever (default batch size 1),
        sample i equal to sample i of any finite nsamples. `on_window_slide` runs once per call when a
        sample outgrows the context."""
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
