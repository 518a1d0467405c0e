"""Share a model on the Hugging Face Hub: `gpt2kit push RUN_OR_DIR --repo ORG/NAME` and `finetune --push-to-hub`.

What goes up: the model's HF-format files (config, weights, vocabulary) and a generated model card (README.md
with the Hub's YAML front matter). For a run directory also its loss plot. Which model of a run:
  best   the lowest validation loss (the model `--model RUN` loads); the default when the run has one
  final  the weights after the last step; the default when validation chose no best/
A LoRA run's best/ and final/ hold the adapter *and* the merged model: the merged model is pushed, so the
repository loads with transformers and gpt2kit alone; the adapter (gpt2kit's own format, which records a
local path to its base) stays local. A run with adapter checkpoints only must be merged first.

huggingface_hub does the uploading (HF_ENDPOINT, HF_TOKEN or `hf auth login`); its exceptions become one-line
Gpt2kitErrors here."""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2kit import runs
from gpt2kit.config import OPENAI_NAMES
from gpt2kit.data import TokenCache
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import is_adapter_dir, is_model_dir, shard_names, weights_source

log = logging.getLogger("gpt2kit")

WHICH = ("auto", "best", "final")
# the files of a model directory that a Hub repository needs (the weights are added by _model_files)
_MODEL_FILES = ("config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# licences of the base models gpt2kit knows by name (their Hub model cards say so)
_LICENSES = {"openai-community/gpt2": "mit", "openai-community/gpt2-medium": "mit",
             "openai-community/gpt2-large": "mit", "openai-community/gpt2-xl": "mit",
             "distilbert/distilgpt2": "apache-2.0"}
LOGIN_HINT = "set HF_TOKEN to a token with write access (huggingface.co/settings/tokens) or run `hf auth login` " \
             "(older huggingface_hub: `huggingface-cli login`)"


@dataclass
class Picked:
    model_dir: Path  # the directory whose files are uploaded
    run_dir: Path | None  # the run it belongs to, if any (the card is written from it)
    which: str | None  # best | final, for a run
    why: str  # one line: what was picked and why


def check_repo_id(repo: str) -> str:
    if not _REPO_ID.fullmatch(repo or "") or len(repo) > 96 or ".." in repo or repo.endswith(".git"):
        raise Gpt2kitError(f"--repo {repo!r} is not a Hub repository id: use ORG/NAME (your user name or an "
                           "organization, a slash, and a name of letters, digits, '-', '_' or '.')")
    return repo


def _token(token: str | None) -> str:
    from huggingface_hub import get_token  # lazy: slow to import; only pushing needs it
    token = token or get_token()
    if not token:
        raise Gpt2kitError(f"no Hugging Face token to push with: {LOGIN_HINT}")
    return token


def check_ready(repo: str, token: str | None = None) -> None:
    """What can be checked without the network before a long run that ends with a push: the repository id and
    that a token is there."""
    check_repo_id(repo)
    _token(token)


def pick_model(path: str | Path, which: str = "auto") -> Picked:
    """The model directory to push from `path` (a run directory, a run's best/ or final/, or a model
    directory); a one-line Gpt2kitError for anything else."""
    if which not in WHICH:
        raise Gpt2kitError(f"--which must be one of {', '.join(WHICH)}, not {which!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise Gpt2kitError(f"no such directory: {path}; pass a run directory or a model directory")
    if not p.is_dir():
        raise Gpt2kitError(f"{path} is a file; pass a run directory or a model directory (config.json + "
                           "model.safetensors)")
    if runs.is_run_dir(p):
        info = runs.run_info(p)
        has = {w: is_model_dir(p / w) for w in ("best", "final")}
        if which == "auto":
            which = "best" if has["best"] else "final"
        if not has[which]:
            other = "final" if which == "best" else "best"
            if has[other]:
                hint = f"use --which {other}"
            elif runs.adapter_only_checkpoint(p) is not None:
                hint = (f"it holds LoRA adapter checkpoints only: merge one first with `gpt2kit merge "
                        f"{shlex.quote(str(p))} --out DIR`, then push DIR")
            else:
                hint = (f"finish it first with `gpt2kit finetune --resume {shlex.quote(str(p))}`"
                        if info.status != "finished" else "it has no saved model")
            raise Gpt2kitError(f"run {path} has no {which}/ model ({info.shown_status} at step {info.step}); {hint}")
        if which == "best":
            why = (f"{p / 'best'}: the lowest validation loss ({info.best_val_loss:.4f} at step {info.best_step}); "
                   "--which final pushes the last step's model" if info.best_val_loss is not None else
                   f"{p / 'best'}: the lowest validation loss")
        else:
            why = (f"{p / 'final'}: the model after the last step (step {info.step})"
                   + ("; --which best pushes the lowest validation loss" if has["best"] else
                      " (validation chose no best/)"))
        return Picked(p / which, p, which, why)
    if p.name in ("best", "final") and runs.is_run_dir(p.parent) and is_model_dir(p):
        return Picked(p, p.parent, p.name, f"{p} (the run's {p.name} model)")
    if is_model_dir(p):
        return Picked(p, None, None, str(p))
    if is_adapter_dir(p):
        raise Gpt2kitError(f"{path} holds a LoRA adapter only: merge it into its base first with `gpt2kit merge "
                           f"{shlex.quote(str(p))} --out DIR`, then push DIR")
    raise Gpt2kitError(f"{path} is neither a gpt2kit run nor a model directory (no run.json, no config.json with "
                       "model.safetensors): pass a run directory or a model directory")


def _model_files(d: Path) -> dict[str, Path]:
    """path in the repository -> local file: the config, the weights (a single file, or an index and its
    shards) and the vocabulary. A directory in OpenAI's TensorFlow layout is refused (convert it first)."""
    src = weights_source(d)
    if src is None or not (d / "config.json").is_file():
        raise Gpt2kitError(f"{d} is not in HuggingFace format (config.json + model.safetensors): convert it first "
                           f"with `gpt2kit convert {shlex.quote(str(d))} OUT --to hf`, then push OUT")
    out = {f: d / f for f in _MODEL_FILES if (d / f).is_file()}
    out[src.name] = src
    if src.name.endswith(".index.json"):
        out |= {n: d / n for n in shard_names(src)}
    return out


# ---- the model card -------------------------------------------------------------------------------


def _hub_id(model: str | None) -> str | None:
    """A base model as a Hub id when it is one: a known name, 'org/name', or a snapshot in the HF cache."""
    from gpt2kit.checkpoints.hub import REPO_IDS  # lazy: the package imports torch, which a push never needs
    if not model:
        return None
    name = OPENAI_NAMES.get(model, model)
    if name in REPO_IDS:
        return REPO_IDS[name]
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", model)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if _REPO_ID.fullmatch(model) and not Path(model).exists():
        return model
    return None


def _shown(value: Any) -> Any:
    """Local paths in the card by their last part only: the card is public, the directory layout is not."""
    if isinstance(value, list):
        return [_shown(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value


def _command(cfg: dict[str, Any]) -> str:
    """The finetune command that reproduces the run's resolved config (paths by name, defaults left out)."""
    from gpt2kit.train import TrainConfig  # lazy: torch and the trainer, only to word the command
    default = TrainConfig().to_dict()
    # where it ran and what it reported to say nothing about the model; eps and the sampling settings have no flag
    skip = {"out", "push_to_hub", "push_private", "wandb", "wandb_project", "wandb_run_name", "tensorboard", "eps",
            "sample_temperature", "sample_top_k"}
    parts = ["gpt2kit", "finetune"]
    for key, value in cfg.items():
        if key in skip or value == default.get(key) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        value = _shown(value)
        if key in ("data", "val_data", "lora_targets", "freeze"):
            items = value if isinstance(value, list) else [value]
            if key == "lora_targets":
                parts += [flag, ",".join(items)]
            elif key == "freeze":
                parts += [a for v in items for a in (flag, v)]
            else:
                parts += [flag, *items]
        elif key == "prompts":
            parts += [a for v in value for a in ("--prompt", v)]
        elif isinstance(value, bool):
            parts.append(flag if value else "")
        else:
            parts += [flag, str(value)]
    parts += ["--out", "RUN"]
    return " ".join(shlex.quote(x) for x in parts if x)


def _data_facts(run_dir: Path, info: dict[str, Any]) -> dict[str, int]:
    facts = {}
    for key in ("train_tokens", "val_tokens"):
        path = info.get(key)
        if isinstance(path, str) and Path(path).is_file():
            try:
                c = TokenCache.open(path)
                facts[key], facts[key.replace("tokens", "docs")] = len(c), int(c.n_docs)
            except Exception:  # noqa: BLE001 - counts are a nicety; a card without them is still right
                pass
    return facts


def _loss(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def model_card(picked: Picked, repo: str, *, license: str | None = None, has_plot: bool = False) -> str:
    """README.md for the repository: YAML front matter (license, base_model, tags, library_name) and the run's
    facts (base model, data, steps, validation loss, the loss plot, the command), then how to use it."""
    from huggingface_hub import ModelCardData  # lazy: slow to import; only pushing needs it
    info: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    if picked.run_dir is not None:
        info = runs.read_run_json(picked.run_dir)
        try:
            cfg = json.loads((picked.run_dir / runs.CONFIG_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
    base = info.get("model") or cfg.get("model")
    base_id = _hub_id(base) if cfg.get("init", "pretrained") == "pretrained" else None
    license = license or _LICENSES.get(base_id or "")
    data = ModelCardData(license=license, base_model=base_id, library_name="transformers",
                         tags=["gpt2", "gpt2kit", "text-generation"], pipeline_tag="text-generation")
    name = repo.split("/", 1)[1]
    lines = ["---", data.to_yaml(), "---", "", f"# {name}", ""]
    if picked.run_dir is None:
        lines += ["A GPT-2 model shared with [gpt2kit](https://pypi.org/project/gpt2kit/).", ""]
    else:
        lora = bool(cfg.get("lora_rank"))
        if cfg.get("init") == "scratch":
            origin = f"trained from scratch (architecture {_shown(cfg.get('config') or base)})"
        else:
            origin = f"fine-tuned from [{base_id}](https://huggingface.co/{base_id})" if base_id else \
                f"fine-tuned from a local model ({_shown(base)})"
        how = f" with LoRA adapters of rank {cfg['lora_rank']}, merged into the weights" if lora else ""
        lines += [f"GPT-2 {origin}{how}, with [gpt2kit](https://pypi.org/project/gpt2kit/). This repository holds "
                  f"the run's **{picked.which}** model"
                  + (" (the lowest validation loss)." if picked.which == "best" else " (after the last step)."), ""]
        facts = _data_facts(picked.run_dir, info)
        rows = [("base model", base_id or _shown(base) or "-")]
        names = ", ".join(_shown(cfg.get("data") or [])) or "-"
        tokens = f" ({facts['train_tokens']:,} tokens in {facts['train_docs']:,} documents)" if "train_tokens" in \
            facts else ""
        rows.append(("training data", names + tokens))
        if cfg.get("val_data"):
            val = ", ".join(_shown(cfg["val_data"]))
        elif cfg.get("val_fraction"):
            val = f"{cfg['val_fraction']:g} of the documents held out"
        else:
            val = "none"
        if "val_tokens" in facts:
            val += f" ({facts['val_tokens']:,} tokens in {facts['val_docs']:,} documents)"
        rows.append(("validation data", val))
        steps = f"{info.get('step', 0)} of {info.get('total_steps') or cfg.get('steps') or '-'}"
        if cfg.get("epochs"):
            steps += f" ({cfg['epochs']:g} epochs)"
        if info.get("stopped_early"):
            steps += ", stopped early"
        rows.append(("steps", steps))
        batch = cfg.get("batch_size", 0) * cfg.get("grad_accum", 1)
        if batch and cfg.get("block_size"):
            rows.append(("batch", f"{batch} x {cfg['block_size']} tokens per process, lr {cfg.get('lr')}, "
                                  f"{cfg.get('schedule')} schedule"))
        metrics = runs.read_metrics(picked.run_dir)
        vals = [r for r in metrics if "val_loss" in r]
        final_val = vals[-1] if vals and vals[-1].get("step") == info.get("step") else None
        best = _loss(info.get("best_val_loss")) + (f" (step {info['best_step']})" if info.get("best_step") else "")
        rows.append(("validation loss, best", best))
        rows.append(("validation loss, final", _loss(final_val and final_val["val_loss"])))
        rows.append(("training loss, last step", _loss(info.get("last_loss"))))
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
        if has_plot:
            lines += ["![training and validation loss](loss.png)", ""]
        lines += ["The command that trained it (local paths shown by name):", "", "```sh", _command(cfg), "```", ""]
        if cfg:
            shown = {k: _shown(v) for k, v in cfg.items() if k not in ("out",)}
            lines += ["<details><summary>The run's resolved configuration</summary>", "", "```json",
                      json.dumps(shown, indent=2), "```", "", "</details>", ""]
    lines += ["## Use it", "", "With gpt2kit:", "", "```sh", "pip install gpt2kit",
              f'gpt2kit generate "Once upon a time" --model {repo}', "```", "", "With transformers:", "",
              "```python", "from transformers import pipeline", "",
              f'generator = pipeline("text-generation", model="{repo}")',
              'print(generator("Once upon a time", max_new_tokens=40)[0]["generated_text"])', "```", ""]
    return "\n".join(lines)


# ---- uploading ------------------------------------------------------------------------------------


def push(path: str | Path, repo: str, *, private: bool = False, which: str = "auto", token: str | None = None,
         endpoint: str | None = None, license: str | None = None) -> str:
    """Upload a model (a model directory, or a run's best/final model) with a generated model card to the
    Hub repository `repo`, creating it if need be; returns the repository's URL. One commit, so a failed
    push leaves the repository as it was."""
    from huggingface_hub import CommitOperationAdd, HfApi  # lazy: slow to import; only pushing needs it
    check_repo_id(repo)
    picked = pick_model(path, which)
    files = _model_files(picked.model_dir)
    plot = picked.run_dir / "loss.png" if picked.run_dir is not None else None
    has_plot = plot is not None and plot.is_file()
    if has_plot:
        files["loss.png"] = plot
    if picked.run_dir is None and (picked.model_dir / "README.md").is_file():
        card = (picked.model_dir / "README.md").read_bytes()  # the directory's own card, as its author wrote it
    else:
        card = model_card(picked, repo, license=license, has_plot=has_plot).encode()
    from huggingface_hub import constants  # lazy: slow to import; only pushing needs it
    if constants.HF_HUB_OFFLINE:
        raise Gpt2kitError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; unset it to push")
    log.info("pushing %s to %s", picked.why, repo)
    from gpt2kit.checkpoints.hub import bound_timeouts  # lazy: imports huggingface_hub
    bound_timeouts()
    api = HfApi(endpoint=endpoint, token=_token(token))
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f)) for name, f in files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        what = f"the {picked.which} model of a gpt2kit run" if picked.which else "a model"
        api.create_commit(repo, ops, commit_message=f"Upload {what} with gpt2kit", repo_type="model")
    except Exception as e:
        err = _push_error(e, repo)
        if err is None:
            raise
        raise err from e
    return str(url)


def _push_error(e: Exception, repo: str) -> Gpt2kitError | None:
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, RepositoryNotFoundError  # lazy: slow to import

    from gpt2kit.checkpoints.hub import NETWORK_ERRORS, _chain  # lazy: the package imports torch
    chain = list(_chain(e))

    def find(kind):
        return next((x for x in chain if isinstance(x, kind)), None)

    if find(HFValidationError):
        return Gpt2kitError(f"--repo {repo!r} is not a valid Hub repository id: use ORG/NAME")
    x = find(HfHubHTTPError)
    status = getattr(getattr(x, "response", None), "status_code", None)
    if status == 401:
        return Gpt2kitError(f"the Hub rejected the access token while pushing to {repo} (HTTP 401): {LOGIN_HINT}")
    if status == 403 or (status == 404 and find(RepositoryNotFoundError)):
        return Gpt2kitError(f"no permission to write to {repo} on the Hub (HTTP {status}): use your own user name "
                            "or an organization you may write to, with a token that has write access")
    if status is not None:
        return Gpt2kitError(f"cannot push to {repo}: the Hugging Face Hub answered HTTP {status}: try again later")
    if find(NETWORK_ERRORS):
        return Gpt2kitError(f"cannot push to {repo}: the Hugging Face Hub is unreachable (no network connection, "
                            "no answer, or HF_ENDPOINT is wrong): connect and try again")
    return None
