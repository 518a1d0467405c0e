"""`gpt2kit runs [DIR ...]`: list run directories with their status, steps and best validation loss, or
compare them (--compare): the settings on which they differ, and their results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "runs", help="list fine-tuning runs",
        description="List the gpt2kit run directories at or below DIR (default: the current directory) with "
                    "their status, step, best validation loss, last training loss and, for a failed run, its error. "
                    "Hidden and symlinked folders are not searched. A run marked 'dead' was "
                    "killed without recording it (a run is running while its trainer holds RUN/.lock); "
                    "`gpt2kit finetune --resume RUN` continues it. Numbered runs (runs/0007-jokes, from "
                    "`finetune --runs-dir`) show their number first; runs/7 (or 7, for runs/) names one. With "
                    "--compare, the runs found side by side instead: the settings on which they differ, then their "
                    "results.")
    p.add_argument("dirs", nargs="*", default=["."], metavar="DIR", help="run directories or folders holding runs")
    p.add_argument("--compare", action="store_true",
                   help="show the runs side by side: the settings that differ between them, then their status, "
                        "steps, best validation loss, last loss and median tokens/s")
    p.add_argument("--json", action="store_true", help="one JSON object per run (with --compare: one object)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.errors import Gpt2kitError
    from gpt2kit.run_numbers import DEFAULT_RUNS_DIR, resolve_run_ref
    from gpt2kit.runs import compare_runs, format_comparison, format_runs, list_runs
    found, seen = [], set()
    for d in args.dirs:
        ref = Path(resolve_run_ref(d))
        if not ref.exists() and ref.name.isdigit():  # a run number that no run has
            where = ref.parent if ref.parent != Path(".") else Path(DEFAULT_RUNS_DIR)
            raise Gpt2kitError(f"no run numbered {int(ref.name)} in {where}/: `gpt2kit runs {where}` lists them")
        for r in list_runs(ref):
            if r.path.resolve() not in seen:
                seen.add(r.path.resolve())
                found.append(r)
    if args.compare:
        c = compare_runs(found)
        print(json.dumps(c.to_dict()) if args.json else format_comparison(c))
    elif args.json:
        for r in found:
            print(json.dumps(r.to_dict()))
    else:
        print(format_runs(found))
    return 0
