"""`gpt2kit generate`: prompted, unconditional, interactive, streamed or bulk generation."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

from gpt2kit.cli.common import add_model_args, add_quantize_arg, load_generator, setup_logging
from gpt2kit.errors import Gpt2kitError

SEPARATOR = "=" * 40


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a GPT-2 model",
                       description="Generate text: prompted, unconditional, interactive, or in bulk to a file.")
    p.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (same as --prompt)")
    add_model_args(p)
    add_quantize_arg(p)
    src = p.add_argument_group("input")
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a file ('-' for stdin)")
    src.add_argument("--unconditional", action="store_true", help="no prompt: start from <|endoftext|>")
    src.add_argument("--interactive", "-i", action="store_true", help="ask for prompts in a loop")
    s = p.add_argument_group("sampling")
    s.add_argument("--length", "-n", type=int, default=100, help="new tokens per sample (default 100)")
    s.add_argument("--temperature", "-t", type=float, default=1.0, help="0 means greedy (default 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    s.add_argument("--seed", type=int, help="same seed, same text")
    s.add_argument("--nsamples", type=int, default=1, help="samples to generate; 0 means endless")
    s.add_argument("--batch-size", type=int, help="samples generated together (default: all, up to 32)")
    s.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    s.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="keep generating past <|endoftext|>")
    o = p.add_argument_group("output")
    o.add_argument("--include-prompt", action="store_true", help="print the prompt before the continuation")
    o.add_argument("--format", choices=("text", "jsonl"), default="text", help="stdout format")
    o.add_argument("--output", "-o", help="write samples to this JSON Lines file, with a progress bar")
    p.set_defaults(func=run)


def _read_prompt(args: argparse.Namespace) -> str | None:
    given = [x for x in (args.prompt_arg, args.prompt, args.prompt_file) if x is not None]
    if len(given) > 1:
        raise Gpt2kitError("give the prompt once: as PROMPT, --prompt or --prompt-file")
    if args.unconditional:
        if given:
            raise Gpt2kitError("--unconditional takes no prompt; drop one or the other")
        return None
    if args.prompt_file is not None:
        try:
            text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise Gpt2kitError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise Gpt2kitError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        given = [text.removesuffix("\n")]
    if not given and not args.interactive:
        raise Gpt2kitError("no prompt: give PROMPT, --prompt, --prompt-file, or use --unconditional or --interactive")
    if given and given[0] == "":
        raise Gpt2kitError("empty prompt: give some text, or use --unconditional to start from <|endoftext|>")
    return given[0] if given else None


def run(args: argparse.Namespace) -> int:
    from gpt2kit.generate import GenerationConfig

    setup_logging()
    prompt = _read_prompt(args)
    if args.nsamples < 0:
        raise Gpt2kitError(f"--nsamples must be >= 0 (0 means endless), got {args.nsamples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise Gpt2kitError(f"--batch-size must be > 0, got {args.batch_size}")
    cfg = GenerationConfig(
        max_new_tokens=args.length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
        stop_at_eot=args.stop_at_eot, seed=args.seed,
    ).validate()  # bad flags fail before the model loads
    gen = load_generator(args)
    out = _Printer(args)
    if args.interactive:
        return _interactive(gen, cfg, args, out)
    if args.output:
        return _to_file(gen, prompt, cfg, args)
    if args.nsamples == 0:  # endless, like OpenAI's generate_unconditional_samples.py
        bs = args.batch_size or 1
        for start in itertools.count(0, bs):
            c = replace(cfg, seed=None if cfg.seed is None else cfg.seed + start)
            out.run(gen, prompt, c, bs, bs, start)
    out.run(gen, prompt, cfg, args.nsamples, args.batch_size, 0)
    return 0


class _Printer:
    """Writes samples to stdout: streamed token by token when one sample runs at a time, otherwise each
    sample whole, in order, as its batch finishes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def run(self, gen, prompt: str | None, cfg, nsamples: int, batch_size: int | None, offset: int) -> None:
        args = self.args
        many = nsamples > 1 or args.nsamples != 1
        if (batch_size or min(nsamples, 32)) == 1 and args.format == "text":
            w = sys.stdout.write
            started: set[int] = set()
            for d in gen.stream(prompt, cfg, nsamples, batch_size):
                if d.index not in started:
                    started.add(d.index)
                    self._header(offset + d.index, many)
                    if args.include_prompt and prompt is not None:
                        w(prompt)
                w(d.text + ("\n" if d.finish_reason else ""))
                sys.stdout.flush()
            return
        for c in gen.completions(prompt, cfg, nsamples, batch_size):
            if args.format == "jsonl":
                sys.stdout.write(json.dumps(_record(c, prompt, offset), ensure_ascii=False) + "\n")
            else:
                self._header(offset + c.index, many)
                if args.include_prompt and prompt is not None:
                    sys.stdout.write(prompt)
                sys.stdout.write(c.text + "\n")
            sys.stdout.flush()

    def _header(self, i: int, many: bool) -> None:
        if many:
            sys.stdout.write(f"{SEPARATOR} SAMPLE {i + 1} {SEPARATOR}\n")


def _record(c, prompt: str | None, offset: int = 0) -> dict:
    return {"index": offset + c.index, "prompt": prompt if prompt is not None else "", "text": c.text,
            "tokens": c.tokens, "finish_reason": c.finish_reason}


def _interactive(gen, cfg, args: argparse.Namespace, out: _Printer) -> int:
    nsamples = args.nsamples or 1
    while True:
        try:
            text = input("Model prompt >>> ")
        except EOFError:
            sys.stdout.write("\n")
            return 0
        if not text.strip():
            print("Prompt should not be empty!", file=sys.stderr)
            continue
        out.run(gen, text, cfg, nsamples, args.batch_size, 0)


def _to_file(gen, prompt: str | None, cfg, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.nsamples == 0:
        raise Gpt2kitError("--output needs a finite --nsamples (0 means endless)")
    path = Path(args.output)
    if not path.parent.exists():
        raise Gpt2kitError(f"the folder of --output {path} does not exist")
    # each finished batch is written and flushed at once: Ctrl-C keeps everything already generated
    with path.open("w", encoding="utf-8") as f, tqdm(total=args.nsamples, unit="sample", file=sys.stderr) as bar:
        for c in gen.completions(prompt, cfg, args.nsamples, args.batch_size):
            f.write(json.dumps(_record(c, prompt), ensure_ascii=False) + "\n")
            f.flush()
            bar.update(1)
    print(f"wrote {args.nsamples} samples to {path}", file=sys.stderr)
    return 0
