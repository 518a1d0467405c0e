"""CTranslate2 model directories (model.bin, config.json, vocabulary.json), written by CTranslate2's own
TransformersConverter (the [ctranslate2] extra, which needs transformers) from a HuggingFace directory that
gpt2kit writes first into a temporary directory. Its GPT-2 loader honours activation_function, so nanoGPT's
exact GELU carries over."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gpt2kit.checkpoints.hf import write_hf_dir
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError

QUANTIZATIONS = ("int8", "int8_float32", "int16", "float16", "bfloat16", "float32")
# what the converter writes into its output directory
FILES = ("model.bin", "vocabulary.json", "vocabulary.txt", "config.json")


def write_ctranslate2(out: Path, config: GPTConfig, sd: dict[str, torch.Tensor], files: tuple[Path, Path],
                      quantization: str | None = None) -> None:
    """Convert our model into `out` (an existing empty directory). quantization None keeps float32."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise Gpt2kitError(f"unknown --quantization {quantization!r}: use {', '.join(QUANTIZATIONS)}")
    try:
        import transformers  # noqa: F401  (the converter loads the model with it)
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise Gpt2kitError("--to ctranslate2 needs ctranslate2 and transformers: "
                           "pip install 'gpt2kit[ctranslate2]'") from None
    with tempfile.TemporaryDirectory(prefix="gpt2kit-ct2-") as tmp:
        hf = Path(tmp)
        write_hf_dir(hf, config, {k: v.float() for k, v in sd.items()})
        (hf / "vocab.json").write_bytes(files[0].read_bytes())
        (hf / "merges.txt").write_bytes(files[1].read_bytes())
        # force: `out` is the empty directory convert made (and checked) for it
        TransformersConverter(str(hf)).convert(str(out), quantization=quantization, force=True)
