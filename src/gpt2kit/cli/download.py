"""`gpt2kit download NAME`: fetch a model from the Hugging Face Hub into the local cache."""

from __future__ import annotations

import argparse

# hub's errors end with a hint for verbs that take --model; download has none, so it says what fits here
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


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import hub
    from gpt2kit.config import OPENAI_NAMES

    d = hub.download(OPENAI_NAMES.get(args.name, args.name), revision=args.revision, cache_dir=args.cache_dir,
                     force=args.force, local_hint=_DOWNLOAD_HINT)
    print(d)
    return 0
