"""The decode loop: prefill + one-token steps over a static KV cache, streaming, stop sequences, batching.

Every row of a batch keeps its own position, generator and stopping state, so rows of different prompt
lengths share forward passes without padding masks, and a row's text depends only on its prompt, its
seed and its parameters, never on the batch it ran in."""

from __future__ import annotations

import codecs
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Generator_
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from gpt2kit.cuda_graphs import prepare_cuda_decoding_
from gpt2kit.errors import Gpt2kitError
from gpt2kit.kernels import prepare_cpu_decoding_
from gpt2kit.model import GPT
from gpt2kit.sampling import SamplingParams, sample, token_logprobs
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger("gpt2kit")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True
    seed: int | None = None
    logprobs: int | None = None  # also report the top-N alternatives per generated token

    def __post_init__(self) -> None:
        # stop="END" is one stop string (as in OpenAI's API and transformers' stop_strings), not the three
        # one-character strings that iterating the str would give
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens <= 0:
            raise Gpt2kitError(f"length must be > 0 tokens, got {self.max_new_tokens}")
        if self.seed is not None and self.seed < 0:
            raise Gpt2kitError(f"seed must be >= 0, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise Gpt2kitError("a stop string must not be empty")
        self.sampling.validate()
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


@dataclass
class TokenInfo:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    index: int
    prompt: str
    prompt_tokens: list[int]
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOT or a stop string) or "length"
    token_info: list[TokenInfo] = field(default_factory=list)


@dataclass
class Delta:
    """A streaming event: new text for sample `index`; `finish_reason` set on its last event."""
    index: int
    text: str
    tokens: list[int]
    finish_reason: str | None = None
    token_info: list[TokenInfo] = field(default_factory=list)


def row_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator:
    """Sample `index` of a request seeded `seed` gets its own generator (mixed, so seed 1/index 0 and
    seed 0/index 1 differ)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    else:
        g.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


class _Row:
    """Per-sample decoding state: tokens in context, text so far, streaming and stop bookkeeping."""

    def __init__(self, index: int, prompt: str, prompt_ids: list[int], cfg: GenerationConfig,
                 tok: Tokenizer, device: torch.device):
        self.out = Completion(index, prompt, list(prompt_ids))
        self.cfg = cfg
        self.params = cfg.sampling
        self.tok = tok
        self.gen = row_generator(cfg.seed, index, device)
        self.context = list(prompt_ids)  # what the model sees (slides when longer than the window)
        self.pos = 0  # next cache position to write
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.emitted = 0  # characters of out.text already streamed
        self.hold = max((len(s) for s in cfg.stop), default=1) - 1
        self.pending_info: list[TokenInfo] = []
        self.pending_tokens: list[int] = []
        self.ends: list[int] = []  # len(out.text) after each token of out.tokens

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def push(self, token: int, info: TokenInfo | None) -> None:
        o = self.out
        self.pending_tokens.append(token)
        if info is not None:
            o.token_info.append(info)
            self.pending_info.append(info)
        if self.cfg.stop_at_eot and token == self.tok.eot_token:
            o.text += self.decoder.decode(b"", final=True)
            o.finish_reason = "stop"
            return
        o.tokens.append(token)
        self.context.append(token)
        o.text += self.decoder.decode(self.tok.token_bytes(token))
        self.ends.append(len(o.text))
        if self.cfg.stop:
            # only the tail can hold a new match
            start = max(0, len(o.text) - len(self.tok.token_bytes(token)) - self.hold - 4)
            hits = [i for i in (o.text.find(s, start) for s in self.cfg.stop) if i >= 0]
            if hits:
                cut = min(hits)
                o.text = o.text[:cut]
                # keep the tokens whose text lies wholly before the cut: a token that straddles it (part
                # text, part stop string) is dropped, so `tokens` decodes to `text` or a little less
                o.tokens = [t for t, end in zip(o.tokens, self.ends) if end <= cut]
                o.finish_reason = "stop"
                return
        if len(o.tokens) >= self.cfg.max_new_tokens:
            o.text += self.decoder.decode(b"", final=True)
            o.finish_reason = "length"

    def delta(self) -> Delta | None:
        o = self.out
        # hold back text that might still turn into a stop string
        upto = len(o.text) if self.done else max(self.emitted, len(o.text) - self.hold)
        if upto == self.emitted and not self.done and not self.pending_tokens:
            return None
        d = Delta(o.index, o.text[self.emitted:upto], self.pending_tokens, o.finish_reason, self.pending_info)
        self.emitted = upto
        self.pending_tokens, self.pending_info = [], []
        return d


def start_window(n_context: int, max_new: int, window: int) -> int:
    """How many of a prompt's most recent tokens the first prefill keeps, in a window of `window` positions
    that must also hold `max_new` new tokens: all, when they fit; else, when the output fits beside at least
    half a window of prompt, the prompt's last window - max_new tokens, so that the window never slides while
    generating (gpt-2-simple's truncation); else all of a prompt shorter than the window (the window slides
    once it fills), or the prompt's last half window."""
    if n_context + max_new <= window:
        return n_context
    if max_new <= window - window // 2:
        return window - max_new
    return n_context if n_context < window else window // 2


def _window_notice() -> None:
    log.warning("prompt plus output is longer than the model's context; sliding the window "
                "(the model sees only the most recent tokens)")


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
                on_window_slide: Callable[[], None] | None = _window_notice,
                ) -> Generator_[Delta, None, list[Completion]]:
    """Generate one sample per prompt, all in one batch, yielding text as it is produced; returns the
    finished completions."""
    cfg.validate()
    device = model.device
    ctx = model.config.n_positions
    # a checkpoint may pad its vocabulary past the tokenizer's (50257 -> 50304, for speed): those ids have
    # no text, so they are never sampled. Dropping their logits columns equals masking them to -inf.
    n_vocab = min(tok.vocab_size, model.config.vocab_size)
    if prompt_ids is None:
        prompt_ids = [tok.encode(p) for p in prompts]
    rows = [_Row(first_index + i, p, ids, cfg, tok, device) for i, (p, ids) in enumerate(zip(prompts, prompt_ids))]
    if any(not r.context for r in rows):
        raise Gpt2kitError("empty prompt: give some text, or generate unconditionally (starts from <|endoftext|>)")
    too_big = max((max(r.context) for r in rows), default=0)
    if too_big >= model.config.vocab_size:
        raise Gpt2kitError(f"the prompt has token id {too_big}, outside the model's vocabulary of "
                           f"{model.config.vocab_size}: the tokenizer ({tok.vocab_size} tokens) does not match "
                           "this model; give the matching one with --tokenizer DIR")
    B = len(rows)
    # a cache just long enough for this job: less memory and shorter attention
    model.setup_caches(B, min(max(len(r.context) for r in rows) + cfg.max_new_tokens, ctx))
    cache_len = model.cache_len
    warned = False
    for r in rows:
        keep = start_window(len(r.context), cfg.max_new_tokens, cache_len)
        if keep < len(r.context):
            r.context = r.context[-keep:]
            if not warned and on_window_slide:
                on_window_slide()
                warned = True
        r.pos = len(r.context)
    logits = _prefill(model, [r.context for r in rows])[:, :n_vocab]  # (B, V)
    fast_greedy = cfg.sampling.greedy and cfg.repetition_penalty == 1.0 and cfg.logprobs is None
    active = list(range(B))
    while True:
        if fast_greedy:
            picks = logits.argmax(dim=-1).tolist()  # one host sync per step for the whole batch
        for b in active:
            r = rows[b]
            if fast_greedy:
                token = picks[b]
            else:
                seen = torch.tensor(r.context, device=device) if cfg.repetition_penalty != 1.0 else None
                token = sample(logits[b], r.params, r.gen, seen)
            info = None
            if cfg.logprobs is not None:
                lp, vals, ids = token_logprobs(logits[b], cfg.logprobs)
                info = TokenInfo(token, float(lp[token]), list(zip(ids.tolist(), vals.tolist())))
            r.push(token, info)
            d = r.delta()
            if d is not None:
                yield d
        active = [b for b in active if not rows[b].done]
        if not active:
            return [r.out for r in rows]
        for b in active:
            r = rows[b]
            if r.pos >= cache_len:
                # the row filled the window: re-prefill its most recent tokens alone at positions 0..W-2;
                # the newest token is fed below at position W-1 like any other step
                if not warned and on_window_slide:
                    on_window_slide()
                    warned = True
                r.context = r.context[-(cache_len // 2):]
                _prefill(model, [r.context[:-1]], rows=slice(b, b + 1))
                r.pos = len(r.context) - 1
        # finished rows ride along, rewriting their last slot; their outputs are ignored
        x = torch.tensor([[r.context[-1]] for r in rows], device=device)  # (B, 1)
        pos_list = [min(r.pos, cache_len - 1) for r in rows]
        pos = torch.tensor(pos_list, device=device).view(B, 1)
        logits = model(x, pos, kv_len=max(pos_list) + 1)[:, -1, :n_vocab]  # (B, V)
        for b in active:
            rows[b].pos += 1


def _prefill(model: GPT, contexts: list[list[int]], rows: slice | None = None) -> torch.Tensor:
    """Right-padded prefill; returns the logits at each row's last prompt token, (B, V). Padded slots get
    overwritten by the row's own later tokens before any query can see them (a query at position p
    only sees slots <= p)."""
    device = model.device
    T = max(len(c) for c in contexts)
    x = torch.tensor([c + [c[-1]] * (T - len(c)) for c in contexts], device=device)  # (B, T)
    last = torch.tensor([len(c) - 1 for c in contexts], device=device)
    return model(x, torch.arange(T, device=device), kv_len=T, rows=rows, logits_at=last)[:, 0]  # (B, V)


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


def prepare_decoding_(model: GPT, quantize: str | None = None) -> str:
    """Make `model` decode fast where it lives, with the same numerics: gpt2kit.kernels on a CPU (where
    quantize="int8" applies), CUDA graphs on a GPU (gpt2kit.cuda_graphs). Returns the path taken ("kernel",
    "kernel-int8", "column-major", "cuda-graphs" or "none")."""
    path = prepare_cpu_decoding_(model, quantize)
    return path if path != "none" else prepare_cuda_decoding_(model)


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
        from gpt2kit.checkpoints import load_model
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
                 batch_size: int | None, on_window_slide: Callable[[], None] | None = _window_notice,
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
               on_window_slide: Callable[[], None] | None = _window_notice) -> Iterator[Delta]:
        """Text deltas for every sample, in batches of `batch_size` (default: all at once, at most 32).
        Sample i of prompt j has index j * nsamples + i and uses seed (cfg.seed, that index), so the
        batch size never changes the text. nsamples=0 samples one prompt forever (default batch size 1),
        sample i equal to sample i of any finite nsamples. `on_window_slide` runs once per call when a
        sample outgrows the context."""
        for batch in self._batches(prompt, cfg, nsamples, batch_size, on_window_slide):
            yield from batch

    def completions(self, prompt: str | Sequence[str] | None, cfg: GenerationConfig, nsamples: int = 1,
                    batch_size: int | None = None,
                    on_window_slide: Callable[[], None] | None = _window_notice) -> Iterator[Completion]:
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
