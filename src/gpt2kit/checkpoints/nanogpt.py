"""nanoGPT's training checkpoints (`ckpt.pt`): torch.save of {"model": state dict, "model_args": {n_layer,
n_head, n_embd, block_size, bias, vocab_size, dropout}, "optimizer", "iter_num", "best_val_loss", "config"}.

nanoGPT's model differs from GPT-2 in three ways, each mapped here:
- its MLP uses the exact GELU (nn.GELU()), so the config says activation="gelu";
- with bias=False its LayerNorms and Linears have no bias: zero biases compute the same, and keep the model
  readable by everything that expects GPT-2's tensors (HF, OpenAI TF, llm.c, GGUF, CTranslate2);
- its vocabulary is often padded to 50,304 rows: they are kept, as nanoGPT computes over them too.
Its weights are nn.Linear (out, in), our layout; torch.compile adds "_orig_mod." to every key."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from gpt2kit.checkpoints.hf import check_state_dict
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import could_be_nanogpt  # noqa: F401  (also read from here)

_BIASES = ("ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


def _load(path: Path) -> Any:
    try:
        # weights_only: never run pickled code; a nanoGPT checkpoint holds only tensors, numbers, strings
        # and dicts. mmap: the optimizer state, twice the model's size, is never read
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise Gpt2kitError(f"{path} holds objects other than tensors and was not loaded (that would run "
                               "arbitrary code); re-save its ['model'] and ['model_args'] where you trust it") from None
        raise Gpt2kitError(f"cannot read {path}: the file is corrupt or truncated ({e})") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Gpt2kitError(f"cannot read {path}: the file is corrupt or truncated ({first})") from None


def read_nanogpt(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our layout) from a nanoGPT ckpt.pt."""
    ckpt = _load(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("model_args"), dict)):
        raise Gpt2kitError(f"{path} is a PyTorch file but not a nanoGPT checkpoint (no 'model' and 'model_args'); "
                           "gpt2kit reads nanoGPT's ckpt.pt, llm.c's .bin, or a model directory")
    args = ckpt["model_args"]
    try:
        config = GPTConfig(vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
                           n_layer=args["n_layer"], n_head=args["n_head"], activation="gelu")
    except KeyError as e:
        raise Gpt2kitError(f"{path}: model_args has no {e.args[0]!r}; it is not a nanoGPT GPT checkpoint") from None
    except Gpt2kitError as e:
        raise Gpt2kitError(f"{path}: model_args: {e}") from None
    sd: dict[str, torch.Tensor] = {}
    for k, v in ckpt["model"].items():
        k = k.removeprefix("_orig_mod.")  # torch.compile's wrapper
        if k == "lm_head.weight" or k.endswith(".attn.bias"):
            continue  # tied to wte; the causal-mask buffer of nanoGPT without flash attention
        sd[k] = v
    if not args.get("bias", True):  # bias=False: no bias anywhere; zeros compute the same
        d = config.n_embd
        zeros = {"ln_1.bias": d, "ln_2.bias": d, "attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d,
                 "mlp.c_fc.bias": config.n_inner, "mlp.c_proj.bias": d}
        dtype = sd["transformer.wte.weight"].dtype if "transformer.wte.weight" in sd else torch.float32
        for i in range(config.n_layer):
            for name in _BIASES:
                sd.setdefault(f"transformer.h.{i}.{name}", torch.zeros(zeros[name], dtype=dtype))
        sd.setdefault("transformer.ln_f.bias", torch.zeros(d, dtype=dtype))
    check_state_dict(sd, config, implied_by="model_args")
    return config, sd
