"""Experiment trackers the trainer reports to, beside RUN/metrics.jsonl and RUN/samples: today Weights & Biases
(`finetune --wandb`). The trainer calls one `Trackers` object at the points where it writes its own records;
a tracker that fails warns once and never stops training.

W&B reads its usual settings from the environment (WANDB_API_KEY or `wandb login`, WANDB_MODE=offline,
WANDB_DIR, WANDB_ENTITY); each start of a process (a new run or a resume) is one W&B run."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from gpt2kit.errors import Gpt2kitError

log = logging.getLogger("gpt2kit")

WANDB_EXTRA = "pip install 'gpt2kit[wandb]'"
# metrics.jsonl's keys -> the names charted in W&B
_NAMES = {"loss": "train/loss", "lr": "train/lr", "tok_per_s": "train/tokens_per_sec", "grad_norm": "train/grad_norm",
          "tokens": "train/tokens", "val_loss": "val/loss", "val_ppl": "val/perplexity"}


class Tracker(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None: ...

    def log_samples(self, step: int, prompts: Sequence[str], texts: Sequence[str]) -> None: ...

    def finish(self, status: str) -> None: ...


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise Gpt2kitError(f"--wandb needs the wandb package: {WANDB_EXTRA}") from None
    return wandb


class WandbTracker:
    def __init__(self, config: dict[str, Any], run_dir: Path, project: str | None, name: str | None):
        wandb = _import_wandb()
        self.wandb = wandb
        try:
            self.run = wandb.init(project=project or "gpt2kit", name=name or run_dir.name, config=config,
                                  job_type="finetune",
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - wandb raises its own kinds (UsageError, CommError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Gpt2kitError(f"cannot start Weights & Biases ({first}): run `wandb login` or set WANDB_API_KEY, "
                               "or set WANDB_MODE=offline to log locally and `wandb sync` later") from None

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        shown = {_NAMES[k]: v for k, v in metrics.items() if k in _NAMES and v is not None}
        if shown:
            self.run.log(shown, step=step)

    def log_samples(self, step: int, prompts: Sequence[str], texts: Sequence[str]) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "text"],
                                 data=[[step, p, t] for p, t in zip(prompts, texts)])
        self.run.log({"samples": table}, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("finished", "interrupted") else 1)


class Trackers:
    """All the trackers a run reports to (none: every call does nothing). Only the main process has any."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self._warned: set[int] = set()

    def _each(self, call: str, *args: Any) -> None:
        for i, t in enumerate(self.trackers):
            try:
                getattr(t, call)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("%s failed (%s: %s); training goes on without it", type(t).__name__,
                                type(e).__name__, e)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self._each("log_metrics", step, metrics)

    def log_samples(self, step: int, prompts: Sequence[str], texts: Sequence[str]) -> None:
        self._each("log_samples", step, prompts, texts)

    def finish(self, status: str) -> None:
        self._each("finish", status)
        self.trackers = []


def check_available(use_wandb: bool) -> None:
    """Before a run starts: the optional packages its trackers need are installed."""
    if use_wandb:
        if importlib.util.find_spec("wandb") is None:
            raise Gpt2kitError(f"--wandb needs the wandb package: {WANDB_EXTRA}")


def open_trackers(config: dict[str, Any], run_dir: Path, *, use_wandb: bool = False, wandb_project: str | None = None,
                  wandb_run_name: str | None = None) -> Trackers:
    trackers: list[Tracker] = []
    if use_wandb:
        trackers.append(WandbTracker(config, run_dir, wandb_project, wandb_run_name))
    return Trackers(trackers)
