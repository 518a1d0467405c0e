"""Find, read and write GPT-2 checkpoints in any supported format.

Readable: HuggingFace directories, OpenAI's TensorFlow checkpoint directories, gpt2kit run directories
(which hold HuggingFace-format models), nanoGPT's ckpt.pt and llm.c's model files, and model names
(downloaded from the Hub). Written: our HuggingFace-compatible format, and (by convert) OpenAI's TensorFlow
checkpoint layout, llm.c model files, GGUF (llama.cpp) and CTranslate2 directories."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2kit.config import OPENAI_NAMES, GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.run_numbers import resolve_run_ref
from gpt2kit.tokenizer import GPT2_VOCAB_DIR, Tokenizer, find_vocab_files, read_encoder

log = logging.getLogger("gpt2kit")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks cuda, then mps, then cpu. Otherwise only the devices gpt2kit runs on (cpu, cuda,
    cuda:N, mps), each checked to exist here: torch accepts more names ('meta', 'xpu', ...) that would
    fail later, deep inside loading."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    usage = "use cpu, cuda, cuda:N, mps or auto"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Gpt2kitError(f"unknown device {str(device)!r}: {usage}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise Gpt2kitError(f"device {str(device)!r} is not supported by gpt2kit: {usage}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise Gpt2kitError(f"device {str(device)!r} does not exist: use cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Gpt2kitError(f"--device {device} asked for, but this torch build sees no CUDA GPU; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise Gpt2kitError(f"--device {device} asked for, but only {n} CUDA GPU(s) are visible "
                               f"(cuda:0 to cuda:{n - 1}); pick one of those or use --device cpu")
    if dev.type == "mps":
        if not _mps_available():
            raise Gpt2kitError(f"--device {device} asked for, but MPS is not available here; use --device cpu")
        if dev.index not in (None, 0):
            raise Gpt2kitError(f"device {str(device)!r} does not exist: use mps")
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise Gpt2kitError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return DTYPES[dtype]


def run_model_dir(path: Path) -> Path | None:
    """A gpt2kit run directory (has run.json): its best model if validation picked one, else its final
    model, else its newest checkpoint."""
    if not (path / "run.json").is_file():
        return None
    for sub in ("best", "final"):
        if is_model_dir(path / sub):
            return path / sub
    ckpts = sorted((path / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if (path / "checkpoints").is_dir() else []
    for c in reversed(ckpts):
        if is_model_dir(c):
            return c
    raise Gpt2kitError(f"run directory {path} has no saved model yet (no best/, final/ or checkpoints/)")


def is_model_dir(path: Path) -> bool:
    from gpt2kit.checkpoints.hf import is_hf_dir
    return path.is_dir() and (is_hf_dir(path) or _is_tf_dir(path))


def _is_tf_dir(path: Path) -> bool:
    from gpt2kit.checkpoints.openai_tf import is_openai_tf_dir
    return is_openai_tf_dir(path)


def is_model_file(path: Path) -> bool:
    """A single-file checkpoint of another trainer: nanoGPT's ckpt.pt (a torch.save archive) or llm.c's .bin
    (read_checkpoint says which, or why it is neither)."""
    from gpt2kit.checkpoints.llmc import is_llmc_file
    from gpt2kit.checkpoints.nanogpt import could_be_nanogpt
    return path.is_file() and (is_llmc_file(path) or could_be_nanogpt(path))


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
    from gpt2kit.checkpoints import hub
    return hub.resolve(OPENAI_NAMES.get(s, s), flag=flag, local_hint=local_hint or hub.LOCAL_HINT)


def require_finite(sd: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights holding NaN or infinity (a run that diverged, a damaged file): such a model only
    produces garbage ("!!!!!", since every logit is NaN), so it is named here, where it is read."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise Gpt2kitError(f"{source} holds NaN or infinite weights ({k}), so the model cannot give "
                               "meaningful output; use an earlier checkpoint of the run that wrote it")


def read_checkpoint(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our layout) from an HF or OpenAI-TF directory, a nanoGPT ckpt.pt or an llm.c
    model file; weights that are not all finite are refused."""
    from gpt2kit.checkpoints import hf
    if path.is_file():
        from gpt2kit.checkpoints.llmc import is_llmc_file, read_llmc
        from gpt2kit.checkpoints.nanogpt import read_nanogpt
        config, sd = read_llmc(path) if is_llmc_file(path) else read_nanogpt(path)
        require_finite(sd, path)
        return config, sd
    if hf.is_hf_dir(path):
        config = GPTConfig.from_json_file(path / "config.json")
        sd = hf.read_hf_state_dict(path)
        require_finite(sd, hf.weights_source(path) or path)
        return config, hf.hf_to_gpt2kit(sd, config)
    if _is_tf_dir(path):
        from gpt2kit.checkpoints.openai_tf import read_openai_tf
        hparams, sd = read_openai_tf(path)
        require_finite(sd, path)
        config = GPTConfig.from_openai_hparams(hparams)
        return config, hf.hf_to_gpt2kit(sd, config)
    if (path / "config.json").is_file():
        raise Gpt2kitError(f"{path} has config.json but no model.safetensors or pytorch_model.bin (nor a "
                           "model.safetensors.index.json with its shards): copy the weights in beside it")
    raise Gpt2kitError(f"{path} is not a GPT-2 checkpoint: expected config.json + model.safetensors "
                       "(HuggingFace), hparams.json + model.ckpt.* (OpenAI TF), or a gpt2kit run directory")


def load_model(name_or_path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None,
               tokenizer_dir: str | Path | None = None) -> tuple[GPT, Tokenizer]:
    """Load any readable checkpoint (or model name) as an eval-mode GPT plus its tokenizer. A LoRA adapter
    directory, or a LoRA run with adapter checkpoints only, is its base model with the adapter merged in."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    from gpt2kit.lora import adapter_named, open_base
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
    from gpt2kit.checkpoints.hf import write_hf_dir
    out = Path(out)
    write_hf_dir(out, model.config, model.state_dict())
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _write_openai_tf(out: Path, files: tuple[Path, Path] | None, config: GPTConfig,
                     sd: dict[str, torch.Tensor]) -> None:
    from gpt2kit.checkpoints.hf import gpt2kit_to_hf
    from gpt2kit.checkpoints.openai_tf_write import openai_hparams, write_openai_tf
    if config.activation != "gelu_new":
        raise Gpt2kitError("OpenAI's GPT-2 code computes the tanh GELU; this model uses the exact GELU (a nanoGPT "
                           "model) and would compute differently there: convert it to --to hf instead")
    n_vocab = len(read_encoder(files[0])) if files is not None else config.vocab_size
    hf = gpt2kit_to_hf(sd)
    if n_vocab < config.vocab_size:  # rows padded past the vocabulary (e.g. 50304): OpenAI's code sizes its
        hf["transformer.wte.weight"] = hf["transformer.wte.weight"][:n_vocab]  # logits by n_vocab, so drop them
    write_openai_tf(out, openai_hparams(config, min(n_vocab, config.vocab_size)), hf, files)


# The folder inside an output directory that a model is written into before its files are moved into place:
# a write that is killed leaves only this, which the next write into the same directory removes.
PARTIAL = ".gpt2kit-partial"


def make_new_output_dir(out: str | Path) -> list[Path]:
    """Create `out` to write a model into, refusing up front (before any loading) anything that would
    clobber something or fail later: an existing file, a non-empty directory, an unwritable place.
    A directory holding only the leftover of a killed write (PARTIAL) counts as empty; the leftover is
    removed. Returns the directories it created, outermost first."""
    out = Path(out).expanduser()
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if PARTIAL in entries:
            if entries != {PARTIAL}:
                raise Gpt2kitError(f"output directory {out} holds a model write that was interrupted while its "
                                   f"files were moved into place ({PARTIAL} is left in it): remove {out} and "
                                   "run again")
            log.info("removing %s, left by an interrupted write", out / PARTIAL)
            shutil.rmtree(out / PARTIAL)
            entries = set()
        if entries:
            raise Gpt2kitError(f"output directory {out} already exists and is not empty: choose a new directory "
                               "(nothing in it is overwritten)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise Gpt2kitError(f"output directory {out} is not writable: check its permissions or choose another")
        return []
    if out.exists() or out.is_symlink():
        raise Gpt2kitError(f"output {out} is an existing file, not a directory: choose a new directory name "
                           "(the file is left as it is)")
    created = [p for p in (out, *out.absolute().parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise Gpt2kitError(f"cannot create output directory {out} ({e.strerror or e}): choose a writable "
                           "location") from None
    return created


@contextlib.contextmanager
def new_model_dir(out: str | Path) -> Iterator[Path]:
    """Write a model into `out`, a new (or empty) directory (make_new_output_dir's checks, before any
    loading). Yields the folder to write into, `out`/PARTIAL; its files are moved into `out` when the block
    ends. A failed write leaves `out` as it was found, a killed one only PARTIAL (removed by the next)."""
    out = Path(out).expanduser()
    created = make_new_output_dir(out)
    stage = out / PARTIAL
    moved: list[Path] = []
    try:
        stage.mkdir()
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
            moved.append(out / f.name)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for f in moved:
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise


CONVERT_FORMATS = ("hf", "openai-tf", "llmc", "gguf", "ctranslate2")
_FILE_FORMATS = ("llmc", "gguf")  # written as one file; the others as a directory


def _new_output_file(out: Path) -> None:
    """Refuse, before any loading, an output file that exists or cannot be created."""
    if out.exists() or out.is_symlink():
        raise Gpt2kitError(f"output {out} already exists: choose a new file name (nothing is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Gpt2kitError(f"cannot create {out.parent} ({e.strerror or e}): choose a writable location") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise Gpt2kitError(f"{out.parent} is not writable: check its permissions or choose another location")


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
        from gpt2kit.checkpoints.gguf_write import OUTTYPES, import_gguf
        if outtype not in OUTTYPES:
            raise Gpt2kitError(f"unknown --outtype {outtype!r}: use {', '.join(OUTTYPES)}")
        import_gguf()  # missing extra: before any loading
    if to == "ctranslate2":
        from gpt2kit.checkpoints.ctranslate2 import QUANTIZATIONS
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise Gpt2kitError(f"unknown --quantization {quantization!r}: use {', '.join(QUANTIZATIONS)}")
        import importlib.util
        if importlib.util.find_spec("ctranslate2") is None or importlib.util.find_spec("transformers") is None:
            raise Gpt2kitError("--to ctranslate2 needs ctranslate2 and transformers: "
                               "pip install 'gpt2kit[ctranslate2]'")
    hint = ("pass SRC as a local directory (config.json + model.safetensors, hparams.json + model.ckpt.*, or a "
            "gpt2kit run), a nanoGPT ckpt.pt or an llm.c model .bin")
    if to in _FILE_FORMATS:
        _new_output_file(out)
        path = resolve_model_dir(src, flag="SRC", local_hint=hint)
        config, sd = read_checkpoint(path)
        files = _source_vocab(path, config, needed=to == "gguf")
        if to == "gguf":
            from gpt2kit.checkpoints.gguf_write import write_gguf
            write_gguf(out, config, sd, files, outtype=outtype, name=path.stem if path.is_file() else path.name)
        else:
            from gpt2kit.checkpoints.llmc import write_llmc
            n_vocab = len(read_encoder(files[0])) if files is not None else None
            write_llmc(out, config, sd, n_vocab=n_vocab, dtype=dt or torch.float32)
        return out
    with new_model_dir(out) as stage:
        path = resolve_model_dir(src, flag="SRC", local_hint=hint)
        config, sd = read_checkpoint(path)
        if to == "ctranslate2":
            from gpt2kit.checkpoints.ctranslate2 import write_ctranslate2
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
            from gpt2kit.checkpoints.hf import write_hf_dir
            write_hf_dir(stage, config, sd)
            if files is not None:
                (stage / "vocab.json").write_bytes(files[0].read_bytes())
                (stage / "merges.txt").write_bytes(files[1].read_bytes())
            (stage / "gpt2kit.json").write_text(json.dumps({"converted_from": str(src)}, indent=2) + "\n")
    return out
