"""GGUF files for llama.cpp (llama-cli, llama-server, llama-cpp-python), written through the `gguf` package
(the [gguf] extra) in the layout llama.cpp's own convert_hf_to_gguf.py writes for GPT2LMHeadModel:

- architecture "gpt2"; keys gpt2.{block_count, context_length, embedding_length, feed_forward_length,
  attention.head_count, attention.layer_norm_epsilon}, general.file_type, general.quantization_version;
- tensors token_embd, position_embd, output_norm and per block attn_norm, attn_qkv, attn_output, ffn_norm,
  ffn_up, ffn_down (weights and biases) in nn.Linear's (out, in) layout: HF's Conv1D weights, which
  llama.cpp's converter transposes, are stored so already. No `output` tensor: GPT-2 ties it to token_embd,
  and llama.cpp's gpt2 uses token_embd when it is absent;
- 1-D tensors and position_embd stay float32; the other weights take --outtype (q8_0 falls back to f16 for
  a tensor whose rows are not a multiple of 32, as llama.cpp does);
- tokenizer.ggml.model "gpt2", pre "gpt-2", the tokens as vocab.json spells them, token types (normal;
  <|endoftext|> control; "[PADn]" unused for rows past the vocabulary), the merges, bos/eos ids."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.tokenizer import EOT

OUTTYPES = ("f32", "f16", "q8_0")

# our key suffix -> llama.cpp's tensor name suffix, per block
_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
              "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise Gpt2kitError("--to gguf needs the gguf package: pip install 'gpt2kit[gguf]'") from None
    return gguf


def gguf_name(key: str) -> str:
    """Our state-dict key -> llama.cpp's GGUF tensor name."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    _, _, i, rest = key.split(".", 3)  # transformer.h.{i}.{module}.{weight|bias}
    module, param = rest.rsplit(".", 1)
    return f"blk.{i}.{_BLOCK_NAMES[module]}.{param}"


def _vocabulary(files: tuple[Path, Path], n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter builds them from vocab.json + merges.txt."""
    import gguf
    encoder = json.loads(files[0].read_text(encoding="utf-8"))
    by_id = {i: t for t, i in encoder.items()}
    if len(by_id) > n_rows:
        raise Gpt2kitError(f"the vocabulary has {len(by_id)} tokens but the model only {n_rows} embedding rows: "
                           "they do not belong together")
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] == EOT else gguf.TokenType.NORMAL)
    lines = files[1].read_text(encoding="utf-8").split("\n")
    merges = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return tokens, [int(t) for t in types], merges


def write_gguf(out: Path, config: GPTConfig, sd: dict[str, torch.Tensor], files: tuple[Path, Path],
               outtype: str = "f16", name: str | None = None) -> None:
    """Write `out` (a .gguf file) from our state dict and the vocabulary `files`. Written to a temporary name,
    then renamed."""
    gguf = import_gguf()
    if outtype not in OUTTYPES:
        raise Gpt2kitError(f"unknown --outtype {outtype!r}: use {', '.join(OUTTYPES)}")
    if config.activation != "gelu_new":
        raise Gpt2kitError("llama.cpp's gpt2 computes GPT-2's tanh GELU; this model uses the exact GELU (a nanoGPT "
                           "model) and would compute differently there: convert it to --to hf or ctranslate2")
    q = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    tokens, types, merges = _vocabulary(files, config.vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "gpt2")
    try:
        if name:
            w.add_name(name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(config.bos_token_id)
        w.add_eos_token_id(config.eos_token_id)
        for key, t in sd.items():
            if key == "lm_head.weight":
                continue  # tied to token_embd
            gname = gguf_name(key)
            data = t.detach().to("cpu", torch.float32).contiguous().numpy()
            qtype = q
            if data.ndim <= 1 or gname.startswith("position_embd") or not gname.endswith(".weight"):
                qtype = gguf.GGMLQuantizationType.F32
            try:
                qdata = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # rows not a multiple of the block size: as llama.cpp, float16
                qtype = gguf.GGMLQuantizationType.F16
                qdata = gguf.quants.quantize(data, qtype)
            w.add_tensor(gname, qdata, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise

