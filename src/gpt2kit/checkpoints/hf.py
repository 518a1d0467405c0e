"""HuggingFace GPT-2 checkpoints (config.json + model.safetensors or pytorch_model.bin) <-> our GPT.

The only layout differences between HF and gpt2kit are listed here: HF stores the four projection
matrices as Conv1D weights of shape (in, out); we use nn.Linear, (out, in). Everything else maps key
for key after dropping the optional "transformer." prefix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.is_file():
            return load_file(str(st))
        if pt.is_file():
            # weights_only: never run arbitrary pickled code from a downloaded file
            sd = torch.load(str(pt), map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(sd, dict):
                raise Gpt2kitError(f"{pt} does not hold a state dict")
            return sd
    except pickle.UnpicklingError:
        raise Gpt2kitError(f"{pt} holds objects other than tensors and was not loaded (that would run "
                           "arbitrary code); convert it to model.safetensors where you trust it") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        name = st if st.is_file() else pt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Gpt2kitError(f"cannot read weights {name}: the file is corrupt or truncated ({first}); "
                           "re-download or re-save it") from None
    raise Gpt2kitError(f"no model.safetensors or pytorch_model.bin in {path}")


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
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise Gpt2kitError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}); "
                           "it is not a complete GPT-2 checkpoint")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise Gpt2kitError(f"tensor {k} has shape {tuple(out[k].shape)} but config.json implies {shape}")
    unexpected = sorted(set(out) - set(expected))
    if unexpected:
        raise Gpt2kitError(f"checkpoint has unexpected tensor {unexpected[0]}; it is not a plain GPT-2 model")
    return out


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
    tmp = out / "model.safetensors.tmp"
    save_file(gpt2kit_to_hf(state_dict), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    cfg = config.to_hf_dict()
    cfg["dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    (out / "config.json.tmp").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "config.json.tmp").replace(out / "config.json")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
