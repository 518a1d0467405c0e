"""GPU benchmark: gpt2kit against transformers on the same random-initialised weights, in one process.

    PYTHONPATH=src python3 bench/bench_gpu.py --json gpu.json 2>&1                       # gpt2, all sections
    PYTHONPATH=src python3 bench/bench_gpu.py --configs gpt2,gpt2-medium,gpt2-xl --train-configs gpt2 --json gpu.json
    PYTHONPATH=src timeout -s TERM 570 python3 bench/bench_gpu.py --only decode --configs gpt2-large 2>&1
    .venv/bin/python bench/bench_gpu.py --device cpu --config tiny --quick              # CPU smoke test (seconds)
    PYTHONPATH=src python3 bench/bench_gpu.py --only decode --configs gpt2 --modes greedy,top-k,top-p,min-p

For every config (a GPTConfig preset) one random-initialised model is saved as a HuggingFace checkpoint in a
temporary directory, and both libraries load those same weights from it. Sections (`--only`, default all):

parity  max |logit difference| between gpt2kit's GPT and transformers' GPT2LMHeadModel on a random 2 x 128
        batch, both loaded in float32, then both in bfloat16 (also as a share of max |logit|, and each bfloat16
        side against the float32 logits); the float32 mean loss on both sides (transformers' labels=x shift);
        whether 64 greedy tokens from a 16-token prompt are identical (gpt2kit as Generator.load prepares it
        against transformers' generate), and where they first differ.
decode  tokens/s at batch 1 and 8 (32-token prompt, --new tokens) for three sides: "gpt2kit" (the model
        from Generator.load, with whatever fast decoding path it installs), "gpt2kit eager" (load_model, nothing
        installed) and "transformers" (generate under inference_mode), greedy and with each of --modes, the
        sampling settings of bench_generate.py (top-k 40 at T 0.8, top-p 0.9 at T 0.9, min-p 0.1; transformers
        samples with the same warpers), with each sampled mode's step cost over greedy. Each side is warmed up
        once with a short run, then the sides alternate --reps times and the best run counts. Time to first
        token (one prefill plus the first token, batch 1, greedy) for the same three. --configs also takes
        bench_generate.py's own shapes ("small": issue 18's 3 x 96 model, best at --batches 32).
train   tokens/s of one full training step (forward, backward, clip 1.0, AdamW lr 1e-4, weight decay 0.01 on
        matrices, dropout 0) on the same batches of tinyshakespeare: gpt2kit's Trainer (what `gpt2kit finetune`
        runs), on CUDA also Trainer with TrainConfig(compile=True) in bfloat16, against the plain transformers
        loop (hf(input_ids=x, labels=x).loss, torch.autocast for bfloat16, clip_grad_norm_, fused AdamW).
        float32 rows run with TF32 off on both sides. tokens/s come from the median step; MFU uses the
        nanoGPT/PaLM estimate (6 * params + 12 * n_layer * n_embd * block FLOPs a token) over --peak-tflops
        (bfloat16) or --peak-tflops-fp32; peak GPU memory from torch.cuda.max_memory_allocated.

Progress lines come as it runs; all tables are printed together at the end (also after a SIGTERM, e.g. from
`timeout`), and --json PATH gets every number, rewritten after each measurement. A side that fails (out of
memory, an unsupported op) shows `FAILED: <reason>` in its cell, its traceback goes to stderr, and the
rest goes on (run with 2>&1 so that tracebacks stay in order and the tables come last). On the CPU decode
runs float32 only, and the training batch defaults to 2 x 64."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import CONFIGS, MODES, hf_kwargs, model_config  # noqa: E402  (the same settings and shapes)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOCAB = SHARED / "gpt2-vocab"
SHAKESPEARE = SHARED / "datasets" / "tinyshakespeare.txt"
SECTIONS = ("parity", "decode", "train")
EOT = 50256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# plumbing: failures that stay in their cell, clocks, memory


class Failed(str):
    """A cell whose measurement raised: 'FAILED: <one line>' (a str, so it goes into the JSON as it is)."""


class Interrupted(BaseException):
    """SIGTERM (e.g. `timeout`): stop measuring, print what there is."""


def attempt(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or a Failed cell when it raises (traceback to stderr)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # one failure must not lose the other numbers
        print(f"--- {what} failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        line = (str(e).strip().splitlines() or [""])[0]
        msg = f"{type(e).__name__}: {line}" if line else type(e).__name__
        print(f"  {what}: FAILED", flush=True)
        result = Failed(f"FAILED: {msg[:110]}")
    free()  # only after a failure: emptying the CUDA cache between timed runs would slow the next one
    return result


def failed(x: Any) -> bool:
    return isinstance(x, Failed)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], Any]) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


# ---------------------------------------------------------------------------------------------------
# models and data


def make_checkpoint(name: str, out: Path, dev: torch.device) -> Path:
    """A random-initialised GPT(model_config(name)) saved with the GPT-2 tokenizer. Built on `dev`
    (random init of the big presets takes minutes on a CPU, moments on a GPU); save_model writes float32."""
    from gpt2kit.checkpoints import save_model
    from gpt2kit.model import GPT
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    with torch.device(dev):
        model = GPT(model_config(name))
    save_model(model, Tokenizer.from_dir(VOCAB), out)
    del model
    free()
    return out


def load_hf(path: Path, dtype: str, dev: torch.device):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(path, dtype=DTYPES[dtype]).to(dev).eval()


def shakespeare_ids() -> list[int]:
    from gpt2kit.tokenizer import Tokenizer
    return Tokenizer.from_dir(VOCAB).encode(SHAKESPEARE.read_text())


def train_batches(ids: list[int], n: int, batch: int, block: int, dev: torch.device) -> list:
    """n (x, y) pairs of batch x block tokens, y = x shifted by one; the same for every side."""
    arr = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(arr) - block - 1, size=batch)
        w = torch.from_numpy(np.stack([arr[s:s + block + 1] for s in starts])).to(dev)
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def describe_fast_path(model) -> str:
    """What Generator.load installed for one-token steps: GPT.decode_step (the CPU kernel) and, where this
    gpt2kit has it, GPT.graph_step (CUDA graphs)."""
    steps = [f"{a}={type(getattr(model, a)).__name__}" for a in ("decode_step", "graph_step")
             if getattr(model, a, None) is not None]
    return ", ".join(steps) or "none"


# ---------------------------------------------------------------------------------------------------
# parity


def logits_parity(ours, hf, x: torch.Tensor, ref: dict) -> dict:
    """max |ours - transformers| over the logits of x; float32 logits are kept in `ref` to measure the
    bfloat16 sides against."""
    with torch.inference_mode():
        a, b = ours(x).float(), hf(x).logits.float()
    diff, top = float((a - b).abs().max()), float(b.abs().max())
    res = {"max_abs_diff": diff, "max_abs_logit": top, "rel_diff": diff / top,
           "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
    if "float32" in ref:
        r = ref["float32"]
        scale = float(r.abs().max())
        res["gpt2kit_vs_float32_rel"] = float((a - r).abs().max()) / scale
        res["transformers_vs_float32_rel"] = float((b - r).abs().max()) / scale
    else:
        ref["float32"] = b
    return res


def loss_parity(ours, hf, x: torch.Tensor) -> dict:
    """Mean next-token loss over x: transformers shifts labels=x itself; gpt2kit gets the same pairs."""
    with torch.inference_mode():
        la = float(ours.loss(x[:, :-1], x[:, 1:]))
        lb = float(hf(input_ids=x, labels=x).loss)
    return {"gpt2kit": la, "transformers": lb, "abs_diff": abs(la - lb)}


def greedy_parity(path: Path, dev: torch.device, prompt: list[int], n: int) -> dict:
    from gpt2kit.generate import GenerationConfig, Generator, run_stream, stream_rows

    gen = Generator.load(str(path), device=str(dev), dtype="float32")
    cfg = GenerationConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
    ours = run_stream(stream_rows(gen.model, gen.tokenizer, ["x"], cfg, prompt_ids=[prompt]))[0].tokens
    del gen
    hf = load_hf(path, "float32", dev)
    ids = torch.tensor([prompt], device=dev)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=EOT, eos_token_id=None)
    theirs = out[0, len(prompt):].tolist()
    first = next((i for i, (p, q) in enumerate(zip(ours, theirs)) if p != q), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"identical": ours == theirs, "first_diff": first, "n": n, "gpt2kit": ours, "transformers": theirs}


def run_parity(name: str, path: Path, dev: torch.device, prompt: list[int]) -> dict:
    from gpt2kit.checkpoints import load_model

    cfg = model_config(name)
    T = min(128, cfg.n_positions)
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1)).to(dev)
    res: dict[str, Any] = {"config": name, "batch": [2, T]}
    ref: dict[str, torch.Tensor] = {}
    for dt in ("float32", "bfloat16"):
        models = attempt(f"parity {name} {dt} load", lambda dt=dt: (load_model(path, device=dev, dtype=dt)[0],
                                                                     load_hf(path, dt, dev)))
        if failed(models):
            res[f"logits_{dt}"] = models
            continue
        res[f"logits_{dt}"] = attempt(f"parity {name} {dt} logits", logits_parity, *models, x, ref)
        if dt == "float32":
            res["loss_float32"] = attempt(f"parity {name} loss", loss_parity, *models, x)
        del models
        free()
    ref.clear()
    n = min(64, cfg.n_positions - len(prompt))
    res["greedy_float32"] = attempt(f"parity {name} greedy", greedy_parity, path, dev, prompt, n)
    return res


# ---------------------------------------------------------------------------------------------------
# decode


def decode_runners(path: Path, dev: torch.device, dtype: str, compiled: bool = False,
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """side -> fn(prompts: list[list[int]], n, mode) that decodes n tokens for each prompt with MODES[mode]
    (or a Failed load)."""
    from gpt2kit.checkpoints import load_model
    from gpt2kit.generate import GenerationConfig, Generator, run_stream, stream_rows

    def gpt2kit_runner(model, tok):
        def run(prompts: list[list[int]], n: int, mode: str = "greedy") -> None:
            cfg = GenerationConfig(max_new_tokens=n, stop_at_eot=False, seed=0, **MODES[mode])
            outs = run_stream(stream_rows(model, tok, ["x"] * len(prompts), cfg, prompt_ids=prompts))
            assert all(len(o.tokens) == n for o in outs)
        return run

    def hf_runner(hf):
        def run(prompts: list[list[int]], n: int, mode: str = "greedy") -> None:
            ids = torch.tensor(prompts, device=dev)
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=EOT, eos_token_id=None, **hf_kwargs(mode))
            assert out.shape[1] == ids.shape[1] + n
        return run

    info: dict[str, str] = {}
    runners: dict[str, Any] = {}
    gen = attempt(f"decode {dtype} load gpt2kit", Generator.load, str(path), device=str(dev), dtype=dtype)
    if not failed(gen):
        info["gpt2kit_fast_path"] = describe_fast_path(gen.model)
        runners["gpt2kit"] = gpt2kit_runner(gen.model, gen.tokenizer)
    else:
        runners["gpt2kit"] = gen
    if compiled and dev.type == "cuda":  # the graphs recorded from a torch.compile'd step (GraphStep(compile=True))
        from gpt2kit.cuda_graphs import GraphStep
        comp = attempt(f"decode {dtype} load gpt2kit compiled", Generator.load, str(path), device=str(dev),
                       dtype=dtype)
        if not failed(comp):
            comp.model.graph_step = GraphStep(comp.model, compile=True)
            comp = gpt2kit_runner(comp.model, comp.tokenizer)
        runners["gpt2kit compiled"] = comp
    eager = attempt(f"decode {dtype} load gpt2kit eager", load_model, path, device=dev, dtype=dtype)
    runners["gpt2kit eager"] = eager if failed(eager) else gpt2kit_runner(*eager)
    hf = attempt(f"decode {dtype} load transformers", load_hf, path, dtype, dev)
    if not failed(hf):
        info["transformers_attn"] = str(getattr(hf.config, "_attn_implementation", "?"))
        runners["transformers"] = hf_runner(hf)
    else:
        runners["transformers"] = hf
    return runners, info


def best_of(dev: torch.device, runners: dict[str, Any], prompts: list[list[int]], n: int, warm_n: int,
            reps: int, what: str) -> dict[str, Any]:
    """Warm each side up once (warm_n tokens), then alternate the sides `reps` times; per side the list of
    run times in seconds, or a Failed cell."""
    times: dict[str, Any] = {}
    for side, run in runners.items():
        times[side] = run if failed(run) else attempt(f"{what} {side} warm-up", run, prompts, warm_n)
        if not failed(times[side]):
            times[side] = []
    for _ in range(reps):
        for side, run in runners.items():
            if failed(times[side]):
                continue
            t = attempt(f"{what} {side}", timed, dev, lambda run=run: run(prompts, n))
            times[side] = t if failed(t) else times[side] + [t]
    return times


def with_mode(runners: dict[str, Any], mode: str) -> dict[str, Any]:
    """The runners as best_of calls them, fn(prompts, n), decoding with MODES[mode]."""
    return {s: r if failed(r) else (lambda prompts, n, r=r: r(prompts, n, mode)) for s, r in runners.items()}


def run_decode(name: str, path: Path, dev: torch.device, dtypes: list[str], batches: list[int], prompt: list[int],
               new: int, reps: int, results: dict, save: Callable[[], None], compiled: bool = False,
               modes: tuple[str, ...] = ("greedy",)) -> None:
    n = min(new, model_config(name).n_positions - len(prompt))
    for dt in dtypes:
        runners, info = decode_runners(path, dev, dt, compiled)
        for b in batches:
            for mode in modes:
                times = best_of(dev, with_mode(runners, mode), [prompt] * b, n, min(8, n), reps,
                                f"decode {name} {dt} batch {b} {mode}")
                row = {"config": name, "dtype": dt, "batch": b, "mode": mode, "prompt": len(prompt), "new": n,
                       **info, "times_s": {s: t for s, t in times.items() if not failed(t)}}
                for side, t in times.items():
                    row[side] = t if failed(t) else b * n / min(t)
                results["decode"].append(row)
                print(f"  decode {name} {dt} batch {b} {mode}: " + ", ".join(
                    f"{s} {v:.1f} tok/s" if not failed(v) else f"{s} FAILED" for s, v in
                    ((s, row[s]) for s in runners)), flush=True)
                save()
        # time to first token: one prefill + the first token, batch 1
        times = best_of(dev, with_mode(runners, "greedy"), [prompt], 1, 1, reps, f"ttft {name} {dt}")
        row = {"config": name, "dtype": dt, "prompt": len(prompt),
               **{s: t if failed(t) else min(t) * 1e3 for s, t in times.items()}}
        results["ttft"].append(row)
        print(f"  ttft {name} {dt}: " + ", ".join(
            f"{s} {row[s]:.2f} ms" if not failed(row[s]) else f"{s} FAILED" for s in runners), flush=True)
        save()
        del runners
        free()


# ---------------------------------------------------------------------------------------------------
# train


def train_side(side: str, path: Path, dev: torch.device, dtype: str, batches: list, warm: int) -> dict:
    """Train one side on `batches` (the first `warm` untimed); step times, losses, peak memory."""
    from gpt2kit.checkpoints import load_model
    from gpt2kit.train import TrainConfig, Trainer

    reset_peak(dev)
    if side.startswith("gpt2kit"):
        model, _ = load_model(path, device=dev, dtype="float32")
        model.train()
        cfg = TrainConfig(model=str(path), data=["-"], lr=1e-4, weight_decay=0.01, grad_clip=1.0, dtype=dtype,
                          dropout=0.0, compile=side == "gpt2kit compile")
        trainer = Trainer(model, cfg, dev)
        mode = trainer.precision.mode

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = trainer.forward_backward([(x, y)])
            trainer.optimizer_step(1e-4)
            return loss
    else:
        hf = load_hf(path, "float32", dev).train()
        decay = [p for p in hf.parameters() if p.dim() >= 2]
        no_decay = [p for p in hf.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, fused=True)
        mode = "autocast" if dtype == "bfloat16" else "float32"

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = hf(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    losses = []
    warm_s = timed(dev, lambda: losses.extend(step(x, y) for x, y in batches[:warm]))
    times = []
    for x, y in batches[warm:]:
        times.append(timed(dev, lambda x=x, y=y: losses.append(step(x, y))))
    return {"mode": mode, "warmup_s": warm_s, "step_s": times, "losses": [float(v) for v in losses],
            "peak_gib": peak_gib(dev)}


def run_train(name: str, path: Path, dev: torch.device, dtypes: list[str], ids: list[int], args, results: dict,
              save: Callable[[], None]) -> None:
    cfg = model_config(name)
    block = min(args.block, cfg.n_positions)
    tokens = args.train_batch * block
    batches = train_batches(ids, args.warmup + args.steps, args.train_batch, block, dev)
    # FLOPs a token: 6 per weight used in a product (wpe is a lookup) + attention (nanoGPT's estimate_mfu)
    n_params = cfg.num_params() - cfg.n_positions * cfg.n_embd
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * block
    for dt in dtypes:
        compiled = ["gpt2kit compile"] if dev.type == "cuda" and dt == "bfloat16" else []
        sides = ["gpt2kit", *compiled, "transformers"]
        rows = []
        for side in sides:
            free()  # the previous side's model, gradients and optimizer state are gone: give their memory back
            r = attempt(f"train {name} {dt} {side}", train_side, side, path, dev, dt, batches, args.warmup)
            if side == "gpt2kit compile":
                attempt("torch._dynamo.reset", torch._dynamo.reset)  # drop the compiled graphs
            row: dict[str, Any] = {"config": name, "dtype": dt, "side": side, "batch": args.train_batch,
                                   "block": block}
            if failed(r):
                row["failed"] = r
            else:
                median = statistics.median(r["step_s"])
                peak = args.peak_tflops if dt == "bfloat16" else args.peak_tflops_fp32
                row.update(r, median_ms=median * 1e3, tok_s=tokens / median,
                           mfu=flops_per_token * tokens / median / (peak * 1e12) if dev.type == "cuda" else None)
                print(f"  train {name} {dt} {side}: {row['median_ms']:.1f} ms/step, {row['tok_s']:.0f} tok/s, "
                      f"warm-up {r['warmup_s']:.1f} s, last loss {r['losses'][-1]:.4f}", flush=True)
            rows.append(row)
        base = next((r for r in rows if r["side"] == "transformers" and "tok_s" in r), None)
        for r in rows:
            r["ratio"] = r["tok_s"] / base["tok_s"] if base and "tok_s" in r else None
        results["train"].extend(rows)
        save()
    del batches
    free()


# ---------------------------------------------------------------------------------------------------
# output


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def num(v: Any, spec: str) -> str:
    if failed(v):
        return str(v)
    return "-" if v is None else format(v, spec)


def ratio(a: Any, b: Any) -> str:
    return "-" if failed(a) or failed(b) or a is None or b is None or not b else f"{a / b:.2f}x"


def dtype_label(dt: str, dev: torch.device) -> str:
    return "float32 (tf32 off)" if dt == "float32" and dev.type == "cuda" else dt


def sampling_cost(decode: list[dict]) -> list[list[str]]:
    """Rows of the sampled modes' step cost over greedy, per config, dtype and batch that has both."""
    greedy = {(r["config"], r["dtype"], r["batch"]): r for r in decode if r.get("mode", "greedy") == "greedy"}
    rows = []
    for r in decode:
        g = greedy.get((r["config"], r["dtype"], r["batch"]))
        if r.get("mode", "greedy") == "greedy" or g is None:
            continue
        cells = []
        for side in ("gpt2kit", "gpt2kit eager", "transformers"):
            a, b = g.get(side), r.get(side)
            cells.append("-" if failed(a) or failed(b) or not a or not b else f"{100 * (a / b - 1):+.1f}%")
        rows.append([r["config"], r["dtype"], str(r["batch"]), r["mode"], *cells])
    return rows


def report(results: dict, dev: torch.device) -> str:
    out = []
    if results["parity"]:
        rows = []
        for p in results["parity"]:
            for dt in ("float32", "bfloat16"):
                c = p.get(f"logits_{dt}")
                if c is None:
                    continue
                if failed(c):
                    rows.append([p["config"], dtype_label(dt, dev), c, "", "", "", ""])
                    continue
                vs = (f"{c['gpt2kit_vs_float32_rel']:.2e} / {c['transformers_vs_float32_rel']:.2e}"
                      if "gpt2kit_vs_float32_rel" in c else "-")
                rows.append([p["config"], dtype_label(dt, dev), f"{c['max_abs_diff']:.3e}", f"{c['max_abs_logit']:.2f}",
                             f"{c['rel_diff']:.2e}", f"{c['top1_agreement']:.2%}", vs])
        title = "parity: logits of a random 2 x 128 batch, gpt2kit vs transformers, same weights and dtype"
        out.append(title + "\n" + table(
            ["config", "dtype", "max |diff|", "max |logit|", "diff / max|logit|", "top-1 agree",
             "vs float32 logits (gpt2kit / transformers)"], rows))
        rows = []
        for p in results["parity"]:
            lo, g = p.get("loss_float32"), p.get("greedy_float32")
            loss = ([str(lo), "", ""] if failed(lo) else [f"{lo['gpt2kit']:.6f}", f"{lo['transformers']:.6f}",
                                                          f"{lo['abs_diff']:.2e}"]) if lo is not None else ["-"] * 3
            greedy = ([str(g), ""] if failed(g) else
                      ["yes" if g["identical"] else "NO", "-" if g["first_diff"] is None else str(g["first_diff"])]
                      ) if g is not None else ["-"] * 2
            rows.append([p["config"], *loss, *greedy])
        out.append("parity: float32 mean loss, and 64 greedy tokens from a 16-token prompt (gpt2kit as Generator.load "
                   "prepares it vs transformers generate)\n" + table(
                       ["config", "gpt2kit loss", "transformers loss", "|diff|", "greedy identical", "first diff at"],
                       rows))
    if results["decode"]:
        rows = [[r["config"], dtype_label(r["dtype"], dev), str(r["batch"]), r.get("mode", "greedy"),
                 num(r["gpt2kit"], ".1f"),
                 num(r["gpt2kit eager"], ".1f"), num(r["transformers"], ".1f"),
                 ratio(r["gpt2kit"], r["transformers"]), ratio(r["gpt2kit eager"], r["transformers"]),
                 str(r["new"]), r.get("gpt2kit_fast_path", "?")]
                + ([num(r.get("gpt2kit compiled"), ".1f"), ratio(r.get("gpt2kit compiled"), r["transformers"])]
                   if any("gpt2kit compiled" in x for x in results["decode"]) else [])
                for r in results["decode"]]
        extra = (["compiled tok/s", "compiled/transformers"]
                 if any("gpt2kit compiled" in x for x in results["decode"]) else [])
        r0 = results["decode"][0]
        out.append(f"decode: tokens/s, prompt {r0['prompt']} tokens, best of {results['meta']['reps']} "
                   f"(fast path = what Generator.load installed; transformers attention: "
                   f"{r0.get('transformers_attn', '?')})\n" + table(
                       ["config", "dtype", "batch", "mode", "gpt2kit tok/s", "gpt2kit-eager tok/s",
                        "transformers tok/s", "gpt2kit/transformers", "eager/transformers", "new", "fast path",
                        *extra], rows))
    if cost := sampling_cost(results["decode"]):
        out.append("decode: a sampled step's cost over a greedy one (greedy tok/s / sampled tok/s - 1; issue 18: "
                   "<= 5% for 124M at batch 1 and 8, <= 25% for the small model at batch 32)\n" + table(
                       ["config", "dtype", "batch", "mode", "gpt2kit", "gpt2kit eager", "transformers"], cost))
    if results["ttft"]:
        rows = [[r["config"], dtype_label(r["dtype"], dev), num(r["gpt2kit"], ".2f"), num(r["gpt2kit eager"], ".2f"),
                 num(r["transformers"], ".2f"), ratio(r["transformers"], r["gpt2kit"]),
                 ratio(r["transformers"], r["gpt2kit eager"])] for r in results["ttft"]]
        out.append(f"time to first token, batch 1, prompt {results['ttft'][0]['prompt']} (ms; speedup = transformers "
                   "time / gpt2kit time)\n" + table(
                       ["config", "dtype", "gpt2kit ms", "gpt2kit-eager ms", "transformers ms", "speedup",
                        "eager speedup"], rows))
    if results["train"]:
        rows = []
        for r in results["train"]:
            head = [r["config"], dtype_label(r["dtype"], dev), r["side"]]
            if "failed" in r:
                rows.append(head + [r["failed"]] + [""] * 7)
                continue
            rows.append(head + [f"{r['median_ms']:.1f}", f"{r['tok_s']:.0f}",
                                "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                                num(None if r["mfu"] is None else 100 * r["mfu"], ".1f"), num(r["peak_gib"], ".2f"),
                                f"{r['warmup_s']:.1f}", f"{r['losses'][-1]:.4f}", r["mode"]])
        t0 = results["train"][0]
        m = results["meta"]
        out.append(f"train: one step = forward + backward + clip + AdamW, batch {t0['batch']} x {t0['block']}, "
                   f"median of {m['train_steps']} steps after {m['train_warmup']} warm-up (warm-up s includes "
                   "compilation; last loss: transformers' labels=x scores block - 1 targets a row, gpt2kit block, "
                   f"so they differ slightly); MFU against {m['peak_tflops']} TFLOP/s (bf16) / "
                   f"{m['peak_tflops_fp32']} (fp32)\n" + table(
                       ["config", "dtype", "side", "median step ms", "tokens/s", "vs transformers", "MFU %",
                        "peak mem GiB", "warm-up s", "last loss", "mode"], rows))
    return "\n\n".join(out)


def header(dev: torch.device) -> dict:
    import transformers
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(dev), "cuda": torch.version.cuda, "device_name": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if dev.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(dev)
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        meta["git"] = None
    return meta


def header_line(meta: dict) -> str:
    return (f"torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}, "
            f"device {meta['device']} ({meta['device_name']}), CUDA {meta['cuda']}, {meta['cpus']} CPUs, "
            f"tf32 matmul {meta['tf32_matmul']}, gpt2kit {meta['git'] or '?'}")


# ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", "--config", default="gpt2", help="comma-separated presets (gpt2, gpt2-medium, "
                    "gpt2-large, gpt2-xl, distilgpt2, tiny); default gpt2")
    ap.add_argument("--train-configs", help="presets for the train section (default: --configs)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run: parity,decode,train")
    ap.add_argument("--quick", action="store_true", help="short runs: --new 32, --reps 3, --steps 3 after 1, "
                    "--train-batch 2, --block 64")
    ap.add_argument("--json", type=Path, help="write every result here as JSON")
    ap.add_argument("--new", type=int, help="decode: new tokens per run (default 256; quick 32)")
    ap.add_argument("--reps", type=int, help="decode: timed runs per side, best counts (default 5; quick 3)")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--modes", default="greedy", help=f"decode: sampling settings, of {', '.join(MODES)} "
                    "(bench_generate.py's); default greedy")
    ap.add_argument("--compiled-decode", action="store_true", help="decode: also time CUDA graphs recorded from a "
                    "torch.compile'd step (slow to start: one compilation per graph shape)")
    ap.add_argument("--decode-dtypes", help="default float32,bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="train dtypes")
    ap.add_argument("--train-batch", type=int, help="train: sequences a step (default 16; quick or CPU 2)")
    ap.add_argument("--block", type=int, help="train: tokens a sequence (default 1024; quick or CPU 64)")
    ap.add_argument("--steps", type=int, help="train: timed steps (default 20; quick 3)")
    ap.add_argument("--warmup", type=int, help="train: untimed steps first (default 3; quick 1)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    ap.add_argument("--peak-tflops-fp32", type=float, default=67.0,
                    help="float32 peak for MFU of the float32 rows (H100 SXM non-tensor FP32: 67)")
    args = ap.parse_args()
    small = args.quick or args.device == "cpu"
    args.new = args.new or (32 if args.quick else 256)
    args.reps = args.reps or (3 if args.quick else 5)
    args.train_batch = args.train_batch or (2 if small else 16)
    args.block = args.block or (64 if small else 1024)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.train_configs = ([c.strip() for c in args.train_configs.split(",") if c.strip()] if args.train_configs
                          else args.configs)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if unknown := [m for m in args.modes if m not in MODES]:
        ap.error(f"unknown --modes {', '.join(unknown)}; choose from {', '.join(MODES)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    args.decode_dtypes = ([d.strip() for d in args.decode_dtypes.split(",")] if args.decode_dtypes
                          else ["float32", "bfloat16"] if args.device.startswith("cuda") else ["float32"])
    for d in args.dtypes + args.decode_dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}: use float32 or bfloat16")
    from gpt2kit.config import PRESETS
    for c in args.configs + args.train_configs:
        if c not in PRESETS and c not in CONFIGS:
            ap.error(f"unknown config {c!r}; choose from {', '.join([*PRESETS, *CONFIGS])}")
    return args


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    # float32 means float32 on both sides: no TF32 tensor cores for matrix products (PyTorch's default too)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta = header(dev)
    meta.update(reps=args.reps, train_steps=args.steps, train_warmup=args.warmup, peak_tflops=args.peak_tflops,
                peak_tflops_fp32=args.peak_tflops_fp32, args=vars(args) | {"json": str(args.json)})
    results: dict[str, Any] = {"meta": meta, "parity": [], "decode": [], "ttft": [], "train": []}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
            tmp.replace(args.json)

    def on_term(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    print(header_line(meta), flush=True)
    print(f"sections {','.join(args.only)}; configs {','.join(args.configs)}", flush=True)
    t_start = time.perf_counter()
    try:
        ids = shakespeare_ids()
        prompt16, prompt32 = ids[:16], ids[:32]
        configs = list(dict.fromkeys(args.configs + (args.train_configs if "train" in args.only else [])))
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            for name in configs:
                t = time.perf_counter()
                path = attempt(f"checkpoint {name}", make_checkpoint, name, Path(tmp) / name, dev)
                if failed(path):
                    results.setdefault("failed_checkpoints", {})[name] = path
                    continue
                print(f"[{time.perf_counter() - t_start:.0f} s] {name}: random checkpoint saved in "
                      f"{time.perf_counter() - t:.1f} s", flush=True)
                if "parity" in args.only and name in args.configs:
                    results["parity"].append(run_parity(name, path, dev, prompt16))
                    save()
                    print(f"[{time.perf_counter() - t_start:.0f} s] parity {name} done", flush=True)
                if "decode" in args.only and name in args.configs:
                    run_decode(name, path, dev, args.decode_dtypes, args.batches, prompt32, args.new, args.reps,
                               results, save, args.compiled_decode, args.modes)
                    print(f"[{time.perf_counter() - t_start:.0f} s] decode {name} done", flush=True)
                if "train" in args.only and name in args.train_configs:
                    run_train(name, path, dev, args.dtypes, ids, args, results, save)
                    print(f"[{time.perf_counter() - t_start:.0f} s] train {name} done", flush=True)
                for f in Path(path).iterdir():  # the big presets' checkpoints are gigabytes
                    f.unlink()
    except (Interrupted, KeyboardInterrupt):
        results["interrupted"] = True
        print("\ninterrupted: printing what was measured", flush=True)
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    text = ("INTERRUPTED, partial results\n" if results.get("interrupted") else "") + header_line(meta) + "\n"
    text += report(results, dev)
    results["report"] = text
    save()
    print("\n" + "=" * 100)
    print(text)
    if args.json:
        print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
