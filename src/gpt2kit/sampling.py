"""Pure functions from next-token logits to tokens: the filters (temperature, top-k, top-p, min-p,
typical-p) and the draw, for a batch of rows that each have their own parameters and random numbers.

A row's random number for its n-th sampled token is a hash of (its key, n) (`uniforms`), and the token is
drawn by inverse CDF over the kept tokens in vocabulary order, so a row's text depends only on its own seed
and index, never on the other rows of its batch. On a CPU the compiled kernel (kernels/cpu_sample.cpp) does
a batch in one pass; elsewhere (CUDA, MPS, or without the kernel) `draw` runs the same steps with PyTorch,
mirroring transformers' warpers; both pick the same tokens (up to float32 rounding at a boundary)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpt2kit import kernels
from gpt2kit.errors import Gpt2kitError
from gpt2kit.processors import apply_repetition_penalty

FMAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # nucleus; 1 disables
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 disables
    repetition_penalty: float = 1.0  # CTRL-style, as in transformers; 1 disables
    typical_p: float = 1.0  # locally typical sampling (Meister et al., 2022); 1 disables

    def validate(self) -> SamplingParams:
        if not 0 <= self.temperature < math.inf:
            raise Gpt2kitError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise Gpt2kitError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Gpt2kitError(f"top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise Gpt2kitError(f"min-p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise Gpt2kitError(f"typical-p must be in (0, 1] (1 disables it), got {self.typical_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise Gpt2kitError(f"repetition penalty must be a finite number > 0 (1 disables it), got "
                               f"{self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def row(self) -> list[float]:
        """This row's columns of `draw`'s parameter table (all but the random number)."""
        return [self.temperature, self.top_k, self.top_p, self.min_p, self.typical_p]


# ---- random numbers: one uniform per row and token, from a counter-based hash (splitmix64) ------------

_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_key(seed: int | None, index: int) -> int:
    """Sample `index` of a request seeded `seed` gets its own key (mixed, so seed 1/index 0 and seed 0/index
    1 differ); without a seed, a random one."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def uniforms(keys: torch.Tensor | Sequence[int], steps: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """keys, steps (k,) -> (k,) float64 in [0, 1): splitmix64's output for state key + (step + 1) * golden
    ratio, so each (key, step) has its own number and no generator state exists. In numpy's uint64, which
    wraps as splitmix64 does (a decoding step calls this: torch's dispatch on tiny tensors costs ten times
    more)."""
    k = np.asarray(keys.cpu() if isinstance(keys, torch.Tensor) else keys, dtype=np.int64).astype(np.uint64)
    n = np.asarray(steps.cpu() if isinstance(steps, torch.Tensor) else steps, dtype=np.int64).astype(np.uint64)
    z = k + (n + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


# ---- the filters and the draw ------------------------------------------------------------------------

def scale_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits (k, V), temperature (k,) > 0 -> (logits - each row's max) / temperature, <= 0 with the top at
    0. Shifting first keeps a tiny temperature (or logits made huge by a repetition penalty) from taking
    values past float32's range (inf, then NaN from softmax, then token 0 whatever the logits): the limit,
    argmax, is what such a row gets."""
    x = logits.clamp(max=FMAX)
    inv_t = (1.0 / temperature.double()).clamp(max=FMAX).float().to(logits.device)
    return (x - x.amax(dim=-1, keepdim=True)) * inv_t[:, None]


def _top_p(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopPLogitsWarper, with a top_p per row."""
    sorted_z, order = torch.sort(z, descending=False, stable=True)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p.double()).float().to(z.device)[:, None]  # 1 - p rounded as transformers does
    drop[:, -1] = False
    return z.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _min_p(z: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """transformers' MinPLogitsWarper, with a min_p per row."""
    probs = torch.softmax(z, dim=-1)
    low = probs < min_p.float().to(z.device)[:, None] * probs.amax(dim=-1, keepdim=True)
    return z.masked_fill(low, float("-inf"))


def _typical_p(z: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper, with a mass per row."""
    normalized = torch.log_softmax(z, dim=-1)
    ent = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-normalized - ent)
    sorted_s, order = torch.sort(shifted, descending=False)
    cum = z.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass.float().to(z.device)[:, None]).sum(dim=1).clamp(max=z.size(-1) - 1)
    drop = sorted_s > sorted_s.gather(1, last.view(-1, 1))
    drop[:, 0] = False
    return z.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def filter_scaled(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """PyTorch's path: logits (k, V) and the parameter table (k, >= 5: temperature > 0, top_k, top_p, min_p,
    typical_p) -> scaled logits z (k, V), -inf where a filter drops the token. Temperature, then top-k, top-p,
    min-p and typical-p, transformers' order, each as its warper computes it; a filter runs only on the rows
    that use it, and no row's tokens depend on another's."""
    t = table.cpu()
    V = logits.size(-1)
    z = scale_logits(logits.float(), t[:, 0])
    top_k = t[:, 1].long()
    on = (top_k > 0) & (top_k < V)
    if bool(on.any()):
        k = top_k.clamp(min=1, max=V)
        vals = torch.topk(logits.float().clamp(max=FMAX), int(k[on].max()), dim=-1).values
        kth = vals.gather(1, (k.clamp(max=vals.size(1)) - 1).to(z.device)[:, None])
        kth = torch.where(on.to(z.device)[:, None], kth, float("-inf"))
        z = z.masked_fill(logits.float().clamp(max=FMAX) < kth, float("-inf"))
    for col, f in ((2, _top_p), (3, _min_p), (4, _typical_p)):
        rows = (t[:, col] > 0) & (t[:, col] < 1) if col != 3 else t[:, col] > 0
        if bool(rows.all()):
            z = f(z, t[:, col])
        elif bool(rows.any()):
            idx = rows.nonzero()[:, 0].to(z.device)
            z = z.index_copy(0, idx, f(z[idx], t[rows, col]))
    return z


def draw(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """logits (k, V) and the parameter table (k, 6) float64 on the CPU: temperature (0: argmax, ties to the
    lowest id), top_k, top_p, min_p, typical_p, and the row's uniform random number u in [0, 1) -> tokens
    (k,) int64 on the logits' device. Each row keeps what transformers' warpers keep and takes the first
    token whose running probability, in vocabulary order, exceeds u."""
    ext = _kernel()
    if ext is not None and logits.device.type == "cpu":
        return ext.sample_rows(logits.float().contiguous(), table.contiguous())
    greedy = (table[:, 0] == 0).to(logits.device)
    t = table.clone()
    t[:, 0] = torch.where(t[:, 0] == 0, 1.0, t[:, 0])  # greedy rows are drawn too, then replaced
    e = filter_scaled(logits, t).exp()
    fine = torch.float64 if logits.device.type != "mps" else torch.float32  # (MPS has no float64)
    cum = e.to(fine).cumsum(dim=-1)
    u = table[:, 5].to(fine).to(logits.device)  # cast on the CPU: MPS has no float64
    tok = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    last = e.size(-1) - 1 - (e > 0).flip(-1).int().argmax(dim=-1)  # u * total rounded up to the total
    tok = torch.where(tok > last, last, tok)
    return torch.where(greedy, logits.argmax(dim=-1), tok)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (k, V) -> each row's first maximum (k,) int64, as `draw` picks for a greedy row. On a CPU the
    kernel's pass (PyTorch's argmax takes ~15x as long over a batch of 50,257-token rows)."""
    ext = _kernel()
    if ext is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return ext.argmax_rows(logits.contiguous())
    return logits.argmax(dim=-1)


_tried_kernel = False


def _kernel():
    """The compiled kernel when one is built already (never builds: decoding's set-up does)."""
    global _tried_kernel
    if kernels.loaded() is None and not _tried_kernel:
        _tried_kernel = True
        kernels.load(build=False, quiet=True)
    return kernels.loaded()


def params_table(params: Sequence[SamplingParams], us: torch.Tensor) -> torch.Tensor:
    """draw's parameter table (k, 6) for rows with `params` and random numbers `us` (k,)."""
    table = np.empty((len(params), 6))
    table[:, :5] = [p.row() for p in params]
    table[:, 5] = us.numpy() if isinstance(us, torch.Tensor) else us
    return torch.from_numpy(table)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  typical_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) with the dropped tokens at -inf, as transformers' top-k, top-p, min-p and typical
    warpers (in that order) leave them; PyTorch's path of `draw`."""
    x = logits.float().reshape(-1, logits.size(-1))
    table = torch.tensor([[1.0, top_k, top_p, min_p, typical_p]] * x.size(0), dtype=torch.float64)
    z = filter_scaled(x, table)
    return torch.where(torch.isinf(z) & (z < 0), float("-inf"), x).view(logits.shape)


def sample(logits: torch.Tensor, params: SamplingParams, key: int = 0, step: int = 0,
           seen: torch.Tensor | None = None) -> int:
    """One row: logits (V,) -> token id, with the random number of (key, step) (see `uniforms`). Greedy
    when temperature == 0 (ties go to the lowest id). A row of a batch gets the same token from `draw`."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    u = uniforms([key], [step])
    return int(draw(logits[None], params_table([params], u))[0])


def token_logprobs(logits: torch.Tensor, top_n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (V,) -> (log-softmax (V,), top_n values, top_n ids), for OpenAI-style `logprobs`."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, top_n) if top_n > 0 else (lp[:0], torch.zeros(0, dtype=torch.long))
    return lp, vals, ids
