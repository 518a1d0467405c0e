"""Other tools' checkpoints: nanoGPT's ckpt.pt and llm.c's model files read (each built here in that tool's own
layout and checked against transformers on the same weights), and llm.c, GGUF and CTranslate2 written."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from gpt2kit.checkpoints import convert, load_model, save_model
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from tests.conftest import VOCAB_DIR, random_model

transformers = pytest.importorskip("transformers")

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])


def hf_model(sd: dict[str, torch.Tensor], config: GPTConfig, activation: str) -> transformers.GPT2LMHeadModel:
    """transformers' GPT-2 on weights given in nn.Linear layout (ours, nanoGPT's and llm.c's)."""
    hf_cfg = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                     n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                     activation_function=activation, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    m = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf_sd = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    m.load_state_dict(hf_sd, strict=False)
    m.tie_weights()
    return m


def logits_equal(ours: torch.nn.Module, ref: transformers.GPT2LMHeadModel) -> None:
    with torch.no_grad():
        a, b = ours(IDS), ref(IDS).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ---- nanoGPT ----------------------------------------------------------------------------------------------

def nanogpt_state(bias: bool, vocab: int = 50304, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """A nanoGPT model's state dict as its GPT class names it (nn.Linear weights, a tied lm_head.weight; with
    bias=False no bias tensor at all), random values; and its model_args."""
    g = torch.Generator().manual_seed(seed)
    L, d, T = 2, 64, 32

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"transformer.wte.weight": r(vocab, d), "transformer.wpe.weight": r(T, d)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(d) / 2, p + "attn.c_attn.weight": r(3 * d, d),
                   p + "attn.c_proj.weight": r(d, d), p + "ln_2.weight": 1 + r(d) / 2,
                   p + "mlp.c_fc.weight": r(4 * d, d), p + "mlp.c_proj.weight": r(d, 4 * d)})
        if bias:
            sd.update({p + "ln_1.bias": r(d), p + "attn.c_attn.bias": r(3 * d), p + "attn.c_proj.bias": r(d),
                       p + "ln_2.bias": r(d), p + "mlp.c_fc.bias": r(4 * d), p + "mlp.c_proj.bias": r(d)})
    sd["transformer.ln_f.weight"] = 1 + r(d) / 2
    if bias:
        sd["transformer.ln_f.bias"] = r(d)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    args = dict(n_layer=L, n_head=4, n_embd=d, block_size=T, bias=bias, vocab_size=vocab, dropout=0.0)
    return args, sd


def save_nanogpt(path, args, sd, compiled: bool) -> None:
    """What nanoGPT's train.py saves (raw_model.state_dict() keeps torch.compile's _orig_mod. prefix)."""
    model = {("_orig_mod." + k if compiled else k): v for k, v in sd.items()}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
           "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": [0]}]}
    torch.save({"model": model, "optimizer": opt, "model_args": args, "iter_num": 5000,
                "best_val_loss": torch.tensor(2.9), "config": {"dataset": "openwebtext", "compile": compiled}},
               path)


@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_checkpoint_computes_as_transformers_with_exact_gelu(tmp_path, bias, compiled):
    args, sd = nanogpt_state(bias)
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    save_nanogpt(path, args, sd, compiled)
    model, tok = load_model(path, device="cpu", dtype="float32")
    assert model.config.activation == "gelu" and model.config.vocab_size == 50304  # padded rows kept
    assert tok.vocab_size == 50257
    full = dict(sd)
    for k, v in model.state_dict().items():  # bias=False: zero biases
        full.setdefault(k, v)
    if not bias:
        assert all(not v.any() for k, v in model.state_dict().items() if k.endswith(".bias"))
    logits_equal(model, hf_model(full, model.config, "gelu"))
    # tanh GELU would differ: the activation matters
    with pytest.raises(AssertionError):
        logits_equal(model, hf_model(full, model.config, "gelu_new"))

    # its HF export says "gelu", and transformers loads it to the same logits
    out = convert(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    assert (out / "vocab.json").is_file()
    logits_equal(model, transformers.GPT2LMHeadModel.from_pretrained(out).eval())
    again, _ = load_model(out, device="cpu", dtype="float32")
    assert again.config.activation == "gelu"
    logits_equal(again, hf_model(full, model.config, "gelu"))


def test_nanogpt_exact_gelu_survives_fast_paths(tmp_path, capsys):
    """The CPU kernels compute the tanh GELU only: a gelu model must not be given them."""
    from gpt2kit import kernels
    args, sd = nanogpt_state(True)
    save_nanogpt(tmp_path / "ckpt.pt", args, sd, False)
    model, _ = load_model(tmp_path / "ckpt.pt", device="cpu", dtype="float32")
    assert not kernels.DecodeStep.for_model(model)
    from gpt2kit.generate import Generator
    gen = Generator.load(tmp_path / "ckpt.pt", device="cpu", dtype="float32")
    ids = gen.model(IDS)[0, -1].argmax().item()  # the decode step agrees with the full forward
    ref = hf_model(dict(sd), model.config, "gelu")
    with torch.no_grad():
        assert ids == ref(IDS).logits[0, -1].argmax().item()
    # the CLI takes the file as --model and says which vocabulary it used
    assert main(["generate", "Hello", "-m", str(tmp_path / "ckpt.pt"), "--length", "3", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note:" in err and "using GPT-2's own" in err, err


def test_nanogpt_unsafe_pickle_and_foreign_files_are_one_line_errors(tmp_path, capsys):
    args, sd = nanogpt_state(True, vocab=64)
    bad = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "model_args": args, "config": _Evil()}, bad)
    with pytest.raises(Gpt2kitError, match="objects other than tensors"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    assert main(["generate", "hi", "-m", str(other)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a nanoGPT checkpoint" in err
    char = tmp_path / "char.pt"  # nanoGPT's shakespeare_char: 65 tokens of its own
    save_nanogpt(char, dict(args, vocab_size=65), nanogpt_state(True, vocab=65)[1], False)
    with pytest.raises(Gpt2kitError, match="vocabulary of its own"):
        load_model(char)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


# ---- llm.c ------------------------------------------------------------------------------------------------

LLMC_ORDER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")


def llmc_bytes(sd: dict[str, torch.Tensor], config: GPTConfig, version: int = 3) -> bytes:
    """An llm.c model file as llm.c's train_gpt2.py write_model lays it out: the int32 header, then wte padded
    with zero rows to a multiple of 128, wpe, each per-layer tensor for every layer in turn, ln_f."""
    V, L = config.vocab_size, config.n_layer
    Vp = (V + 127) // 128 * 128
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [20240326, version, config.n_positions, V, L, config.n_head, config.n_embd, Vp]
    wte = torch.nn.functional.pad(sd["transformer.wte.weight"], (0, 0, 0, Vp - V))
    tensors = [wte, sd["transformer.wpe.weight"]]
    for name in LLMC_ORDER:
        tensors += [sd[f"transformer.h.{i}.{name}"] for i in range(L)]
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    dt = torch.float32 if version == 3 else torch.bfloat16
    body = b"".join(t.to(dt).contiguous().view(torch.int16 if version == 5 else torch.float32).numpy().tobytes()
                    for t in tensors)
    return header.tobytes() + body


@pytest.fixture(scope="module")
def tiny_gpt() -> torch.nn.Module:
    return random_model(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128), std=0.2)


def test_llmc_model_file_computes_as_transformers(tmp_path, tiny_gpt):
    sd = {k: v for k, v in tiny_gpt.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "gpt2_tiny.bin"
    path.write_bytes(llmc_bytes(sd, tiny_gpt.config))
    model, tok = load_model(path, device="cpu", dtype="float32")
    assert model.config.vocab_size == 50257 and model.config.activation == "gelu_new" and tok.vocab_size == 50257
    logits_equal(model, hf_model(sd, tiny_gpt.config, "gelu_new"))
    # bfloat16 (version 5): the same weights, rounded
    path5 = tmp_path / "gpt2_tiny_bf16.bin"
    path5.write_bytes(llmc_bytes(sd, tiny_gpt.config, version=5))
    m5, _ = load_model(path5, device="cpu", dtype="float32")
    for k, v in m5.state_dict().items():
        torch.testing.assert_close(v, sd.get(k, sd["transformer.wte.weight"]).to(torch.bfloat16).float())


def test_convert_to_llmc_writes_llmcs_own_layout(tmp_path, tiny_model_dir, tiny_gpt, capsys):
    src = save_model(tiny_gpt, None, tmp_path / "src")
    for f in ("vocab.json", "merges.txt"):
        (src / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert main(["convert", str(src), str(tmp_path / "m.bin"), "--to", "llmc"]) == 0
    sd = {k: v for k, v in tiny_gpt.state_dict().items() if k != "lm_head.weight"}
    assert (tmp_path / "m.bin").read_bytes() == llmc_bytes(sd, tiny_gpt.config)  # byte for byte
    assert main(["convert", str(src), str(tmp_path / "m5.bin"), "--to", "llmc", "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "m5.bin").read_bytes() == llmc_bytes(sd, tiny_gpt.config, version=5)
    # OUT's name picks the format when --to is left out (a note says so); --to hf keeps the folder
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "named.bin")]) == 0
    assert (tmp_path / "named.bin").read_bytes() == llmc_bytes(sd, tiny_gpt.config)
    assert "note: writing an llm.c model file (OUT ends in .bin" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "folder.bin"), "--to", "hf"]) == 0
    assert (tmp_path / "folder.bin" / "config.json").is_file()
    # a format's own option under another format is an error, not ignored
    assert main(["convert", str(src), str(tmp_path / "q"), "--outtype", "q8_0"]) == 1
    assert capsys.readouterr().err == ("error: --outtype is for --to gguf, and this writes --to hf: drop --outtype, "
                                       "or add --to gguf\n")
    assert main(["convert", str(src), str(tmp_path / "q.bin"), "--quantization", "int8"]) == 1
    assert capsys.readouterr().err.startswith("error: --quantization is for --to ctranslate2, and this writes --to "
                                              "llmc")  # (the error alone, no note before it)
    # a padded vocabulary: header vocab_size is the tokenizer's, the rows are kept
    from tests.conftest import padded_vocab_model
    padded = save_model(padded_vocab_model(), None, tmp_path / "padded")
    for f in ("vocab.json", "merges.txt"):
        (padded / f).write_bytes((tiny_model_dir / f).read_bytes())
    convert(padded, tmp_path / "p.bin", to="llmc")
    header = np.fromfile(tmp_path / "p.bin", dtype=np.int32, count=8)
    assert list(header[[3, 7]]) == [50257, 50304]
    capsys.readouterr()
    # the output is never overwritten; an exact-GELU model cannot go to llm.c
    assert main(["convert", str(src), str(tmp_path / "m.bin"), "--to", "llmc"]) == 1
    assert "already exists" in capsys.readouterr().err
    args, nsd = nanogpt_state(True)
    save_nanogpt(tmp_path / "ckpt.pt", args, nsd, False)
    with pytest.raises(Gpt2kitError, match="tanh GELU"):
        convert(tmp_path / "ckpt.pt", tmp_path / "n.bin", to="llmc")
    assert not (tmp_path / "n.bin").exists() and not (tmp_path / "n.bin.tmp").exists()


def test_llmc_token_shard_and_damaged_files_are_clear_errors(tmp_path, tiny_gpt):
    shard = tmp_path / "train_000.bin"
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, 3]
    shard.write_bytes(header.tobytes() + np.array([1, 2, 3], dtype=np.uint16).tobytes())
    with pytest.raises(Gpt2kitError, match="token shard"):
        load_model(shard)
    sd = {k: v for k, v in tiny_gpt.state_dict().items() if k != "lm_head.weight"}
    cut = tmp_path / "cut.bin"
    cut.write_bytes(llmc_bytes(sd, tiny_gpt.config)[:-100])
    with pytest.raises(Gpt2kitError, match="truncated"):
        load_model(cut)


# ---- GGUF -------------------------------------------------------------------------------------------------

def _gguf_field(reader, key):
    f = reader.fields[key]
    if len(f.types) == 1 and f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0].name == "ARRAY":
        vals = [f.parts[i] for i in f.data]
        return [bytes(v).decode() for v in vals] if f.types[-1].name == "STRING" else [int(v[0]) for v in vals]
    return f.parts[f.data[0]][0].item()


def check_gguf(path, model_dir, outtype: str):
    """The metadata llama.cpp's converter writes for GPT-2, and every tensor against the source. (gguf's reader
    takes ~10 s over the 50,257 tokens and merges: each test reads one file.)"""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(path)
    cfg = GPTConfig.from_json_file(model_dir / "config.json")
    ftype = {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    expect = {"general.architecture": "gpt2", "gpt2.block_count": cfg.n_layer, "gpt2.context_length": cfg.n_positions,
              "gpt2.embedding_length": cfg.n_embd, "gpt2.feed_forward_length": 4 * cfg.n_embd,
              "gpt2.attention.head_count": cfg.n_head, "general.file_type": ftype, "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 50256,
              "tokenizer.ggml.eos_token_id": 50256}
    for k, v in expect.items():
        assert _gguf_field(r, k) == v, k
    assert abs(_gguf_field(r, "gpt2.attention.layer_norm_epsilon") - cfg.layer_norm_epsilon) < 1e-12
    vocab = json.loads((VOCAB_DIR / "encoder.json").read_text())
    tokens, types = _gguf_field(r, "tokenizer.ggml.tokens"), _gguf_field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[:50257] == sorted(vocab, key=vocab.get)
    assert types[50256] == 3 and set(types[:50256]) == {1}  # <|endoftext|> control, the rest normal
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, cfg.vocab_size)] and set(types[50257:]) <= {5}
    merges = [ln for ln in (VOCAB_DIR / "vocab.bpe").read_text().split("\n") if ln and not ln.startswith("#")]
    assert _gguf_field(r, "tokenizer.ggml.merges") == merges
    sd = load_model(model_dir, device="cpu", dtype="float32")[0].state_dict()
    from gpt2kit.checkpoints.gguf_write import gguf_name
    want = {gguf_name(k): v for k, v in sd.items() if k != "lm_head.weight"}
    assert {t.name for t in r.tensors} == set(want)  # no `output`: tied to token_embd
    for t in r.tensors:
        src = want[t.name].numpy()
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
        kind = t.tensor_type.name
        assert kind == ("F32" if src.ndim == 1 or t.name == "position_embd.weight" else outtype.upper()), t.name
        tol = {"F32": 0, "F16": 1e-3, "Q8_0": 1e-2}[kind]  # relative to the tensor's largest value
        np.testing.assert_allclose(data, src, atol=tol * np.abs(src).max(), rtol=0, err_msg=t.name)


def test_gguf_holds_llamacpps_gpt2_layout_and_every_tensor(tmp_path, tiny_model_dir):
    out = convert(tiny_model_dir, tmp_path / "m.gguf", to="gguf")  # f16, llama.cpp's default
    check_gguf(out, tiny_model_dir, "f16")


def test_gguf_q8_0_of_a_padded_vocabulary(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("gguf")
    from tests.conftest import padded_vocab_model
    padded = save_model(padded_vocab_model(), None, tmp_path / "padded")
    for f in ("vocab.json", "merges.txt"):
        (padded / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert main(["convert", str(padded), str(tmp_path / "p.gguf"), "--to", "gguf", "--outtype", "q8_0"]) == 0
    check_gguf(tmp_path / "p.gguf", padded, "q8_0")


def test_gguf_refusals(tmp_path, tiny_model_dir):
    pytest.importorskip("gguf")
    args, sd = nanogpt_state(True)
    save_nanogpt(tmp_path / "ckpt.pt", args, sd, False)
    with pytest.raises(Gpt2kitError, match="tanh GELU"):
        convert(tmp_path / "ckpt.pt", tmp_path / "n.gguf", to="gguf")
    assert not (tmp_path / "n.gguf").exists() and not (tmp_path / "n.gguf.tmp").exists()
    with pytest.raises(Gpt2kitError, match="--outtype"):
        convert(tiny_model_dir, tmp_path / "x.gguf", to="gguf", dtype="float16")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it builds llama.cpp from source)")
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, tiny_model_dir):
    import llama_cpp
    out = convert(tiny_model_dir, tmp_path / "m.gguf", to="gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, seed=0)
    prompt = IDS[0].tolist()
    theirs = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(t)
        if len(theirs) == 12:
            break
    assert llm.tokenize(b"The quick brown fox", add_bos=False, special=False) == [464, 2068, 7586, 21831]
    model, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    assert theirs == _greedy(model, prompt, 12)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- CTranslate2 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["gpt2kit", "nanogpt"])
def test_ctranslate2_greedy_tokens_equal_ours(tmp_path, tiny_model_dir, source):
    ctranslate2 = pytest.importorskip("ctranslate2")
    if source == "nanogpt":  # exact GELU: CTranslate2 must compute it too
        args, sd = nanogpt_state(True, vocab=50257)
        src = tmp_path / "ckpt.pt"
        save_nanogpt(src, args, sd, True)
    else:
        src = tiny_model_dir
    out = convert(src, tmp_path / "ct2", to="ctranslate2")
    assert (out / "model.bin").is_file()
    model, _ = load_model(src, device="cpu", dtype="float32")
    vocab = json.loads((VOCAB_DIR / "encoder.json").read_text())
    by_id = {i: t for t, i in vocab.items()}
    prompt = IDS[0].tolist()
    gen = ctranslate2.Generator(str(out), device="cpu")
    res = gen.generate_batch([[by_id[i] for i in prompt]], max_length=12, sampling_topk=1,
                             include_prompt_in_result=False, end_token=[])
    assert res[0].sequences_ids[0] == _greedy(model, prompt, 12)


def test_ctranslate2_int8_and_cli(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("ctranslate2")
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "ct2"), "--to", "ctranslate2",
                 "--quantization", "int8"]) == 0
    assert json.loads((tmp_path / "ct2" / "config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "ct2"), "--to", "ctranslate2"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_missing_extras_are_one_line_errors(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_gguf(name, *a, **k):
        if name == "gguf":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt2kit[gguf]" in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "ct2"), "--to", "ctranslate2"]) == 1
    assert "gpt2kit[ctranslate2]" in capsys.readouterr().err
    assert not (tmp_path / "ct2").exists()

