"""Training speed: gpt2kit vs a plain transformers training loop, same weights, data and settings.

    python bench/bench_train.py                 # fp32 + bf16 table, then the jokes-job projection
    python bench/bench_train.py --quick         # fewer steps, skips transformers' bf16 (very slow on AVX2)

Both sides fully fine-tune the same random-initialised 124M GPT-2 (random weights train at exactly the
speed of pretrained ones) on the same batches of 2 x 256 tokens of tinyshakespeare: AdamW (lr 1e-4,
weight decay 0.01 on matrices), gradient clipping at 1.0, dropout 0, torch.set_num_threads(2). The
transformers side is the loop its docs and most scripts use: `model(input_ids, labels=input_ids).loss`,
`torch.optim.AdamW` with its defaults, `torch.autocast` for bf16. The gpt2kit side is gpt2kit.train.Trainer,
the code `gpt2kit finetune` runs. Each (side, dtype) runs in its own process, so peak RSS is its own;
rounds alternate the sides so that load from other processes hits both alike. Reported tokens/s is the
median over timed steps (after one warm-up step)."""

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


def worker(side: str, dtype: str, steps: int, model_dir: str) -> dict:
    """One process: load the shared weights, train `steps` + 1 warm-up steps, report times and peak RSS."""
    import torch
    torch.set_num_threads(2)
    batches = _batches(steps + 1)
    times = []
    if side == "gpt2kit":
        from gpt2kit.checkpoints import load_model
        from gpt2kit.train import TrainConfig, Trainer
        model, _ = load_model(model_dir, device="cpu", dtype="float32")
        model.train()
        cfg = TrainConfig(model=model_dir, data=["-"], lr=1e-4, weight_decay=0.01, grad_clip=1.0, dtype=dtype)
        trainer = Trainer(model, cfg, torch.device("cpu"))
        mode = trainer.precision.mode
        for x, y in batches:
            t = time.perf_counter()
            loss = trainer.forward_backward([(x, y)])
            trainer.optimizer_step(1e-4)
            times.append(time.perf_counter() - t)
            last = float(loss)
    else:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        model = GPT2LMHeadModel.from_pretrained(model_dir).train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        fused = side == "transformers+fused"
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, **({"fused": True} if fused else {}))
        mode = "autocast" if dtype == "bfloat16" else "float32"
        for x, _ in batches:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            last = float(loss)
    timed = times[1:] or times
    return {"side": side, "dtype": dtype, "mode": mode, "step_s": timed, "warmup_s": times[0],
            "tok_s": BATCH * BLOCK / statistics.median(timed), "loss": last,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _run_worker(side: str, dtype: str, steps: int, model_dir: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, __file__, "--worker", side, dtype, str(steps), model_dir],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {side} {dtype} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _merge(results: list[dict]) -> dict:
    steps = [s for r in results for s in r["step_s"]]
    return {**results[0], "step_s": steps, "tok_s": BATCH * BLOCK / statistics.median(steps),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in results)}


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
        tok_s = statistics.median(r["tok_per_s"] for r in recs)
        info = json.loads((res.run_dir / "run.json").read_text())
        from gpt2kit.data import TokenCache
        n_train = len(TokenCache.open(info["train_tokens"]))
    total = 10 * n_train
    return {"tok_s": tok_s, "train_tokens": n_train, "epoch_tokens": total, "hours": total / tok_s / 3600,
            "steps_10_epochs": -(-total // (batch * block)), "probe_wall_s": wall, "batch": batch,
            "block": block, "lora_rank": lora_rank}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed steps per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds for float32")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 round, no transformers bf16 (~200 s/step)")
    ap.add_argument("--hf-bf16-steps", type=int, default=0,
                    help="transformers bf16 steps after the first (0: time the first step alone; at ~200 s a step "
                    "on AVX2 CPUs its warm-up cost is noise)")
    ap.add_argument("--no-jokes", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, dtype, steps, model_dir = args.worker
        print(json.dumps(worker(side, dtype, int(steps), model_dir)))
        return
    if args.quick:
        args.steps, args.rounds = 3, 1

    import torch

    from gpt2kit.checkpoints import save_model
    from gpt2kit.config import GPTConfig
    from gpt2kit.model import GPT
    from gpt2kit.tokenizer import Tokenizer
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; threads 2", flush=True)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_model(GPT(GPTConfig.from_name("gpt2")), Tokenizer.from_dir(VOCAB), d)  # random 124M, saved once
        rows = []
        for dtype in ("float32", "bfloat16"):
            sides = ["gpt2kit", "transformers"] + (["transformers+fused"] if dtype == "float32" else [])
            if dtype == "bfloat16" and args.quick:
                sides = ["gpt2kit"]
            per_side: dict[str, list] = {s: [] for s in sides}
            rounds = args.rounds if dtype == "float32" else 1
            for r in range(rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    steps = args.hf_bf16_steps if (dtype == "bfloat16" and side != "gpt2kit") else args.steps
                    res = _run_worker(side, dtype, steps, d)
                    per_side[side].append(res)
                    print(f"  {side:<20} {dtype:<9} {res['tok_s']:8.1f} tok/s  steps "
                          f"{[round(s, 2) for s in res['step_s']]}  peak {res['peak_rss_gib']:.2f} GiB", flush=True)
            rows += [_merge(v) for v in per_side.values()]

        print("\n| dtype | gpt2kit tok/s | transformers tok/s | ratio | gpt2kit peak RSS | transformers peak RSS |")
        print("|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            ours = next((r for r in rows if r["side"] == "gpt2kit" and r["dtype"] == dtype), None)
            for other in ("transformers", "transformers+fused"):
                hf = next((r for r in rows if r["side"] == other and r["dtype"] == dtype), None)
                if ours and hf:
                    print(f"| {dtype} ({ours['mode']} vs {other}) | {ours['tok_s']:.1f} | {hf['tok_s']:.2f} | "
                          f"{ours['tok_s'] / hf['tok_s']:.2f}x | {ours['peak_rss_gib']:.2f} GiB | "
                          f"{hf['peak_rss_gib']:.2f} GiB |")
            if ours and not any(r["side"] != "gpt2kit" and r["dtype"] == dtype for r in rows):
                print(f"| {dtype} ({ours['mode']}) | {ours['tok_s']:.1f} | - | - | "
                      f"{ours['peak_rss_gib']:.2f} GiB | - |")

        if not args.no_jokes:
            print("\njokes job: 124M, full fine-tuning, 10 epochs over onelinefun.csv (--column Joke)", flush=True)
            for batch, block, rank in ((8, 128, 0), (4, 256, 0), (8, 128, 8)):
                j = jokes_projection(d, steps=4 if args.quick else 6, batch=batch, block=block, lora_rank=rank)
                what = f"LoRA rank {rank}" if rank else "full"
                print(f"  {what}, batch {batch} x {block}: {j['tok_s']:.0f} tok/s; 10 epochs = {j['epoch_tokens']:,} "
                      f"tokens ({j['steps_10_epochs']} steps) -> {j['hours'] * 60:.0f} min projected "
                      f"(original tutorial: {ORIGINAL_HOURS:.0f} h, {ORIGINAL_HOURS / j['hours']:.0f}x)", flush=True)


if __name__ == "__main__":
    main()
