"""Find, read and write GPT-2 checkpoints in any supported format.

Readable: HuggingFace directories, OpenAI's TensorFlow checkpoint directories, gpt2kit run directories
(which hold HuggingFace-format models), nanoGPT's ckpt.pt and llm.c's model files, and model names
(downloaded from the Hub). Written: our HuggingFace-compatible format, and (by convert) OpenAI's TensorFlow
checkpoint layout, llm.c model files, GGUF (llama.cpp) and CTranslate2 directories.

This module is the one place that says what `--model X` means: resolve_model_dir turns X (a directory, a run
or a numbered run, a single-file checkpoint, a Hub name) into a local path, load_model reads it, and a LoRA
adapter (or a LoRA run with adapter checkpoints only) is loaded onto the base it was trained on, which is
checked by fingerprint (open_base). The submodules read and write one format each; gpt2kit.layout says what a
path holds without reading it."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shlex
from pathlib import Path

import torch

from gpt2kit import runs
from gpt2kit.checkpoints import hf
from gpt2kit.checkpoints.ctranslate2 import QUANTIZATIONS, write_ctranslate2
from gpt2kit.checkpoints.gguf_write import OUTTYPES, import_gguf, write_gguf
from gpt2kit.checkpoints.llmc import read_llmc, write_llmc
from gpt2kit.checkpoints.nanogpt import read_nanogpt
from gpt2kit.checkpoints.openai_tf import read_openai_tf
from gpt2kit.checkpoints.openai_tf_write import openai_hparams, write_openai_tf
from gpt2kit.checkpoints.output_dirs import PARTIAL, make_new_output_dir, new_model_dir, new_output_file  # noqa: F401  (also read from here)
from gpt2kit.config import OPENAI_NAMES, GPTConfig
from gpt2kit.devices import DTYPES, pick_device, pick_dtype  # noqa: F401  (also read from here)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import (  # noqa: F401  (also read from here)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONVERT_FORMATS,
    find_vocab_files,
    is_adapter_dir,
    is_llmc_file,
    is_model_dir,
    is_model_file,
    is_openai_tf_dir,
    is_run_dir,
    run_model_dir,
    shard_names,
    weights_source,
)
from gpt2kit.lora import (
    LoraConfig,
    apply_lora,
    find_adapter,
    load_adapter_weights,
    merge_lora,
    merged_state_dict,
    read_adapter_config,
)
from gpt2kit.model import GPT
from gpt2kit.run_numbers import resolve_run_ref
from gpt2kit.tokenizer import GPT2_VOCAB_DIR, Tokenizer, read_encoder
from gpt2kit.weights_io import require_finite

log = logging.getLogger("gpt2kit")

def _check_links(path: Path, what: str) -> None:
    """A one-line error when `path` is a symbolic link loop or a link to nothing (both read as "does not
    exist" to Path.exists, which would send the name to the Hub)."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Gpt2kitError(f"{what}: its symbolic links form a loop (a link that leads back to itself); "
                               "point the link at the model directory, or pass that directory") from None
        if path.is_symlink():
            raise Gpt2kitError(f"{what} is a symbolic link to {os.readlink(path)}, which does not exist; fix the "
                               "link, or pass the model directory") from None


def resolve_model_dir(name_or_path: str | Path, flag: str = "--model", local_hint: str | None = None) -> Path:
    """A local model for `name_or_path`: a directory as it is, a run directory's model, a nanoGPT ckpt.pt or
    llm.c model file as it is, or a model name downloaded (and cached) from the Hugging Face Hub. `flag` and
    `local_hint` word the errors for the caller's argument (default: --model). A numbered run may be named by
    its number (`runs/7`, or `7` for runs/; see run_numbers)."""
    s = str(resolve_run_ref(name_or_path))
    path = Path(s).expanduser()
    if path.is_dir():
        return run_model_dir(path) or path
    if is_model_file(path):
        return path
    if path.exists():
        raise Gpt2kitError(f"{flag} {s} is a file gpt2kit does not read as a model; pass the directory that holds "
                           "config.json and the weights, a nanoGPT ckpt.pt or an llm.c model .bin")
    _check_links(path, f"{flag} {s}")  # a broken link is a local path gone wrong, not a model name to download
    from gpt2kit.checkpoints import hub  # lazy: huggingface_hub is slow to import; only a Hub name needs it
    return hub.resolve(OPENAI_NAMES.get(s, s), flag=flag, local_hint=local_hint or hub.LOCAL_HINT)


def read_checkpoint(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our layout) from an HF or OpenAI-TF directory, a nanoGPT ckpt.pt or an llm.c
    model file; weights that are not all finite are refused."""
    if path.is_file():
        config, sd = read_llmc(path) if is_llmc_file(path) else read_nanogpt(path)
        require_finite(sd, path)
        return config, sd
    if hf.is_hf_dir(path):
        config = GPTConfig.from_json_file(path / "config.json")
        sd = hf.read_hf_state_dict(path)
        require_finite(sd, hf.weights_source(path) or path)
        return config, hf.hf_to_gpt2kit(sd, config)
    if is_openai_tf_dir(path):
        hparams, sd = read_openai_tf(path)
        require_finite(sd, path)
        config = GPTConfig.from_openai_hparams(hparams)
        return config, hf.hf_to_gpt2kit(sd, config)
    if (path / "config.json").is_file():
        raise Gpt2kitError(f"{path} has config.json but no model.safetensors or pytorch_model.bin (nor a "
                           "model.safetensors.index.json with its shards): copy the weights in beside it")
    if is_adapter_dir(path):  # (load_model merges one into its base; a checkpoint's reader does not)
        raise Gpt2kitError(f"{path} is a LoRA adapter, not a whole model: `gpt2kit merge {path} --out DIR` writes its "
                           "base with the adapter merged in, which this reads")
    raise Gpt2kitError(f"{path} is not a GPT-2 checkpoint: expected config.json + model.safetensors "
                       "(HuggingFace), hparams.json + model.ckpt.* (OpenAI TF), or a gpt2kit run directory")


def load_model(name_or_path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None,
               tokenizer_dir: str | Path | None = None) -> tuple[GPT, Tokenizer]:
    """Load any readable checkpoint (or model name) as an eval-mode GPT plus its tokenizer. A LoRA adapter
    directory, or a LoRA run with adapter checkpoints only, is its base model with the adapter merged in."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if adapter_named(name_or_path) is not None:  # merged onto its base in float32 (as `gpt2kit merge` does)
        model, tok, _, _ = open_base(name_or_path, device=dev, dtype=dt, tokenizer_dir=tokenizer_dir,
                                     fingerprint=False)
        return model, tok
    for attempt in range(3):
        path = resolve_model_dir(name_or_path)
        try:
            return _load_model_dir(path, dev, dt, tokenizer_dir)
        except Exception:
            # a run still training may delete the checkpoint it picked (--keep) while it is read: pick again
            if attempt == 2 or path.exists() or path == Path(str(name_or_path)).expanduser():
                raise
    raise AssertionError("unreachable")


def _load_model_dir(path: Path, dev: torch.device, dt: torch.dtype,
                    tokenizer_dir: str | Path | None) -> tuple[GPT, Tokenizer]:
    config, sd = read_checkpoint(path)
    if tokenizer_dir is None:
        tokenizer_dir = vocab_dir(path, config)
    with torch.device("meta"):
        model = GPT(config)  # no time spent on random init: every tensor comes from the file
    sd = {k: v.to(device=dev, dtype=dt) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    model.eval()
    tok_src = Path(tokenizer_dir) if tokenizer_dir else path
    if find_vocab_files(tok_src) is None:
        raise Gpt2kitError(f"{tok_src} has no tokenizer files (vocab.json + merges.txt or encoder.json + "
                           "vocab.bpe); copy them from the base model's directory")
    return model, Tokenizer.from_dir(tok_src)


_NOTED: set[Path] = set()  # single-file checkpoints whose vocabulary note was given


def vocab_dir(path: Path, config: GPTConfig | None = None) -> Path:
    """The directory of the vocabulary that goes with the checkpoint at `path`: a model directory's own; for
    a single-file checkpoint (ckpt.pt, llm.c .bin: they hold none), vocabulary files beside it, else GPT-2's
    own (shipped with gpt2kit), with a note. A model with fewer rows than GPT-2's vocabulary (nanoGPT's
    character-level models) has a vocabulary of its own, which gpt2kit cannot read: that is an error."""
    if not path.is_file():
        return path
    if find_vocab_files(path.parent) is not None:
        return path.parent
    if config is not None and config.vocab_size < 50257:
        raise Gpt2kitError(f"{path} has {config.vocab_size} tokens, fewer than GPT-2's 50257: it was trained with "
                           "a vocabulary of its own (nanoGPT's character-level meta.pkl?), which gpt2kit cannot "
                           "use; put a GPT-2 style vocab.json + merges.txt for it beside the file")
    if path not in _NOTED and log.isEnabledFor(logging.INFO):  # (resolving, loading and the tokenizer each ask)
        _NOTED.add(path)
        log.info("%s holds no vocabulary: using GPT-2's own (bundled with gpt2kit)", path)
    return GPT2_VOCAB_DIR


def save_model(model: GPT, tokenizer: Tokenizer | None, out: str | Path) -> Path:
    """Write HuggingFace-compatible config.json, model.safetensors, vocab.json and merges.txt."""
    out = Path(out)
    hf.write_hf_dir(out, model.config, model.state_dict())
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _write_openai_tf(out: Path, files: tuple[Path, Path] | None, config: GPTConfig,
                     sd: dict[str, torch.Tensor]) -> None:
    if config.activation != "gelu_new":
        raise Gpt2kitError("OpenAI's GPT-2 code computes the tanh GELU; this model uses the exact GELU (a nanoGPT "
                           "model) and would compute differently there: convert it to --to hf instead")
    n_vocab = len(read_encoder(files[0])) if files is not None else config.vocab_size
    hf_sd = hf.gpt2kit_to_hf(sd)
    if n_vocab < config.vocab_size:  # rows padded past the vocabulary (e.g. 50304): OpenAI's code sizes its
        hf_sd["transformer.wte.weight"] = hf_sd["transformer.wte.weight"][:n_vocab]  # logits by n_vocab, so drop them
    write_openai_tf(out, openai_hparams(config, min(n_vocab, config.vocab_size)), hf_sd, files)


_FILE_FORMATS = ("llmc", "gguf")  # written as one file; the others as a directory


def _source_vocab(path: Path, config: GPTConfig, needed: bool) -> tuple[Path, Path] | None:
    """The vocabulary files for the checkpoint at `path` (vocab_dir's choice for a single file); None, or an
    error when the output format must hold them (`needed`), where there are none."""
    try:
        files = find_vocab_files(vocab_dir(path, config))
    except Gpt2kitError:
        if needed:
            raise
        files = None
    if files is None and needed:
        raise Gpt2kitError(f"{path} has no vocabulary files (vocab.json + merges.txt or encoder.json + vocab.bpe), "
                           "which the output holds: copy the base model's into it")
    return files


def convert(src: str | Path, out: str | Path, dtype: str | None = None, to: str = "hf", outtype: str = "f16",
            quantization: str | None = None) -> Path:
    """Any readable checkpoint -> `out`. to="hf": our (HuggingFace-compatible) format; "openai-tf": OpenAI's
    TensorFlow checkpoint layout (float32), for TF-based GPT-2 tools; "ctranslate2": a CTranslate2 model
    (`quantization` int8, float16, ...; default float32). Each into a new (or empty) directory. "llmc": an
    llm.c model file (dtype float32 or bfloat16); "gguf": a GGUF file for llama.cpp (`outtype` f32, f16 or
    q8_0). Each a new file."""
    src_path, out = Path(src).expanduser(), Path(out).expanduser()
    if src_path.is_dir() and out.resolve() == src_path.resolve():
        raise Gpt2kitError("convert would overwrite its own source; choose another output directory")
    if to not in CONVERT_FORMATS:
        raise Gpt2kitError(f"unknown output format {to!r}: use {', '.join(CONVERT_FORMATS)}")
    dt = pick_dtype(dtype, torch.device("cpu")) if dtype not in (None, "auto") else None  # bad --dtype: now
    if to == "openai-tf" and dt not in (None, torch.float32):
        raise Gpt2kitError(f"--dtype {dtype}: OpenAI's TensorFlow checkpoints hold float32 weights (its code "
                           "builds float32 variables); leave --dtype out with --to openai-tf")
    if to == "llmc" and dt not in (None, torch.float32, torch.bfloat16):
        raise Gpt2kitError(f"--dtype {dtype}: llm.c model files hold float32 or bfloat16 weights")
    if to in ("gguf", "ctranslate2") and dt is not None:
        option = "--outtype f32|f16|q8_0" if to == "gguf" else "--quantization"
        raise Gpt2kitError(f"--dtype is not used with --to {to}: choose the stored type with {option}")
    if to == "gguf":
        if outtype not in OUTTYPES:
            raise Gpt2kitError(f"unknown --outtype {outtype!r}: use {', '.join(OUTTYPES)}")
        import_gguf()  # missing extra: before any loading
    if to == "ctranslate2":
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise Gpt2kitError(f"unknown --quantization {quantization!r}: use {', '.join(QUANTIZATIONS)}")
        if importlib.util.find_spec("ctranslate2") is None or importlib.util.find_spec("transformers") is None:
            raise Gpt2kitError("--to ctranslate2 needs ctranslate2 and transformers: "
                               "pip install 'gpt2kit[ctranslate2]'")
    hint = ("pass SRC as a local directory (config.json + model.safetensors, hparams.json + model.ckpt.*, or a "
            "gpt2kit run), a nanoGPT ckpt.pt or an llm.c model .bin")
    if to in _FILE_FORMATS:
        new_output_file(out)
        path = resolve_model_dir(src, flag="SRC", local_hint=hint)
        config, sd = read_checkpoint(path)
        files = _source_vocab(path, config, needed=to == "gguf")
        if to == "gguf":
            write_gguf(out, config, sd, files, outtype=outtype, name=path.stem if path.is_file() else path.name)
        else:
            n_vocab = len(read_encoder(files[0])) if files is not None else None
            write_llmc(out, config, sd, n_vocab=n_vocab, dtype=dt or torch.float32)
        return out
    with new_model_dir(out) as stage:
        path = resolve_model_dir(src, flag="SRC", local_hint=hint)
        config, sd = read_checkpoint(path)
        if to == "ctranslate2":
            write_ctranslate2(stage, config, sd, _source_vocab(path, config, needed=True), quantization)
            return out
        files = _source_vocab(path, config, needed=False)
        if files is None:
            names = "encoder.json and vocab.bpe" if to == "openai-tf" else "vocab.json and merges.txt"
            log.warning("%s has no vocabulary files: copy the base model's %s into %s before using it",
                        path, names, out)
        if to == "openai-tf":
            _write_openai_tf(stage, files, config, sd)
        else:
            if dt is not None:
                sd = {k: v.to(dt) for k, v in sd.items()}
            hf.write_hf_dir(stage, config, sd)
            if files is not None:
                (stage / "vocab.json").write_bytes(files[0].read_bytes())
                (stage / "merges.txt").write_bytes(files[1].read_bytes())
            (stage / "gpt2kit.json").write_text(json.dumps({"converted_from": str(src)}, indent=2) + "\n")
    return out


# ---- LoRA adapters as models: each loaded onto the base it was trained on, which is checked ---------------

def weights_fingerprint(model_dir: str | Path) -> str | None:
    """A cheap content fingerprint of a model directory's weights (HuggingFace, sharded or OpenAI TF files):
    the same wherever the directory is copied, different once training has changed the weights. None when
    the directory holds no weight files of a known kind."""
    d = Path(model_dir)
    src = weights_source(d) if d.is_dir() else None
    if d.is_file():  # a single-file checkpoint: nanoGPT's ckpt.pt, llm.c's .bin
        files = [d]
    elif src is not None:
        files = [d / n for n in shard_names(src)] if src.name.endswith(".index.json") else [src]
    else:  # OpenAI TF: model.ckpt.index + model.ckpt.data-*
        files = sorted(f for f in d.iterdir() if f.is_file() and (f.suffix == ".index" or ".data-" in f.name))
    if not files or not all(f.is_file() for f in files):  # a missing shard: the loader names it, in its words
        return None
    h = hashlib.sha256(b"gpt2kit-weights-v1\0")
    try:
        for f in files:
            runs.hash_file(h, f)
    except OSError:  # replaced while read: _read_fingerprinted's second look tells
        return None
    return "v1:" + h.hexdigest()[:32]


def _merged_fingerprint(adapter: Path, cfg: LoraConfig, base_fp: str | None) -> str | None:
    """The fingerprint of `adapter` merged onto the base whose fingerprint is `base_fp`."""
    if base_fp is None:
        return None
    h = hashlib.sha256(b"gpt2kit-lora-merged-v1\0")
    h.update(json.dumps([cfg.rank, cfg.alpha, cfg.targets, base_fp]).encode())
    runs.hash_file(h, adapter / ADAPTER_WEIGHTS)
    return "v1:" + h.hexdigest()[:32]


def _read_fingerprinted(fingerprint, load, what: Path):
    """(load(), fingerprint()), the fingerprint taken before and after reading: a directory replaced
    meanwhile (a run writing best/ again) is an error, never a fingerprint of other weights than those read."""
    before = fingerprint()
    out = load()
    if fingerprint() != before:
        raise Gpt2kitError(f"{what} changed while it was read (is a run writing it?); try again")
    return out, before


def _run_tokenizer(adapter: Path) -> Path | None:
    """The vocabulary a run keeps beside its adapters (RUN/best, RUN/checkpoints/step-N), if any."""
    for run in (adapter.parent, adapter.parent.parent):
        if is_run_dir(run) and find_vocab_files(run / "tokenizer") is not None:
            return run / "tokenizer"
    return None


def adapter_named(path: str | Path) -> Path | None:
    """The adapter `path` names when it is no model itself: an adapter directory (RUN/checkpoints/step-N of a
    LoRA run), or a LoRA run with adapter checkpoints only (its newest). None for anything else."""
    p = Path(str(resolve_run_ref(path))).expanduser()
    return p if is_adapter_dir(p) and not is_model_dir(p) else runs.adapter_only_checkpoint(p)


def open_base(base: str | Path, device: str | torch.device | None = "cpu",
              dtype: str | torch.dtype | None = "float32", tokenizer_dir: str | Path | None = None,
              fingerprint: bool = True, _depth: int = 0, flag: str = "--model"):
    """Load the weights `base` names and say exactly which they were: (GPT, Tokenizer, fingerprint or None,
    the directory read). `base` is anything `--model` takes (a model directory or name, a run: its best/,
    final/ or newest checkpoint), or an adapter directory, which is merged onto its own base (in float32, then
    cast). A LoRA run with adapter checkpoints only gives its newest adapter checkpoint merged the same way,
    and that checkpoint directory is what is returned: see train.setup.load_model. `flag` names the option that
    gave `base` in errors (`--base` for merge)."""
    adapter = adapter_named(base)
    if adapter is not None:
        if _depth > 8:
            raise Gpt2kitError(f"{adapter}: adapters on adapters more than 8 deep (does one name itself as its "
                               f"base in {ADAPTER_CONFIG}?)")
        model, tok, fp = _load_adapted(adapter, None, device, torch.float32, fingerprint, _depth + 1)
        merge_lora(model)
        model = model.to(dtype=pick_dtype(dtype, pick_device(device))).eval()
        own = Path(tokenizer_dir) if tokenizer_dir else _run_tokenizer(adapter)
        return model, (Tokenizer.from_dir(own) if own else tok), fp, adapter
    d = resolve_model_dir(base, flag=flag, local_hint=None if flag == "--model" else
                          f"pass {flag} a local directory holding config.json and model.safetensors")
    (model, tok), fp = _read_fingerprinted(lambda: weights_fingerprint(d) if fingerprint else None,
                                           lambda: load_model(d, device=device, dtype=dtype,
                                                              tokenizer_dir=tokenizer_dir), d)
    return model, tok, fp, d


def _load_adapted(path: Path, base: str | None, device, dtype, fingerprint: bool, depth: int = 0):
    """(the base with the adapter at `path` applied, its tokenizer, fingerprint of the two merged or None)."""
    cfg = read_adapter_config(path)
    merge = f"`gpt2kit merge {shlex.quote(str(path))} --base MODEL --out DIR`"  # --base is merge's alone
    if not (base or cfg.base_model):
        raise Gpt2kitError(f"{path / ADAPTER_CONFIG} does not name its base model; merge the adapter onto it: "
                           f"{merge}")
    if not base and Path(cfg.base_model).is_absolute() and not Path(cfg.base_model).exists():
        raise Gpt2kitError(f"the base model recorded in {path / ADAPTER_CONFIG}, {cfg.base_model}, is gone; "
                           f"move it back, or merge the adapter onto it where it is now: {merge}")
    recorded = cfg.base_fingerprint
    model, tok, fp, _ = open_base(base or cfg.base_model, device=device, dtype=dtype,
                                  fingerprint=fingerprint or bool(recorded), _depth=depth,
                                  flag="--base" if base else "--model")
    if recorded and fp is not None and fp != recorded:
        if not base:
            raise Gpt2kitError(f"adapter {path} was trained on {cfg.base_model}, whose weights have changed since "
                               f"(fingerprint {fp}, recorded {recorded}; the same weights saved again in another form "
                               f"count as changed too); merge it onto the weights it was trained on, "
                               f"{merge}, or onto these anyway with --base {shlex.quote(cfg.base_model)}")
        log.warning(f"adapter {path} was trained on other weights than {base} (fingerprint {recorded}, these "
                    f"are {fp}); applying it to them as --base asks")
    apply_lora(model, cfg)
    _, merged = _read_fingerprinted(lambda: _merged_fingerprint(path, cfg, fp) if fingerprint else None,
                                    lambda: load_adapter_weights(model, path), path)
    return model, tok, merged


def load_lora_model(adapter: str | Path, base: str | None = None, device: str | torch.device | None = "cpu",
                    dtype: str | torch.dtype | None = "float32"):
    """The base model with the adapter applied (not merged), plus its tokenizer. Without `base`, the recorded
    base model is used, and refused if its weights are no longer those the adapter was trained on (adapters
    from before fingerprints were recorded are not checked); an explicit `base` is used as given."""
    model, tok, _ = _load_adapted(find_adapter(adapter), base, device, dtype, fingerprint=False)
    return model.eval(), tok


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None,
                  dtype: str | None = None) -> Path:
    """What `gpt2kit merge` does: base model + adapter -> a plain HuggingFace-format checkpoint."""
    dt = pick_dtype(dtype, torch.device("cpu")) if dtype not in (None, "auto") else torch.float32
    find_adapter(adapter)  # a missing adapter is named before --out is created
    if base and base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise Gpt2kitError(f"--base {base} does not exist; pass the base model's directory (or its name)")
    with new_model_dir(out) as stage:  # a new or empty directory: never over a model or a run
        model, tok = load_lora_model(adapter, base)
        sd = {k: v.to(dt) for k, v in merged_state_dict(model).items()}
        hf.write_hf_dir(stage, model.config, sd)
        tok.save(stage)
    return Path(out).expanduser()


def load_adapter_run(run_dir: str | Path, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None) -> tuple[GPT, Tokenizer] | None:
    """`--model RUN` for a LoRA run that has only adapter checkpoints: the base model with the newest
    adapter folded in (in memory, as `gpt2kit merge` does) and the run's tokenizer, as (GPT, Tokenizer).
    None when `run_dir` is not such a run (load it as any model directory)."""
    ckpt = runs.adapter_only_checkpoint(run_dir)
    if ckpt is None:
        return None
    model, tok, _, _ = open_base(ckpt, device=device, dtype=dtype, fingerprint=False)  # + the run's tokenizer
    return model, tok
