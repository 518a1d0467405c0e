"""Training speed: gpt2kit vs a plain transformers training loop, same weights, data and settings.

    python bench/bench_train.py                 # fp32 + bf16 table, then the jokes-job projection
    python bench/bench_train.py --quick         # fewer steps, skips transformers' bf16 (very slow on AVX2)

Both sides fully fine-tune the same random-initialised 124M GPT-2 (random weights train at exactly the
speed of pretrained ones) on the same batches of 2 x 256 tokens of tinyshakespeare: AdamW (lr 1e-4,
weight decay 0.01 on matrices), gradient clipping at 1.0, dropout 0, torch.set_num_threads(2). The
transformers side is the loop its docs and most scripts use: `model(input_ids, labels=input_ids).loss`,
`torch.optim.AdamW` with its defaults, `torch.autocast` for bf16. The gpt2kit side is gpt2kit.train.Trainer,
the code `gpt2kit finetune` runs; "transformers+fused" is the same loop with `AdamW(fused=True)`, which
is what transformers' own Trainer picks by default on torch >= 2.8. The timed steps of all sides run in
one process, interleaved, so that load from other processes falls on every side alike; tokens/s is the
best (fastest) timed step after one warm-up step, the estimate least disturbed by other processes on a
shared machine (the median is printed too). Peak RSS comes from a separate process per side (load
the model, train two steps)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOCAB = SHARED / "gpt2-vocab"
SHAKESPEARE = SHARED / "datasets" / "tinyshakespeare.txt"
JOKES = SHARED / "datasets" / "onelinefun.csv"
BATCH, BLOCK = 2, 256
ORIGINAL_HOURS = 44.0  # the jokes tutorial's reported CPU time (run_lm_finetuning.py, batch 2, 10 epochs)


def _batches(n: int) -> list:
    import numpy as np
    import torch

    from gpt2kit.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(VOCAB)
    ids = np.array(tok.encode(SHAKESPEARE.read_text()[:400_000]), dtype=np.int64)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(ids) - BLOCK - 1, size=BATCH)
        w = torch.from_numpy(np.stack([ids[s:s + BLOCK + 1] for s in starts]))
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


class _Side:
    """One training loop over a model loaded from the shared weights."""

    def __init__(self, side: str, dtype: str, model_dir: str):
        import torch
        self.side, self.dtype = side, dtype
        if side == "gpt2kit":
            from gpt2kit.checkpoints import load_model
            from gpt2kit.train import TrainConfig, Trainer
            model, _ = load_model(model_dir, device="cpu", dtype="float32")
            model.train()
            cfg = TrainConfig(model=model_dir, data=["-"], lr=1e-4, weight_decay=0.01, grad_clip=1.0, dtype=dtype)
            self.trainer = Trainer(model, cfg, torch.device("cpu"))
            self.mode = self.trainer.precision.mode
        else:
            from transformers import GPT2LMHeadModel
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            self.model = GPT2LMHeadModel.from_pretrained(model_dir).train()
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.model.parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
            kw = {"fused": True} if side == "transformers+fused" else {}
            self.opt = torch.optim.AdamW(groups, lr=1e-4, **kw)
            self.mode = "autocast" if dtype == "bfloat16" else "float32"

    def step(self, x, y) -> float:
        import torch
        t = time.perf_counter()
        if self.side == "gpt2kit":
            loss = self.trainer.forward_backward([(x, y)])
            self.trainer.optimizer_step(1e-4)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
                loss = self.model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        float(loss)
        return time.perf_counter() - t


def timing_worker(dtype: str, sides: list[str], steps: dict[str, int], model_dir: str) -> dict:
    """All sides in one process, their steps interleaved round-robin, so that load from other processes
    falls on every side alike. The first step of each side is a warm-up (not timed) unless it is the
    only one."""
    import torch
    torch.set_num_threads(2)
    loops = {s: _Side(s, dtype, model_dir) for s in sides}
    n = max(steps.values()) + 1
    batches = _batches(n)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(n):
        order = sides if i % 2 == 0 else sides[::-1]
        for s in order:
            if i <= steps[s]:
                times[s].append(loops[s].step(*batches[i]))
    out = {}
    for s in sides:
        timed = times[s][1:] or times[s]
        # the fastest step is the estimate least disturbed by other processes on a shared machine
        out[s] = {"side": s, "dtype": dtype, "mode": loops[s].mode, "step_s": timed, "warmup_s": times[s][0],
                  "tok_s": BATCH * BLOCK / min(timed), "tok_s_median": BATCH * BLOCK / statistics.median(timed)}
    return out


def memory_worker(side: str, dtype: str, model_dir: str) -> float:
    """Peak RSS (GiB) of a process that loads the model and trains two steps (one for transformers' bf16,
    at ~200 s a step; the optimizer state exists after the first)."""
    import torch
    torch.set_num_threads(2)
    loop = _Side(side, dtype, model_dir)
    for x, y in _batches(1 if (side, dtype) == ("transformers", "bfloat16") else 2):
        loop.step(x, y)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _subprocess(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def jokes_projection(model_dir: str, steps: int, batch: int, block: int, lora_rank: int = 0) -> dict:
    """A real `finetune` run on the jokes CSV for a few steps; 10 epochs projected from its tokens/s."""
    import torch
    torch.set_num_threads(2)
    from gpt2kit.runs import read_metrics
    from gpt2kit.train import TrainConfig, finetune
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(model=model_dir, data=[str(JOKES)], column="Joke", out=f"{d}/run", steps=steps,
                          batch_size=batch, block_size=block, eval_every=0, sample_every=0, save_every=10**6,
                          lora_rank=lora_rank, tensorboard=False)
        t0 = time.perf_counter()
        res = finetune(cfg, progress=False)
        wall = time.perf_counter() - t0
        recs = [r for r in read_metrics(res.run_dir) if "loss" in r][1:]  # drop the warm-up step
        tok_s = max(r["tok_per_s"] for r in recs)  # the least disturbed step, as above
        tok_s_median = statistics.median(r["tok_per_s"] for r in recs)
        info = json.loads((res.run_dir / "run.json").read_text())
        from gpt2kit.data import TokenCache
        n_train = len(TokenCache.open(info["train_tokens"]))
    total = 10 * n_train
    return {"tok_s": tok_s, "tok_s_median": tok_s_median,
            "train_tokens": n_train, "epoch_tokens": total, "hours": total / tok_s / 3600,
            "hours_median": total / tok_s_median / 3600,
            "steps_10_epochs": -(-total // (batch * block)), "probe_wall_s": wall, "batch": batch,
            "block": block, "lora_rank": lora_rank}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="3 steps; no transformers bf16 (~200 s a step on AVX2)")
    ap.add_argument("--hf-bf16-steps", type=int, default=0,
                    help="transformers bf16 steps after the first (0: time the first step alone; at ~200 s a step "
                    "on AVX2 CPUs its warm-up cost is noise)")
    ap.add_argument("--no-jokes", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--timing-worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timing_worker:
        dtype, spec, model_dir = args.timing_worker
        steps = dict((k, int(v)) for k, v in (item.split("=") for item in spec.split(",")))
        print(json.dumps(timing_worker(dtype, list(steps), steps, model_dir)))
        return
    if args.memory_worker:
        side, dtype, model_dir = args.memory_worker
        print(json.dumps(memory_worker(side, dtype, model_dir)))
        return
    if args.quick:
        args.steps = 3

    import torch

    from gpt2kit.checkpoints import save_model
    from gpt2kit.config import GPTConfig
    from gpt2kit.model import GPT
    from gpt2kit.tokenizer import Tokenizer
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; 2 threads; load average {_load()}",
          flush=True)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_model(GPT(GPTConfig.from_name("gpt2")), Tokenizer.from_dir(VOCAB), d)  # random 124M, saved once
        rows: dict[tuple[str, str], dict] = {}
        for dtype in ("float32", "bfloat16"):
            if dtype == "float32":
                steps = {"gpt2kit": args.steps, "transformers": args.steps, "transformers+fused": args.steps}
            elif args.quick:
                steps = {"gpt2kit": args.steps}
            else:
                steps = {"gpt2kit": args.steps, "transformers": args.hf_bf16_steps}
            spec = ",".join(f"{k}={v}" for k, v in steps.items())
            res = json.loads(_subprocess("--timing-worker", dtype, spec, d))
            for side, r in res.items():
                if not args.no_memory:
                    r["peak_rss_gib"] = float(_subprocess("--memory-worker", side, dtype, d))
                rows[(side, dtype)] = r
                mem = f"  peak RSS {r['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in r else ""
                print(f"  {side:<20} {dtype:<9} {r['mode']:<9} {r['tok_s']:8.2f} tok/s best, "
                      f"{r['tok_s_median']:8.2f} median; steps "
                      f"{[round(x, 2) for x in r['step_s']]}{mem}", flush=True)
        print(f"load average after: {_load()}")

        def rss(r: dict) -> str:
            return f"{r['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in r else "-"
        print("\ntokens/s from the fastest of the interleaved steps")
        print("| dtype | gpt2kit tok/s | baseline | baseline tok/s | ratio | gpt2kit peak RSS | baseline peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            ours = rows.get(("gpt2kit", dtype))
            for other in ("transformers", "transformers+fused"):
                base = rows.get((other, dtype))
                if ours and base:
                    print(f"| {dtype} ({ours['mode']}) | {ours['tok_s']:.1f} | {other} ({base['mode']}) | "
                          f"{base['tok_s']:.2f} | {ours['tok_s'] / base['tok_s']:.2f}x | {rss(ours)} | {rss(base)} |")

        if not args.no_jokes:
            print("\njokes job: 124M, 10 epochs over onelinefun.csv (--column Joke)", flush=True)
            for batch, block, rank in ((8, 128, 0), (2, 256, 0), (8, 128, 8)):
                j = jokes_projection(d, steps=4 if args.quick else 8, batch=batch, block=block, lora_rank=rank)
                what = f"LoRA rank {rank}" if rank else "full fine-tuning"
                print(f"  {what}, batch {batch} x {block}: {j['tok_s']:.0f} tok/s (median {j['tok_s_median']:.0f}); "
                      f"10 epochs = {j['epoch_tokens']:,} "
                      f"tokens ({j['steps_10_epochs']} steps) -> {j['hours'] * 60:.0f} min projected "
                      f"({j['hours_median'] * 60:.0f} at the median) "
                      f"(original tutorial: {ORIGINAL_HOURS:.0f} h, {ORIGINAL_HOURS / j['hours']:.0f}x); "
                      f"load average {_load()}", flush=True)


if __name__ == "__main__":
    main()
