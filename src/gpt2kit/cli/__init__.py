"""`gpt2kit VERB ...`: each verb lives in its own module here as a thin adapter over the library.

A verb module defines `register(subparsers)`, which adds its parser and sets `func=run` where
`run(args) -> int | None`. Library errors (Gpt2kitError) become one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from gpt2kit.cli.flags import translate
from gpt2kit.errors import Gpt2kitError

# verb modules, in the order `gpt2kit --help` lists them
VERBS = ("generate", "eval", "download", "convert", "encode", "finetune", "merge", "push", "runs", "serve")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    verb_parser = _verb_parsers(parser).get(argv[0]) if argv else None
    if verb_parser is not None:  # --top_k for --top-k; another tool's flag named with ours
        argv = argv[:1] + translate(argv[0], verb_parser, argv[1:])
    args, extras = parser.parse_known_args(argv)
    if extras:
        # report unknown flags from the verb's own parser, so the hint is `gpt2kit VERB --help`
        verb_parser = _verb_parsers(parser).get(getattr(args, "verb", None), parser)
        verb_parser.error(f"unrecognized arguments: {' '.join(extras)}")
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
    except OSError as e:  # a path the user named that can't be read or written: one line, not a traceback
        print(f"error: {_describe_os_error(e)}", file=sys.stderr)
        return 1


def _verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _describe_os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    what = e.strerror or str(e)
    fix = {errno.ENOSPC: "free some disk space or write somewhere else",
           errno.EACCES: "check the path's permissions or choose another one",
           errno.EPERM: "check the path's permissions or choose another one",
           errno.EROFS: "choose a writable location",
           errno.EISDIR: "give a file name, not a directory",
           errno.ENOTDIR: "check the path: a part of it is a file, not a directory",
           errno.EEXIST: "remove it or choose another path"}.get(e.errno, "check the path and try again")
    return f"{what}{where}: {fix}"


if __name__ == "__main__":
    sys.exit(main())
