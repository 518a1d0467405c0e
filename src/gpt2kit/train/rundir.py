"""A run directory's life: taking its lock, checking what --out holds, replacing an earlier run only once
everything has been checked (`commit`), cleaning up after a start that failed before training, and writing
checkpoints and the named models (best/, final/) so that a failed write never leaves a half one."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from gpt2kit import lora, runs
from gpt2kit.checkpoints import hf, save_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import ADAPTER_CONFIG
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train.config import TrainConfig, resume_hint
from gpt2kit.train.distributed import _out_of_memory
from gpt2kit.train.state import TRAINER_STATE, TrainState

STAGING = ".tmp-data"  # a new run's data caches, until it replaces what --out held (see RunDir.commit)


class RunDir:
    """The main process's hold on the run directory. Order matters for what a failure leaves behind: the lock
    is taken before anything else touches the directory (`prepare`); everything that can fail is checked while
    the directory stays as it was; then `commit` replaces what --out held (--overwrite) and records the run. A
    new run that fails before `commit` leaves nothing behind (`abandon`, then `close` removes the folders it
    made); a resume that fails before it leaves the run as it was."""

    def __init__(self, path: Path, *, resuming: bool, overwrite: bool = False, lock: runs.RunLock | None = None):
        self.path = path
        self.resuming = resuming
        self.overwrite = overwrite
        self.lock = lock  # resume() takes it before reading the run
        self.created: list[Path] = []  # folders this start made, outermost first (removed if it fails before training)
        self.committed = False  # run.json and config.json now describe this run
        self.replaced = False  # commit has removed what --out held
        self.record: dict[str, Any] = {}  # run.json fields found during setup, written by commit

    def prepare(self) -> None:
        d = self.path
        if self.resuming:
            if self.lock is None:  # (resume() takes it; a caller without one)
                self.lock = runs.RunLock.acquire(d)
            try:  # a read-only run would fail at its first write, after loading the model and data
                tempfile.TemporaryFile(dir=d).close()
            except OSError as e:
                raise Gpt2kitError(f"cannot resume {d}: cannot write in it ({e.strerror or e}); a run "
                                   "directory must be writable to resume: make it writable, or copy it elsewhere "
                                   "and resume the copy") from None
            runs.recover_dirs(d)
            return
        # gpt2kit deletes only what it wrote: --out is a new path, an empty folder, or a run of ours. The lock
        # first (so the folder is made first), then the checks; nothing is deleted here (see commit)
        if d.exists() and not d.is_dir():
            raise Gpt2kitError(f"--out {d} is a file; give a directory for the run")
        if self.lock is None:
            self.created += [p for p in (d, *d.absolute().parents) if not p.exists()][::-1]
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Gpt2kitError(f"cannot create --out {d} ({e.strerror or e}); choose a writable place") from None
            self.lock = runs.RunLock.acquire(d)
        if runs.is_run_dir(d):
            # an unreadable run.json is a one-line error here; the lock is ours, so "running" means killed
            info = runs.run_info(d, locked=False)
            if not (self.overwrite or self._aborted_start(info)):
                go_on = (f"start a new run from its model with --model {shlex.quote(str(d))}"
                         if info.status == "finished" else f"continue it with {resume_hint(d)}")
                raise Gpt2kitError(f"{d} already holds a run ({info.status} at step {info.step}); {go_on}, "
                                   "replace it with --overwrite (Python: finetune(..., overwrite=True)), or choose "
                                   "another --out")
        elif any(not runs.is_leftover(p.name) for p in d.iterdir()):
            raise Gpt2kitError(f"--out {d} is a folder with other files in it, not a gpt2kit run"
                               + (" (--overwrite only replaces runs)" if self.overwrite else "")
                               + "; choose another --out or an empty folder")
        shutil.rmtree(d / STAGING, ignore_errors=True)  # an earlier start's, killed before it trained

    def _aborted_start(self, info: runs.RunInfo) -> bool:
        return (info.status in ("failed", "dead", "interrupted") and info.step == 0
                and not runs.checkpoint_dirs(self.path) and runs.model_dir(self.path) is None)

    def commit(self, cfg: TrainConfig, tok: Tokenizer, step: int) -> None:
        """Everything has been checked: replace what --out held (an earlier run: its own entries only) with this
        run, and record it. A resume records that it runs again (from `step`)."""
        d = self.path
        if not self.resuming:
            runs.remove_run(d, keep=(STAGING,))
            self.replaced = True  # (from here on, a failure before training removes this run's entries too)
            if (d / STAGING).exists():
                os.replace(d / STAGING, d / "data")
            tok.save(d / "tokenizer")  # the run keeps its own vocabulary (checkpoints come and go)
            self.record.update(step=0, started=runs.now(), model=cfg.model, lora=bool(cfg.lora_rank))
        # run.json before config.json: a run killed between the two is a run (dead at step 0, replaced by the
        # next start), not a folder of unknown files
        runs.update_run_json(d, status="running", total_steps=cfg.steps, error=None,  # (a failed start's)
                             **self.record, **runs.process_stamp())
        runs.write_json(d / runs.CONFIG_JSON, cfg.to_dict())
        # from step 0 the loop evaluates step 0 again: keep none of the earlier start's records
        runs.truncate_metrics(d, step if step else -1)
        self.committed = True

    def abandon(self) -> None:
        """A new run that failed before commit ended: remove what it wrote (its staged data, or if commit had
        begun, its run entries); the lock file and the folders it made go in `close`."""
        shutil.rmtree(self.path / STAGING, ignore_errors=True)
        if self.replaced:
            runs.remove_run(self.path)

    def close(self) -> None:
        """The last thing a run does: run.json says how it ended before another may start."""
        if self.lock is not None:
            self.lock.release()
        if not self.committed:
            for d in reversed(self.created):  # a new run that never trained leaves no folder it made
                try:
                    d.rmdir()
                except OSError:
                    break


# ---- checkpoints and named models -----------------------------------------------------------------

def write_model(model: GPT, tok: Tokenizer, lora_cfg: lora.LoraConfig | None, out: Path) -> None:
    """The model in HF format (LoRA: the adapter only)."""
    if lora_cfg is None:
        save_model(model, tok, out)
    else:
        lora.save_adapter(model, lora_cfg, out)


def write_full_model(model: GPT, tok: Tokenizer, lora_cfg: lora.LoraConfig | None, out: Path) -> None:
    """The model in HF format (LoRA: the adapter and the merged model, for best/ and final/)."""
    write_model(model, tok, lora_cfg, out)
    if lora_cfg is not None:
        hf.write_hf_dir(out, model.config, lora.merged_state_dict(model))
        tok.save(out)


@contextlib.contextmanager
def writing(tmp: Path, final: Path, *, run_dir: Path, model: GPT, world: int) -> Iterator[None]:
    """A failed write of `tmp` (disk full, no permission) becomes one line naming `final`, the checkpoint
    `--resume` would continue from (or that there is none yet), and the fix; the half-written `tmp` is
    removed, and the previous `final` was never touched."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if _out_of_memory(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.strerror:
            why = e.strerror
        else:  # PyTorch and safetensors word a full disk their own way ("unexpected pos ..."): look at it
            try:
                free = shutil.disk_usage(final.parent if final.parent.is_dir() else run_dir).free
            except OSError:
                free = None
            # what a checkpoint holds: the weights and Adam's two moments, plus a margin
            need = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20
            why = (f"no space left on device, {free / 1e6:,.0f} MB free" if free is not None and free < need
                   else (str(e).strip().splitlines() or [""])[-1])
        ckpts = runs.checkpoint_dirs(run_dir)
        kept = (f"the last checkpoint, {ckpts[-1][1]}, is kept: free some disk space, then "
                f"{resume_hint(run_dir, world)} to continue from it" if ckpts else
                "no checkpoint has been written yet: free some disk space, then "
                f"{resume_hint(run_dir, world)} to start the run again from step 0")
        raise Gpt2kitError(f"cannot write {final} ({why[:200]}); {kept} (or start again with another --out)"
                           ) from None


def stage_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh, empty checkpoints/.tmp-step-N, where checkpoint step-N is written before write_checkpoint
    renames it."""
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step-{step}"
    root.mkdir(exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any], *, model: GPT, tok: Tokenizer,
                     lora_cfg: lora.LoraConfig | None, keep: int, world: int, sharded: bool = False) -> None:
    """checkpoints/step-N: the model (or adapter) and trainer.pt; only the newest `keep` are kept. `sharded`:
    an --fsdp checkpoint, whose processes have already written the weights and the optimizer state into the
    staged folder (stage_checkpoint, then fsdp.save_sharded); the model's config.json (LoRA: and its
    adapter_config.json) and trainer.pt go beside them."""
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step-{step}"
    with writing(tmp, root / f"step-{step}", run_dir=run_dir, model=model, world=world):
        if sharded:
            runs.write_json(tmp / "config.json", model.config.to_hf_dict())
            if lora_cfg is not None:
                runs.write_json(tmp / ADAPTER_CONFIG, lora_cfg.to_dict())
        else:
            stage_checkpoint(run_dir, step)
            write_model(model, tok, lora_cfg, tmp)
        TrainState.save_dict(state, tmp / TRAINER_STATE)
    runs.replace_dir(tmp, root / f"step-{step}")
    for _, old in runs.checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_named(run_dir: Path, name: str, *, model: GPT, tok: Tokenizer, lora_cfg: lora.LoraConfig | None,
                world: int) -> Path:
    """best/ or final/, replaced whole."""
    out = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    with writing(tmp, out, run_dir=run_dir, model=model, world=world):
        if tmp.exists():
            shutil.rmtree(tmp)
        write_full_model(model, tok, lora_cfg, tmp)
    runs.replace_dir(tmp, out)
    return out
