"""`gpt2kit runs [DIR]`: list run directories with their status, steps and best validation loss."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "runs", help="list fine-tuning runs",
        description="List the gpt2kit run directories at or below DIR (default: the current directory) with "
                    "their status, step, best validation loss, last training loss and, for a failed run, its error. "
                    "Hidden and symlinked folders are not searched. A run marked 'dead' was "
                    "killed without recording it; `gpt2kit finetune --resume RUN` continues it.")
    p.add_argument("dir", nargs="?", default=".", metavar="DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.runs import format_runs, list_runs
    found = list_runs(args.dir)
    if args.json:
        for r in found:
            print(json.dumps(r.to_dict()))
    else:
        print(format_runs(found))
    return 0
