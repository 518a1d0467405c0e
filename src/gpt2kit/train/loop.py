"""The run."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2kit import runs
from gpt2kit.data import cache_identity, check_inputs, plural
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.progress import progress_bar, safe_stderr
from gpt2kit.run_numbers import new_run_dir, resolve_run_ref
from gpt2kit.tokenizer import Tokenizer, find_vocab_files
from gpt2kit.train.config import DEFAULT_PROMPTS, RunResult, TrainConfig, default_cadence
from gpt2kit.train.config import resume_hint as _resume_hint
from gpt2kit.train.distributed import _init_distributed, _out_of_memory, _peer_failed
from gpt2kit.train.setup import _EVAL_TOKENS, _check_inputs, _check_sharing, _memory_warning, _sample_texts
from gpt2kit.train.state import TRAINER_STATE, TRAINER_STATE_VERSION
from gpt2kit.train.trainer import Trainer, freeze, lr_at, set_dropout

log = logging.getLogger("gpt2kit")


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Interrupt:
    """First Ctrl-C (or SIGTERM): finish the step, save, exit cleanly. Second Ctrl-C: stop at once."""

    def __init__(self, say):
        self.flag = False
        self.say = say
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.say("stopping: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


_STAGING = ".tmp-data"  # a new run's data caches, until it replaces what --out held (see _Run._commit)


class _Run:
    """One training process's run. Order matters for what a failure leaves behind: the run's lock is taken
    before anything else touches the directory; then everything that can fail is checked (model, data, block
    size, optimizer, the checkpoint's state) while the directory stays as it was; then `_commit` replaces what
    --out held (--overwrite) and records the run; then it trains. A new run that fails before `_commit` leaves
    nothing behind (not even the directory, if it made it); a resume that fails before it leaves the run as
    it was."""

    def __init__(self, cfg: TrainConfig, *, resume: bool, progress: bool, overwrite: bool = False,
                 moved_base: bool = False, lock: runs.RunLock | None = None, extending: bool = False):
        self.cfg = cfg
        self.resuming = resume
        self.lock = lock  # held by the main process (resume() takes it before reading the run)
        self.extending = extending  # resuming with a new --steps/--epochs total
        self.committed = False  # run.json and config.json now describe this process's run
        self._replaced = False  # _commit has removed what --out held
        self.created: list[Path] = []  # folders this start made, outermost first (removed if it fails before training)
        self._record: dict[str, Any] = {}  # run.json fields found during setup, written by _commit
        self.moved_base = moved_base  # resuming a LoRA run with its base model at a new cfg.model
        self.overwrite = overwrite
        self.progress = progress
        self.dir = Path(cfg.out)
        self.bar = None
        self.tb = None
        from gpt2kit.tracking import Trackers
        self.trackers = Trackers()  # W&B etc.; the main process's only
        self._plotted = -1e9
        self._write_warned: set[str] = set()
        self.dist, self.device, self.device_reason = _init_distributed(cfg)

    # ---- output ----
    def say(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---- setup ----
    def _prepare_dir(self) -> None:
        if not self.dist.main:
            return
        if self.resuming:
            if self.lock is None:  # (resume() takes it; a caller of _Run without one)
                self.lock = runs.RunLock.acquire(self.dir)
            try:  # a read-only run would fail at its first write, after loading the model and data
                tempfile.TemporaryFile(dir=self.dir).close()
            except OSError as e:
                raise Gpt2kitError(f"cannot resume {self.dir}: cannot write in it ({e.strerror or e}); a run "
                                   "directory must be writable to resume: make it writable, or copy it elsewhere "
                                   "and resume the copy") from None
            runs.recover_dirs(self.dir)
            return
        # gpt2kit deletes only what it wrote: --out is a new path, an empty folder, or a run of ours. The lock
        # first (so the folder is made first), then the checks; nothing is deleted here (see _commit)
        d = self.dir
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
                         if info.status == "finished" else f"continue it with {_resume_hint(d)}")
                raise Gpt2kitError(f"{d} already holds a run ({info.status} at step {info.step}); {go_on}, "
                                   "replace it with --overwrite (Python: finetune(..., overwrite=True)), or choose "
                                   "another --out")
        elif any(not runs.is_leftover(p.name) for p in d.iterdir()):
            raise Gpt2kitError(f"--out {d} is a folder with other files in it, not a gpt2kit run"
                               + (" (--overwrite only replaces runs)" if self.overwrite else "")
                               + "; choose another --out or an empty folder")
        shutil.rmtree(d / _STAGING, ignore_errors=True)  # an earlier start's, killed before it trained

    def _commit(self) -> None:
        """Everything has been checked: replace what --out held (an earlier run: its own entries only) with this
        run, and record it. A resume records that it runs again."""
        d = self.dir
        if not self.resuming:
            runs.remove_run(d, keep=(_STAGING,))
            self._replaced = True  # (from here on, a failure before training removes this run's entries too)
            if (d / _STAGING).exists():
                os.replace(d / _STAGING, d / "data")
            self.tok.save(d / "tokenizer")  # the run keeps its own vocabulary (checkpoints come and go)
            self._record.update(step=0, started=runs.now(), model=self.cfg.model, lora=bool(self.cfg.lora_rank))
        # run.json before config.json: a run killed between the two is a run (dead at step 0, replaced by the
        # next start), not a folder of unknown files
        runs.update_run_json(d, status="running", total_steps=self.cfg.steps, error=None,  # (a failed start's)
                             **self._record, **runs.process_stamp())
        runs.write_json(d / runs.CONFIG_JSON, self.cfg.to_dict())
        # from step 0 the loop evaluates step 0 again: keep none of the earlier start's records
        runs.truncate_metrics(d, self.step if self.step else -1)
        self.committed = True

    def _abandon(self) -> None:
        """A new run that failed before _commit ended: remove what it wrote (its staged data, or if _commit had
        begun, its run entries); the lock file and the folders it made go when the lock is released (run's
        finally)."""
        shutil.rmtree(self.dir / _STAGING, ignore_errors=True)
        if self._replaced:
            runs.remove_run(self.dir)

    def _aborted_start(self, info: runs.RunInfo) -> bool:
        return (info.status in ("failed", "dead", "interrupted") and info.step == 0
                and not runs.checkpoint_dirs(self.dir) and runs.model_dir(self.dir) is None)

    def _load_model(self, ckpt: Path | None) -> tuple[GPT, Tokenizer, str | None, str | None]:
        """fp32 master weights on the device: from the checkpoint, the pretrained model, or random. Also the
        directory the base weights came from and their fingerprint (LoRA runs record both in their adapters)."""
        from gpt2kit import lora
        from gpt2kit.checkpoints import load_model, read_checkpoint, resolve_model_dir, vocab_dir
        from gpt2kit.config import GPTConfig
        cfg = self.cfg
        # the run keeps its own copy of the vocabulary (checkpoints come and go; the base may move)
        own = self.dir / "tokenizer"
        own_tok = self.resuming and find_vocab_files(own) is not None
        full_ckpt = ckpt is not None and not cfg.lora_rank  # needs nothing from the base model
        needs_base = cfg.model and not (full_ckpt and (own_tok or cfg.tokenizer))
        base_dir = base_fp = None
        if needs_base and cfg.init == "pretrained" and not full_ckpt:
            src, expect = cfg.model, None
            if ckpt is not None:  # resuming a LoRA run: its adapters go on the weights they were trained on
                rec = lora.read_adapter_config(ckpt)
                if rec.base_model and not self.moved_base and (Path(rec.base_model).exists()
                                                               or Path(cfg.model).is_absolute()):
                    src = rec.base_model
                expect = rec.base_fingerprint
            if self.resuming and not self.moved_base and Path(src).is_absolute() and not Path(src).exists():
                raise Gpt2kitError(f"cannot resume {self.dir}: the base model {src} of this LoRA run is gone; pass "
                                   "--model WHERE_IT_IS_NOW with --resume (Python: resume(..., model=...))")
            # The base is read once, here, and base_dir names exactly what was read: a model directory, or for
            # a LoRA run with adapter checkpoints only, the adapter checkpoint merged onto its base (not the run,
            # whose newest adapter changes as it trains on). The fingerprint catches what a path cannot: weights
            # replaced under the same name (a run resumed, best/ rewritten).
            model, tok, base_fp, src_dir = lora.open_base(
                src, device=self.device, dtype=torch.float32, tokenizer_dir=str(own) if own_tok else cfg.tokenizer,
                fingerprint=bool(cfg.lora_rank))
            if expect and base_fp != expect:
                raise Gpt2kitError(f"cannot resume {self.dir}: its adapters were trained on {src}, whose weights have "
                                   f"changed since (fingerprint {base_fp}, recorded {expect}; the same weights saved "
                                   "again in another form count as changed too); put those weights back, or start a "
                                   "new run")
            base_dir = str(src_dir.resolve())
        else:
            base_dir = str(resolve_model_dir(cfg.model).resolve()) if needs_base else None
            # a single-file base (nanoGPT ckpt.pt, llm.c .bin) has its vocabulary beside it or uses GPT-2's
            tok_dir = str(own) if own_tok else cfg.tokenizer or (str(vocab_dir(Path(base_dir))) if base_dir else None)
            if tok_dir is None:
                raise Gpt2kitError("training from scratch needs a tokenizer: pass --tokenizer DIR (a directory "
                                   "with vocab.json + merges.txt, e.g. a GPT-2 model directory)")
            if full_ckpt:
                model, tok = load_model(ckpt, device=self.device, dtype=torch.float32, tokenizer_dir=tok_dir)
            else:
                if cfg.config and Path(cfg.config).is_file():
                    gcfg = GPTConfig.from_json_file(cfg.config)
                elif cfg.config:
                    gcfg = GPTConfig.from_name(cfg.config)
                elif Path(base_dir).is_file():
                    gcfg = read_checkpoint(Path(base_dir))[0]
                else:
                    gcfg = GPTConfig.from_json_file(Path(base_dir) / "config.json")
                tok = Tokenizer.from_dir(tok_dir)
                torch.manual_seed(cfg.seed)
                model = GPT(gcfg).to(self.device)
        if tok.vocab_size > model.config.vocab_size:
            raise Gpt2kitError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                               f"{model.config.vocab_size}; pass the model's own --tokenizer")
        model.train()
        set_dropout(model, cfg.dropout)
        return model, tok, base_dir, base_fp

    def _prepare_data(self, tok: Tokenizer):
        from gpt2kit.data import TokenCache, TooLittleData, prepare_data
        cfg = self.cfg
        info = runs.read_run_json(self.dir) if runs.is_run_dir(self.dir) else {}
        recorded = info.get("train_tokens"), info.get("val_tokens")
        if self.resuming and recorded[0] and Path(recorded[0]).is_file():
            # the caches this run trained on: the same tokens even if the raw files changed or moved
            train = TokenCache.open(recorded[0])
            val = TokenCache.open(recorded[1]) if recorded[1] and Path(recorded[1]).is_file() else None
            self._same_data(info.get("data_ids") or {}, train, val)
            return train, val
        spec = cfg.data_spec()
        frac = cfg.val_fraction if cfg.val_fraction is not None else (0.0 if cfg.val_data else 0.05)
        if cfg.eval_every == 0 and not cfg.val_data and cfg.val_fraction is None:
            frac = 0.0

        # a new run stages its caches, so that the run it replaces stays whole until every check has passed
        cache_dir = self.dir / ("data" if self.resuming else _STAGING)

        def prep():
            try:
                return prepare_data(cfg.data, tok, spec, val_data=cfg.val_data or None, val_fraction=frac,
                                    seed=cfg.seed, cache_dir=cache_dir)
            except TooLittleData as e:
                if not (frac and cfg.val_fraction is None):  # the user asked for this split
                    raise TooLittleData(e.n_tokens, "pass --val-data FILE, or --val-fraction 0") from None
                self.say(f"warning: the data has only {e.n_tokens} tokens, too few to hold out validation data; "
                         "training without validation (add --val-data FILE to validate)")
                return prepare_data(cfg.data, tok, spec, cache_dir=cache_dir)
        # the main process writes the caches (the others wait for its outcome, a data error included), then
        # the others open them
        first = self.dist.agree(prep if self.dist.main else None)
        second = self.dist.agree(None if self.dist.main else prep)
        train, val = first if self.dist.main else second
        checked = self.resuming and "data_ids" in info
        if checked:
            self._same_data(info["data_ids"], train, val)
        if self.dist.main:  # (a resume that prepared the data again records where its caches now are)
            own, data = cache_dir.resolve(), (self.dir / "data").resolve()

            def where(c) -> str:  # where the cache is once _commit has moved the staged ones into RUN/data
                p = c.path.resolve()
                return str(data / p.relative_to(own)) if own in p.parents else str(p)
            paths = dict(train_tokens=where(train), val_tokens=where(val) if val is not None else None)
            # caches read in place (not the run's own copies in RUN/data) may be replaced under the same name
            ids = {k: cache_identity(c) for k, c in (("train", train), ("val", val))
                   if c is not None and own not in c.path.resolve().parents}
            self._record.update(paths, **({} if checked else {"data_ids": ids}))
        return train, val

    def _same_data(self, recorded: dict[str, Any], train, val) -> None:
        for key, what, cache in (("train", "training", train), ("val", "validation", val)):
            then = recorded.get(key)
            if cache is None or not then:
                continue
            now = cache_identity(cache)
            if now != then:
                raise Gpt2kitError(f"cannot resume {self.dir}: its {what} data {cache.path} has changed since the "
                                   f"run started ({then['tokens']:,} tokens then, {now['tokens']:,} now); put the "
                                   "original back, or start a new run")

    def _resolve(self, model: GPT, train, val) -> TrainConfig:
        """Fill every automatic value, so config.json records exactly what runs."""
        cfg = self.cfg
        ctx = model.config.n_positions
        block = cfg.block_size or min(ctx, 1024)
        if block > ctx:
            raise Gpt2kitError(f"--block-size {block} exceeds the model's context of {ctx} tokens")
        if not cfg.line_by_line and 2 <= len(train) < block + 1:  # (Batcher would shrink it; record it here)
            self.say(f"warning: the training data has only {len(train)} tokens, fewer than block size {block} + 1; "
                     f"using blocks of {len(train) - 1} (pass --block-size {len(train) - 1} or less, or add data, "
                     "to silence this)")
            block = len(train) - 1
        units = train.n_docs if cfg.line_by_line else len(train)
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world * (1 if cfg.line_by_line else block)
        steps_per_epoch = max(1, math.ceil(units / per_step))
        total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
        lr = cfg.lr or (1e-3 if cfg.lora_rank else 6e-4 if cfg.init == "scratch" else 1e-4)
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 20)
        has_val = val is not None
        cadence = default_cadence(total, has_val=has_val, batch_size=cfg.batch_size, block_size=block,
                                  grad_accum=cfg.grad_accum, world=self.dist.world, eval_every=cfg.eval_every,
                                  sample_every=cfg.sample_every, save_every=cfg.save_every,
                                  eval_batches=cfg.eval_batches)
        tb = cfg.tensorboard
        if tb is None:
            import importlib.util
            tb = importlib.util.find_spec("tensorboard") is not None
        def absolute(p: str | None) -> str | None:  # so that --resume works from any directory
            return str(Path(p).resolve()) if p and Path(p).exists() else p
        eval_batches = cadence.eval_batches
        if cfg.eval_batches is None and cfg.line_by_line and val is not None:
            # validation covers what the run says it has: every document while they hold ~32K target tokens
            # (which short documents spread over many more padded batches than windows of the stream), else an
            # even spread of them; the run's notes say how much each evaluation scores
            targets = np.maximum(np.minimum(np.diff(val.doc_offsets), block + 1) - 1, 0)
            docs = min(val.n_docs, math.ceil(val.n_docs * _EVAL_TOKENS / max(1, int(targets.sum()))))
            per_batch = cfg.batch_size * self.dist.world
            eval_batches = self.dist.world * max(1, math.ceil(docs / per_batch))  # (divisible by the world)
        from gpt2kit.checkpoints import pick_dtype
        dtype = str(pick_dtype(cfg.dtype, self.device)).removeprefix("torch.")  # "auto" as chosen on this device
        return replace(cfg, dtype=dtype, eval_batches=eval_batches, model=absolute(cfg.model),
                       tokenizer=absolute(cfg.tokenizer),
                       config=absolute(cfg.config), data=[absolute(d) for d in cfg.data],
                       val_data=[absolute(d) for d in cfg.val_data], block_size=block, steps=total, lr=lr,
                       warmup_steps=warm, eval_every=cadence.eval_every,
                       sample_every=cadence.sample_every, save_every=cadence.save_every, tensorboard=tb,
                       prompts=list(cfg.prompts) or list(DEFAULT_PROMPTS),
                       val_fraction=cfg.val_fraction if cfg.val_fraction is not None else
                       (0.0 if cfg.val_data or not has_val else 0.05),
                       epochs=cfg.epochs if cfg.steps is None else None)

    # ---- checkpoints ----
    def _trainer_state(self, step: int) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "version": TRAINER_STATE_VERSION, "step": step, "world_size": self.dist.world,
            **self.trainer.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "step": step, "total_steps": self.cfg.steps},
            "batcher": self.batcher.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "python": random.getstate()},
            "best_val_loss": self.best_val, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "tokens": self.tokens_seen, "train_time": self.train_time, "last_loss": self.last_loss,
        }

    def _write_model(self, out: Path) -> None:
        """The model in HF format (LoRA: adapter only for checkpoints, adapter + merged for best/final)."""
        from gpt2kit.checkpoints import save_model
        if self.lora_cfg is None:
            save_model(self.model, self.tok, out)
            return
        from gpt2kit import lora
        lora.save_adapter(self.model, self.lora_cfg, out)

    def _write_full_model(self, out: Path) -> None:
        from gpt2kit.checkpoints.hf import write_hf_dir
        self._write_model(out)
        if self.lora_cfg is not None:
            from gpt2kit import lora
            write_hf_dir(out, self.model.config, lora.merged_state_dict(self.model))
            self.tok.save(out)

    @contextlib.contextmanager
    def _writing(self, tmp: Path, final: Path) -> Iterator[None]:
        """A failed write of `tmp` (disk full, no permission) becomes one line naming `final`, the checkpoint
        `--resume` would continue from (or that there is none yet), and the fix; the half-written `tmp` is
        removed, and the previous `final` was never touched."""
        import shutil

        from safetensors import SafetensorError
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
                    free = shutil.disk_usage(final.parent if final.parent.is_dir() else self.dir).free
                except OSError:
                    free = None
                # what a checkpoint holds: the weights and Adam's two moments, plus a margin
                need = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) + 2**20
                why = (f"no space left on device, {free / 1e6:,.0f} MB free" if free is not None and free < need
                       else (str(e).strip().splitlines() or [""])[-1])
            ckpts = runs.checkpoint_dirs(self.dir)
            kept = (f"the last checkpoint, {ckpts[-1][1]}, is kept: free some disk space, then "
                    f"{_resume_hint(self.dir, self.dist.world)} to continue from it" if ckpts else
                    "no checkpoint has been written yet: free some disk space, then "
                    f"{_resume_hint(self.dir, self.dist.world)} to start the run again from step 0")
            raise Gpt2kitError(f"cannot write {final} ({why[:200]}); {kept} (or start again with another --out)"
                               ) from None

    def save_checkpoint(self, step: int) -> None:
        state = self._trainer_state(step)  # every rank's state is identical here; the main one writes
        self.dist.agree(lambda: self._write_checkpoint(step, state) if self.dist.main else None)

    def _write_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        root = self.dir / "checkpoints"
        tmp = root / f".tmp-step-{step}"
        with self._writing(tmp, root / f"step-{step}"):
            root.mkdir(exist_ok=True)
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            tmp.mkdir()
            self._write_model(tmp)
            torch.save(state, tmp / f"{TRAINER_STATE}.tmp")
            os.replace(tmp / f"{TRAINER_STATE}.tmp", tmp / TRAINER_STATE)
        runs.replace_dir(tmp, root / f"step-{step}")
        for _, old in runs.checkpoint_dirs(self.dir)[:-self.cfg.keep]:
            import shutil
            shutil.rmtree(old, ignore_errors=True)
        runs.update_run_json(self.dir, step=step, checkpoint=f"checkpoints/step-{step}",
                             **self._best(), last_loss=self.last_loss)
        self._plot()

    def _save_named(self, name: str) -> Path:
        out = self.dir / name
        self.dist.agree(lambda: self._write_named(name, out) if self.dist.main else None)
        return out

    def _write_named(self, name: str, out: Path) -> None:
        tmp = self.dir / f".tmp-{name}"
        with self._writing(tmp, out):
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            self._write_full_model(tmp)
        runs.replace_dir(tmp, out)

    def _load_checkpoint_state(self, ckpt: Path) -> None:
        try:
            from gpt2kit.checkpoints.hf import load_pickle
            state = load_pickle(ckpt / TRAINER_STATE, map_location=self.device)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise Gpt2kitError(f"cannot read {ckpt / TRAINER_STATE} ({type(e).__name__}); delete {ckpt} to "
                               "resume from the checkpoint before it") from None
        if state.get("version") != TRAINER_STATE_VERSION:
            raise Gpt2kitError(f"{ckpt / TRAINER_STATE} has format v{state.get('version')}; this gpt2kit "
                               f"reads v{TRAINER_STATE_VERSION}")
        world = state.get("world_size", self.dist.world)  # (absent from older checkpoints)
        if world != self.dist.world:
            q = shlex.quote(str(self.dir))
            how = (f"`torchrun --nproc_per_node {world} -m gpt2kit finetune --resume {q}`" if world > 1 else
                   f"without torchrun: `gpt2kit finetune --resume {q}`")
            raise Gpt2kitError(f"cannot resume {self.dir}: it was trained with {world} process"
                               f"{'es' if world > 1 else ''} and this job has {self.dist.world} (the global batch "
                               f"and the data each step reads depend on it); resume it with {how}")
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

    # ---- evaluation, samples, plots ----
    def _eval_batches_per_rank(self) -> int | None:
        # eval_batches counts global batches: each of W processes scores 1/W of them (the same windows as
        # one process when W divides eval_batches)
        return None if self.cfg.eval_batches is None else max(1, self.cfg.eval_batches // self.dist.world)

    def _eval_coverage(self) -> str:
        """What each evaluation scores, exactly, for the start-up notes."""
        cfg = self.cfg
        scored, of, t_scored, t_all = self.val_batcher.eval_coverage(self._eval_batches_per_rank())
        unit = "document" if cfg.line_by_line else "window"
        if scored == of:
            return f"validation: each evaluation scores all {plural(of, unit)} ({t_all:,} target tokens)"
        per_batch = cfg.batch_size * self.dist.world
        return (f"validation: each evaluation scores {scored:,} of {plural(of, unit)} ({t_scored:,} of {t_all:,} "
                f"target tokens), spread evenly, to keep evaluation quick; --eval-batches "
                f"{self.dist.world * math.ceil(of / per_batch)} scores them all")

    def evaluate(self, step: int) -> float:
        total, count = self.trainer.eval_loss(self.val_batcher.eval_batches(self._eval_batches_per_rank()))
        loss = total / max(1, count)
        ppl = math.exp(loss) if loss < 700 else math.inf  # (exp overflows a float64 past ~709)
        # the starting model's loss (step 0) is the baseline: only a step that beats it becomes best/
        improved = step > 0 and (self.best_val is None or loss < self.best_val)
        if self.dist.main:
            self._keep_going(runs.METRICS, lambda: runs.append_metrics(
                self.dir, [{"step": step, "val_loss": loss, "val_ppl": ppl if ppl < math.inf else None,
                            "val_tokens": count}]))
            self.trackers.log_metrics(step, {"val_loss": loss, "val_ppl": ppl if ppl < math.inf else None})
            if self.tb is not None:
                self.tb.add_scalar("val/loss", loss, step)
                self.tb.add_scalar("val/perplexity", ppl, step)
        if step > 0:
            if improved:
                self.best_val, self.best_step, self.bad_evals = loss, step, 0
                self._save_named("best")
                if self.dist.main:
                    self._keep_going(runs.RUN_JSON, lambda: runs.update_run_json(
                        self.dir, best_val_loss=loss, best_step=step, step=step))
            else:
                self.bad_evals += 1
        elif self.best_val is None:
            self.best_val, self.best_step = loss, 0
        mark = " (best)" if improved else ""
        shown = f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"
        self.say(f"step {step}: validation loss {loss:.4f}, perplexity {shown}{mark}")
        self._plot()
        return loss

    def _best(self) -> dict[str, Any]:
        """best/'s validation loss and step, for run.json and RunResult: None while no step has beaten the
        starting model (whose step-0 loss self.best_val then holds, as the baseline)."""
        has = bool(self.best_step)
        return {"best_val_loss": self.best_val if has else None, "best_step": self.best_step if has else None}

    def sample(self, step: int) -> None:
        if not self.dist.main:
            return
        texts = _sample_texts(self.model, self.tok, self.cfg.prompts, self.cfg.sample_tokens,
                              seed=self.cfg.seed + step, temperature=self.cfg.sample_temperature,
                              top_k=self.cfg.sample_top_k)
        out = self.dir / "samples"
        sep = "\n" + "=" * 40 + "\n"
        self._keep_going("samples", lambda: (out.mkdir(exist_ok=True),
                                             runs.atomic_write_text(out / f"step-{step}.txt", sep.join(texts) + "\n")))
        shown = "\n".join(f"  | {line}" for t in texts for line in (t.strip() or "(empty)").splitlines()[:6])
        self.trackers.log_samples(step, self.cfg.prompts, texts)
        self.say(f"step {step}: samples (samples/step-{step}.txt)\n{shown}")

    def _keep_going(self, what: str, write: Callable[[], Any]) -> None:
        """Bookkeeping that only the main process writes (metrics, samples, run.json fields): a failure, such
        as a full disk, is a warning (once per file), not the end of training. Under torchrun the other
        processes would otherwise be left waiting at their next collective call. Checkpoints, which matter,
        fail on every process alike (_Dist.agree), with the previous one kept."""
        try:
            write()
        except OSError as e:
            if what not in self._write_warned:
                self._write_warned.add(what)
                self.say(f"warning: cannot write {self.dir / what} ({e.strerror or e}); training goes on, but "
                         "the next checkpoint will fail the same way unless you free some disk space")

    def _plot(self, force: bool = False) -> None:
        # redrawn at evaluations and checkpoints, at most every 30 s (drawing takes a moment), and at the end
        if self.dist.main and (force or time.monotonic() - self._plotted > 30):
            self._plotted = time.monotonic()
            from gpt2kit.plot import plot_run
            try:
                plot_run(self.dir)
            except Exception as e:  # noqa: BLE001 - a plot must never stop training
                log.warning("could not draw loss.png: %s", e)

    # ---- main ----
    def run(self) -> RunResult:
        status, stopped_early = "running", False
        try:
            with safe_stderr():  # a closed or broken stderr (`| head`, a killed `tee`) never stops training
                self.dist.agree(self._prepare_dir)
                self._setup()
                with _Interrupt(self.say) as interrupt:
                    status, stopped_early = self._loop(interrupt)
        except BaseException as e:
            peer = self.dist.initialized and _peer_failed(e)
            if self.dist.main and self.committed:
                st = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                why = ("another process of the torchrun job failed (its error is in the job's output)" if peer else
                       f"{type(e).__name__}: {e}"[:500])
                got = {"step": self.step} if hasattr(self, "step") else {}  # how far it got
                with contextlib.suppress(OSError, Gpt2kitError):  # e.g. the disk is full: report `e`, not this
                    runs.update_run_json(self.dir, status=st, error=None if st == "interrupted" else why, **got)
            elif self.dist.main and not self.resuming and self.lock is not None:
                self._abandon()
            if peer:  # the process that failed has said why; a transport traceback here would only hide it
                raise Gpt2kitError(f"process {self.dist.rank}: stopping, because another process of this torchrun "
                                   "job failed (its error is printed above, or in its node's output)") from None
            if _out_of_memory(e):
                raise Gpt2kitError(f"out of memory on {self.device} at batch {self.cfg.batch_size} x "
                                   f"{self.cfg.block_size} tokens; lower --batch-size (raise --grad-accum to keep "
                                   "the global batch), add --grad-checkpointing, or use --lora-rank 8") from None
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.tb is not None:
                self.tb.close()
            self.trackers.finish(status)
            if self.lock is not None:  # the last thing: run.json says how it ended before another may start
                self.lock.release()
            if self.dist.main and not self.committed:
                for d in reversed(self.created):  # a new run that never trained leaves no folder it made
                    try:
                        d.rmdir()
                    except OSError:
                        break

        model_dir = None
        if self.dist.main:
            # (a LoRA checkpoint holds adapters only, which --model RUN also loads)
            ckpts = runs.checkpoint_dirs(self.dir)
            model_dir = runs.model_dir(self.dir) or (ckpts[-1][1] if ckpts else None)
        tps = self.tokens_seen / self.train_time if self.train_time > 0 else 0.0
        best = self._best()
        return RunResult(self.dir, status, self.step, self.cfg.steps, self.last_loss, best["best_val_loss"],
                         best["best_step"], model_dir, tps, stopped_early)

    def _build_model(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        self.model, self.tok, base_dir, base_fp = self._load_model(ckpt)
        self.lora_cfg = None
        if cfg.lora_rank:
            from gpt2kit import lora
            self.lora_cfg = lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                            targets=cfg.lora_targets, base_model=base_dir,
                                            base_fingerprint=base_fp)
            torch.manual_seed(cfg.seed)
            lora.apply_lora(self.model, self.lora_cfg)
            if ckpt is not None:
                lora.load_adapter_weights(self.model, ckpt)
        if cfg.freeze:
            frozen = freeze(self.model, cfg.freeze)
            self.say(f"frozen: {plural(len(frozen), 'parameter tensor')} ({', '.join(cfg.freeze)})")
        self.model.gradient_checkpointing = cfg.grad_checkpointing

    def _setup(self) -> None:
        cfg = self.cfg
        if self.resuming:
            ckpts = runs.checkpoint_dirs(self.dir)
            ckpt = ckpts[-1][1] if ckpts else None
        else:
            ckpt = None
        self.dist.agree(lambda: self._build_model(ckpt))
        train, val = self._prepare_data(self.tok)
        asked_eval = cfg.eval_every
        self.cfg = cfg = self._resolve(self.model, train, val)

        from gpt2kit.data import Batcher
        kw = dict(seed=cfg.seed, line_by_line=cfg.line_by_line, rank=self.dist.rank, world_size=self.dist.world,
                  device=self.device, eot_token=self.tok.eot_token)
        self.batcher = Batcher(train, cfg.block_size, cfg.batch_size, **kw)
        self.val_batcher = None
        if val is not None:
            val_block = cfg.block_size
            if not cfg.line_by_line and 2 <= len(val) < val_block + 1:  # what Batcher would do, said plainly
                val_block = len(val) - 1
                self.say(f"warning: the validation data has only {len(val)} tokens; validating on blocks of "
                         f"{val_block}")
            self.val_batcher = Batcher(val, val_block, cfg.batch_size, **kw)
        if cfg.line_by_line:
            lengths = np.diff(train.doc_offsets)  # (n_docs,), each with its closing <|endoftext|>
            long = lengths > cfg.block_size + 1
            if long.any():
                unused = int((lengths[long] - (cfg.block_size + 1)).sum())
                self.say(f"warning: --line-by-line: {int(long.sum()):,} of {len(lengths):,} documents are longer than "
                         f"block size {cfg.block_size} + 1 tokens and are cut to it ({unused / len(train):.0%} of "
                         "the training tokens unused); raise --block-size, or drop --line-by-line to train on "
                         "windows of the whole text")
        if cfg.early_stop and self.val_batcher is None:
            self.say(f"warning: --early-stop {cfg.early_stop} needs validation data and this run has none; it will "
                     "run all its steps")
        if asked_eval and self.val_batcher is None:
            self.say(f"warning: --eval-every {asked_eval} needs validation data and this run has none; it will not "
                     "evaluate")
        self.trainer = Trainer(self.model, cfg, self.device, ddp=self.dist.initialized)
        self.step, self.best_val, self.best_step, self.bad_evals = 0, None, None, 0
        self.tokens_seen, self.train_time, self.last_loss = 0, 0.0, None
        if ckpt is not None:
            self._load_checkpoint_state(ckpt)
        if self.step >= cfg.steps and self.extending:
            raise Gpt2kitError(f"cannot continue {self.dir} to {plural(cfg.steps, 'step')}: it has done "
                               f"{self.step} already (--steps and --epochs with --resume give the new total)")
        # a batch that cannot fit is refused before the commit, so it leaves no run (and --overwrite deletes nothing)
        warn = _memory_warning(self.model, cfg, cfg.block_size, self.device,
                               sum(p.numel() for p in self.trainer.params))
        self.dist.agree(self._commit if self.dist.main else None)
        if warn:
            self.say(f"warning: {warn}")

        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trainer.params)
        prec = self.trainer.precision
        self.say(f"gpt2kit finetune: device {self.device_reason}; {prec.describe()}")
        what = (f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else
                "all weights" if n_train == n_params else "partly frozen")
        trained = f"{n_train:,}" if n_train < 1e6 else f"{n_train / 1e6:.2f}M"
        self.say(f"model: {n_params / 1e6:.1f}M parameters, {trained} trained ({what}); data: "
                 f"{plural(len(train), 'token')} in {plural(train.n_docs, 'document')}"
                 + (f", validation {len(val):,} tokens" if val is not None else ", no validation"))
        if self.val_batcher is not None and cfg.eval_every:
            self.say(self._eval_coverage())
        glob_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.say(f"steps: {cfg.steps} of {plural(glob_batch, 'sequence')} x {cfg.block_size} tokens, lr {cfg.lr:g} "
                 f"({cfg.schedule}, {cfg.warmup_steps} warmup); run directory {self.dir}"
                 + (f"; resuming at step {self.step}" if self.step else ""))
        if cfg.compile and self.device.type == "cpu":
            self.say("warning: --compile made CPU training slower in our measurements (4.1 vs 2.9 s a step for "
                     "124M, after a long compile); it is meant for GPUs")
        if cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.say("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
        if cfg.wandb and self.dist.main:
            from gpt2kit.tracking import open_trackers
            self.trackers = open_trackers(cfg.to_dict(), self.dir, use_wandb=True, wandb_project=cfg.wandb_project,
                                          wandb_run_name=cfg.wandb_run_name)

    def _loop(self, interrupt: _Interrupt) -> tuple[str, bool]:
        cfg = self.cfg
        if self.dist.main and self.progress:
            self.bar = progress_bar(total=cfg.steps, initial=self.step, unit="step", desc="finetune")
        if self.step == 0:
            if self.val_batcher is not None and cfg.eval_every:
                self.evaluate(0)
            if cfg.sample_every:
                self.sample(0)
        last_write = time.monotonic()
        pending: list[dict[str, Any]] = []
        stopped_early = False
        while self.step < cfg.steps:
            step = self.step
            torch.manual_seed(_step_seed(cfg.seed, step, self.dist.rank))  # dropout masks depend on (seed, step)
            lr = lr_at(step, cfg, cfg.steps)
            t0 = time.perf_counter()
            batches = [self.batcher.next() for _ in range(cfg.grad_accum)]
            n_tok = sum(int((y != -100).sum()) for _, y in batches)
            loss_t = self.trainer.forward_backward(batches)
            norm = self.trainer.optimizer_step(lr)
            loss = self.dist.mean(float(loss_t), self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step = step + 1
            n_tok *= self.dist.world
            self.tokens_seen += n_tok
            self.train_time += dt
            self.last_loss = loss
            if not math.isfinite(loss) and self.trainer.precision.scaler is None:
                raise Gpt2kitError(
                    f"the loss became {loss} at step {self.step}; start a new run with a lower --lr (now {cfg.lr:g})"
                    + (" or --dtype float32" if self.trainer.precision.mode != "float32" else "")
                    + " (--resume would repeat the same steps)")
            rec = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                   "tok_per_s": n_tok / dt, "time": round(self.train_time, 3)}
            if norm is not None:
                rec["grad_norm"] = float(norm)
            pending.append(rec)
            if self.dist.main:
                self.trackers.log_metrics(self.step, rec)
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f}, {n_tok / dt:,.0f} tok/s, lr {lr:.2e}", refresh=False)
                self.bar.update(1)
            if self.tb is not None:
                self.tb.add_scalar("train/loss", loss, self.step)
                self.tb.add_scalar("train/lr", lr, self.step)
            stop = self.dist.any_flag(interrupt.flag, self.device)
            last = self.step == cfg.steps
            due = lambda every: bool(every) and (self.step % every == 0)  # noqa: E731
            if self.dist.main and (pending and (time.monotonic() - last_write > 5 or stop or last
                                                 or due(cfg.eval_every) or due(cfg.save_every))):
                self._keep_going(runs.METRICS, functools.partial(runs.append_metrics, self.dir, pending))
                pending = []
                last_write = time.monotonic()
            if self.val_batcher is not None and (due(cfg.eval_every) or (last and cfg.eval_every)):
                self.evaluate(self.step)
                if cfg.early_stop and self.bad_evals >= cfg.early_stop:
                    self.say(f"early stop: no better validation loss in {plural(cfg.early_stop, 'evaluation')} "
                             f"(best {self.best_val:.4f} at step {self.best_step})")
                    stopped_early = True
            if due(cfg.sample_every) or (last and cfg.sample_every):
                self.sample(self.step)
            if stop:
                self.save_checkpoint(self.step)
                self._plot(force=True)
                if self.dist.main:
                    runs.update_run_json(self.dir, status="interrupted", step=self.step)
                self.say(f"interrupted: saved {self.dir}/checkpoints/step-{self.step}; continue with "
                         f"{_resume_hint(self.dir, self.dist.world)}")
                return "interrupted", False
            if due(cfg.save_every) and not last and not stopped_early:
                self.save_checkpoint(self.step)
            if stopped_early:
                break
        if self.dist.main and pending:
            self._keep_going(runs.METRICS, functools.partial(runs.append_metrics, self.dir, pending))
        self.save_checkpoint(self.step)
        final = self._save_named("final")
        if self.dist.main:
            runs.update_run_json(self.dir, status="finished", step=self.step, finished=runs.now(),
                                 stopped_early=stopped_early, last_loss=self.last_loss,
                                 **self._best())
        self._plot(force=True)
        best = ""
        if self.best_step == 0:
            best = (f"; no step beat the starting model's validation loss ({self.best_val:.4f}), so there is no "
                    "best/ (lower --lr?)")
        elif self.best_step is not None:
            best = f"; best validation loss {self.best_val:.4f} at step {self.best_step} in best/"
        tps = self.tokens_seen / max(self.train_time, 1e-9)
        if self.bar is not None:  # the finished bar first, once, then the summary under it
            self.bar.close()
            self.bar = None
        self.say(f"done: {plural(self.step, 'step')}, {tps:,.0f} tokens/s; model in {final}{best}")
        return "finished", stopped_early


def finetune(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False,
             runs_dir: str | os.PathLike | None = None, name: str | None = None) -> RunResult:
    """Train a new run into cfg.out: a new path, an empty folder, or (with `overwrite`, or after a start
    that failed before training) an earlier run that is not running, whose own files are replaced only once
    everything has been checked; a folder holding anything else is refused. `runs_dir`: train into the next
    numbered run there instead (`runs/0007`, with `name`: `runs/0007-name`; cfg.out is set to it). A start
    that fails before training leaves no run behind. Under torchrun, every process calls this."""
    if not isinstance(cfg, TrainConfig):
        raise Gpt2kitError(f"finetune() takes a TrainConfig, not {type(cfg).__name__}")
    if name is not None and runs_dir is None:
        raise Gpt2kitError("--name names a numbered run: give it with --runs-dir DIR (not with --out)")
    if cfg.model:
        cfg.model = os.fspath(resolve_run_ref(cfg.model))  # (`--model runs/7`: recorded as the run's real path)
    if cfg.steps is not None and cfg.epochs is not None:  # (a resolved config.json holds both: resume is fine)
        raise Gpt2kitError(f"give --steps ({cfg.steps}) or --epochs ({cfg.epochs:g}), not both")
    if cfg.early_stop and cfg.eval_every == 0:  # (a resolved config.json may hold both: resume is fine)
        raise Gpt2kitError(f"--early-stop {cfg.early_stop} counts evaluations, and --eval-every 0 turns them off; "
                           "give --eval-every N, or drop --early-stop")
    cfg.validate()
    # (a numbered run is a new folder in runs_dir: what matters is whether a data folder holds runs_dir)
    _check_inputs(cfg if runs_dir is None else replace(cfg, out=os.fspath(Path(runs_dir) / "0")))
    # the data, before the model (which may mean a long download, or a download error offline)
    check_inputs(cfg.data, cfg.data_spec(), val_inputs=cfg.val_data or None)
    _check_sharing(cfg)
    run = _Run(cfg, resume=False, progress=progress, overwrite=overwrite)
    if runs_dir is not None:
        number, made = None, not Path(runs_dir).expanduser().exists()
        if run.dist.main:  # the main process picks the number; under torchrun the others learn it
            cfg.out = run.cfg.out = str(new_run_dir(runs_dir, name))
            number = cfg.out
        if run.dist.initialized:
            import torch.distributed as dist
            got = [number]
            dist.broadcast_object_list(got, src=0)
            cfg.out = run.cfg.out = got[0]
        run.dir = Path(cfg.out)
        # (made empty by new_run_dir, as was runs_dir if it was new: removed again if the start fails)
        run.created = [run.dir.parent] * made + [run.dir]
    return _finish(run)


def resume(run_dir: str | Path, *, progress: bool = True, device: str | None = None,
           model: str | os.PathLike | None = None, steps: int | None = None, epochs: float | None = None
           ) -> RunResult:
    """Continue a run from its newest checkpoint, with the configuration it was started with. A run that
    had not reached its first checkpoint starts over (with the same result, since every step is
    deterministic). `model`: where a LoRA run's base model is now, if it moved (its weights must be the
    ones the run trained on). `steps` or `epochs`: a new total length, to continue a finished run for longer
    (or change an unfinished one's), with its optimizer state; the learning-rate schedule becomes the one of
    a run of the new length. The run's lock is taken before anything is read: a run another process trains
    is refused at once."""
    run_dir = Path(resolve_run_ref(run_dir))
    lock = None
    if os.environ.get("RANK", "0") == "0" and run_dir.is_dir():
        lock = _lock_for_resume(run_dir)
    try:
        run = _resume_run(run_dir, lock, progress=progress, device=device, model=model, steps=steps,
                          epochs=epochs)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return _finish(run)


def _lock_for_resume(run_dir: Path) -> runs.RunLock:
    try:
        return runs.RunLock.acquire(run_dir)
    except OSError as e:
        raise Gpt2kitError(f"cannot resume {run_dir}: cannot write in it ({e.strerror or e}); a run directory "
                           "must be writable to resume: make it writable, or copy it elsewhere and resume the copy"
                           ) from None


def _resume_run(run_dir: Path, lock: runs.RunLock | None, *, progress: bool, device: str | None,
                model: str | os.PathLike | None, steps: int | None, epochs: float | None) -> _Run:
    info = runs.read_run_json(run_dir)
    try:
        d = json.loads((run_dir / runs.CONFIG_JSON).read_text())
    except (OSError, ValueError) as e:
        raise Gpt2kitError(f"cannot read {run_dir / runs.CONFIG_JSON} ({e}); the run cannot be resumed") from None
    if not isinstance(d, dict):
        raise Gpt2kitError(f"{run_dir / runs.CONFIG_JSON} does not hold a JSON object; the run cannot be resumed")
    cfg = TrainConfig.from_dict(d)
    cfg.out = str(run_dir)
    if device is not None:
        cfg.device = device
    if model is not None:
        if not cfg.lora_rank:
            raise Gpt2kitError(f"run {run_dir} trains all weights and resumes from its own checkpoints; drop "
                               "--model (it can only point a LoRA run at its moved base model)")
        cfg.model = os.fspath(model)
    if steps is not None and epochs is not None:
        raise Gpt2kitError(f"give --steps ({steps}) or --epochs ({epochs:g}), not both")
    extending = steps is not None or epochs is not None
    if extending:  # the new total; _Run._resolve turns epochs into steps, and _setup checks it is more
        cfg.steps, cfg.epochs = steps, epochs
    if info.get("status") == "finished" and info.get("stopped_early"):
        raise Gpt2kitError(f"run {run_dir} already finished: it stopped early at step {info.get('step')} (no "
                           f"better validation loss); its model is in {runs.model_dir(run_dir)}. Start a new run "
                           f"from it with --model {shlex.quote(str(run_dir))}")
    if info.get("status") == "finished":
        ckpts = runs.checkpoint_dirs(run_dir)
        step = ckpts[-1][0] if ckpts else info.get("step")
        # the target: --steps when the config names it (raising it extends a finished run), else the total
        # this run computed and recorded (so an edited or epoch-based config can't restart a finished run)
        target = cfg.steps if cfg.steps is not None else None if epochs is not None else info.get("total_steps")
        if isinstance(target, int) and isinstance(step, int) and step >= target:
            more = (f"--steps {target} is no more than that (it is the new total)" if extending else
                    f"continue it for longer with --resume {shlex.quote(str(run_dir))} --steps N (the new total), "
                    f"or start a new run from it with --model {shlex.quote(str(run_dir))}")
            raise Gpt2kitError(f"run {run_dir} already finished ({plural(step, 'step')}); its model is in "
                               f"{runs.model_dir(run_dir)}. {more[0].upper()}{more[1:]}")
        if extending and not ckpts:
            raise Gpt2kitError(f"run {run_dir} has no checkpoint left to continue from (checkpoints/ is empty); "
                               f"start a new run from its model with --model {shlex.quote(str(run_dir))}")
    cfg.validate()
    _check_sharing(cfg)
    return _Run(cfg, resume=True, progress=progress, moved_base=model is not None, lock=lock, extending=extending)


def _push(run: _Run, result: RunResult) -> None:
    """--push-to-hub, after a finished run: a failure is recorded in result.push_error with how to retry (the
    run itself stays finished)."""
    from gpt2kit.push import push
    repo = run.cfg.push_to_hub
    retry = shlex.join(["gpt2kit", "push", str(result.run_dir), "--repo", repo]
                       + (["--private"] if run.cfg.push_private else []))
    try:
        result.pushed = push(result.run_dir, repo, private=run.cfg.push_private)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the run is safe on disk and can be pushed again
        why = str(e) if isinstance(e, Gpt2kitError) else f"{type(e).__name__}: {e}"
        result.push_error = f"the run finished, but pushing it to {repo} failed: {why}; retry with `{retry}`"
        return
    run.say(f"pushed to {result.pushed}")


def _finish(run: _Run) -> RunResult:
    try:
        result = run.run()
    finally:
        if run.dist.initialized:
            import gc

            import torch.distributed as dist
            # The DDP wrapper's reducer holds the process group. Left to the interpreter's teardown, gloo's
            # threads could be destroyed while still joinable: the process aborted after training had
            # finished ("terminate called without an active exception"). Free it, then the group, now.
            trainer = getattr(run, "trainer", None)
            if trainer is not None:
                trainer.fwd = trainer.ddp_module = None
            gc.collect()
            dist.destroy_process_group()
    if result.status == "finished" and run.cfg.push_to_hub and run.dist.main:
        _push(run, result)
    return result
