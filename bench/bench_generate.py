"""Decode speed of gpt2kit vs transformers on the same random-initialised weights, side by side.

    python bench/bench_generate.py                 # 124M, float32 and int8, 2 threads: batch 1 and 8, TTFT
    python bench/bench_generate.py --config small --batches 32 --no-int8 --no-ttft   # 3 x 96, batch 32
    python bench/bench_generate.py --config tiny   # quick smoke run
    python bench/bench_generate.py --peer ctranslate2   # also CTranslate2 on the same weights (peer_ctranslate2.py)
    python bench/bench_generate.py --searches --batches 1 --modes greedy --no-int8 --no-ttft   # beam, contrastive

Each case decodes greedily and with the sampling settings users run (top-k 40 at T 0.8, top-p 0.9 at T 0.9,
min-p 0.1 at T 1.0), gpt2kit against transformers' generate() (do_sample=True with the same warpers) on the
same weights. Prints ms per step and tokens/s for both, the ratio, each sampled case's cost over greedy, the
memory-bandwidth limit (weight bytes read per decode step against this machine's measured bandwidth), and
the time gpt2kit takes to pick the tokens alone, from fixed logits. --searches adds the deterministic
searches users run: beam search with 5 beams, plain and with no_repeat_ngram_size=2 and early stopping
(transformers' decoding guide's recipe for GPT-2), against transformers' beam search; and contrastive search
(alpha 0.6, k 4), against gpt2kit's own greedy step (transformers keeps contrastive search on the Hub, out of
its core, and this machine cannot download it)."""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT.parent / "shared" / "data" / "gpt2-vocab"


def measure_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s for streaming reads (a sum over a buffer far larger than the caches)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


# sampling settings: name -> GenerationConfig fields (transformers gets the same as generate() arguments)
MODES = {
    "greedy": dict(temperature=0.0),
    "top-k": dict(temperature=0.8, top_k=40),
    "top-p": dict(temperature=0.9, top_p=0.9),
    "min-p": dict(temperature=1.0, min_p=0.1),
}
# benchmark-only model shapes beside the library's presets
CONFIGS = {"small": dict(n_layer=3, n_head=3, n_embd=96)}  # issue #18's small model (3 layers, 96 wide)


def model_config(name: str):
    from gpt2kit.config import GPTConfig

    return GPTConfig(**CONFIGS[name]) if name in CONFIGS else GPTConfig.from_name(name)


def make_checkpoint(config_name: str, out: Path, std: float = 0.02) -> Path:
    from gpt2kit.checkpoints import save_model
    from gpt2kit.model import GPT
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = GPT(model_config(config_name))
    save_model(model, Tokenizer.from_dir(VOCAB), out)
    return out


def hf_kwargs(mode: str) -> dict:
    """transformers' generate() arguments for a sampling mode: its warpers, and nothing it would add by
    default (top_k=50 when sampling)."""
    m = MODES[mode]
    if m["temperature"] == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": m["temperature"], "top_k": m.get("top_k", 0),
            "top_p": m.get("top_p", 1.0), "min_p": m.get("min_p")}


def bench_decode(path: Path, batch: int, prompt_len: int, new: int, dtype: torch.dtype, reps: int,
                 quantize: str | None = None, modes: tuple[str, ...] = ("greedy",)) -> dict[str, tuple[float, float]]:
    """Best-of-`reps` tokens/s for gpt2kit and transformers in each sampling mode, their runs alternating so
    that anything else happening on the machine hits both sides alike. quantize="int8": gpt2kit decodes
    with int8 weights, transformers stays in `dtype`."""
    from transformers import GPT2LMHeadModel

    from gpt2kit.checkpoints import load_model
    from gpt2kit.generate import GenerationConfig, run_stream, stream_rows
    from gpt2kit.kernels import prepare_cpu_decoding_

    model, tok = load_model(path, device="cpu", dtype=dtype)
    path_used = prepare_cpu_decoding_(model, quantize)  # as Generator.load and `gpt2kit generate` do
    print(f"gpt2kit CPU decoding path: {path_used}", flush=True)
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=dtype).eval()
    ids = [list(range(1000, 1000 + prompt_len))] * batch
    runs = {}
    for mode in modes:
        cfg = GenerationConfig(max_new_tokens=new, stop_at_eot=False, seed=0, **MODES[mode])
        kw = {"pad_token_id": 50256, "eos_token_id": None, **hf_kwargs(mode)}

        def ours(n: int, cfg: GenerationConfig = cfg) -> None:
            outs = run_stream(stream_rows(model, tok, ["x"] * batch, replace(cfg, max_new_tokens=n), prompt_ids=ids))
            assert all(len(o.tokens) == n for o in outs)

        def theirs(n: int, kw: dict = kw) -> None:
            with torch.inference_mode():
                out = hf.generate(torch.tensor(ids), max_new_tokens=n, min_new_tokens=n, **kw)
            assert out.shape[1] == prompt_len + n

        ours(8)
        theirs(8)  # warm-up
        runs[mode] = (ours, theirs)
    # every rep runs every mode on both sides, so that a slow minute on the machine hits greedy and the
    # sampled modes alike and the "vs greedy" column compares like with like
    best = {mode: [float("inf"), float("inf")] for mode in modes}
    for _ in range(reps):
        for mode in modes:
            for i, f in enumerate(runs[mode]):
                best[mode][i] = min(best[mode][i], _timed(lambda f=f: f(new)))
    return {mode: (batch * new / b[0], batch * new / b[1]) for mode, b in best.items()}


# deterministic searches: name -> GenerationConfig fields (transformers gets the same generate() arguments)
SEARCHES = {
    "beam 5": dict(num_beams=5),
    "beam 5, no-repeat 2, early": dict(num_beams=5, no_repeat_ngram_size=2, early_stopping=True),
    "contrastive 0.6, k 4": dict(penalty_alpha=0.6, top_k=4),
}


def bench_searches(path: Path, prompt_len: int, new: int, reps: int) -> dict[str, tuple[float, float | None]]:
    """ms per new token of each search for one prompt, gpt2kit (as Generator.load prepares the model) and
    transformers (None for contrastive search, which transformers no longer ships), best of `reps`
    alternating runs. Every run makes all `new` tokens (<|endoftext|> does not end it)."""
    from transformers import GPT2LMHeadModel

    from gpt2kit.generate import GenerationConfig, Generator

    gen = Generator.load(str(path), device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    prompt = gen.tokenizer.decode(list(range(1000, 1000 + prompt_len)))
    ids = torch.tensor([gen.tokenizer.encode(prompt)])
    out = {}
    for name, fields in SEARCHES.items():
        cfg = GenerationConfig(max_new_tokens=new, stop_at_eot=False, **fields)

        def ours(n: int, cfg: GenerationConfig = cfg) -> None:
            (o,) = gen.generate(prompt, replace(cfg, max_new_tokens=n))
            assert len(o.tokens) == n

        def theirs(n: int, fields: dict = fields) -> None:
            with torch.inference_mode():
                o = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=50256, eos_token_id=None, **fields)
            assert o.shape[1] == ids.shape[1] + n

        sides = [ours] + ([theirs] if "penalty_alpha" not in fields else [])
        for f in sides:
            f(8)  # warm-up
        best = [float("inf")] * len(sides)
        for _ in range(reps):
            for i, f in enumerate(sides):
                best[i] = min(best[i], _timed(lambda f=f: f(new)))
        out[name] = (1e3 * best[0] / new, 1e3 * best[1] / new if len(best) > 1 else None)
    return out


def pick_cost(batches: list[int], vocab: int = 50257, reps: int = 30) -> dict[tuple[str, int], float]:
    """ms per call of decode.next_tokens alone (gpt2kit's token picking) on fixed random logits of the
    vocabulary's size, per mode and batch size: what sampling adds to a step, without the model."""
    from gpt2kit.decode import GenerationConfig, Row, next_tokens
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(VOCAB)
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        logits = torch.randn(b, vocab, generator=g) * 2
        for mode in MODES:
            rows = [Row(i, "", [1], GenerationConfig(seed=0, **MODES[mode]), tok, torch.device("cpu"))
                    for i in range(b)]
            next_tokens(rows, logits)
            out[mode, b] = min(_timed(lambda rows=rows, x=logits: next_tokens(rows, x)) for _ in range(reps)) * 1e3
    return out


TTFT_HF = """
import sys, time, torch
t0 = float(sys.argv[2])
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
tok = GPT2TokenizerFast.from_pretrained(sys.argv[1])
m = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
ids = tok("Hello, my name is", return_tensors="pt").input_ids
with torch.inference_mode():
    out = m.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=50256)
print(tok.decode(out[0, -1:]), end="", flush=True)
"""


def drift(path: Path, dtype: torch.dtype, new: int) -> tuple[float, float, int]:
    """How far `dtype` weights drift from float32: max |logit difference| / max |logit| on a 64-token
    text, greedy tokens that agree before the first divergence (of `new`), and top-1 agreement."""
    from gpt2kit.checkpoints import load_model
    from gpt2kit.generate import Generator

    m32, tok = load_model(path, device="cpu", dtype=torch.float32)
    mlo, _ = load_model(path, device="cpu", dtype=dtype)
    x = torch.arange(1000, 1064).view(1, 64)
    with torch.inference_mode():
        a, b = m32(x), mlo(x).float()
    return _compare(a, b, Generator(m32, tok), Generator(mlo, tok), new)


def _compare(a: torch.Tensor, b: torch.Tensor, g32, glo, new: int) -> tuple[float, float, int]:
    """max |a - b| / max |a| and top-1 agreement of two sets of logits, then how many of `new` greedy tokens
    the two generators share before they first differ."""
    from gpt2kit.generate import GenerationConfig

    rel = float((a - b).abs().max() / a.abs().max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    cfg = GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eot=False)
    t32, tlo = (g.generate("The history of Japan", cfg)[0].tokens for g in (g32, glo))
    same = next((i for i, (p, q) in enumerate(zip(t32, tlo)) if p != q), len(t32))
    return rel, top1, same


def drift_int8(path: Path, new: int) -> tuple[float, float, int]:
    """How far int8 decoding drifts from float32 on the same weights: feeding the same 64 tokens one at a
    time to both, max |logit difference| / max |logit| and top-1 agreement over those steps; then greedy
    tokens that agree before the first divergence (of `new`)."""
    from gpt2kit.checkpoints import load_model
    from gpt2kit.generate import Generator
    from gpt2kit.kernels import prepare_cpu_decoding_

    m32, tok = load_model(path, device="cpu", dtype=torch.float32)
    m8, _ = load_model(path, device="cpu", dtype=torch.float32)
    prepare_cpu_decoding_(m32)
    prepare_cpu_decoding_(m8, "int8")
    text = torch.arange(1000, 1064)
    logits = []
    with torch.inference_mode():
        for m in (m32, m8):
            m.setup_caches(1, 64)
            logits.append(torch.cat([m(text[i].view(1, 1), torch.tensor([i]), kv_len=i + 1)[0] for i in range(64)]))
    return _compare(*logits, Generator(m32, tok), Generator(m8, tok), new)


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def ttft(path: Path) -> tuple[float, float]:
    """Seconds from process start to the first generated token on stdout, for both tools."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def run(cmd: list[str]) -> float:
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        p.stdout.read(1)  # first byte of the first token
        t = time.time() - t0
        p.wait()
        return t

    ours_cmd = [sys.executable, "-m", "gpt2kit", "generate", "Hello, my name is", "-m", str(path),
                "--length", "1", "--temperature", "0", "--device", "cpu"]
    theirs_cmd = [sys.executable, "-c", TTFT_HF, str(path), "0"]
    times = [(run(ours_cmd), run(theirs_cmd)) for _ in range(3)]  # alternating, as the decode runs
    return min(t[0] for t in times), min(t[1] for t in times)


def print_decode(name: str, b: int, res: dict[str, tuple[float, float]]) -> None:
    """One line per mode: ms per step and tok/s for both sides, the ratio, and a sampled mode's cost over
    greedy (ms per step, both sides)."""
    greedy = res.get("greedy")
    for mode, (ours, theirs) in res.items():
        ms, ms_hf = 1e3 * b / ours, 1e3 * b / theirs
        extra = ""
        if greedy and mode != "greedy":
            extra = (f"{ms / (1e3 * b / greedy[0]) - 1:>+10.1%}{ms_hf / (1e3 * b / greedy[1]) - 1:>+10.1%}")
        print(f"{f'decode {name} batch {b} {mode}':<34}{ms:>9.2f}{ours:>10.1f}{ms_hf:>9.2f}{theirs:>10.1f}"
              f"{ours / theirs:>7.2f}x{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="gpt2", help="a model preset (gpt2, tiny, ...) or small (3 layers, 96 wide)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default=",".join(MODES), help=f"sampling settings to run, of {', '.join(MODES)}")
    ap.add_argument("--bf16", action="store_true", help="also run bfloat16 weights")
    ap.add_argument("--no-int8", action="store_true", help="skip int8 weight-only decoding")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--searches", action="store_true", help="also beam and contrastive search, one prompt")
    ap.add_argument("--peer", choices=["ctranslate2"], action="append", default=[],
                    help="also measure this peer on the same weights (float32 and int8, greedy and sampled)")
    args = ap.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown --modes {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    batches = [int(x) for x in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, config {args.config}, "
          f"prompt {args.prompt_len}, new tokens {args.new}, best of {args.reps}")
    print("modes: " + "; ".join(f"{m} {MODES[m]}" for m in modes))
    bw = measure_bandwidth()
    gc.collect()
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(args.config, Path(d) / "m")
        cfg = model_config(args.config)
        # bytes read per decode step: every weight once (wte is shared with the LM head), no wpe table
        weight_bytes = (cfg.num_params() - cfg.n_positions * cfg.n_embd) * 4
        print(f"memory bandwidth {bw / 1e9:.1f} GB/s; float32 weights {weight_bytes / 1e6:.0f} MB "
              f"-> limit {bw / weight_bytes:.1f} tokens/s at batch 1")
        print(f"{'case':<34}{'ms/step':>9}{'tok/s':>10}{'hf ms':>9}{'hf tok/s':>10}{'ratio':>8}"
              f"{'vs greedy':>10}{'hf vs gr.':>10}")
        dtypes = [("float32", torch.float32, None)] + ([("bfloat16", torch.bfloat16, None)] if args.bf16 else [])
        dtypes += [] if args.no_int8 else [("int8", torch.float32, "int8")]  # against transformers in float32
        greedy_ms = None  # float32 batch 1, for the searches' comparison
        for name, dt, quantize in dtypes:
            for b in batches:
                res = bench_decode(path, b, args.prompt_len, args.new, dt, args.reps, quantize, modes)
                gc.collect()
                print_decode(name, b, res)
                if b == 1 and name == "float32" and "greedy" in res:
                    greedy_ms = 1e3 / res["greedy"][0]
                    # measured again right after the decoding runs, keeping the highest: one reading taken
                    # while a neighbour was busy would understate the limit and flatter the percentage
                    ours, theirs = res["greedy"]
                    bw = max(bw, measure_bandwidth())
                    print(f"{'  greedy, of bandwidth limit':<34}{ours / (bw / weight_bytes):>19.0%}"
                          f"{theirs / (bw / weight_bytes):>19.0%}   (bandwidth {bw / 1e9:.1f} GB/s, "
                          f"limit {bw / weight_bytes:.1f} tok/s)")
        if args.searches:
            for name, (ms, ms_hf) in bench_searches(path, args.prompt_len, args.new, args.reps).items():
                hf_ms, vs = (f"{ms_hf:.2f}", f"{ms_hf / ms:.2f}x") if ms_hf else ("-", "-")
                over = f", {ms / greedy_ms:.2f}x gpt2kit's greedy batch-1 step" if greedy_ms else ""
                print(f"{f'search {name}':<34}{ms:>9.2f}{'':>10}{hf_ms:>9}{'':>10}{vs:>8}"
                      f"   (ms per new token{over})", flush=True)
        cost = pick_cost(batches, cfg.vocab_size)
        print("picking the tokens alone (decode.next_tokens on fixed logits), ms per call: "
              + "; ".join(f"batch {b}: " + ", ".join(f"{m} {cost[m, b]:.2f}" for m in MODES) for b in batches))
        if args.bf16:
            rel, top1, same = drift(path, torch.bfloat16, args.new)
            print(f"bfloat16 drift from float32: max |dlogit| {rel:.2%} of max |logit|, top-1 agreement "
                  f"{top1:.1%} over 64 positions, greedy tokens identical for the first {same} of {args.new}")
        if not args.no_int8:
            rel, top1, same = drift_int8(path, args.new)
            print(f"int8 drift from float32: max |dlogit| {rel:.2%} of max |logit|, top-1 agreement {top1:.1%} "
                  f"over 64 decoding steps, greedy tokens identical for the first {same} of {args.new}")
        if not args.no_ttft:
            ours, theirs = ttft(path)
            print(f"time to first token: gpt2kit {ours:.2f} s, transformers {theirs:.2f} s ({theirs / ours:.2f}x)")
        if "ctranslate2" in args.peer:
            from peer_ctranslate2 import report  # lazy: a benchmark-only dependency, only with --peer

            report(path, [int(x) for x in args.batches.split(",")], args.prompt_len, args.new, args.reps,
                   args.threads, int8=not args.no_int8)


if __name__ == "__main__":
    main()
