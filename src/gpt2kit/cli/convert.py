"""`gpt2kit convert SRC OUT`: any readable checkpoint to gpt2kit's HuggingFace-compatible format, or to
OpenAI's TensorFlow checkpoint layout."""

from __future__ import annotations

import argparse

FORMATS = ("hf", "openai-tf")  # gpt2kit.checkpoints.CONVERT_FORMATS, written out: importing it imports torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to gpt2kit's (HuggingFace) format or OpenAI's TF layout",
                       description="Read a HuggingFace directory, an OpenAI TensorFlow checkpoint directory, a "
                       "gpt2kit run directory or a model name, and write config.json, model.safetensors, "
                       "vocab.json and merges.txt that transformers and gpt2kit both load; or, with --to "
                       "openai-tf, OpenAI's checkpoint layout (hparams.json, model.ckpt.*, encoder.json, "
                       "vocab.bpe) that OpenAI's gpt-2 scripts, nshepperd's train.py and gpt-2-simple restore.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", choices=FORMATS, default="hf",
                   help="hf: HuggingFace format (default); openai-tf: OpenAI's TensorFlow checkpoint, float32")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep; --to hf only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import convert
    from gpt2kit.cli.common import setup_logging

    setup_logging()  # the warning for a source without vocabulary files
    out = convert(args.src, args.out, dtype=args.dtype, to=args.to)
    print(f"wrote {out}")
    return 0
