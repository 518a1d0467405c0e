"""Perplexity with a sliding window: the strided procedure of transformers' perplexity guide, counted
token-exactly (every token after the first is scored once, with up to `block_size` tokens of context)."""

from __future__ import annotations

import contextlib
import glob
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2kit.data import (
    TOKEN_SUFFIXES,
    Batcher,
    DataSpec,
    TokenCache,
    is_token_cache,
    not_regular_error,
    read_text,
    read_tokens,
)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.memory import device_memory, gib, is_out_of_memory
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer


@dataclass
class EvalResult:
    perplexity: float
    loss: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    # lm-eval's figures per word and per byte of the text (gpt2kit.tasks.text_metrics), where there is text
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        d = {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens}
        return d | {k: v for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")
                    if (v := getattr(self, k)) is not None}


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window; the scored positions tile 1..n_tokens-1."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        first = max(prev_end, begin + 1)  # position 0 of the text has no context to be predicted from
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_window(n_positions: int, block_size: int | None = None, stride: int | None = None,
                 n_tokens: int | None = None) -> tuple[int, int]:
    """The (block size, stride) perplexity() will use, or a Gpt2kitError naming the bad value. Callers
    check here before any work starts (the CLI before loading the model and before its progress bar)."""
    if block_size is not None and block_size < 2:
        raise Gpt2kitError(f"block size must be >= 2 tokens (leave it out for the model's context), got {block_size}")
    block = min(block_size or n_positions, n_positions)  # a longer block than the context cannot be scored
    if stride is None:
        stride = block // 2
    elif stride <= 0:
        raise Gpt2kitError(f"stride must be >= 1 token (leave it out for half the block), got {stride}")
    if stride > block:
        raise Gpt2kitError(f"stride must be in 1..{block} (the block size), got {stride}")
    if n_tokens is not None and n_tokens < 2:
        raise Gpt2kitError("the evaluation text has fewer than 2 tokens; give a longer file")
    return block, stride


@torch.inference_mode()
def perplexity(model: GPT, ids: list[int] | torch.Tensor, block_size: int | None = None,
               stride: int | None = None, batch_size: int = 4,
               progress: Callable[[int], None] | None = None) -> EvalResult:
    if batch_size <= 0:
        raise Gpt2kitError(f"batch size must be > 0, got {batch_size}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    block_size, stride = check_window(model.config.n_positions, block_size, stride, ids.numel())
    model.eval()
    spans = windows(ids.numel(), block_size, stride)
    with _memory_errors(model, min(batch_size, len(spans)), block_size):
        nll, count = _score_windows(model, ids, spans, batch_size, progress)
    loss = nll / count
    return EvalResult(perplexity=math.exp(loss), loss=loss, tokens=count)


def _score_windows(model: GPT, ids: torch.Tensor, spans: list[tuple[int, int, int]], batch_size: int,
                   progress: Callable[[int], None] | None) -> tuple[float, int]:
    nll, count = 0.0, 0
    # windows of equal length run together as one batch
    i = 0
    while i < len(spans):
        T = spans[i][1] - spans[i][0]
        group = [spans[i]]
        while i + len(group) < len(spans) and len(group) < batch_size and \
                spans[i + len(group)][1] - spans[i + len(group)][0] == T:
            group.append(spans[i + len(group)])
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(model.device)  # (B, T)
        logits = model(x).float()  # (B, T, V)
        for j, (b, e, first) in enumerate(group):
            # logits at position p predict token p + 1
            pred = logits[j, first - b - 1:e - b - 1]
            tgt = x[j, first - b:e - b]
            nll += F.cross_entropy(pred, tgt, reduction="sum").item()
            count += tgt.numel()
        i += len(group)
        if progress:
            progress(len(group))
    return nll, count


@torch.inference_mode()
def score_documents(model: GPT, cache: TokenCache, block_size: int | None = None, batch_size: int = 4,
                    progress: Callable[[int], None] | None = None) -> EvalResult:
    """Loss per target token of each document of `cache` scored as its own sequence, as a --line-by-line run
    validates (data.Batcher's eval batches: each document cut to block_size + 1 tokens, batch_size of them
    padded together, every target token weighted alike), so the same model, data, block and batch size give
    the run's validation loss."""
    if batch_size <= 0:
        raise Gpt2kitError(f"batch size must be > 0, got {batch_size}")
    block = min(block_size or model.config.n_positions, model.config.n_positions)
    if block < 1:
        raise Gpt2kitError(f"block size must be >= 1 token, got {block_size}")
    batcher = Batcher(cache, block, batch_size, line_by_line=True, device=model.device)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    count = 0
    with _memory_errors(model, min(batch_size, cache.n_docs), block):
        for x, y in batcher.eval_batches():
            logits = model(x)  # (B, T, V)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                                     reduction="sum").double()
            count += int((y != -100).sum())
            if progress:
                progress(1)
    if count == 0:
        raise Gpt2kitError(f"{cache.path} has no document of 2 or more tokens to score")
    loss = float(total) / count
    return EvalResult(perplexity=math.exp(loss) if loss < 700 else math.inf, loss=loss, tokens=count)


def check_memory(model: GPT, batch: int, block: int) -> None:
    """Refuse, before it is tried, a batch of `batch` sequences of `block` tokens whose logits and activations
    cannot fit in the memory `model`'s device has free (a one-line Gpt2kitError naming --batch-size)."""
    c = model.config
    # float32 logits (and their float copy and softmax in the loss) dominate; a few layers' activations besides
    need = batch * block * (3 * c.vocab_size + 16 * c.n_embd) * 4
    mem = device_memory(model.device)
    if mem is not None and need > mem[0]:
        raise Gpt2kitError(f"scoring {batch:,} sequences of {block} tokens at once needs roughly {gib(need)}, more "
                           f"than the {gib(mem[0])} free on {model.device.type}; lower --batch-size (e.g. 4)")


@contextlib.contextmanager
def _memory_errors(model: GPT, batch: int, block: int) -> Iterator[None]:
    """check_memory, and a batch that runs out all the same reported as a one-line error naming --batch-size."""
    check_memory(model, batch, block)
    try:
        yield
    except Exception as e:
        if is_out_of_memory(e):
            raise Gpt2kitError(f"out of memory on {model.device.type} scoring {batch:,} sequences of {block} tokens "
                               "at once; lower --batch-size (e.g. 4)") from None
        raise


def read_eval_text(path: str | Path, encoding: str = "utf-8") -> str:
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():  # a FIFO would wait forever for a writer
        raise not_regular_error(p)
    if not p.is_file():
        raise Gpt2kitError(f"evaluation data {p} does not exist or is not a file")
    try:  # as finetune reads text: a binary file (a token .npz, say) is refused, not decoded as latin-1
        text = read_text(p, encoding)
    except OSError as e:
        raise Gpt2kitError(f"cannot read {p}: {e.strerror}") from None
    if not text.strip():
        raise Gpt2kitError(f"evaluation data {p} is empty")
    return text




def plain_text_input(inputs: Sequence[str | Path], column: str | None = None, field: str | None = None,
                     line_by_line: bool = False) -> Path | None:
    """The single text file `inputs` names, to be scored as it is (nothing added between its lines, as in
    the transformers perplexity guide); None for anything read as finetune reads --data (several files,
    folders, globs, tables, JSON Lines, token files), scored as that stream: each document followed by
    <|endoftext|>."""
    if len(inputs) != 1 or column is not None or field is not None or line_by_line:
        return None
    p = Path(inputs[0])
    read_as_data = (".csv", ".tsv", ".jsonl", ".tokens", *TOKEN_SUFFIXES)
    if p.is_dir() or glob.has_magic(str(p)) or p.suffix.lower() in read_as_data:
        return None
    return None if is_token_cache(p) else p


def eval_token_ids(inputs: str | Path | Sequence[str | Path], tokenizer: Tokenizer, column: str | None = None,
                   field: str | None = None, encoding: str = "utf-8", skip_bad_rows: bool = False) -> np.ndarray:
    """The tokens `perplexity` scores for `inputs` (see plain_text_input)."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    plain = plain_text_input(items, column, field)
    if plain is not None:
        return np.asarray(tokenizer.encode(read_eval_text(plain, encoding)), dtype=np.int64)
    spec = DataSpec(column=column, field=field, encoding=encoding, skip_bad_rows=skip_bad_rows)
    return read_tokens(items, tokenizer, spec).astype(np.int64)


def evaluate_file(model: GPT, tokenizer: Tokenizer, path: str | Path, block_size: int | None = None,
                  stride: int | None = None, batch_size: int = 4, encoding: str = "utf-8",
                  progress: Callable[[int], None] | None = None) -> EvalResult:
    """perplexity() of what `path` holds, read as `gpt2kit eval --data PATH` reads it (eval_token_ids)."""
    ids = eval_token_ids(path, tokenizer, encoding=encoding)
    return perplexity(model, ids, block_size, stride, batch_size, progress)
