"""TrainState: a run's progress, saved whole as each checkpoint's trainer.pt and loaded whole to resume."""

from __future__ import annotations

import os
import random
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2kit.checkpoints.hf import load_pickle
from gpt2kit.data import Batcher
from gpt2kit.errors import Gpt2kitError
from gpt2kit.train.trainer import Trainer

TRAINER_STATE = "trainer.pt"
TRAINER_STATE_VERSION = 1


@dataclass
class TrainState:
    """Where a run is: its counters and best-validation bookkeeping, and through `trainer` and `batcher` the
    optimizer, the loss scaler and the data position; with every random generator's state, that is what a
    resumed run needs to recompute the next steps bit for bit. trainer.pt keys (version 1): version, step,
    world_size, optimizer (None under --fsdp: the checkpoint's sharded/ holds it), scaler, scheduler, batcher,
    rng, best_val_loss, best_step, bad_evals, tokens, train_time, last_loss."""
    trainer: Trainer
    batcher: Batcher
    step: int = 0  # optimizer steps done
    best_val: float | None = None  # the best validation loss so far (step 0's: the baseline)
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last new best (for --early-stop)
    tokens_seen: int = 0  # target tokens trained on, every process's
    train_time: float = 0.0  # seconds in training steps (not evaluation, samples or checkpoints)
    last_loss: float | None = None

    def best(self) -> dict[str, Any]:
        """best/'s validation loss and step, for run.json and RunResult: None while no step has beaten the
        starting model (whose step-0 loss best_val then holds, as the baseline)."""
        has = bool(self.best_step)
        return {"best_val_loss": self.best_val if has else None, "best_step": self.best_step if has else None}

    def state_dict(self, *, schedule: str, total_steps: int, world: int) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "version": TRAINER_STATE_VERSION, "step": self.step, "world_size": world,
            **self.trainer.state_dict(),
            "scheduler": {"kind": schedule, "step": self.step, "total_steps": total_steps},
            "batcher": self.batcher.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "python": random.getstate()},
            "best_val_loss": self.best_val, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "tokens": self.tokens_seen, "train_time": self.train_time, "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        self.batcher.load_state_dict(state["batcher"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np_state = rng["numpy"]  # its key array comes back on the run's device (map_location), a GPU too
        np.random.set_state((np_state[0], np_state[1].cpu().numpy().astype(np.uint32), *np_state[2:]))
        random.setstate(rng["python"])
        self.step = int(state["step"])
        self.best_val, self.best_step = state["best_val_loss"], state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.tokens_seen, self.train_time = int(state["tokens"]), float(state["train_time"])
        self.last_loss = state.get("last_loss")

    def save(self, path: Path, *, schedule: str, total_steps: int, world: int) -> None:
        """Written to a temporary name and renamed: a crash never leaves a half trainer.pt."""
        self.save_dict(self.state_dict(schedule=schedule, total_steps=total_steps, world=world), path)

    @staticmethod
    def save_dict(state: dict[str, Any], path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, ckpt: Path, *, device: torch.device, world: int, run_dir: Path, any_world: bool = False) -> None:
        """Restore everything from checkpoint `ckpt`'s trainer.pt, which must come from a job of `world`
        processes unless `any_world` (an --fsdp run, whose global batch the caller has kept: fsdp_regroup)."""
        self.load_state_dict(read_state(ckpt, device=device, world=world, run_dir=run_dir, any_world=any_world))


def read_state(ckpt: Path, *, device: torch.device, world: int, run_dir: Path,
               any_world: bool = False) -> dict[str, Any]:
    try:
        state = load_pickle(ckpt / TRAINER_STATE, map_location=device)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise Gpt2kitError(f"cannot read {ckpt / TRAINER_STATE} ({type(e).__name__}); delete {ckpt} to "
                           "resume from the checkpoint before it") from None
    if state.get("version") != TRAINER_STATE_VERSION:
        raise Gpt2kitError(f"{ckpt / TRAINER_STATE} has format v{state.get('version')}; this gpt2kit "
                           f"reads v{TRAINER_STATE_VERSION}")
    then = state.get("world_size", world)  # (absent from older checkpoints)
    if then != world and not any_world:
        q = shlex.quote(str(run_dir))
        how = (f"`torchrun --nproc_per_node {then} -m gpt2kit finetune --resume {q}`" if then > 1 else
               f"without torchrun: `gpt2kit finetune --resume {q}`")
        raise Gpt2kitError(f"cannot resume {run_dir}: it was trained with {then} process"
                           f"{'es' if then > 1 else ''} and this job has {world} (the global batch "
                           f"and the data each step reads depend on it); resume it with {how}")
    return state
