"""llm.c's GPT-2 model files (gpt2_124M.bin, model_NNNNN.bin): a header of 256 int32 (magic 20240326, version 3
float32 or 5 bfloat16, max_seq_len, vocab_size, num_layers, num_heads, channels, padded_vocab_size), then every
parameter, each per-layer tensor stored for all layers in a row, in this order: wte (padded_vocab_size rows),
wpe, ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb, lnfw, lnfb. Weights
are in nn.Linear's (out, in) layout, ours. llm.c's MLP is 4 * channels wide, its GELU the tanh form and its
LayerNorm epsilon 1e-5.

llm.c pads the vocabulary with zero rows it never samples from: reading keeps vocab_size rows (the rest are
no model's tokens); writing pads to a multiple of 128 as llm.c's own export does."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import LLMC_MAGIC, LLMC_OTHER_MAGICS, is_llmc_file  # noqa: F401  (also read from here)
from gpt2kit.layout import llmc_magic as _magic

_OTHER_MAGICS = LLMC_OTHER_MAGICS

MAGIC = LLMC_MAGIC
VERSIONS = {3: torch.float32, 5: torch.bfloat16}
HEADER_INTS = 256
# per-layer tensors, in llm.c's order
_LAYER_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")


def _shapes(c: GPTConfig, vp: int) -> list[tuple[str, tuple[int, ...]]]:
    """(our key, shape) for every tensor in llm.c's order; per-layer names carry {i}."""
    d, L = c.n_embd, c.n_layer
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (3 * d, d),
                 "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                 "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
                 "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}
    out = [("transformer.wte.weight", (vp, d)), ("transformer.wpe.weight", (c.n_positions, d))]
    out += [(f"transformer.h.{{i}}.{n}", (L, *per_layer[n])) for n in _LAYER_TENSORS]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def read_llmc(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our layout, vocab_size rows of wte) from an llm.c model file."""
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= 4 * HEADER_INTS else None
    magic = _magic(path)
    if magic in _OTHER_MAGICS:
        raise Gpt2kitError(f"{path} is {_OTHER_MAGICS[magic]}")
    if header is None or magic != MAGIC:
        raise Gpt2kitError(f"{path} is not an llm.c model file (no 1024-byte header with magic {MAGIC})")
    version = int(header[1])
    if version not in VERSIONS:
        raise Gpt2kitError(f"{path}: llm.c model version {version} is not one gpt2kit reads (3: float32, "
                           "5: bfloat16); re-export it with llm.c's train_gpt2.py")
    max_t, v, n_layer, n_head, d, vp = (int(x) for x in header[2:8])
    if not 0 < v <= vp:
        raise Gpt2kitError(f"{path}: header gives vocab_size {v} and padded_vocab_size {vp}; the file is damaged")
    try:
        config = GPTConfig(vocab_size=v, n_positions=max_t, n_embd=d, n_layer=n_layer, n_head=n_head)
    except Gpt2kitError as e:
        raise Gpt2kitError(f"{path}: the header is not a GPT-2 model's ({e}); the file is damaged") from None
    dtype = VERSIONS[version]
    shapes = _shapes(config, vp)
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    expect = 4 * HEADER_INTS + n_params * dtype.itemsize
    if size != expect:
        raise Gpt2kitError(f"{path} holds {size} bytes, but its header describes {expect} (a {n_layer}-layer, "
                           f"{d}-wide model); the file is truncated or damaged")
    # (n_params,) view of the file after the header, without reading it all twice
    flat = torch.from_file(str(path), shared=False, size=(size // dtype.itemsize), dtype=dtype)
    flat = flat[4 * HEADER_INTS // dtype.itemsize:]
    sd: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        t = flat[offset:offset + n].view(shape)
        offset += n
        if "{i}" in name:
            for i in range(n_layer):
                sd[name.format(i=i)] = t[i]
        else:
            sd[name] = t
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:v]  # llm.c's padding rows are no tokens
    return config, sd


def write_llmc(out: Path, config: GPTConfig, sd: dict[str, torch.Tensor], n_vocab: int | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write an llm.c model file (version 3 float32, or 5 bfloat16). `n_vocab` is the tokenizer's size, the
    vocab_size in the header when the model's rows are padded past it; the rows are padded with zeros to a
    multiple of 128, as llm.c's export pads them. Written to a temporary name, then renamed."""
    version = {v: k for k, v in VERSIONS.items()}.get(dtype)
    if version is None:
        raise Gpt2kitError("llm.c model files hold float32 or bfloat16 weights: use --dtype float32 or bfloat16")
    if config.n_inner != 4 * config.n_embd:
        raise Gpt2kitError(f"llm.c's MLP is 4 * n_embd wide; this model's is {config.n_inner}, which llm.c cannot hold")
    if config.activation != "gelu_new":
        raise Gpt2kitError("llm.c computes GPT-2's tanh GELU; this model uses the exact GELU (a nanoGPT model) and "
                           "would compute differently there: convert it to --to hf or ctranslate2 instead")
    if config.layer_norm_epsilon != 1e-5:
        raise Gpt2kitError(f"llm.c's LayerNorm epsilon is 1e-5; this model's is {config.layer_norm_epsilon}")
    v_model = config.vocab_size
    v = min(n_vocab, v_model) if n_vocab else v_model
    vp = -(-v_model // 128) * 128
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [MAGIC, version, config.n_positions, v, config.n_layer, config.n_head, config.n_embd, vp]
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            for name, shape in _shapes(config, vp):
                if "{i}" in name:
                    t = torch.stack([sd[name.format(i=i)] for i in range(config.n_layer)])
                else:
                    t = sd[name]
                if name == "transformer.wte.weight" and vp > v_model:
                    t = torch.cat([t, t.new_zeros(vp - v_model, t.shape[1])])
                assert tuple(t.shape) == shape, (name, t.shape, shape)
                t = t.detach().to("cpu", dtype).contiguous()
                # numpy has no bfloat16: the same bytes as int16
                f.write((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy().tobytes())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
