"""Logits processors: the controls that change a row's next-token logits from its own token history, before
sampling (repetition penalty, OpenAI's presence/frequency penalties and logit_bias, banned words, no repeated
n-grams, a minimum length). Pure functions over logits plus `RowProcessors`, the per-row state that makes
each decode step cost a scatter over the few affected ids rather than a rescan of the history.

What each control looks at:
- repetition_penalty, bad_words, no_repeat_ngram_size: the whole history, prompt + generated tokens
  (transformers' processors read all of input_ids);
- presence_penalty, frequency_penalty: the generated tokens only (OpenAI's definition);
- min_tokens: how many tokens were generated."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpt2kit.errors import Gpt2kitError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ProcessorParams:
    repetition_penalty: float = 1.0  # CTRL-style, as in transformers; 1 disables
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token's logit; in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens; in [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs, sorted by id
    bad_words: tuple[str, ...] = ()  # texts never generated (with and without a leading space)
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice; 0 disables
    min_tokens: int = 0  # <|endoftext|> is suppressed until this many tokens are generated

    def validate(self) -> ProcessorParams:
        if not 0 < self.repetition_penalty < float("inf"):
            raise Gpt2kitError(f"repetition penalty must be a finite number > 0 (1 disables it), got "
                               f"{self.repetition_penalty}")
        for name, v in (("presence", self.presence_penalty), ("frequency", self.frequency_penalty)):
            if not -2 <= v <= 2:
                raise Gpt2kitError(f"{name} penalty must be in [-2, 2] (0 disables it), got {v}")
        for tid, bias in self.logit_bias:
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise Gpt2kitError(f"logit bias: token id must be an integer >= 0, got {tid!r}")
            if not -100 <= bias <= 100:
                raise Gpt2kitError(f"logit bias for token {tid} must be in [-100, 100], got {bias}")
        if any(not isinstance(w, str) or w.strip() == "" for w in self.bad_words):
            raise Gpt2kitError("a bad word (--ban) must be a non-empty text")
        if self.no_repeat_ngram_size < 0:
            raise Gpt2kitError(f"no-repeat n-gram size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}")
        if self.min_tokens < 0:
            raise Gpt2kitError(f"min tokens must be >= 0, got {self.min_tokens}")
        return self

    @property
    def active(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or bool(self.bad_words) or self.no_repeat_ngram_size > 0
                or self.min_tokens > 0)


def normalize_logit_bias(bias: Mapping[int, float] | Iterable[tuple[int, float]] | None
                         ) -> tuple[tuple[int, float], ...]:
    """A {token_id: bias} dict (or pairs) -> pairs sorted by id, hashable for a frozen config."""
    if not bias:
        return ()
    items = list(bias.items() if isinstance(bias, Mapping) else bias)
    try:
        pairs = [(t, float(b)) for t, b in items]
    except (TypeError, ValueError):
        raise Gpt2kitError(f"logit bias values must be numbers, got {items!r}") from None
    try:
        return tuple(sorted(pairs))
    except TypeError:  # ids of mixed types: validate() names the bad one
        return tuple(pairs)


# ---- pure functions: one row's logits (V,) ----------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), seen (N,) token ids already in the context: divide positive logits by `penalty`,
    multiply negative ones (the CTRL rule that transformers implements)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    return logits.scatter(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def apply_presence_frequency(logits: torch.Tensor, counts: Mapping[int, int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logits[j] -= counts[j] * frequency + (counts[j] > 0) * presence, where counts are
    the generated tokens' occurrences. logits (V,)."""
    ids = [t for t, c in counts.items() if c > 0]
    if not ids:
        return logits
    pen = torch.tensor([counts[t] * frequency + presence for t in ids], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, torch.tensor(ids, device=logits.device), -pen)


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: each (id, bias) added to that token's logit. logits (V,)."""
    out = logits.clone()
    if bias:
        out.index_add_(0, torch.tensor([t for t, _ in bias], device=logits.device),
                       torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device))
    return out


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram of `history` (transformers' NoRepeatNGramLogitsProcessor):
    those that followed the last n - 1 tokens before. A direct scan; RowProcessors keeps a table instead."""
    if n <= 0 or len(history) + 1 < n:
        return []
    prefix = list(history[len(history) - n + 1:]) if n > 1 else []
    return sorted({history[i + n - 1] for i in range(len(history) - n + 1) if list(history[i:i + n - 1]) == prefix})


def banned_word_tokens(history: Sequence[int], sequences: Sequence[Sequence[int]]) -> list[int]:
    """The tokens that would complete a banned sequence (transformers' NoBadWordsLogitsProcessor): a
    one-token sequence always; a longer one's last token when history ends with the rest of it."""
    out = set()
    for seq in sequences:
        k = len(seq) - 1
        if k == 0 or (k <= len(history) and list(history[len(history) - k:]) == list(seq[:-1])):
            out.add(seq[-1])
    return sorted(out)


def bad_word_sequences(words: Sequence[str], encode: Callable[[str], Sequence[int]]) -> list[list[int]]:
    """Each banned text's token sequences, as it would appear after a space and at the start of a text."""
    out: list[list[int]] = []
    for w in words:
        bare = w[1:] if w.startswith(" ") else w
        for variant in (bare, " " + bare):
            ids = list(encode(variant))
            if ids and ids not in out:
                out.append(ids)
    return out


# ---- per-row incremental state ----------------------------------------------------------------------------

class _Buffer:
    """A growable 1-D numpy array: appending costs no tensor op."""

    def __init__(self, dtype: type) -> None:
        self.a = np.empty(64, dtype=dtype)
        self.n = 0

    def append(self, v) -> None:
        if self.n == len(self.a):
            self.a = np.resize(self.a, 2 * self.n)
        self.a[self.n] = v
        self.n += 1

    def view(self) -> np.ndarray:
        return self.a[:self.n]

    def copy(self) -> _Buffer:
        new = _Buffer.__new__(_Buffer)
        new.a, new.n = self.a.copy(), self.n
        return new


class RowProcessors:
    """One row's controls and the state they need, updated token by token (`push`) in plain Python and numpy
    (no tensor op per row): the distinct ids seen (repetition penalty), the distinct generated ids and their
    counts (presence/frequency), an n-gram table, the history (bad words' prefixes). apply_processors() reads
    them for all rows of a batch at once."""

    def __init__(self, params: ProcessorParams, prompt_ids: Sequence[int], eot: int, vocab_size: int,
                 encode: Callable[[str], Sequence[int]]):
        self.p = params
        for tid, _ in params.logit_bias:
            if tid >= vocab_size:
                raise Gpt2kitError(f"logit bias names token id {tid}, outside the vocabulary of {vocab_size}")
        self.eot = eot
        self.history: list[int] = []
        self.generated = 0
        self.seen: set[int] = set()
        self.seen_ids = _Buffer(np.int64)  # filled only with a repetition penalty
        self.gen_pos: dict[int, int] = {}  # generated token -> its index in gen_ids (presence/frequency only)
        self.gen_ids = _Buffer(np.int64)
        self.gen_counts = _Buffer(np.float64)
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        self.bias_vals = np.array([b for _, b in params.logit_bias], dtype=np.float64)
        self.ngrams: dict[tuple[int, ...], tuple[int, ...]] = {}  # n - 1 tokens -> the tokens that followed
        self.bad = bad_word_sequences(params.bad_words, encode)
        self.bad_single = sorted({s[0] for s in self.bad if len(s) == 1})
        self.bad_multi = [s for s in self.bad if len(s) > 1]
        self._penalize_seen = params.repetition_penalty != 1.0
        self._count = bool(params.presence_penalty or params.frequency_penalty)
        for t in prompt_ids:
            self._add(t)

    @property
    def counts(self) -> dict[int, int]:
        """Generated token -> occurrences (presence/frequency penalties only)."""
        return {t: int(self.gen_counts.a[i]) for t, i in self.gen_pos.items()}

    def _add(self, token: int) -> None:
        self.history.append(token)
        if self._penalize_seen and token not in self.seen:
            self.seen.add(token)
            self.seen_ids.append(token)
        n = self.p.no_repeat_ngram_size
        if n > 0 and len(self.history) >= n:
            key, last = tuple(self.history[-n:-1]), self.history[-1]
            seen = self.ngrams.get(key, ())
            if last not in seen:  # a new tuple, not an append: fork() shares the old ones
                self.ngrams[key] = seen + (last,)

    def push(self, token: int) -> None:
        """Record a generated token."""
        self._add(token)
        self.generated += 1
        if self._count:
            i = self.gen_pos.get(token)
            if i is None:
                self.gen_pos[token] = self.gen_ids.n
                self.gen_ids.append(token)
                self.gen_counts.append(1.0)
            else:
                self.gen_counts.a[i] += 1.0

    def fork(self) -> RowProcessors:
        """An independent copy, for a beam that continues another (the settings and bias arrays shared)."""
        new = copy.copy(self)
        new.history, new.seen, new.gen_pos = list(self.history), set(self.seen), dict(self.gen_pos)
        new.seen_ids, new.gen_ids, new.gen_counts = self.seen_ids.copy(), self.gen_ids.copy(), self.gen_counts.copy()
        new.ngrams = dict(self.ngrams)
        return new

    def banned(self) -> list[int]:
        """Token ids that must not come next."""
        out: set[int] = set(self.bad_single)
        if self.bad_multi:
            out.update(banned_word_tokens(self.history, self.bad_multi))
        n = self.p.no_repeat_ngram_size
        if n > 0 and len(self.history) + 1 >= n:
            out.update(self.ngrams.get(tuple(self.history[len(self.history) - n + 1:]) if n > 1 else (), ()))
        if self.generated < self.p.min_tokens:
            out.add(self.eot)
        return sorted(out)


def follow(states: Sequence[RowProcessors | None], src: Sequence[int], tokens: Sequence[int]
           ) -> list[RowProcessors | None]:
    """Beam search's reordering: row i continues row src[i] with tokens[i] -> the rows' new states. A state
    that one row continues is moved (no copy); one that several continue is forked for all but the first."""
    taken: set[int] = set()
    out: list[RowProcessors | None] = []
    for j in src:
        s = states[j]
        if s is not None and id(s) in taken:
            s = s.fork()  # before any push below, so a copy of the state as it was
        elif s is not None:
            taken.add(id(s))
        out.append(s)
    for s, t in zip(out, tokens):
        if s is not None:
            s.push(t)
    return out


def _entries(parts: list[tuple[int, np.ndarray, np.ndarray | float]], width: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, ids, values) per row -> (flat indices row * width + id, values) of all their entries, built in
    numpy and moved to `device` in one copy each."""
    lengths = [len(ids) for _, ids, _ in parts]
    rows = np.repeat(np.array([r * width for r, _, _ in parts], dtype=np.int64), lengths)
    flat = rows + np.concatenate([ids for _, ids, _ in parts])
    if all(isinstance(v, float) for _, _, v in parts):
        vals = np.repeat(np.array([v for _, _, v in parts], dtype=np.float32), lengths)
    else:
        vals = np.concatenate([v for _, _, v in parts]).astype(np.float32)  # type: ignore[misc]
    return torch.from_numpy(flat).to(device), torch.from_numpy(vals).to(device)


def apply_processors(states: Sequence[RowProcessors | None], logits: torch.Tensor,
                     inplace: bool = False) -> torch.Tensor:
    """logits (k, V) -> processed logits (k, V) (float32): row i processed by states[i], the rows whose state
    is None (no control set) untouched. Per control one gather/scatter over the affected (row, id) entries of
    all rows together: repetition penalty, then presence/frequency penalties, then logit bias, then the bans
    (-inf). The input is left as it was unless `inplace` (then a contiguous float32 input is changed and
    returned); with no controls in the batch it is returned as is."""
    idx = [i for i, s in enumerate(states) if s is not None]
    if not idx:
        return logits
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        out = logits.float().contiguous()
        out = out.clone() if out.data_ptr() == logits.data_ptr() else out
    else:
        out = logits if inplace else logits.clone()
    dev, V = out.device, out.size(1)
    flat = out.view(-1)
    rows: list[tuple[int, RowProcessors]] = [(i, states[i]) for i in idx]  # type: ignore[misc]

    rep = [(i, s.seen_ids.view(), s.p.repetition_penalty) for i, s in rows if s._penalize_seen and s.seen_ids.n]
    if rep:
        at, pen = _entries(rep, V, dev)  # type: ignore[arg-type]
        picked = flat.index_select(0, at)
        flat.scatter_(0, at, torch.where(picked < 0, picked * pen, picked / pen))
    # one entry per (row, id) in each scatter below: the same sums in the same order on every device
    pf = [(i, s.gen_ids.view(), -(s.gen_counts.view() * s.p.frequency_penalty + s.p.presence_penalty))
          for i, s in rows if s._count and s.gen_ids.n]
    bias = [(i, s.bias_ids, s.bias_vals) for i, s in rows if len(s.bias_ids)]
    for parts in (pf, bias):
        if parts:
            at, v = _entries(parts, V, dev)
            flat.scatter_(0, at, flat.index_select(0, at) + v)
    ban = [(i, np.array(b, dtype=np.int64), 0.0) for i, s in rows if (b := s.banned())]
    if ban:
        flat.index_fill_(0, _entries(ban, V, dev)[0], NEG_INF)
    return out
