"""`gpt2kit convert SRC OUT`: any readable checkpoint to gpt2kit's HuggingFace-compatible format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to gpt2kit's (HuggingFace) format",
                       description="Read a HuggingFace directory, an OpenAI TensorFlow checkpoint directory, a "
                       "gpt2kit run directory or a model name, and write config.json, model.safetensors, "
                       "vocab.json and merges.txt that transformers and gpt2kit both load.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import convert

    out = convert(args.src, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
