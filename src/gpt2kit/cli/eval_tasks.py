"""`gpt2kit eval --task rolling|lambada|choice`: the lm-evaluation-harness-style tasks of gpt2kit.tasks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2kit.cli.common import load_generator
from gpt2kit.errors import Gpt2kitError
from gpt2kit.progress import progress_bar


def _check_flags(args: argparse.Namespace) -> None:
    task = args.task
    if args.stride is not None:
        raise Gpt2kitError(f"--stride applies to the sliding window of --task perplexity; --task {task} scores "
                           "lm-eval's windows (leave --stride out)")
    if args.detokenize is not None and task != "rolling":
        raise Gpt2kitError(f"--detokenize applies to --task perplexity and --task rolling, not --task {task}")
    if task in ("lambada", "choice"):
        if len(args.data) != 1 or Path(args.data[0]).suffix.lower() != ".jsonl":
            raise Gpt2kitError(f"--task {task} reads one .jsonl file (--data FILE.jsonl), got: {' '.join(args.data)}")
        if args.column is not None:
            raise Gpt2kitError(f"--column applies to .csv/.tsv data of --task perplexity or rolling, not --task {task}")
        if task == "choice" and args.field is not None:
            raise Gpt2kitError('--task choice reads the fields "context", "choices" and "label"; leave --field out')


def run_task(args: argparse.Namespace) -> int:
    from gpt2kit import tasks
    from gpt2kit.data import DataSpec, read_documents

    _check_flags(args)
    tasks.detokenizer(args.detokenize)  # an unknown name fails before the model loads
    if args.block_size is not None and args.block_size < 1:
        raise Gpt2kitError(f"--block-size must be >= 1, got {args.block_size}")
    # the data is read (and its errors found) before the model loads
    if args.task == "rolling":
        data = read_documents(args.data, DataSpec(column=args.column, field=args.field, encoding=args.encoding))
    elif args.task == "lambada":
        data = tasks.read_lambada(args.data[0], args.field or "text", args.encoding)
    else:
        data = tasks.read_choices(args.data[0], args.encoding)
    gen = load_generator(args)
    model, tok = gen.model, gen.tokenizer
    n_ctx = model.config.n_positions
    if args.block_size is not None and args.block_size > n_ctx:  # as the perplexity task says it
        print(f"note: --block-size {args.block_size} is longer than the model's context; scoring windows of "
              f"{n_ctx} tokens", file=sys.stderr)
    with progress_bar(total=None, unit="request", disable=args.format == "jsonl") as bar:
        if args.task == "rolling":
            r = tasks.rolling(model, tok, data, args.block_size, args.batch_size, args.detokenize, progress=bar.update)
        elif args.task == "lambada":
            r = tasks.lambada(model, tok, data, args.batch_size, args.block_size, progress=bar.update)
        else:
            r = tasks.choice(model, tok, data, args.batch_size, args.block_size, progress=bar.update)
    d = r.to_dict()
    if args.format == "jsonl":
        print(json.dumps(d))
    else:
        print(format_text(d))
    return 0


def format_text(d: dict) -> str:
    """`perplexity 29.4100  loss 3.3811  tokens 287643 ...`: the figures of --format text."""
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
