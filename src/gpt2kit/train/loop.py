"""The run: `finetune` starts one, `resume` continues one. `_Run.run` takes the run directory, sets up (model,
data, resolved config, trainer, state), commits the run, then `_loop` trains: one optimizer step per
iteration, then metrics, evaluation, samples and checkpoints when they are due."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gpt2kit import push, runs, tracking
from gpt2kit.data import check_inputs, plural
from gpt2kit.errors import Gpt2kitError
from gpt2kit.plot import plot_run
from gpt2kit.progress import progress_bar, safe_stderr
from gpt2kit.run_numbers import new_run_dir, resolve_run_ref
from gpt2kit.train.config import RunResult, TrainConfig
from gpt2kit.train.config import resume_hint as _resume_hint
from gpt2kit.train.distributed import _init_distributed, _out_of_memory, _peer_failed
from gpt2kit.train.fsdp import SHARDS, gathered_model, is_sharded_checkpoint, load_sharded, save_sharded
from gpt2kit.train.rundir import RunDir, stage_checkpoint, write_checkpoint, write_named, writing
from gpt2kit.train.setup import (
    build_model,
    check_block_size,
    check_paths,
    check_sharing,
    make_batchers,
    memory_warning,
    prepare_run_data,
    resolve_config,
    sample_texts,
)
from gpt2kit.train.state import TrainState, read_state
from gpt2kit.train.trainer import Trainer, lr_at

log = logging.getLogger("gpt2kit")


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Interrupt:
    """First Ctrl-C (or SIGTERM): finish the step, save, exit cleanly. Second Ctrl-C: stop at once.

    Once the loop has ended with an error, a SIGTERM is ignored: the process is already stopping, and torchrun,
    when one of its job's processes fails, sends the others SIGTERM, which must not cut short the recording of
    the failure in run.json or the line that says why (torchrun sends SIGKILL 30 s later if one lingers)."""

    def __init__(self, say, *, distributed: bool = False):
        self.flag = False
        self.say = say
        self.distributed = distributed
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.say("stopping: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    def __exit__(self, exc_type, *exc) -> None:
        for sig, handler in self.old.items():
            failing_worker = sig == signal.SIGTERM and exc_type is not None and self.distributed
            signal.signal(sig, signal.SIG_IGN if failing_worker else handler)


class _Run:
    """One training process's run. Order matters for what a failure leaves behind (see RunDir): the run's
    lock is taken before anything else touches the directory; then everything that can fail is checked (model,
    data, block size, optimizer, the checkpoint's state) while the directory stays as it was; then the run is
    committed (replacing what --out held, with --overwrite); then it trains."""

    def __init__(self, cfg: TrainConfig, *, resume: bool, progress: bool, overwrite: bool = False,
                 moved_base: bool = False, lock: runs.RunLock | None = None, extending: bool = False):
        self.cfg = cfg
        self.resuming = resume
        self.extending = extending  # resuming with a new --steps/--epochs total
        self.moved_base = moved_base  # resuming a LoRA run with its base model at a new cfg.model
        self.progress = progress
        self.dir = Path(cfg.out)
        # the main process's hold on the run directory (resume() takes the lock before reading the run)
        self.rundir = RunDir(self.dir, resuming=resume, overwrite=overwrite, lock=lock)
        self.bar = None
        self.tb = None
        self.trackers = tracking.Trackers()  # W&B etc.; the main process's only
        self._plotted = -1e9
        self._write_warned: set[str] = set()
        self._pending: list[dict[str, Any]] = []  # step records not yet in metrics.jsonl
        self._metrics_written = time.monotonic()
        self.dist, self.device, self.device_reason = _init_distributed(cfg)
        self.state: TrainState | None = None  # from _setup on

    # ---- output ----
    def say(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---- checkpoints ----
    def save_checkpoint(self) -> None:
        step = self.state.step
        # every rank's state is identical here; the main one writes
        state = self.state.state_dict(schedule=self.cfg.schedule, total_steps=self.cfg.steps, world=self.dist.world)
        sharded = self.trainer.fsdp
        if sharded:  # every process writes its shards of the weights and optimizer state into the staged folder
            tmp = self.dir / "checkpoints" / f".tmp-step-{step}"
            self.dist.agree((lambda: stage_checkpoint(self.dir, step)) if self.dist.main else None)

            def shards() -> None:
                with (writing(tmp, tmp.with_name(f"step-{step}"), run_dir=self.dir, model=self.model,
                              world=self.dist.world) if self.dist.main else contextlib.nullcontext()):
                    save_sharded(self.model, self.trainer.optimizer, tmp / SHARDS)
            self.dist.agree(shards)

        def write() -> None:
            write_checkpoint(self.dir, step, state, model=self.model, tok=self.tok, lora_cfg=self.lora_cfg,
                             keep=self.cfg.keep, world=self.dist.world, sharded=sharded)
            runs.update_run_json(self.dir, step=step, checkpoint=f"checkpoints/step-{step}", **self.state.best(),
                                 last_loss=self.state.last_loss)
            self._plot()
        self.dist.agree(write if self.dist.main else None)

    def save_named(self, name: str) -> Path:
        """best/ or final/ (under --fsdp, the whole model gathered into the main process)."""
        model = gathered_model(self.model, self.lora_cfg) if self.trainer.fsdp else self.model
        self.dist.agree(lambda: write_named(self.dir, name, model=model, tok=self.tok, lora_cfg=self.lora_cfg,
                                            world=self.dist.world) if self.dist.main else None)
        return self.dir / name

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
        improved = step > 0 and (self.state.best_val is None or loss < self.state.best_val)
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
                self.state.best_val, self.state.best_step, self.state.bad_evals = loss, step, 0
                self.save_named("best")
                if self.dist.main:
                    self._keep_going(runs.RUN_JSON, lambda: runs.update_run_json(
                        self.dir, best_val_loss=loss, best_step=step, step=step))
            else:
                self.state.bad_evals += 1
        elif self.state.best_val is None:
            self.state.best_val, self.state.best_step = loss, 0
        mark = " (best)" if improved else ""
        shown = f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"
        self.say(f"step {step}: validation loss {loss:.4f}, perplexity {shown}{mark}")
        self._plot()
        return loss

    def sample(self, step: int) -> None:
        model = self.model
        if self.trainer.fsdp:  # sampled from the whole model, gathered into the main process (a collective call)
            model = gathered_model(self.model, self.lora_cfg)
            if model is not None:
                model.to(self.device)
        if not self.dist.main:
            return
        texts = sample_texts(model, self.tok, self.cfg.prompts, self.cfg.sample_tokens,
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
            try:
                plot_run(self.dir)
            except Exception as e:  # noqa: BLE001 - a plot must never stop training
                log.warning("could not draw loss.png: %s", e)

    # ---- main ----
    def run(self) -> RunResult:
        status, stopped_early = "running", False
        try:
            with safe_stderr():  # a closed or broken stderr (`| head`, a killed `tee`) never stops training
                self.dist.agree(self.rundir.prepare if self.dist.main else None)
                self.dist.check_shared_dir(self.dir)  # (several machines: a shared filesystem)
                self._setup()
                with _Interrupt(self.say, distributed=self.dist.world > 1) as interrupt:
                    status, stopped_early = self._loop(interrupt)
        except BaseException as e:
            peer = self.dist.initialized and _peer_failed(e)
            if self.dist.main and self.rundir.committed:
                st = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                why = ("another process of the torchrun job failed (its error is in the job's output)" if peer else
                       f"{type(e).__name__}: {e}"[:500])
                got = {"step": self.state.step} if self.state is not None else {}  # how far it got
                with contextlib.suppress(OSError, Gpt2kitError):  # e.g. the disk is full: report `e`, not this
                    runs.update_run_json(self.dir, status=st, error=None if st == "interrupted" else why, **got)
            elif self.dist.main and not self.resuming and self.rundir.lock is not None:
                self.rundir.abandon()
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
            if self.dist.main:
                self.rundir.close()

        model_dir = None
        if self.dist.main:
            # (a LoRA checkpoint holds adapters only, which --model RUN also loads)
            ckpts = runs.checkpoint_dirs(self.dir)
            model_dir = runs.model_dir(self.dir) or (ckpts[-1][1] if ckpts else None)
        tps = self.state.tokens_seen / self.state.train_time if self.state.train_time > 0 else 0.0
        best = self.state.best()
        return RunResult(self.dir, status, self.state.step, self.cfg.steps, self.state.last_loss,
                         best["best_val_loss"], best["best_step"], model_dir, tps, stopped_early)

    def _setup(self) -> None:
        cfg, dist, say = self.cfg, self.dist, self.say
        ckpts = runs.checkpoint_dirs(self.dir) if self.resuming else []
        ckpt = ckpts[-1][1] if ckpts else None

        def build() -> None:
            self.model, self.tok, self.lora_cfg = build_model(
                cfg, ckpt, run_dir=self.dir, device=self.device, resuming=self.resuming, moved_base=self.moved_base,
                say=say)
        dist.agree(build)
        check_block_size(cfg, self.model)  # before the data is read
        train, val, record = prepare_run_data(cfg, self.tok, run_dir=self.dir, resuming=self.resuming, dist=dist,
                                              say=say)
        self.rundir.record.update(record)
        asked_eval = cfg.eval_every
        if ckpt is not None and (cfg.fsdp or is_sharded_checkpoint(ckpt)):
            cfg = self._regroup(cfg, ckpt)
        self.cfg = cfg = resolve_config(cfg, self.model, train, val, world=dist.world, device=self.device, say=say)
        self.batcher, self.val_batcher = make_batchers(cfg, train, val, self.tok, dist=dist, device=self.device,
                                                       say=say)
        if cfg.early_stop and self.val_batcher is None:
            say(f"warning: --early-stop {cfg.early_stop} needs validation data and this run has none; it will "
                "run all its steps")
        if asked_eval and self.val_batcher is None:
            say(f"warning: --eval-every {asked_eval} needs validation data and this run has none; it will not "
                "evaluate")
        self.trainer = Trainer(self.model, cfg, self.device, ddp=dist.initialized and not cfg.fsdp, fsdp=cfg.fsdp)
        self.state = TrainState(self.trainer, self.batcher)
        if ckpt is not None:
            self.state.load(ckpt, device=self.device, world=dist.world, run_dir=self.dir, any_world=cfg.fsdp)
            if cfg.fsdp:  # the weights and optimizer state, resharded for this job; its data position
                load_sharded(self.model, self.trainer.optimizer, ckpt)
                self.batcher.step = self.state.step * cfg.grad_accum
        if self.state.step >= cfg.steps and self.extending:
            raise Gpt2kitError(f"cannot continue {self.dir} to {plural(cfg.steps, 'step')}: it has done "
                               f"{self.state.step} already (--steps and --epochs with --resume give the new total)")
        # a batch that cannot fit is refused before the commit, so it leaves no run (and --overwrite deletes nothing)
        warn = memory_warning(self.model.config, cfg, cfg.block_size, self.device, dist.world)
        dist.agree((lambda: self.rundir.commit(cfg, self.tok, self.state.step)) if dist.main else None)
        if warn:
            say(f"warning: {warn}")

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
                 + (f"; resuming at step {self.state.step}" if self.state.step else ""))
        if cfg.compile and self.device.type == "cpu":
            self.say("warning: --compile made CPU training slower in our measurements (4.1 vs 2.9 s a step for "
                     "124M, after a long compile); it is meant for GPUs")
        if cfg.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is optional
                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.say("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
        if cfg.wandb and self.dist.main:
            self.trackers = tracking.open_trackers(cfg.to_dict(), self.dir, use_wandb=True,
                                                   wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name)

    def _regroup(self, cfg: TrainConfig, ckpt: Path) -> TrainConfig:
        """An --fsdp run resumed by another number of processes: its checkpoint reshards, and the global batch
        (batch x grad accum x processes, and the data each step reads) stays the run's, through --grad-accum."""
        if not cfg.fsdp:
            raise Gpt2kitError(f"cannot resume {self.dir}: its checkpoint {ckpt} is sharded (an --fsdp run's) and "
                               "its config.json does not say fsdp; set \"fsdp\": true there and resume it under "
                               "torchrun")
        if not is_sharded_checkpoint(ckpt):
            raise Gpt2kitError(f"cannot resume {self.dir} with --fsdp: its checkpoint {ckpt} holds no sharded "
                               f"state ({SHARDS}/), so it was not written by an --fsdp run")
        then = int(read_state(ckpt, device=torch.device("cpu"), world=self.dist.world, run_dir=self.dir,
                              any_world=True).get("world_size", self.dist.world))
        now = self.dist.world
        if then == now:
            return cfg
        micro = cfg.grad_accum * then  # micro-batches of --batch-size sequences in each step, of every process
        if micro % now:
            raise Gpt2kitError(f"cannot resume {self.dir} with {now} processes: each of its steps is {micro} "
                               f"micro-batches of {cfg.batch_size} sequences (--grad-accum {cfg.grad_accum} x {then} "
                               f"processes), which {now} processes cannot share evenly; resume it with a number of "
                               f"processes that divides {micro}")
        self.say(f"resharding: {then} process{'es' if then > 1 else ''} -> {now}; --grad-accum {cfg.grad_accum} -> "
                 f"{micro // now} keeps the global batch")
        return replace(cfg, grad_accum=micro // now)

    def _loop(self, interrupt: _Interrupt) -> tuple[str, bool]:
        cfg, st, dist = self.cfg, self.state, self.dist
        if dist.main and self.progress:
            self.bar = progress_bar(total=cfg.steps, initial=st.step, unit="step", desc="finetune")
        if st.step == 0:  # the starting model, as a baseline
            if self.val_batcher is not None and cfg.eval_every:
                self.evaluate(0)
            if cfg.sample_every:
                self.sample(0)
        stopped_early = False
        while st.step < cfg.steps:
            # one optimizer step over grad_accum micro-batches; dropout masks depend on (seed, step, rank)
            torch.manual_seed(_step_seed(cfg.seed, st.step, dist.rank))
            lr = lr_at(st.step, cfg, cfg.steps)
            t0 = time.perf_counter()
            batches = [self.batcher.next() for _ in range(cfg.grad_accum)]
            n_tok = dist.world * sum(int((y != -100).sum()) for _, y in batches)
            loss_t = self.trainer.forward_backward(batches)
            norm = self.trainer.optimizer_step(lr)
            loss = dist.mean(float(loss_t), self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            st.step += 1
            st.tokens_seen += n_tok
            st.train_time += dt
            st.last_loss = loss
            self._check_finite(loss)
            self._log_step(loss, lr, norm, n_tok, dt)

            # then whatever is due at this step
            stop = dist.any_flag(interrupt.flag, self.device)
            last = st.step == cfg.steps
            due = lambda every: bool(every) and (st.step % every == 0)  # noqa: E731
            self._write_metrics(force=stop or last or due(cfg.eval_every) or due(cfg.save_every))
            if self.val_batcher is not None and (due(cfg.eval_every) or (last and cfg.eval_every)):
                self.evaluate(st.step)
                if cfg.early_stop and st.bad_evals >= cfg.early_stop:
                    self.say(f"early stop: no better validation loss in {plural(cfg.early_stop, 'evaluation')} "
                             f"(best {st.best_val:.4f} at step {st.best_step})")
                    stopped_early = True
            if due(cfg.sample_every) or (last and cfg.sample_every):
                self.sample(st.step)
            if stop:
                self._interrupted()
                return "interrupted", False
            if due(cfg.save_every) and not last and not stopped_early:
                self.save_checkpoint()
            if stopped_early:
                break
        self._finished(stopped_early)
        return "finished", stopped_early

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss) and self.trainer.precision.scaler is None:  # (loss scaling skips such steps)
            raise Gpt2kitError(
                f"the loss became {loss} at step {self.state.step}; start a new run with a lower --lr "
                f"(now {self.cfg.lr:g})"
                + (" or --dtype float32" if self.trainer.precision.mode != "float32" else "")
                + " (--resume would repeat the same steps)")

    def _log_step(self, loss: float, lr: float, norm: torch.Tensor | None, n_tok: int, dt: float) -> None:
        """A step's metrics: to metrics.jsonl (in batches, _write_metrics), the trackers, the bar, TensorBoard."""
        st = self.state
        rec = {"step": st.step, "loss": loss, "lr": lr, "tokens": st.tokens_seen, "tok_per_s": n_tok / dt,
               "time": round(st.train_time, 3)}
        if norm is not None:
            rec["grad_norm"] = float(norm)
        self._pending.append(rec)
        if self.dist.main:
            self.trackers.log_metrics(st.step, rec)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {n_tok / dt:,.0f} tok/s, lr {lr:.2e}", refresh=False)
            self.bar.update(1)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, st.step)
            self.tb.add_scalar("train/lr", lr, st.step)

    def _write_metrics(self, force: bool = False) -> None:
        """The pending step records, at most every 5 s (and when `force`d: before evaluations, checkpoints
        and the end)."""
        if self.dist.main and self._pending and (force or time.monotonic() - self._metrics_written > 5):
            self._keep_going(runs.METRICS, functools.partial(runs.append_metrics, self.dir, self._pending))
            self._pending = []
            self._metrics_written = time.monotonic()

    def _interrupted(self) -> None:
        self.save_checkpoint()
        self._plot(force=True)
        if self.dist.main:
            runs.update_run_json(self.dir, status="interrupted", step=self.state.step)
        self.say(f"interrupted: saved {self.dir}/checkpoints/step-{self.state.step}; continue with "
                 f"{_resume_hint(self.dir, self.dist.world)}")

    def _finished(self, stopped_early: bool) -> None:
        self._write_metrics(force=True)
        self.save_checkpoint()
        final = self.save_named("final")
        if self.dist.main:
            runs.update_run_json(self.dir, status="finished", step=self.state.step, finished=runs.now(),
                                 stopped_early=stopped_early, last_loss=self.state.last_loss,
                                 **self.state.best())
        self._plot(force=True)
        best = ""
        if self.state.best_step == 0:
            best = (f"; no step beat the starting model's validation loss ({self.state.best_val:.4f}), so there "
                    "is no best/ (lower --lr?)")
        elif self.state.best_step is not None:
            best = f"; best validation loss {self.state.best_val:.4f} at step {self.state.best_step} in best/"
        tps = self.state.tokens_seen / max(self.state.train_time, 1e-9)
        if self.bar is not None:  # the finished bar first, once, then the summary under it
            self.bar.close()
            self.bar = None
        self.say(f"done: {plural(self.state.step, 'step')}, {tps:,.0f} tokens/s; model in {final}{best}")


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
    check_paths(cfg if runs_dir is None else replace(cfg, out=os.fspath(Path(runs_dir) / "0")))
    # the data, before the model (which may mean a long download, or a download error offline)
    check_inputs(cfg.data, cfg.data_spec(), val_inputs=cfg.val_data or None)
    check_sharing(cfg)
    run = _Run(cfg, resume=False, progress=progress, overwrite=overwrite)
    if runs_dir is not None:
        number, made = None, not Path(runs_dir).expanduser().exists()
        if run.dist.main:  # the main process picks the number; under torchrun the others learn it
            cfg.out = run.cfg.out = str(new_run_dir(runs_dir, name))
            number = cfg.out
        if run.dist.initialized:
            got = [number]
            dist.broadcast_object_list(got, src=0)
            cfg.out = run.cfg.out = got[0]
        run.dir = run.rundir.path = Path(cfg.out)
        # (made empty by new_run_dir, as was runs_dir if it was new: removed again if the start fails)
        run.rundir.created = [run.dir.parent] * made + [run.dir]
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
    if extending:  # the new total; setup.resolve_config turns epochs into steps, and _Run._setup checks it is more
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
    check_sharing(cfg)
    return _Run(cfg, resume=True, progress=progress, moved_base=model is not None, lock=lock, extending=extending)


def _push(run: _Run, result: RunResult) -> None:
    """--push-to-hub, after a finished run: a failure is recorded in result.push_error with how to retry (the
    run itself stays finished)."""
    repo = run.cfg.push_to_hub
    retry = shlex.join(["gpt2kit", "push", str(result.run_dir), "--repo", repo]
                       + (["--private"] if run.cfg.push_private else []))
    try:
        result.pushed = push.push(result.run_dir, repo, private=run.cfg.push_private)
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
