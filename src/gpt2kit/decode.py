"""The decoding step API: per-sample state (`Row`), `prefill`, `decode_step`, and picking next tokens.

generate.py's loop and the server's batching engine are both built from these:

    rows = [Row(i, prompt, ids, cfg, tok, device) for ...]
    model.setup_caches(B, cache_len)
    for r in rows: r.fit_window(cache_len)                         # trims prompts that do not fit
    logits = prefill(model, [r.context for r in rows])[:, :n_vocab]  # (B, V)
    while any row is active:
        advance(active_rows, logits[active])                          # sample, record, stop strings
        for each active row: slide_window(model, row, b)              # re-prefill a row that filled its window
        logits = decode_step(model, rows)[:, :n_vocab]                # (B, V): every row's newest token

Every row keeps its own position, random key and stopping state, so rows of different prompt lengths share
forward passes without padding masks, and a row's text depends only on its prompt, its seed and its
parameters, never on the batch it runs in."""

from __future__ import annotations

import codecs
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gpt2kit.cuda_graphs import prepare_cuda_decoding_
from gpt2kit.errors import Gpt2kitError
from gpt2kit.kernels import prepare_cpu_decoding_
from gpt2kit.model import GPT
from gpt2kit.processors import ProcessorParams, RowProcessors, apply_processors, normalize_logit_bias
from gpt2kit.sampling import SamplingParams, argmax, draw, params_table, row_key, token_logprobs, uniforms
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
    typical_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True
    seed: int | None = None
    logprobs: int | None = None  # also report the top-N alternatives per generated token
    # logits processors (gpt2kit.processors): applied to a row's logits before sampling
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a {id: bias} dict is accepted
    bad_words: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0
    min_tokens: int = 0
    # deterministic searches (gpt2kit.search): beam search when num_beams > 1, contrastive search when
    # penalty_alpha > 0 (with top_k candidates)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers' generate() takes it
    penalty_alpha: float = 0.0

    def __post_init__(self) -> None:
        # stop="END" is one stop string (as in OpenAI's API and transformers' stop_strings), not the three
        # one-character strings that iterating the str would give
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.logit_bias, tuple):  # a dict (empty included) or other pairs
            object.__setattr__(self, "logit_bias", normalize_logit_bias(self.logit_bias))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        elif not isinstance(self.bad_words, tuple):
            object.__setattr__(self, "bad_words", tuple(self.bad_words))

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens <= 0:
            raise Gpt2kitError(f"length must be > 0 tokens, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # (the server's range too)
            raise Gpt2kitError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(s == "" for s in self.stop):
            raise Gpt2kitError("a stop string must not be empty")
        self.sampling.validate()
        self.processing.validate()
        if self.min_tokens > self.max_new_tokens:
            raise Gpt2kitError(f"min tokens ({self.min_tokens}) must not exceed the length ({self.max_new_tokens})")
        self._validate_search()
        return self

    def _validate_search(self) -> None:
        """Beam and contrastive search pick tokens deterministically: sampling controls would be ignored. The
        logits processors (repetition penalty included) apply to them as they do to sampling."""
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 1:
            raise Gpt2kitError(f"num_beams must be an integer >= 1 (1: no beam search), got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise Gpt2kitError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not 0.0 <= self.penalty_alpha <= 1.0:
            raise Gpt2kitError(f"penalty_alpha must be in [0, 1] (0: off), got {self.penalty_alpha}")
        if not math.isfinite(self.length_penalty):
            raise Gpt2kitError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams == 1 and (self.length_penalty != 1.0 or self.early_stopping is not False):
            used = [n for n, on in (("length_penalty", self.length_penalty != 1.0),
                                    ("early_stopping", self.early_stopping is not False)) if on]
            raise Gpt2kitError(" and ".join(f"{n} (--{n.replace('_', '-')})" for n in used)
                               + (" only applies" if len(used) == 1 else " only apply")
                               + " to beam search: add num_beams > 1 (--num-beams N) or drop "
                               + ("it" if len(used) == 1 else "them"))
        search = ("beam search (num_beams > 1)" if self.num_beams > 1
                  else "contrastive search (penalty_alpha > 0)" if self.penalty_alpha > 0 else None)
        if search is None:
            return
        if self.num_beams > 1 and self.penalty_alpha > 0:
            raise Gpt2kitError("num_beams > 1 and penalty_alpha > 0 are two different searches; choose one")
        if self.penalty_alpha > 0 and self.top_k < 1:
            raise Gpt2kitError("contrastive search (penalty_alpha > 0) needs top_k candidates: give top_k >= 1, "
                               "e.g. --top-k 4")
        if self.num_beams > 1 and self.top_k:
            raise Gpt2kitError(f"{search} does not sample: drop top_k (--top-k)")
        # 1.0 is the default temperature and 0 means greedy: neither samples anything here
        bad = [name for name, on in (("temperature", self.temperature not in (0.0, 1.0)), ("top_p", self.top_p < 1.0),
                                     ("min_p", self.min_p > 0.0), ("typical_p", self.typical_p < 1.0)) if on]
        if bad:
            raise Gpt2kitError(f"{search} does not sample: drop "
                               + ", ".join(f"{n} (--{n.replace('_', '-')})" for n in bad))
        if self.num_beams > 1 and self.logprobs is not None:
            raise Gpt2kitError("beam search does not report logprobs; drop logprobs or num_beams (--num-beams)")

    @property
    def search(self) -> str | None:
        """"beam", "contrastive" or None (sampling or greedy decoding)."""
        return "beam" if self.num_beams > 1 else "contrastive" if self.penalty_alpha > 0 else None

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, typical_p=self.typical_p)

    @property
    def processing(self) -> ProcessorParams:
        return ProcessorParams(self.repetition_penalty, self.presence_penalty, self.frequency_penalty,
                               self.logit_bias, self.bad_words, self.no_repeat_ngram_size, self.min_tokens)

    @property
    def argmax(self) -> bool:
        """Greedy: a batch of such rows picks its tokens with one argmax. advance() applies the row's logits
        processors (repetition penalty included) first, so the argmax is over the processed logits."""
        return self.temperature == 0



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


class Row:
    """One sample being generated: the tokens the model sees, its next cache position, its sampling
    parameters and random key, and its text, streaming and stop state."""

    def __init__(self, index: int, prompt: str, prompt_ids: Sequence[int], cfg: GenerationConfig,
                 tok: Tokenizer, device: torch.device):
        self.out = Completion(index, prompt, list(prompt_ids))
        self.cfg = cfg
        self.params = cfg.sampling
        self.tok = tok
        self.key = row_key(cfg.seed, index)  # its n-th sampled token draws sampling.uniforms(key, n)
        self.draws = 0
        self.context = list(prompt_ids)  # what the model sees (slides when longer than the window)
        self.pos = 0  # next cache position to write
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.emitted = 0  # characters of out.text already streamed
        self.hold = max((len(s) for s in cfg.stop), default=1) - 1
        self.pending_info: list[TokenInfo] = []
        self.pending_tokens: list[int] = []
        self.ends: list[int] = []  # len(out.text) after each token of out.tokens
        procs = cfg.processing
        # the controls' own state (token counts, n-gram table); None when the row has no control set
        self.processors = (RowProcessors(procs, prompt_ids, tok.eot_token, tok.vocab_size, tok.encode)
                           if procs.active else None)

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None

    def fit_window(self, window: int) -> bool:
        """Before the prefill: keep the prompt tokens start_window() allows in a cache of `window` positions
        (room for cfg.max_new_tokens) and point `pos` past them. True when the prompt was cut."""
        keep = start_window(len(self.context), self.cfg.max_new_tokens, window)
        cut = keep < len(self.context)
        if cut:
            self.context = self.context[-keep:]
        self.pos = len(self.context)
        return cut

    def push(self, token: int, info: TokenInfo | None = None) -> None:
        """Record the next token: text, stop strings, EOT and the length limit."""
        o = self.out
        self.pending_tokens.append(token)
        if info is not None:
            o.token_info.append(info)
            self.pending_info.append(info)
        if self.cfg.stop_at_eot and token == self.tok.eot_token:
            self.finish("stop")
            return
        if self.processors is not None:
            self.processors.push(token)
        o.tokens.append(token)
        self.context.append(token)
        o.text += self.decoder.decode(self.tok.token_bytes(token))
        self.ends.append(len(o.text))
        if self.cfg.stop and len(o.tokens) >= self.cfg.min_tokens:  # no stop string ends a row before min_tokens
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
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row now ("stop" or "length"), flushing a partly decoded UTF-8 character."""
        self.out.text += self.decoder.decode(b"", final=True)
        self.out.finish_reason = reason

    def delta(self) -> Delta | None:
        """What is new since the last delta, or None; text that might still become a stop string is held."""
        o = self.out
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


def window_notice() -> None:
    log.warning("prompt plus output is longer than the model's context: the prompt's start is cut, and sampling "
                "slides the window when it fills (the model sees only the most recent tokens)")


def check_prompts(model: GPT, tok: Tokenizer, contexts: Sequence[Sequence[int]]) -> None:
    """Refuse empty prompts and token ids the model has no embedding for."""
    if any(len(c) == 0 for c in contexts):
        raise Gpt2kitError("empty prompt: give some text, or generate unconditionally (starts from <|endoftext|>)")
    too_big = max((max(c) for c in contexts), default=0)
    if too_big >= model.config.vocab_size:
        raise Gpt2kitError(f"the prompt has token id {too_big}, outside the model's vocabulary of "
                           f"{model.config.vocab_size}: the tokenizer ({tok.vocab_size} tokens) does not match "
                           "this model; give the matching one with --tokenizer DIR")


def usable_vocab(model: GPT, tok: Tokenizer) -> int:
    """Logit columns that can be sampled. A checkpoint may pad its vocabulary past the tokenizer's (50257 ->
    50304, for speed): those ids have no text, so they are never sampled or reported. Dropping their logits
    columns (`logits[:, :n]`) equals masking them to -inf."""
    return min(tok.vocab_size, model.config.vocab_size)


def prefill(model: GPT, contexts: Sequence[Sequence[int]], rows: slice | None = None) -> torch.Tensor:
    """Write each context into its cache row (rows `rows`, default all) at positions 0..len-1 -> logits
    (k, V) at each context's last token. Contexts are right-padded with their own last token; the padded
    slots get overwritten by the row's own later tokens before any query can see them (a query at position
    p only sees slots <= p), and only the last real token of each row goes through the LM head."""
    device = model.device
    T = max(len(c) for c in contexts)
    x = torch.tensor([list(c) + [c[-1]] * (T - len(c)) for c in contexts], device=device)  # (k, T)
    last = torch.tensor([len(c) - 1 for c in contexts], device=device)  # (k,)
    return model(x, torch.arange(T, device=device), kv_len=T, rows=rows, logits_at=last)[:, 0]  # (k, V)


def decode_step(model: GPT, rows: Sequence[Row | None]) -> torch.Tensor:
    """One token per cache row 0..B-1: each row's newest token at its own position -> logits (B, V); the
    rows still generating move to their next position. A finished row rides along rewriting its last slot,
    and a free row (None) writes token 0 at slot 0 of its own cache row (a new row's prefill rewrites it);
    their logits are to be ignored. Attention covers the first max(position) + 1 slots."""
    last = model.cache_len - 1
    toks = [0 if r is None else r.context[-1] for r in rows]
    pos = [0 if r is None else min(r.pos, last) for r in rows]
    device = model.device
    B = len(rows)
    x = torch.tensor(toks, device=device).view(B, 1)  # (B, 1)
    p = torch.tensor(pos, device=device).view(B, 1)  # (B, 1)
    logits = model(x, p, kv_len=max(pos) + 1, rows=slice(0, B))[:, -1, :]  # (B, V)
    for r in rows:
        if r is not None and not r.done:
            r.pos += 1
    return logits


def slide_window(model: GPT, row: Row, slot: int) -> bool:
    """When `row` (in cache row `slot`) has filled its window, keep its most recent half window: re-prefill
    them alone at positions 0..W/2-2, so that its newest token is fed at W/2-1 by the next decode_step.
    True when it slid."""
    window = model.cache_len
    if row.pos < window:
        return False
    row.context = row.context[-(window // 2):]
    prefill(model, [row.context[:-1]], rows=slice(slot, slot + 1))
    row.pos = len(row.context) - 1
    return True


def next_tokens(rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
    """Each row's next token from its logits (k, V), every row in one pass (sampling.draw) with its own
    parameters and its own random number, one host sync for the batch; a batch of greedy rows is one
    argmax. A row gets the token sampling.sample() would give it alone."""
    if all(r.cfg.argmax for r in rows):
        return argmax(logits).tolist()
    # the logits processors (repetition penalty included) ran in advance(); scale_logits' shift by each row's
    # maximum keeps a penalised row's huge logits finite
    us = uniforms([r.key for r in rows], [r.draws for r in rows])
    tokens = draw(logits, params_table([r.params for r in rows], us)).tolist()
    for r in rows:
        r.draws += 1
    return tokens


def token_info(logits: torch.Tensor, token: int, top_n: int) -> TokenInfo:
    """logits (V,) -> the chosen token's log-probability and the top_n alternatives."""
    lp, vals, ids = token_logprobs(logits, top_n)
    return TokenInfo(token, float(lp[token]), list(zip(ids.tolist(), vals.tolist())))


def advance(rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
    """Pick each row's next token from its logits (k, V), after its logits processors, and record it
    (Row.push), with its logprobs (from the model's own logits) when the row asks for them. Returns the tokens.
    The processors change `logits` in place (no copy of the batch's logits per step); the few rows that both
    have processors and report logprobs keep a copy of their own."""
    states = [r.processors for r in rows]
    raw = {i: logits[i].clone() for i, r in enumerate(rows) if r.processors is not None and r.cfg.logprobs is not None}
    tokens = next_tokens(rows, apply_processors(states, logits, inplace=True))
    for i, (r, t) in enumerate(zip(rows, tokens)):
        r.push(t, None if r.cfg.logprobs is None else token_info(raw.get(i, logits[i]), t, r.cfg.logprobs))
    return tokens


def prepare_decoding_(model: GPT, quantize: str | None = None) -> str:
    """Make `model` decode fast where it lives, with the same numerics: gpt2kit.kernels on a CPU (where
    quantize="int8" applies), CUDA graphs on a GPU (gpt2kit.cuda_graphs). Returns the path taken ("kernel",
    "kernel-int8", "column-major", "cuda-graphs" or "none")."""
    path = prepare_cpu_decoding_(model, quantize)
    return path if path != "none" else prepare_cuda_decoding_(model)
