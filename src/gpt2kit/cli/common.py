"""Flags and helpers shared by the verb modules."""

from __future__ import annotations

import argparse
import logging
import sys


def add_model_args(p: argparse.ArgumentParser, default: str | None = "gpt2") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=default,
                   help="a model directory, a gpt2kit run directory, or a name (gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl, distilgpt2, org/name) downloaded from the Hugging Face Hub"
                        + (f" (default {default})" if default else ""))
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default auto)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto (bfloat16 on a GPU that has it, else float32)")
    g.add_argument("--tokenizer", help="a folder with vocab.json + merges.txt (default: the model's own)")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=("int8",),
                   help="int8: decode with int8 copies of the weights (CPU kernel only; ~1.7x the tokens/s of "
                        "float32 at batch 1, outputs drift slightly; prompts are still read in float32)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a handler made once per process must follow it when it
    is replaced, as pytest's capture and callers redirecting stderr do)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ("warning: " if record.levelno >= logging.WARNING else "note: ") + record.getMessage()


def setup_logging(speak: bool = True) -> None:
    """Library notices (logger 'gpt2kit') go to stderr as one line each, "note: ..." or "warning: ...".
    speak=False keeps only errors (the processes of a torchrun job besides the first)."""
    log = logging.getLogger("gpt2kit")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(_Formatter())
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if speak else logging.ERROR)


def load_generator(args: argparse.Namespace):
    from gpt2kit.generate import Generator

    return Generator.load(args.model, device=args.device, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                          quantize=getattr(args, "quantize", None))
