"""Setup of a run."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt2kit import memory, runs
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train.config import TrainConfig

_EVAL_TOKENS = 32768  # validation targets an evaluation scores by default


def _memory_warning(model: GPT, cfg: TrainConfig, block: int, device: torch.device, trainable: int) -> str | None:
    """A rough peak-memory estimate, to warn before the OS kills the process (CPU) or CUDA runs out; a run
    that needs more than the device's whole memory is refused (a Gpt2kitError) before it starts."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    state = 4 * n + 12 * trainable  # weights + grads + Adam moments, float32
    tokens = cfg.batch_size * block
    per_layer = 34 * c.n_embd * 4 if not cfg.grad_checkpointing else c.n_embd * 4
    acts = tokens * (c.n_layer * per_layer + 3 * c.vocab_size * 4)
    need = state + acts
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free, total = _available_ram(), memory.meminfo("MemTotal")
        if free is None:
            return None
    else:
        return None
    if total is not None and need > total:  # cannot fit even with everything else freed
        raise Gpt2kitError(f"--batch-size {cfg.batch_size} x --block-size {block} needs roughly {memory.gib(need)}, "
                           f"more than the {memory.gib(total)} of memory on {device.type}; lower --batch-size (raise "
                           "--grad-accum to keep the batch), add --grad-checkpointing, or use --lora-rank 8")
    if need > 0.9 * free:
        return (f"this run needs roughly {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free on "
                f"{device.type}; if it runs out, lower --batch-size (raise --grad-accum to keep the batch), "
                "add --grad-checkpointing, or use --lora-rank 8")
    return None


def _available_ram() -> int | None:
    return memory.meminfo("MemAvailable")


def _sample_texts(model: GPT, tok: Tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int,
                  temperature: float = 0.8, top_k: int = 40) -> list[str]:
    """One completion per prompt (prompt included), seeded, without touching global random state."""
    from gpt2kit.generate import GenerationConfig, Generator
    was_training = model.training
    model.eval()
    try:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        outs = Generator(model, tok).generate(list(prompts), cfg)
    finally:
        model.clear_caches()
        model.train(was_training)
    return [(o.prompt if o.prompt != "<|endoftext|>" else "") + o.text for o in outs]


def _check_sharing(cfg: TrainConfig) -> None:
    """Before training, not after it: --wandb's package is installed, --push-to-hub names a repository and a
    token is there to push with."""
    if cfg.wandb:
        from gpt2kit.tracking import check_available
        check_available(True)
    if cfg.push_to_hub:
        from gpt2kit.push import check_ready
        check_ready(cfg.push_to_hub)


def _check_inputs(cfg: TrainConfig) -> None:
    """Replacing a run in --out deletes its own entries before the new run reads its inputs: an input among
    them is refused before anything is deleted. So is a data folder holding --out, which would read the run's
    own files (tokenizer/merges.txt, samples/) as training text."""
    out = Path(cfg.out).expanduser().resolve()
    named = [("--model", cfg.model), ("--config", cfg.config), ("--tokenizer", cfg.tokenizer)]
    named += [("--data", d) for d in cfg.data] + [("--val-data", d) for d in cfg.val_data]
    for opt, value in named:
        if not value:
            continue
        path = Path(value).expanduser()
        found = [path] if path.exists() or not glob.has_magic(value) else \
            [Path(m) for m in glob.glob(os.path.expanduser(value), recursive=True)]
        for p in (f.resolve() for f in found if f.exists()):
            if p == out or (out in p.parents and p.relative_to(out).parts[0] in runs.RUN_ENTRIES):
                fix = "" if opt == "--model" else f"copy it out of {cfg.out} first, or "
                raise Gpt2kitError(f"{opt} {value} is inside --out {cfg.out}: a new run cannot replace the one it "
                                   f"{'starts from' if opt == '--model' else 'reads from'}; {fix}choose another --out")
            if (opt in ("--data", "--val-data") and p.is_dir() and p in out.parents
                    and not any(part.startswith(".") for part in out.relative_to(p).parts)):  # (hidden: skipped)
                raise Gpt2kitError(f"{opt} {value} holds --out {cfg.out}, whose own files (tokenizer, samples) would "
                                   "be read as training text; choose an --out outside it")
