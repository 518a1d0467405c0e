"""Fine-tuning (and training from scratch): `finetune(TrainConfig(...)) -> RunResult` is the whole feature;
`gpt2kit finetune` is a thin wrapper.

The package, by concern: config (TrainConfig, RunResult, the default cadence; free of torch), precision,
trainer (the optimizer step), fast_paths (the CPU/GPU fast paths training hands the model), distributed
(torchrun), fsdp (--fsdp: sharding with FSDP2, sharded checkpoints, the gathered model), state (TrainState:
what a checkpoint's trainer.pt holds), rundir (the run directory's life), setup (model, data and the resolved
config), loop (the run itself: finetune, resume).

Determinism, which exact resume rests on: the batch of micro-step j is a pure function of (seed, j)
(data.Batcher), the dropout generator is re-seeded from (seed, step, rank) before every optimizer step,
evaluation and sampling use no global random state, and a checkpoint holds the weights, optimizer,
loss scaler, step and best-validation bookkeeping. So a run killed at any moment (even with SIGKILL) and
resumed from its last checkpoint recomputes the lost steps bit for bit and ends with the same model.

Data parallelism: under `torchrun`, rank r of W takes micro-batches j*W + r (see data.Batcher), and
gradients are averaged across ranks, so W processes with batch B and accumulation A compute the same
update as one process with batch B and accumulation A*W. Under --fsdp the same holds, each rank holding
1/W of the weights, gradients and optimizer state; a resume with W' processes keeps A*W micro-batches a step
by setting the accumulation to A*W/W'."""

from __future__ import annotations

import importlib
from typing import Any

from gpt2kit.train.config import (
    DEFAULT_PROMPTS,
    DTYPE_NAMES,
    FREEZE_GROUPS,
    SCHEDULES,
    Cadence,
    RunResult,
    TrainConfig,
    default_cadence,
)
from gpt2kit.train.config import resume_hint as _resume_hint

# the names that need torch, by module: imported on first use, so that `gpt2kit.train.config` (which the
# command line's parser reads) loads without torch
_LAZY = {
    "gpt2kit.train.precision": ("EmulatedAutocast", "Precision", "_native_cpu"),
    "gpt2kit.train.fast_paths": ("tune_cpu_allocator", "training_ops", "_NormInBackward"),
    "gpt2kit.train.trainer": ("Trainer", "build_optimizer", "param_groups", "lr_at", "freeze", "set_dropout"),
    "gpt2kit.train.distributed": ("_Dist", "_init_distributed"),
    "gpt2kit.train.state": ("TrainState", "TRAINER_STATE", "TRAINER_STATE_VERSION"),
    "gpt2kit.train.loop": ("finetune", "resume", "_Interrupt", "_Run"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["DEFAULT_PROMPTS", "DTYPE_NAMES", "FREEZE_GROUPS", "SCHEDULES", "Cadence", "RunResult", "TrainConfig",
           "default_cadence", "_resume_hint", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gpt2kit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
