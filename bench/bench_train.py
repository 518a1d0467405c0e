"""Training speed: gpt2kit vs a plain transformers training loop, same weights, data and settings.

    python bench/bench_train.py                 # fp32 + bf16 table, then the jokes-job projection
    python bench/bench_train.py --quick         # fewer steps; transformers bf16 only where the CPU has bf16 arithmetic

Both sides fully fine-tune the same random-initialised 124M GPT-2 (random weights train at exactly the
speed of pretrained ones) on the same batches of 2 x 256 tokens of tinyshakespeare: AdamW (lr 1e-4,
weight decay 0.01 on matrices), gradient clipping at 1.0, dropout 0, torch.set_num_threads(2). The
transformers side is the loop its docs and most scripts use: `model(input_ids, labels=input_ids).loss`,
`torch.optim.AdamW` with its defaults, `torch.autocast` for bf16. The gpt2kit side is gpt2kit.train.Trainer,
the code `gpt2kit finetune` runs; "transformers+fused" is the same loop with `AdamW(fused=True)`, which
is what transformers' own Trainer picks by default on torch >= 2.8. Each side runs alone in its own
process (as a real job would), `--rounds` times in alternating order so that drifting load from other
processes falls on every side alike. tokens/s is printed three ways: from the fastest timed step (the least
disturbed estimate on a shared machine), from the median step, and as the throughput of all timed steps
together (their tokens over their summed time: what a training loop delivers); peak RSS comes from the
process itself."""

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
        float(loss.detach())
        return time.perf_counter() - t


def worker(side: str, dtype: str, steps: int, model_dir: str) -> dict:
    """One side in its own process: load the shared weights, train one warm-up step plus `steps`, report
    step times and the process's peak RSS."""
    import torch
    torch.set_num_threads(2)
    loop = _Side(side, dtype, model_dir)
    times = [loop.step(x, y) for x, y in _batches(steps + 1)]
    return {"side": side, "dtype": dtype, "mode": loop.mode, "step_s": times[1:] or times,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


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


def _table(rows: dict) -> None:
    print("\ntokens/s from the fastest step (the least disturbed by other processes); median step in brackets; "
          "throughput of all timed steps after the slash")
    print("| dtype | gpt2kit tok/s | baseline | baseline tok/s | ratio | gpt2kit peak RSS | baseline peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        ours = rows.get(("gpt2kit", dtype))
        for other in ("transformers", "transformers+fused"):
            base = rows.get((other, dtype))
            if ours and base:
                def three(r: dict) -> str:
                    return f"{r['tok_s']:.1f} ({r['tok_s_median']:.1f}) / {r['tok_s_all']:.1f}"
                ratio = {k: ours[k] / base[k] for k in ("tok_s", "tok_s_median", "tok_s_all")}
                print(f"| {dtype} | {three(ours)} {ours['mode']} | {other} | {three(base)} | {ratio['tok_s']:.2f}x "
                      f"({ratio['tok_s_median']:.2f}x) / {ratio['tok_s_all']:.2f}x | {ours['peak_rss_gib']:.2f} GiB | "
                      f"{base['peak_rss_gib']:.2f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side, in alternating order")
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 round; no transformers bf16 on CPUs without "
                    "bf16 arithmetic (~200 s a step on AVX2 CPUs)")
    ap.add_argument("--no-jokes", action="store_true", help="skip the jokes-job projection")
    ap.add_argument("--jokes-only", action="store_true", help="only the jokes-job projection")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, dtype, steps, model_dir = args.worker
        print(json.dumps(worker(side, dtype, int(steps), model_dir)))
        return
    if args.quick:
        args.steps, args.rounds = 4, 1

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
        # where the CPU has bfloat16 arithmetic (AMX, AVX512-BF16) transformers' bf16 autocast step is fast
        # enough to time like the others; elsewhere it takes ~200 s a step and gets one step at the end
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        plan = [("float32", "gpt2kit"), ("float32", "transformers"), ("float32", "transformers+fused"),
                ("bfloat16", "gpt2kit")]
        if native_bf16:
            plan += [("bfloat16", "transformers"), ("bfloat16", "transformers+fused")]
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(0 if args.jokes_only else args.rounds):
            for dtype, side in (plan if r % 2 == 0 else plan[::-1]):
                res = json.loads(_subprocess("--worker", side, dtype, str(args.steps), d))
                results.setdefault((side, dtype), []).append(res)
                print(f"  {side:<20} {dtype:<9} {res['mode']:<9} steps {[round(x, 2) for x in res['step_s']]}  "
                      f"peak RSS {res['peak_rss_gib']:.2f} GiB  (load {_load()})", flush=True)
        if not args.quick and not args.jokes_only and not native_bf16:  # one step of ~200 s; its warm-up is noise
            res = json.loads(_subprocess("--worker", "transformers", "bfloat16", "0", d))
            results[("transformers", "bfloat16")] = [res]
            print(f"  {'transformers':<20} bfloat16  {res['mode']:<9} steps {[round(x, 2) for x in res['step_s']]}  "
                  f"peak RSS {res['peak_rss_gib']:.2f} GiB  (load {_load()})", flush=True)

        rows = {}
        for key, rs in results.items():
            steps = [x for r in rs for x in r["step_s"]]
            rows[key] = {"mode": rs[0]["mode"], "tok_s": BATCH * BLOCK / min(steps),
                         "tok_s_median": BATCH * BLOCK / statistics.median(steps),
                         "tok_s_all": BATCH * BLOCK * len(steps) / sum(steps),
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in rs)}
        if rows:
            _table(rows)

        if not args.no_jokes:
            print("\njokes job: 124M, 10 epochs over onelinefun.csv (--column Joke)", flush=True)
            for batch, block, rank in ((8, 128, 0), (2, 256, 0), (8, 128, 8)):
                j = jokes_projection(d, steps=4 if args.quick else 10, batch=batch, block=block, lora_rank=rank)
                what = f"LoRA rank {rank}" if rank else "full fine-tuning"
                print(f"  {what}, batch {batch} x {block}: {j['tok_s']:.0f} tok/s (median {j['tok_s_median']:.0f}); "
                      f"10 epochs = {j['epoch_tokens']:,} "
                      f"tokens ({j['steps_10_epochs']} steps) -> {j['hours'] * 60:.0f} min projected "
                      f"({j['hours_median'] * 60:.0f} at the median) "
                      f"(original tutorial: {ORIGINAL_HOURS:.0f} h, {ORIGINAL_HOURS / j['hours']:.0f}x); "
                      f"load average {_load()}", flush=True)


if __name__ == "__main__":
    main()
