"""`gpt2kit merge RUN_OR_ADAPTER_DIR --out DIR`: fold LoRA adapters into their base model and write a plain
HuggingFace-format checkpoint. A thin wrapper over gpt2kit.checkpoints.merge_adapter."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="fold LoRA adapters into a plain model checkpoint",
        description="Fold a LoRA adapter (a run directory trained with --lora-rank, or a directory holding "
                    "adapter.safetensors + adapter_config.json) into its base model and write a plain "
                    "HuggingFace-format model directory.")
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER_DIR", help="LoRA run directory (uses best/, else final/, "
                   "else the newest checkpoint) or adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the merged model")
    p.add_argument("--base", metavar="MODEL", help="base model (default: the one recorded in adapter_config.json, "
                   "refused if its weights have changed since the adapter was trained on them; --base uses the "
                   "model given, even that one)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import merge_adapter
    from gpt2kit.cli.common import setup_logging
    setup_logging()  # the warning when --base names other weights than the adapter was trained on
    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(out)
    return 0
