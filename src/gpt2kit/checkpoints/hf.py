"""HuggingFace GPT-2 checkpoints (config.json + model.safetensors or pytorch_model.bin, either one file or
sharded behind an *.index.json) <-> our GPT.

The only layout differences between HF and gpt2kit are listed here: HF stores the four projection
matrices as Conv1D weights of shape (in, out); we use nn.Linear, (out, in). Everything else maps key
for key after dropping the optional "transformer." prefix."""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import INDEX_FILES, WEIGHT_FILES, is_hf_dir, shard_names, weights_source  # noqa: F401  (also read from here)
from gpt2kit.weights_io import save_safetensors

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    src = weights_source(path)
    if src is None:
        raise Gpt2kitError(f"no model.safetensors or pytorch_model.bin (or a sharded index of them) in {path}")
    if not src.name.endswith(".index.json"):
        return _read_weights_file(src)
    sd: dict[str, torch.Tensor] = {}
    for name in shard_names(src):
        shard = path / name
        if not shard.is_file():
            raise Gpt2kitError(f"shard {name} named by {src} is missing; download or copy every shard into {path}")
        sd.update(_read_weights_file(shard))
    return sd


def load_pickle(f: Path, map_location: str | torch.device = "cpu", mmap: bool = False):
    """torch.load with weights_only (never run arbitrary pickled code from a file) and without torch's
    warnings about the file's pickle (such as "Detected pickle protocol 4"): a file it cannot read fails,
    and the caller turns that into its own one-line error, which the warning would only precede."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(f), map_location=map_location, weights_only=True, mmap=mmap)


def _read_weights_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.name.endswith(".safetensors"):
            return load_file(str(f))
        # mmap needs the zip format torch >= 1.6 writes; older (legacy) pickles are read whole.
        sd = load_pickle(f, mmap=zipfile.is_zipfile(f))
    # a damaged pickle fails in many ways: an unknown opcode (UnpicklingError), a bad memo key (KeyError), ...
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError,
            IndexError, TypeError, AttributeError, MemoryError) as e:
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise Gpt2kitError(f"{f} holds objects other than tensors and was not loaded (that would run "
                               "arbitrary code); convert it to model.safetensors where you trust it") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raw = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))  # a pickle opcode torch's format never uses
        if raw:
            raise Gpt2kitError(f"cannot read weights {f}: the file is corrupt or truncated, or a raw pickle "
                               f"rather than what torch.save writes ({raw.group(1).strip()}); re-download or "
                               "re-save it") from None
        raise Gpt2kitError(f"cannot read weights {f}: the file is corrupt or truncated ({first}); "
                           "re-download or re-save it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise Gpt2kitError(f"{f} does not hold a state dict of tensors")
    return sd


def hf_to_gpt2kit(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF (or OpenAI-TF-converted) tensors -> our state dict, shapes checked."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers of old HF files; lm_head is tied to wte
        if k.endswith(CONV1D_SUFFIXES):
            v = v.t()
        out["transformer." + k] = v
    check_state_dict(out, config)
    return out


def check_state_dict(out: dict[str, torch.Tensor], config: GPTConfig, implied_by: str = "config.json") -> None:
    """Every tensor of our layout present with the shape `config` implies, and nothing else."""
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise Gpt2kitError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}); "
                           "it is not a complete GPT-2 checkpoint")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise Gpt2kitError(f"tensor {k} has shape {tuple(out[k].shape)} but {implied_by} implies {shape}")
    unexpected = sorted(set(out) - set(expected))
    if unexpected:
        raise Gpt2kitError(f"checkpoint has unexpected tensor {unexpected[0]}; it is not a plain GPT-2 model")


def gpt2kit_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied; HF's save_pretrained leaves it out too
        if k.endswith(CONV1D_SUFFIXES):
            v = v.t()
        out[k] = v.detach().contiguous()
    return out


def _expected_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, f = c.n_embd, c.n_inner
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (c.vocab_size, d), "transformer.wpe.weight": (c.n_positions, d),
        "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
    }
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "mlp.c_fc.weight": (f, d), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (d, f), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def write_hf_dir(out: Path, config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors (float weights kept in their dtype), loadable by
    transformers.GPT2LMHeadModel.from_pretrained. Written to temporary names, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(gpt2kit_to_hf(state_dict), out / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_hf_dict()
    cfg["dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    (out / "config.json.tmp").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "config.json.tmp").replace(out / "config.json")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
