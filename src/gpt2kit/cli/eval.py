"""`gpt2kit eval`: perplexity of a text file with a sliding window."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gpt2kit.cli.common import add_model_args, load_generator, setup_logging
from gpt2kit.progress import progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a text file or of finetune-style data",
                       description="Perplexity and mean loss of a text file, or of data as finetune reads it, "
                                   "scored with a sliding window.")
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="one text file, scored as it is; or what finetune --data takes (several files, folders, "
                        "globs, .csv/.tsv with --column, .jsonl with --field, token files, a .tokens cache), "
                        "scored as its training stream: each document followed by <|endoftext|>")
    p.add_argument("--column", help="CSV/TSV column holding the text")
    p.add_argument("--field", help="JSONL field holding the text (default: text)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help=".csv/.tsv: skip rows whose number of fields differs from the header's, with a warning "
                   "(default: such rows are an error)")
    p.add_argument("--line-by-line", action="store_true",
                   help="score each line of a .txt file (each row or record of .csv/.jsonl, each document of token "
                        "files) as its own sequence, padded, as finetune --line-by-line validates: the same data, "
                        "--block-size and --batch-size give that run's validation loss")
    p.add_argument("--block-size", type=int, help="window length in tokens (default: the model's context); with "
                   "--line-by-line, longer documents are cut to it, as finetune does")
    p.add_argument("--stride", type=int, help="tokens the window moves each step (default: half the block)")
    p.add_argument("--batch-size", type=int, default=4, help="windows scored together (default 4)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --data (default utf-8)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--task", choices=("perplexity", "rolling", "lambada", "choice"), default="perplexity",
                   help="perplexity (default): the sliding window; rolling: each document scored on its own after "
                        "<|endoftext|> in lm-eval's disjoint windows; lambada: last-word accuracy and perplexity "
                        "of a .jsonl of {\"text\"}; choice: accuracy of a .jsonl of {\"context\", \"choices\", "
                        "\"label\"} (see docs)")
    p.add_argument("--detokenize", choices=("wikitext",),
                   help="undo WikiText's tokenization (' @-@ ' and the like) before scoring, as lm-eval's wikitext "
                        "task does; words and bytes are counted on the text as given")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.data import DataSpec, check_inputs
    from gpt2kit.errors import Gpt2kitError
    from gpt2kit.evaluate import (
        check_memory,
        check_window,
        eval_token_ids,
        perplexity,
        plain_text_input,
        read_eval_text,
        windows,
    )
    from gpt2kit.tasks import count_bytes, count_words, detokenizer, stream_counts, text_metrics

    if args.task != "perplexity":
        if args.line_by_line:
            raise Gpt2kitError(f"--line-by-line applies to the default perplexity task, not --task {args.task}; "
                               "drop one of them")
        from gpt2kit.cli.eval_tasks import run_task
        return run_task(args)

    setup_logging()  # the data's notes (e.g. --skip-bad-rows' count)
    # bad flags and bad data fail before the model loads
    if args.batch_size <= 0:
        raise Gpt2kitError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.block_size is not None and args.block_size < 2:
        raise Gpt2kitError(f"--block-size must be >= 2, got {args.block_size}")
    if args.stride is not None and args.stride <= 0:
        raise Gpt2kitError(f"--stride must be >= 1 token (leave it out for half the block), got {args.stride}")
    if args.stride is not None and args.block_size is not None and args.stride > args.block_size:
        raise Gpt2kitError(f"--stride must be at most --block-size ({args.block_size}), got {args.stride}")
    if args.line_by_line and args.stride is not None:
        raise Gpt2kitError("--stride moves a window over the text; --line-by-line scores each document whole "
                           "(cut to --block-size): drop one of them")
    spec = DataSpec(column=args.column, field=args.field, encoding=args.encoding, line_by_line=args.line_by_line,
                    skip_bad_rows=args.skip_bad_rows)
    plain = plain_text_input(args.data, args.column, args.field, args.line_by_line)
    detok = detokenizer(args.detokenize)
    if detok is not None and plain is None:
        raise Gpt2kitError("--detokenize applies to one text file, or to documents with --task rolling")
    if plain is not None:
        text = read_eval_text(plain, args.encoding)  # read (and its errors found) before the model loads
        if args.skip_bad_rows:
            raise Gpt2kitError(f"--skip-bad-rows applies to .csv/.tsv files, not to files like {plain}; drop it")
        counts = (count_words(text), count_bytes(text))  # of the text as given, as lm-eval's wikitext task
        text = detok(text) if detok else text
    else:
        check_inputs(args.data, spec)
    gen = load_generator(args)
    if args.line_by_line:
        return _line_by_line(args, gen, spec)
    ids = gen.tokenizer.encode(text) if plain is not None else \
        eval_token_ids(args.data, gen.tokenizer, args.column, args.field, args.encoding, args.skip_bad_rows)
    # the checks that need the model's context and the token count, before the progress bar starts
    n_ctx = gen.model.config.n_positions
    if args.block_size is not None and args.block_size > n_ctx:
        print(f"note: --block-size {args.block_size} is longer than the model's context; scoring windows of "
              f"{n_ctx} tokens", file=sys.stderr)
    window = min(args.block_size or n_ctx, n_ctx)
    if args.stride is not None and args.stride > window:  # (check_window's check, worded for the flags)
        raise Gpt2kitError(f"--stride must be at most the window of {window} tokens (--block-size, at most the "
                           f"model's context), got {args.stride}")
    block, stride = check_window(n_ctx, args.block_size, args.stride, len(ids))
    check_memory(gen.model, min(args.batch_size, len(windows(len(ids), block, stride))), block)
    with progress_bar(total=len(windows(len(ids), block, stride)), unit="window",
                      disable=args.format == "jsonl") as bar:
        r = perplexity(gen.model, ids, args.block_size, args.stride, args.batch_size, progress=bar.update)
    if plain is None:
        counts = stream_counts(ids, gen.tokenizer)
    return _report(args, dataclasses.replace(r, **text_metrics(r.loss * r.tokens, *counts)))


def _line_by_line(args: argparse.Namespace, gen, spec) -> int:
    import math

    from gpt2kit.data import read_token_docs
    from gpt2kit.evaluate import check_memory, score_documents

    cache = read_token_docs(args.data, gen.tokenizer, spec)
    n_ctx = gen.model.config.n_positions
    if args.block_size is not None and args.block_size > n_ctx:
        print(f"note: --block-size {args.block_size} is longer than the model's context; cutting documents to "
              f"{n_ctx} + 1 tokens", file=sys.stderr)
    check_memory(gen.model, min(args.batch_size, cache.n_docs), min(args.block_size or n_ctx, n_ctx))
    with progress_bar(total=math.ceil(cache.n_docs / args.batch_size), unit="batch",
                      disable=args.format == "jsonl") as bar:
        r = score_documents(gen.model, cache, args.block_size, args.batch_size, progress=bar.update)
    return _report(args, r)


def _report(args: argparse.Namespace, r) -> int:
    if args.format == "jsonl":
        print(json.dumps(r.to_dict()))
    else:
        from gpt2kit.cli.eval_tasks import format_text
        print(format_text(r.to_dict()))
    return 0
