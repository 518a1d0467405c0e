"""`gpt2kit push RUN_OR_DIR --repo ORG/NAME`: upload a model, or a run's best/final model, with a generated
model card to the Hugging Face Hub. A thin wrapper over gpt2kit.push.push."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push", help="upload a model or a run's model to the Hugging Face Hub",
        description="Upload a model directory, or a fine-tuning run's model, to a Hugging Face Hub repository "
                    "(created if need be) with a model card written from the run: base model, data, steps, "
                    "validation loss, the loss plot, the command, and how to use it. Needs a token with write "
                    "access (HF_TOKEN or `hf auth login`); HF_ENDPOINT picks another Hub.")
    p.add_argument("path", metavar="RUN_OR_DIR", help="a run directory, or a model directory (config.json + "
                   "model.safetensors)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repository to push to")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing "
                   "repository keeps its visibility)")
    p.add_argument("--which", choices=("auto", "best", "final"), default="auto",
                   help="for a run: best (lowest validation loss) or final (last step); auto (default): best if "
                   "validation chose one, else final")
    p.add_argument("--license", metavar="ID", help="licence for the card (default: the base model's, when known: "
                   "mit for gpt2, apache-2.0 for distilgpt2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.cli.common import setup_logging
    from gpt2kit.push import push
    setup_logging()  # "note: pushing RUN/best: the lowest validation loss ..."
    url = push(args.path, args.repo, private=args.private, which=args.which, license=args.license)
    print(url)
    return 0
