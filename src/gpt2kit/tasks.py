"""Evaluation tasks scored as lm-evaluation-harness scores them, so that the figures can be put beside its
own and the GPT-2 paper's: rolling log-likelihood of whole documents (word and byte perplexity, bits per
byte), LAMBADA-style last-word prediction, and multiple choice (HellaSwag, PIQA, ARC and the like).

Every task reduces to log-likelihood requests (context ids, continuation ids) scored by one batched
function, `loglikelihoods`, as lm-eval's `hf` model scores them."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2kit.data import jsonl_objects, read_text
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer

TASKS = ("perplexity", "rolling", "lambada", "choice")

# ---------------------------------------------------------------------------------------------------
# word and byte counts, and the figures made from them (lm-eval's wikitext task)


def count_words(text: str) -> int:
    """Words as lm-eval counts them: the pieces of a split on runs of whitespace (so a leading or trailing
    whitespace run adds an empty piece, as in lm-eval)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def text_metrics(nll: float, words: int, n_bytes: int) -> dict[str, float]:
    """word_perplexity, byte_perplexity and bits_per_byte of a summed negative log-likelihood (nats), with
    lm-eval's weighted_perplexity and bits_per_byte aggregations (sums over documents, then one ratio);
    none for a text of no bytes."""
    if words <= 0 or n_bytes <= 0:
        return {}
    return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / n_bytes),
            "bits_per_byte": nll / (n_bytes * math.log(2))}


def stream_counts(ids: Sequence[int], tokenizer: Tokenizer) -> tuple[int, int]:
    """(words, bytes) of a token stream, counted per document between <|endoftext|> tokens (which are
    neither words nor bytes)."""
    ids = np.asarray(ids, dtype=np.int64)
    words = n_bytes = 0
    for doc in np.split(ids, np.flatnonzero(ids == tokenizer.eot_token)):
        doc = doc[doc != tokenizer.eot_token]
        if doc.size:
            b = tokenizer.decode_bytes(doc.tolist())
            words, n_bytes = words + count_words(b.decode("utf-8", errors="replace")), n_bytes + len(b)
    return words, n_bytes


# ---------------------------------------------------------------------------------------------------
# detokenizers


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (` @-@ `, spaced punctuation and brackets, `= = heading = =`) with the
    rules, in the order, of lm-eval's wikitext task, which follows the GPT-2 paper's approach."""
    s = text.replace("s '", "s'")
    # lm-eval's rule for contractions before digits matches the literal pattern "/' <digit>/" and puts
    # "/'[0-9]/" in its place (a regex written as a literal); kept as it is so that results agree
    s = re.sub(r"/' [0-9]/", "/'[0-9]/", s)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
                           (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "),
                           (" , ", ", ")):
        s = s.replace(spaced, joined)
    # no spaces just inside brackets and quotes
    for open_, close in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")):
        o, c = re.escape(open_), re.escape(close)
        s = re.sub(rf"{o}\s*([^{c}]*?)\s*{c}", lambda m, a=open_, b=close: f"{a}{m.group(1)}{b}", s)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                           (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(spaced, joined)
    return s


DETOKENIZERS: dict[str, Callable[[str], str]] = {"wikitext": wikitext_detokenize}


def detokenizer(name: str | None) -> Callable[[str], str] | None:
    if name is None:
        return None
    if name not in DETOKENIZERS:
        raise Gpt2kitError(f"unknown detokenizer {name!r}; choose one of: {', '.join(DETOKENIZERS)}")
    return DETOKENIZERS[name]


# ---------------------------------------------------------------------------------------------------
# requests and batched scoring


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal models make them: trailing whitespace of the
    context moves to the continuation, the whole text is encoded once and split after the context's
    tokens; an empty context becomes <|endoftext|> (unless the continuation starts with it)."""
    if not context:
        cont = tokenizer.encode(continuation)
        if not cont:
            raise Gpt2kitError("a request with an empty context and an empty continuation has nothing to score")
        return ([tokenizer.eot_token], cont) if cont[0] != tokenizer.eot_token else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 4,
                   max_length: int | None = None,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether greedy decoding gives every continuation token) for each
    (context ids, continuation ids) request. As lm-eval's `hf` model: the model reads the last
    `max_length` (default: its context) tokens of context + continuation minus the final token; requests
    run longest first, `batch_size` at a time, right-padded (padding never changes a causal model's
    earlier logits)."""
    if batch_size <= 0:
        raise Gpt2kitError(f"batch size must be > 0, got {batch_size}")
    max_length = min(max_length or model.config.n_positions, model.config.n_positions)
    model.eval()
    inputs: list[tuple[list[int], list[int]]] = []
    for ctx, cont in requests:
        if not cont:
            raise Gpt2kitError("a request has an empty continuation; there is nothing to score")
        if len(cont) > max_length:
            raise Gpt2kitError(f"a continuation of {len(cont)} tokens is longer than the window of "
                               f"{max_length} tokens; it cannot be scored")
        inputs.append(((list(ctx) + list(cont))[-(max_length + 1):][:-1], list(cont)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = len(inputs[rows[0]][0])
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for j, i in enumerate(rows):
            inp = inputs[i][0]
            x[j, :len(inp)] = torch.tensor(inp)
        logits = model(x.to(model.device))  # (B, T, V)
        for j, i in enumerate(rows):
            inp, cont = inputs[i]
            # the logits at the last len(cont) input positions predict the continuation
            lp = F.log_softmax(logits[j, len(inp) - len(cont):len(inp)].float(), dim=-1)  # (len(cont), V)
            tgt = torch.tensor(cont, device=lp.device)
            greedy = bool((lp.argmax(dim=-1) == tgt).all())
            out[i] = (lp.gather(1, tgt[:, None]).sum().item(), greedy)
        if progress:
            progress(len(rows))
    return out


# ---------------------------------------------------------------------------------------------------
# rolling log-likelihood of whole documents (lm-eval's loglikelihood_rolling)


def rolling_requests(ids: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows over one document: every token is predicted once, the first
    after `prefix` (<|endoftext|>), in blocks of `max_length` tokens that see only the tokens of their own
    block (and the one before it); the last block, if short, keeps a full window of context."""
    ids = list(ids)
    if not ids:
        return []
    first = min(max_length, len(ids))
    reqs = [([prefix], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_length)
        end = done + n
        # loglikelihoods() reads the last max_length + 1 tokens of context + continuation minus the last:
        # for a full block that is the one token before it, for a short last block a full window
        reqs.append((ids[max(end - max_length - 1, 0):done], ids[done:end]))
        done = end
    return reqs


@dataclass
class RollingResult:
    perplexity: float  # per token
    loss: float  # mean negative log-likelihood per token (nats)
    tokens: int
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    documents: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def rolling(model: GPT, tokenizer: Tokenizer, documents: Sequence[str], block_size: int | None = None,
            batch_size: int = 4, detokenize: str | None = None,
            progress: Callable[[int], None] | None = None) -> RollingResult:
    """lm-eval's loglikelihood_rolling perplexity task: each document scored on its own (rolling_requests
    with `block_size` as lm-eval's max_length); words and bytes are counted on the document as given,
    before `detokenize` (as lm-eval's wikitext task counts them)."""
    detok = detokenizer(detokenize)
    if block_size is not None and block_size < 1:
        raise Gpt2kitError(f"block size must be >= 1 token (leave it out for the model's context), got {block_size}")
    max_length = min(block_size or model.config.n_positions, model.config.n_positions)
    reqs, owner = [], []
    words = n_bytes = 0
    for d, doc in enumerate(documents):
        words, n_bytes = words + count_words(doc), n_bytes + count_bytes(doc)
        for r in rolling_requests(tokenizer.encode(detok(doc) if detok else doc), tokenizer.eot_token, max_length):
            reqs.append(r)
            owner.append(d)
    if not reqs:
        raise Gpt2kitError("the documents have no tokens to score")
    scores = loglikelihoods(model, reqs, batch_size, max_length, progress)
    nll = -sum(ll for ll, _ in scores)
    tokens = sum(len(cont) for _, cont in reqs)
    return RollingResult(perplexity=math.exp(nll / tokens), loss=nll / tokens, tokens=tokens,
                         documents=len(documents), **text_metrics(nll, words, n_bytes))


# ---------------------------------------------------------------------------------------------------
# LAMBADA and multiple choice


@dataclass
class LambadaResult:
    accuracy: float
    perplexity: float  # exp of the mean negative log-likelihood of the target, over documents
    documents: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def lambada_request(text: str) -> tuple[str, str]:
    """(context, target) as lm-eval's lambada_openai: everything before the last space, and the last
    word with the space before it."""
    head, _, last = text.rpartition(" ")
    return head, " " + last


def lambada(model: GPT, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 4,
            max_length: int | None = None, progress: Callable[[int], None] | None = None) -> LambadaResult:
    """lm-eval's lambada_openai: accuracy (every token of the target is the greedy one) and perplexity of the
    target after the rest of the text."""
    if not texts:
        raise Gpt2kitError("no LAMBADA documents to score")
    reqs = [encode_pair(tokenizer, *lambada_request(t)) for t in texts]
    scores = loglikelihoods(model, reqs, batch_size, max_length, progress)
    return LambadaResult(accuracy=sum(g for _, g in scores) / len(scores),
                         perplexity=math.exp(-sum(ll for ll, _ in scores) / len(scores)), documents=len(scores))


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    label: int


@dataclass
class ChoiceResult:
    accuracy: float  # the choice of highest log-likelihood is the label
    accuracy_norm: float  # ... of highest log-likelihood per character of the choice (lm-eval's acc_norm)
    accuracy_bytes: float  # ... per UTF-8 byte of the choice (lm-eval's acc_bytes; = acc_norm for ASCII)
    documents: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, as numpy's argmax


def choice(model: GPT, tokenizer: Tokenizer, items: Sequence[ChoiceItem], batch_size: int = 4,
           max_length: int | None = None, target_delimiter: str = " ",
           progress: Callable[[int], None] | None = None) -> ChoiceResult:
    """lm-eval's multiple_choice output type: each choice scored as the continuation
    `target_delimiter + choice` of the context."""
    if not items:
        raise Gpt2kitError("no multiple-choice items to score")
    reqs = [encode_pair(tokenizer, it.context, target_delimiter + c) for it in items for c in it.choices]
    scores = loglikelihoods(model, reqs, batch_size, max_length, progress)
    acc = acc_norm = acc_bytes = 0
    k = 0
    for it in items:
        lls = [ll for ll, _ in scores[k:k + len(it.choices)]]
        k += len(it.choices)
        acc += _argmax(lls) == it.label
        acc_norm += _argmax([ll / len(c) for ll, c in zip(lls, it.choices)]) == it.label
        acc_bytes += _argmax([ll / count_bytes(c) for ll, c in zip(lls, it.choices)]) == it.label
    n = len(items)
    return ChoiceResult(accuracy=acc / n, accuracy_norm=acc_norm / n, accuracy_bytes=acc_bytes / n, documents=n)


# ---------------------------------------------------------------------------------------------------
# reading task files


def _jsonl_objects(path: str | Path, encoding: str = "utf-8") -> list[tuple[int, dict]]:
    p = Path(path)
    if not p.is_file():
        raise Gpt2kitError(f"task data {p} does not exist or is not a file")
    try:
        text = read_text(p, encoding)
    except OSError as e:
        raise Gpt2kitError(f"cannot read {p}: {e.strerror}") from None
    out = list(jsonl_objects(p, text))
    if not out:
        raise Gpt2kitError(f"task data {p} is empty")
    return out


def read_lambada(path: str | Path, field: str = "text", encoding: str = "utf-8") -> list[str]:
    """The texts of a LAMBADA JSON Lines file (one {"text": ...} per line)."""
    texts = []
    for n, obj in _jsonl_objects(path, encoding):
        t = obj.get(field)
        if not isinstance(t, str) or not t.strip():
            raise Gpt2kitError(f"{path}:{n}: needs a non-empty string field {field!r} (pick another with --field)")
        if " " not in t.strip():
            raise Gpt2kitError(f"{path}:{n}: the text has one word; LAMBADA predicts the last word after the rest")
        texts.append(t)
    return texts


def read_choices(path: str | Path, encoding: str = "utf-8") -> list[ChoiceItem]:
    """Multiple-choice items of a JSON Lines file: {"context": str, "choices": [str, ...], "label": int}."""
    items = []
    for n, obj in _jsonl_objects(path, encoding):
        ctx, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
        if not isinstance(ctx, str):
            raise Gpt2kitError(f'{path}:{n}: needs "context", a string')
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise Gpt2kitError(f'{path}:{n}: needs "choices", a list of at least 2 non-empty strings')
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise Gpt2kitError(f'{path}:{n}: needs "label", the index (0..{len(choices) - 1}) of the right choice')
        items.append(ChoiceItem(ctx, choices, label))
    return items
