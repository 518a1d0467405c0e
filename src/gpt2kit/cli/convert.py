"""`gpt2kit convert SRC OUT`: any readable checkpoint to gpt2kit's HuggingFace-compatible format, OpenAI's
TensorFlow checkpoint layout, an llm.c model file, a GGUF file (llama.cpp) or a CTranslate2 model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2kit.layout import CONVERT_FORMATS as FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to gpt2kit's (HuggingFace) format, OpenAI's TF layout, "
                       "llm.c, GGUF or CTranslate2",
                       description="Read a HuggingFace directory, an OpenAI TensorFlow checkpoint directory, a "
                       "gpt2kit run directory, a nanoGPT ckpt.pt, an llm.c model .bin or a model name, and write "
                       "config.json, model.safetensors, vocab.json and merges.txt that transformers and gpt2kit "
                       "both load; or, with --to openai-tf, OpenAI's checkpoint layout (hparams.json, model.ckpt.*, "
                       "encoder.json, vocab.bpe) that OpenAI's gpt-2 scripts, nshepperd's train.py and gpt-2-simple "
                       "restore; --to llmc, an llm.c model file (OUT.bin); --to gguf, a GGUF file (OUT.gguf) for "
                       "llama.cpp; --to ctranslate2, a CTranslate2 model directory.")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", choices=FORMATS, default=None,
                   help="hf: HuggingFace format (default; gguf when OUT ends in .gguf, llmc when it ends in .bin); "
                   "openai-tf: OpenAI's TensorFlow checkpoint, float32; "
                   "llmc: llm.c model file; gguf: llama.cpp (needs gpt2kit[gguf]); ctranslate2: CTranslate2 "
                   "(needs gpt2kit[ctranslate2])")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep; --to hf only); "
                   "float32 (default) or bfloat16 with --to llmc")
    p.add_argument("--outtype", default=None, choices=("f32", "f16", "q8_0"),
                   help="--to gguf: the stored type of the weight matrices (default f16, as llama.cpp's converter)")
    p.add_argument("--quantization", default=None,
                   choices=("int8", "int8_float32", "int16", "float16", "bfloat16", "float32"),
                   help="--to ctranslate2: the weights' type (default: float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoints import convert
    from gpt2kit.cli.common import setup_logging
    from gpt2kit.errors import Gpt2kitError

    setup_logging()  # the warning for a source without vocabulary files
    # without --to, the format OUT's name asks for
    to = args.to or {".gguf": "gguf", ".bin": "llmc"}.get(Path(args.out).suffix.lower(), "hf")
    for flag, value, target in (("--outtype", args.outtype, "gguf"), ("--quantization", args.quantization,
                                                                      "ctranslate2")):
        if value is not None and to != target:
            raise Gpt2kitError(f"{flag} is for --to {target}, and this writes --to {to}: drop {flag}, or add "
                               f"--to {target}")
    if args.to is None and to != "hf":
        print(f"note: writing {'a GGUF file' if to == 'gguf' else 'an llm.c model file'} (OUT ends in "
              f"{Path(args.out).suffix}; --to hf writes a HuggingFace folder of that name)", file=sys.stderr)
    out = convert(args.src, args.out, dtype=args.dtype, to=to, outtype=args.outtype or "f16",
                  quantization=args.quantization)
    print(f"wrote {out}")
    return 0
