"""Pure functions from next-token logits to tokens. No model, no state beyond an explicit generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2kit.errors import Gpt2kitError
from gpt2kit.processors import apply_repetition_penalty


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # nucleus; 1 disables
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 disables
    repetition_penalty: float = 1.0  # CTRL-style, as in transformers; 1 disables

    def validate(self) -> SamplingParams:
        if not self.temperature >= 0:
            raise Gpt2kitError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise Gpt2kitError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Gpt2kitError(f"top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise Gpt2kitError(f"min-p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise Gpt2kitError(f"repetition penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set excluded logits to -inf. logits (..., V), already divided by temperature. Top-k, then top-p, then
    min-p: the order of transformers' logits warpers, so that together they keep the same tokens. The most
    likely token always survives, so top_p -> 0 and top_k = 1 both mean argmax."""
    neg_inf = float("-inf")
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one is always kept)
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), neg_inf)
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), neg_inf)
    return logits


def scale_logits(logits: torch.Tensor, temperature: float, repetition_penalty: float = 1.0) -> torch.Tensor:
    """logits (..., V) / temperature. A tiny temperature (or a repetition penalty near 0 or huge) could take
    logits past float32's range: inf, then NaN from softmax, then token 0 whatever the logits. Then each row's
    top logit is shifted to 0 first, in float64 (where the temperature itself does not underflow to 0; on the
    CPU, as MPS has no float64), which keeps the limit: argmax. Decided from the parameters alone, so the
    usual path waits for nothing."""
    if max(repetition_penalty, 1 / repetition_penalty) <= 1e30 * temperature:
        return logits / temperature
    x = logits.to("cpu", torch.float64).clamp(max=torch.finfo(torch.float32).max)
    return ((x - x.amax(dim=-1, keepdim=True)) / temperature).to(logits.device, torch.float32)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> int:
    """One row: logits (V,) -> token id. Greedy when temperature == 0 (ties go to the lowest id)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_logits(scale_logits(logits, params.temperature, params.repetition_penalty),
                           params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race sampling (argmax of p / E, E ~ Exp(1)) draws exactly from `probs` and uses a fixed
    # number of random numbers per token, so a row's text depends only on its own seed, never on which
    # other rows share its batch.
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int(torch.argmax(probs / e))


def sample_rows(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]) -> list[int]:
    """sample() for k rows that share `params` (no repetition penalty), in one pass: the same steps on
    logits (k, V), and each row's exponential draws from its own generator, so every row gets the token
    sample() would give it. One pass instead of k keeps small CPU ops from dominating."""
    if params.greedy:
        return logits.float().argmax(dim=-1).tolist()
    scaled = filter_logits(scale_logits(logits.float(), params.temperature), params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(scaled, dim=-1)  # (k, V)
    e = torch.empty_like(probs)
    for row, g in zip(e, generators):
        row.exponential_(1.0, generator=g)
    return torch.argmax(probs / e, dim=-1).tolist()


def token_logprobs(logits: torch.Tensor, top_n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (V,) -> (log-softmax (V,), top_n values, top_n ids), for OpenAI-style `logprobs`."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, top_n) if top_n > 0 else (lp[:0], torch.zeros(0, dtype=torch.long))
    return lp, vals, ids
