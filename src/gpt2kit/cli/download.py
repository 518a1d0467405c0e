"""`gpt2kit download NAME`: fetch a model from the Hugging Face Hub into the local cache."""

from __future__ import annotations

import argparse

# hub's messages end with hints for verbs that take --model; download has none, so it says what fits here
_DOWNLOAD_HINT = ("copy the model's directory (config.json, model.safetensors, vocab.json, merges.txt) to this "
                  "machine and pass that directory as --model to generate, eval or serve; it needs no download")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a model from the Hugging Face Hub",
                       description="Download a GPT-2 model (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 "
                       "or org/name) into the Hugging Face cache and print its local directory.")
    p.add_argument("name")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--cache-dir", help="cache folder (default: the Hugging Face cache, HF_HOME)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=run)


def _reword(message: str) -> str:
    from gpt2kit.checkpoints import hub

    return (message.replace(hub._LOCAL_HINT, _DOWNLOAD_HINT)
            .replace("or pass a local directory", f"or {_DOWNLOAD_HINT}")
            .replace(", or a local directory", ""))  # a directory is no NAME to download


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import hub
    from gpt2kit.config import OPENAI_NAMES
    from gpt2kit.errors import Gpt2kitError

    try:
        d = hub.download(OPENAI_NAMES.get(args.name, args.name), revision=args.revision,
                         cache_dir=args.cache_dir, force=args.force)
    except Gpt2kitError as e:
        raise Gpt2kitError(_reword(str(e))) from None
    print(d)
    return 0
