"""`gpt2kit encode INPUT... --out FILE.tokens`: tokenize training data once, ahead of fine-tuning."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode", help="tokenize text/csv/jsonl files into a .tokens cache for finetune",
        description="Tokenize .txt files (one document each), folders, globs, .csv (--column) and .jsonl "
                    "(--field) into a .tokens file that `gpt2kit finetune` reads directly. Token files "
                    "(.npz/.npy from gpt-2-simple or nshepperd's encode.py, nanoGPT .bin) are converted as they are.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    # checked in run(), to point at nshepperd's `encode.py INPUT OUT.npz` order
    p.add_argument("--out", "-o", metavar="FILE.tokens", help="token cache to write (required)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", default="gpt2", help="model whose tokenizer to use (default: gpt2)")
    src.add_argument("--tokenizer", metavar="DIR", help="directory with vocab.json+merges.txt or "
                     "encoder.json+vocab.bpe (instead of --model)")
    p.add_argument("--column", help=".csv/.tsv: the column holding one document per row")
    p.add_argument("--field", help=".jsonl: the field holding the text (default: text)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help=".csv/.tsv: skip rows whose number of fields differs from the header's, with a warning "
                   "(default: such rows are an error)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the inputs (default: utf-8)")
    p.add_argument("--line-by-line", action="store_true", help=".txt: each non-empty line is a document")
    p.set_defaults(func=run)


def _command(args: argparse.Namespace, inputs: list[str], out: Path) -> str:
    """The arguments of the corrected command: the inputs, --out and every other option that was given."""
    words = [*inputs, "--out", str(out)]
    for opt, value, default in (("--model", args.model, "gpt2"), ("--tokenizer", args.tokenizer, None),
                                ("--column", args.column, None), ("--field", args.field, None),
                                ("--encoding", args.encoding, "utf-8")):
        if value != default:
            words += [opt, value]
    if args.line_by_line:
        words.append("--line-by-line")
    if args.skip_bad_rows:
        words.append("--skip-bad-rows")
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    # imported here so `gpt2kit --help` stays quick
    from gpt2kit.cli.common import setup_logging
    from gpt2kit.data import DataSpec, check_encode_output, check_inputs, encode_files, plural
    from gpt2kit.errors import Gpt2kitError
    setup_logging()
    from gpt2kit.tokenizer import Tokenizer

    if args.out is None:
        last = Path(args.inputs[-1])
        if len(args.inputs) > 1 and not last.exists() and last.suffix.lower() in (".npz", ".tokens", ".bin", ".npy"):
            raise Gpt2kitError(f"the output is named with --out, not as the last input: gpt2kit encode "
                               f"{_command(args, args.inputs[:-1], last.with_suffix('.tokens'))}")
        raise Gpt2kitError("--out FILE.tokens is required: the token cache to write")
    spec = DataSpec(column=args.column, field=args.field, encoding=args.encoding, line_by_line=args.line_by_line,
                    skip_bad_rows=args.skip_bad_rows)
    check_inputs(args.inputs, spec)  # before the tokenizer, which may mean a download
    check_encode_output(args.inputs, args.out)
    if args.tokenizer:
        tok = Tokenizer.from_dir(args.tokenizer)
    else:
        from gpt2kit.checkpoints import resolve_model_dir, vocab_dir  # import torch and the model: only when needed
        try:
            model_dir = resolve_model_dir(args.model)
        except Gpt2kitError as e:
            raise Gpt2kitError(f"{e} (or pass the vocabulary directory with --tokenizer DIR)") from None
        tok = Tokenizer.from_dir(vocab_dir(model_dir))
    t0 = time.perf_counter()
    cache = encode_files(args.inputs, args.out, tok, spec)
    print(f"encoded {plural(cache.n_docs, 'document')}, {plural(len(cache), 'token')} -> {cache.path} "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0
