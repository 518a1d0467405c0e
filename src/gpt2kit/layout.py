"""What is on disk, by name alone: the file names gpt2kit reads and writes, and predicates that say what a
path holds (a HuggingFace model directory, an OpenAI TensorFlow checkpoint, a nanoGPT or llm.c file, a LoRA
adapter, a gpt2kit run) without loading torch or any weights. Config parsing and the CLI use it before the
model is imported; the readers in gpt2kit.checkpoints use it to pick a format.

A run directory (see gpt2kit.runs for what each entry holds):

    RUN/run.json  config.json  metrics.jsonl  samples/  loss.png  tokenizer/  data/  tensorboard/
        checkpoints/step-N/    a model (or a LoRA adapter), plus trainer.pt once it can be resumed from
        best/  final/          models
        .lock"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from gpt2kit.errors import Gpt2kitError

# ---- HuggingFace model directories -------------------------------------------------------------------

CONFIG_JSON = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What save_pretrained(max_shard_size=...) writes instead of one weights file: an index whose weight_map
# names the shard file holding each tensor.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG_JSON).is_file() and any((path / f).is_file() for f in WEIGHT_FILES + INDEX_FILES)


def weights_source(path: Path) -> Path | None:
    """The file that holds (or indexes) the weights, in order of preference: safetensors before the pickle,
    a single file before an index."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return path / name
    return None


def shard_names(index: Path) -> list[str]:
    """The shard files an index names, in first-use order, each checked to be a plain name in its folder."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Gpt2kitError(f"cannot read shard index {index}: {e}; re-download or re-save the model") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise Gpt2kitError(f"shard index {index} has no weight_map of tensor names to shard files; "
                           "re-download or re-save the model")
    names = list(dict.fromkeys(wmap.values()))
    for n in names:
        if Path(n).name != n or n in (".", ".."):
            raise Gpt2kitError(f"shard index {index} names {n!r}, which is not a file beside it; "
                               "re-download or re-save the model")
    return names


# ---- OpenAI's TensorFlow checkpoints -----------------------------------------------------------------

HPARAMS_JSON = "hparams.json"


def is_openai_tf_dir(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir() or not (path / HPARAMS_JSON).is_file():
        return False
    return (path / "checkpoint").is_file() or any(p.is_file() for p in path.glob("*.index"))


# ---- single-file checkpoints of other trainers -------------------------------------------------------

LLMC_MAGIC = 20240326  # the first int32 of an llm.c model file
# llm.c's other files, named in the error when one is passed as a model
LLMC_OTHER_MAGICS = {20240520: "an llm.c token shard (training data; pass it as --data)",
                     20240327: "an llm.c debug state file, not a model",
                     20240328: "an llm.c tokenizer file, not a model"}


def llmc_magic(path: Path) -> int | None:
    """The little-endian int32 a file starts with, or None (unreadable, shorter than 4 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return struct.unpack("<i", head)[0] if len(head) == 4 else None


def is_llmc_file(path: Path) -> bool:
    """A file that starts with one of llm.c's magic numbers (a model, or one read_llmc names as not one)."""
    return path.is_file() and (llmc_magic(path) == LLMC_MAGIC or llmc_magic(path) in LLMC_OTHER_MAGICS)


def could_be_nanogpt(path: Path) -> bool:
    """A file torch.save wrote (a zip archive), which read_nanogpt tells apart from other such files."""
    return path.is_file() and zipfile.is_zipfile(path)


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (is_hf_dir(path) or is_openai_tf_dir(path))


def is_model_file(path: Path) -> bool:
    """A single-file checkpoint of another trainer: nanoGPT's ckpt.pt (a torch.save archive) or llm.c's .bin
    (read_checkpoint says which, or why it is neither)."""
    return path.is_file() and (is_llmc_file(path) or could_be_nanogpt(path))


# what `gpt2kit convert --to` writes (read by the CLI parser, which must not import torch)
CONVERT_FORMATS = ("hf", "openai-tf", "llmc", "gguf", "ctranslate2")


# ---- vocabularies ------------------------------------------------------------------------------------

VOCAB_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))  # HF's names, OpenAI's


def find_vocab_files(directory: str | Path) -> tuple[Path, Path] | None:
    d = Path(directory)
    for enc, merges in VOCAB_FILE_PAIRS:
        if (d / enc).is_file() and (d / merges).is_file():
            return d / enc, d / merges
    return None


# ---- LoRA adapters -----------------------------------------------------------------------------------

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_WEIGHTS).is_file() and (p / ADAPTER_CONFIG).is_file()


# ---- run directories ---------------------------------------------------------------------------------

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"  # in a checkpoint: what --resume restarts from
BEST, FINAL = "best", "final"
LOCK = ".lock"
# what a run writes at its top level; runs.remove_run deletes these and nothing else
RUN_ENTRIES = (RUN_JSON, CONFIG_JSON, METRICS, "loss.png", "samples", "tokenizer", "data", CHECKPOINTS, BEST,
               FINAL, "tensorboard")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_JSON).is_file()


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """A run's checkpoints, (step, path) oldest first: its checkpoints/step-N directories. A checkpoint being
    written lives under a temporary name (.tmp-step-N) and is never listed. What a caller needs of one is
    checked by that caller: trainer.pt to resume from it (runs.checkpoint_dirs), a model to load it
    (run_model_dir), an adapter (runs.adapter_only_checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        name = p.name
        if name.startswith("step-") and name[5:].isdigit() and p.is_dir():
            out.append((int(name[5:]), p))
    return sorted(out)


def is_resumable(checkpoint: Path) -> bool:
    """A checkpoint that holds the trainer state --resume reads (not only a model)."""
    return (checkpoint / TRAINER_STATE).is_file()


def run_model_dir(path: Path) -> Path | None:
    """A gpt2kit run directory (has run.json): its best model if validation picked one, else its final
    model, else its newest checkpoint that holds a model. None for any other path."""
    if not is_run_dir(path):
        return None
    for sub in (BEST, FINAL):
        if is_model_dir(path / sub):
            return path / sub
    for _, c in reversed(checkpoint_dirs(path)):
        if is_model_dir(c):
            return c
    if any((c / "sharded").is_dir() for _, c in checkpoint_dirs(path)):  # (train/fsdp.py's SHARDS)
        raise Gpt2kitError(f"run directory {path} has no saved model yet: no best/ or final/, and its checkpoints "
                           "hold --fsdp shards, not a model; resume it (under torchrun) to write final/")
    raise Gpt2kitError(f"run directory {path} has no saved model yet (no best/, final/ or checkpoints/)")
