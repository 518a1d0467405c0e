"""Load test for `gpt2kit serve`: concurrent streaming clients against the same requests one at a time,
then memory over many requests. Loopback only, bounded in request count and time.

    python bench/bench_serve.py                 # 124M random weights, 32 clients, 1,000-request memory run
    python bench/bench_serve.py --config tiny   # quick smoke run

Starts `gpt2kit serve` as its own process on 127.0.0.1 with a randomly initialised model, sends every
client's request sequentially and then all at once (streaming, seeded, the same token counts), prints a
table with total tokens/s and the ratio, then sends --memory-requests requests --memory-concurrency at a
time and prints the server's resident memory after the first tenth and at the end. Exits 1 when a
request fails, the ratio is under --min-ratio, or memory grows more than --max-growth."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT.parent / "shared" / "data" / "gpt2-vocab"
WORDS = ("the river ran past a quiet town where people told old stories about the sea and the hills beyond "
         "it in the long winter evenings").split()


def make_checkpoint(config_name: str, out: Path) -> Path:
    from gpt2kit.checkpoints import save_model
    from gpt2kit.config import GPTConfig
    from gpt2kit.model import GPT
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    return save_model(GPT(GPTConfig.from_name(config_name)), Tokenizer.from_dir(VOCAB), out)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:  # Linux
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Result:
    tokens: int = 0
    ttft: float = 0.0  # seconds to the first text
    latency: float = 0.0
    error: str | None = None


@dataclass
class Phase:
    name: str
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error]

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def body(i: int, max_tokens: int) -> dict:
    prompt = " ".join(WORDS[i % 7: i % 7 + 4 + i % 13])  # prompts of different lengths
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 50,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}


async def one(client: httpx.AsyncClient, url: str, payload: dict, timeout: float) -> Result:
    r = Result()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=payload, timeout=timeout) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
                elif not r.ttft:
                    r.ttft = time.perf_counter() - t0
            if not done and not r.error:
                r.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    r.latency = time.perf_counter() - t0
    return r


async def run_phase(name: str, url: str, payloads: list[dict], concurrency: int, timeout: float,
                    on_progress=None) -> Phase:
    phase = Phase(name)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def guarded(p: dict) -> Result:
            async with sem:
                res = await one(client, url, p, timeout)
            if on_progress:
                on_progress()
            return res

        t0 = time.perf_counter()
        phase.results = list(await asyncio.gather(*(guarded(p) for p in payloads)))
        phase.wall = time.perf_counter() - t0
    return phase


def start_server(model_dir: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--model-name", "bench",
           "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--dtype", "float32",
           "--max-batch", str(args.max_batch), "--max-queue", str(max(64, 2 * args.clients)),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline()  # the server prints its address once it is listening
    m = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not m:
        proc.kill()
        sys.exit(f"the server did not start:\n{line}{log.read_text()}")
    return proc, m.group(0)


def fmt_phase(p: Phase) -> str:
    ttft = statistics.median(r.ttft for r in p.results) if p.results else 0.0
    lat = sorted(r.latency for r in p.results)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0
    return (f"{p.name:<12} {len(p.results):>8} {p.tokens:>7} {p.wall:>8.1f} {p.tps:>8.1f} {ttft * 1000:>10.0f} "
            f"{p95:>10.2f} {len(p.errors):>6}")


async def main_async(args: argparse.Namespace, url: str, pid: int) -> int:
    ok = True
    deadline = time.monotonic() + args.time_limit

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    await run_phase("warm-up", url, [body(0, 8), body(1, 8)], 2, args.request_timeout)
    payloads = [body(i, args.max_tokens) for i in range(args.clients)]
    seq = await asyncio.wait_for(run_phase("sequential", url, payloads, 1, args.request_timeout), left())
    con = await asyncio.wait_for(run_phase("concurrent", url, payloads, args.clients, args.request_timeout), left())
    print(f"\n{args.clients} streaming requests of {args.max_tokens} tokens, {args.config} (random weights), "
          f"max batch {args.max_batch}, torch threads in the server: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':<12} {'requests':>8} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'TTFT p50':>10} "
          f"{'p95 lat s':>10} {'errors':>6}")
    print(fmt_phase(seq))
    print(fmt_phase(con))
    ratio = con.tps / seq.tps if seq.tps else 0.0
    verdict = "ok" if ratio >= args.min_ratio else "FAIL"
    print(f"concurrent / sequential tokens/s: {ratio:.2f}x (need >= {args.min_ratio}x) {verdict}")
    for p in (seq, con):
        for e in p.errors[:5]:
            print(f"  {p.name} error: {e}")
    ok &= ratio >= args.min_ratio and not seq.errors and not con.errors
    if seq.tokens != con.tokens:
        print(f"note: token counts differ ({seq.tokens} vs {con.tokens})")

    if args.memory_requests:
        n = args.memory_requests
        done = 0
        marks: dict[str, int] = {"before": rss_bytes(pid)}

        def progress() -> None:
            nonlocal done
            done += 1
            if done == max(1, n // 10):
                marks["warm"] = rss_bytes(pid)

        payloads = [body(i, args.memory_tokens) for i in range(n)]
        mem = await asyncio.wait_for(run_phase("memory", url, payloads, args.memory_concurrency,
                                               args.request_timeout, progress), left())
        marks["end"] = rss_bytes(pid)
        warm = marks.get("warm", marks["before"])
        growth = (marks["end"] - warm) / warm
        verdict = "ok" if growth <= args.max_growth and not mem.errors else "FAIL"
        mib = 2**20
        print(f"\nmemory: {n} requests ({args.memory_concurrency} at a time, {args.memory_tokens} tokens each) "
              f"in {mem.wall:.0f} s, {mem.tps:.0f} tok/s, errors {len(mem.errors)}")
        print(f"server RSS: before {marks['before'] / mib:.0f} MiB, after {n // 10} requests {warm / mib:.0f} MiB, "
              f"after {n} requests {marks['end'] / mib:.0f} MiB ({growth * 100:+.1f}%, need <= "
              f"{args.max_growth * 100:.0f}%) {verdict}")
        for e in mem.errors[:5]:
            print(f"  memory error: {e}")
        ok &= verdict == "ok"
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="gpt2", help="model preset with random weights (default gpt2 = 124M; tiny)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    p.add_argument("--memory-requests", type=int, default=1000, help="requests in the memory run (0 skips it)")
    p.add_argument("--memory-concurrency", type=int, default=32)
    p.add_argument("--memory-tokens", type=int, default=16, help="tokens per request in the memory run")
    p.add_argument("--min-ratio", type=float, default=3.0)
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (0.05: 5%%)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--time-limit", type=float, default=1200.0, help="seconds for the whole run")
    args = p.parse_args()
    if args.clients < 1 or args.clients > 256 or args.memory_requests > 10_000:
        sys.exit("keep it bounded: 1..256 clients, at most 10,000 memory requests")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(args.config, Path(tmp) / "model")
        proc, url = start_server(model_dir, args, Path(tmp) / "server.log")
        try:
            code = asyncio.run(main_async(args, url, proc.pid))
        except asyncio.TimeoutError:
            print(f"FAIL: over --time-limit {args.time_limit:.0f} s")
            code = 1
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log = (Path(tmp) / "server.log").read_text()
            if log.strip():
                print("\nserver log:\n" + log[-3000:])
    return code


if __name__ == "__main__":
    sys.exit(main())
