"""`gpt2kit VERB ...`: each verb lives in its own module here as a thin adapter over the library.

A verb module defines `register(subparsers)`, which adds its parser and sets `func=run` where
`run(args) -> int | None`. Library errors (Gpt2kitError) become one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gpt2kit.errors import Gpt2kitError

# verb modules, in the order `gpt2kit --help` lists them
VERBS = ("generate", "eval", "download", "convert", "encode", "finetune", "merge", "runs", "serve")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from gpt2kit import __version__
    parser = _Parser(prog="gpt2kit", description="GPT-2 generation, fine-tuning, evaluation "
                                     "and serving.")
    parser.add_argument("--version", action="version", version=f"gpt2kit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in VERBS:
        try:
            mod = importlib.import_module(f"gpt2kit.cli.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"gpt2kit.cli.{verb}":
                continue  # verb not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Gpt2kitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gpt2kit generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
