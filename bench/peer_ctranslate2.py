"""CTranslate2 beside gpt2kit on the same random weights: `bench_generate.py --peer ctranslate2`.

The HuggingFace-format checkpoint that bench_generate writes is converted once with CTranslate2's
TransformersConverter (float32); CTranslate2 then decodes it with compute type float32 or int8 (int8 weights
quantized when loaded), against gpt2kit in float32 and with int8 weight-only decoding. Each case —
batch 1 and 8, greedy, top-k 40 at temperature 0.8 and top-p 0.9 at temperature 0.9 — generates exactly
`new` tokens after the same `prompt_len`-token prompt on both sides (CTranslate2: include_prompt_in_result
False, min_length = max_length = new, so the end token cannot end a row early; gpt2kit: stop_at_eot False),
and the two alternate run by run so that a busy neighbour hits both alike.

CTranslate2 is a benchmark-only dependency (in the dev extra); gpt2kit never imports it for decoding."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# (label, gpt2kit GenerationConfig fields, CTranslate2 generate_batch sampling arguments)
MODES = [
    ("greedy", {"temperature": 0.0}, {"sampling_topk": 1}),
    ("top-k 40 T 0.8", {"temperature": 0.8, "top_k": 40}, {"sampling_topk": 40, "sampling_temperature": 0.8}),
    ("top-p 0.9 T 0.9", {"temperature": 0.9, "top_p": 0.9},
     {"sampling_topk": 0, "sampling_topp": 0.9, "sampling_temperature": 0.9}),  # topk 0: the whole vocabulary
]
COMPUTE = [("float32", None), ("int8", "int8")]  # (CTranslate2 compute type, gpt2kit --quantize)


@dataclass
class Row:
    case: str
    ours: float  # tokens/s
    theirs: float


def convert(hf_dir: Path, out: Path) -> Path:
    """The CTranslate2 model of an HF GPT-2 directory (float32; int8 is chosen when loading)."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir)).convert(str(out), force=True)
    return out


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_case(path: Path, ct2_dir: Path, compute: str, quantize: str | None, batch: int, prompt_len: int,
               new: int, reps: int, threads: int, modes: list[tuple[str, dict, dict]]) -> list[Row]:
    """Best-of-`reps` tokens/s for gpt2kit and CTranslate2 at one compute type and batch size, per mode."""
    import ctranslate2
    from transformers import GPT2TokenizerFast

    from gpt2kit.checkpoints import load_model
    from gpt2kit.generate import GenerationConfig, run_stream, stream_rows
    from gpt2kit.kernels import prepare_cpu_decoding_

    model, tok = load_model(path, device="cpu", dtype=torch.float32)
    prepare_cpu_decoding_(model, quantize)
    gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute, intra_threads=threads,
                                inter_threads=1)
    ids = [list(range(1000, 1000 + prompt_len))] * batch
    start = [GPT2TokenizerFast.from_pretrained(path).convert_ids_to_tokens(i) for i in ids]  # CT2 takes strings
    rows = []
    for label, ours_kw, theirs_kw in modes:
        cfg = GenerationConfig(max_new_tokens=new, stop_at_eot=False, seed=0, **ours_kw)

        def ours(n: int, cfg: GenerationConfig = cfg) -> None:
            outs = run_stream(stream_rows(model, tok, ["x"] * batch, replace(cfg, max_new_tokens=n), prompt_ids=ids))
            assert all(len(o.tokens) == n for o in outs)

        def theirs(n: int, theirs_kw: dict = theirs_kw) -> None:
            res = gen.generate_batch(start, max_length=n, min_length=n, include_prompt_in_result=False, **theirs_kw)
            got = [len(r.sequences_ids[0]) for r in res]
            assert got == [n] * batch, f"CTranslate2 generated {got} tokens, not {n}"

        ours(8)
        theirs(8)  # warm-up
        best = [float("inf"), float("inf")]
        for _ in range(reps):
            for i, f in enumerate((ours, theirs)):
                best[i] = min(best[i], _timed(lambda f=f: f(new)))
        rows.append(Row(f"{compute} batch {batch} {label}", batch * new / best[0], batch * new / best[1]))
    return rows


def report(path: Path, batches: list[int], prompt_len: int, new: int, reps: int, threads: int,
           int8: bool = True) -> list[Row]:
    """Measure every case and print it as it completes: tok/s of both and gpt2kit / CTranslate2."""
    import ctranslate2

    computes = COMPUTE if int8 else COMPUTE[:1]
    print(f"\nCTranslate2 {ctranslate2.__version__} ({threads} threads) on the same weights")
    print(f"{'case':<36}{'gpt2kit tok/s':>15}{'ctranslate2':>15}{'ratio':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ct2_dir = convert(path, Path(d) / "ct2")
        for compute, quantize in computes:
            for b in batches:
                for row in bench_case(path, ct2_dir, compute, quantize, b, prompt_len, new, reps, threads, MODES):
                    print(f"{row.case:<36}{row.ours:>15.1f}{row.theirs:>15.1f}{row.ours / row.theirs:>7.2f}x",
                          flush=True)
                    rows.append(row)
    return rows
