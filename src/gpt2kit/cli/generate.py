"""`gpt2kit generate`: prompted, unconditional, interactive, streamed or bulk generation."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

from gpt2kit.cli.common import add_model_args, add_quantize_arg, load_generator, setup_logging
from gpt2kit.errors import Gpt2kitError
from gpt2kit.progress import progress_bar

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
    s.add_argument("--length", "-n", "--max-new-tokens", type=int, default=100,
                   help="new tokens per sample (default 100)")
    s.add_argument("--temperature", "-t", type=float, default=1.0, help="0 means greedy (default 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    s.add_argument("--typical-p", type=float, default=1.0,
                   help="typical sampling mass in (0, 1]: keep the tokens nearest the expected surprise (1: off)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    s.add_argument("--seed", type=int, help="same seed, same text")
    s.add_argument("--nsamples", type=int, default=1, help="samples to generate; 0 means endless")
    s.add_argument("--batch-size", type=int, help="samples generated together (default: all, up to 32)")
    s.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    s.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="keep generating past <|endoftext|>")
    c = p.add_argument_group("controls", "applied to each row's logits before sampling (docs/generation.md)")
    c.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="never repeat an n-gram of N tokens (0: off)")
    c.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="subtract X from generated tokens' logits, once (OpenAI's; in [-2, 2])")
    c.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="subtract X per occurrence from generated tokens' logits (OpenAI's; in [-2, 2])")
    c.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS in [-100, 100] to token ID's logit; -100 bans it (repeatable)")
    c.add_argument("--ban", action="append", default=[], metavar="TEXT",
                   help="never generate TEXT, with or without a leading space (repeatable)")
    c.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="no <|endoftext|> or stop string ends a sample before N tokens")
    b = p.add_argument_group("search (deterministic; see docs/generation.md)")
    b.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (1: off)")
    b.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-probability / length**X (default 1; > 0 favours longer beams)")
    b.add_argument("--early-stopping", nargs="?", const=True, default=False, type=_early_stopping,
                   metavar="never", help="end a prompt's beam search once N beams have finished; "
                   "'--early-stopping never' searches on while a beam could still win")
    b.add_argument("--penalty-alpha", type=float, default=0.0,
                   help="contrastive search with --top-k candidates: weight of the degeneration penalty in [0, 1]")
    o = p.add_argument_group("output")
    o.add_argument("--include-prompt", action="store_true", help="print the prompt before the continuation")
    o.add_argument("--format", choices=("text", "jsonl"), default="text", help="stdout format")
    o.add_argument("--output", "-o", help="write samples to this JSON Lines file, with a progress bar")
    p.set_defaults(func=run)


def _early_stopping(value: str) -> bool | str:
    if value.lower() != "never":
        raise argparse.ArgumentTypeError(f"takes no value or 'never', got {value!r} (give PROMPT before it)")
    return "never"


def _read_prompt(args: argparse.Namespace) -> str | None:
    given = [x for x in (args.prompt_arg, args.prompt, args.prompt_file) if x is not None]
    if len(given) > 1:
        raise Gpt2kitError("give the prompt once: as PROMPT, --prompt or --prompt-file")
    if args.interactive:
        # the loop reads every prompt itself: a prompt, --unconditional or --output given too would be ignored
        other = ("a PROMPT" if args.prompt_arg is not None else "--prompt" if args.prompt is not None
                 else "--prompt-file" if args.prompt_file is not None else "--unconditional" if args.unconditional
                 else "--output" if args.output else None)
        if other:
            raise Gpt2kitError(f"--interactive reads its prompts from the keyboard and prints the samples; "
                               f"drop {other} or --interactive")
        if args.nsamples == 0:
            raise Gpt2kitError("--nsamples 0 (endless) would never ask for the next prompt; give --interactive "
                               "a number of samples per prompt")
        return None
    if args.unconditional:
        if given:
            raise Gpt2kitError("--unconditional takes no prompt; drop one or the other")
        return None
    if args.prompt_file is not None:
        try:
            if args.prompt_file == "-":  # bytes, so that non-UTF-8 input is an error here as it is for a file
                stdin = sys.stdin
                data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
            else:
                data = Path(args.prompt_file).read_bytes()
            text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not prompt text
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads
        except OSError as e:
            raise Gpt2kitError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise Gpt2kitError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        given = [text.removesuffix("\n")]
    if not given:
        raise Gpt2kitError("no prompt: give PROMPT, --prompt, --prompt-file, or use --unconditional or --interactive")
    if given[0] == "":
        raise Gpt2kitError("empty prompt: give some text, or use --unconditional to start from <|endoftext|>")
    try:
        given[0].encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in the command line arrive as lone surrogates
        raise Gpt2kitError("the prompt is not UTF-8 text") from None
    return given[0]


def run(args: argparse.Namespace) -> int:
    from gpt2kit.generate import GenerationConfig, once, window_notice  # lazy: torch off the CLI's start-up path

    setup_logging()
    prompt = _read_prompt(args)
    if args.nsamples < 0:
        raise Gpt2kitError(f"--nsamples must be >= 0 (0 means endless), got {args.nsamples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise Gpt2kitError(f"--batch-size must be > 0, got {args.batch_size}")
    cfg = GenerationConfig(
        max_new_tokens=args.length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, typical_p=args.typical_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
        stop_at_eot=args.stop_at_eot, seed=args.seed,
        no_repeat_ngram_size=args.no_repeat_ngram_size, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=_logit_bias(args.logit_bias), bad_words=tuple(args.ban),
        min_tokens=args.min_tokens, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping, penalty_alpha=args.penalty_alpha,
    ).validate()  # bad flags fail before the model loads
    if cfg.search == "beam" and not 1 <= args.nsamples <= cfg.num_beams:
        raise Gpt2kitError(f"beam search returns the best 1 to --num-beams ({cfg.num_beams}) beams per prompt: "
                           f"give --nsamples in that range, not {args.nsamples}")
    if args.output and not args.interactive:
        if args.nsamples == 0:
            raise Gpt2kitError("--output needs a finite --nsamples (0 means endless)")
        _check_output(Path(args.output))
    gen = load_generator(args)
    out = _Printer(args, once(window_notice))  # one window notice per run, however many batches or prompts
    if args.interactive:
        return _interactive(gen, cfg, args, out)
    if args.output:
        return _to_file(gen, prompt, cfg, args, out.notice)
    # nsamples 0 is endless, like OpenAI's generate_unconditional_samples.py (batch size 1 unless given)
    out.run(gen, prompt, cfg, args.nsamples, args.batch_size)
    return 0


def _logit_bias(items: list[str]) -> dict[int, float]:
    """--logit-bias ID=BIAS values -> {id: bias}; a later value for the same id wins."""
    out: dict[int, float] = {}
    for item in items:
        tid, eq, bias = item.partition("=")
        try:
            if not eq:
                raise ValueError
            out[int(tid)] = float(bias)
        except ValueError:
            raise Gpt2kitError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 50256=-100), got {item!r}") from None
    return out


class _Printer:
    """Writes samples to stdout: streamed token by token when one sample runs at a time, otherwise each
    sample whole, in order, as its batch finishes."""

    def __init__(self, args: argparse.Namespace, notice):
        self.args = args
        self.notice = notice

    def run(self, gen, prompt: str | None, cfg, nsamples: int, batch_size: int | None) -> None:
        args = self.args
        many = nsamples != 1 or args.nsamples != 1
        bs = batch_size or (1 if nsamples == 0 else min(nsamples, 32))
        if bs == 1 and args.format == "text" and cfg.search != "beam":  # beam search cannot stream
            w = sys.stdout.write
            started: set[int] = set()
            for d in gen.stream(prompt, cfg, nsamples, bs, on_window_slide=self.notice):
                if d.index not in started:
                    started.add(d.index)
                    self._header(d.index, many)
                    if args.include_prompt and prompt is not None:
                        w(prompt)
                w(d.text + ("\n" if d.finish_reason else ""))
                sys.stdout.flush()
            return
        for c in gen.completions(prompt, cfg, nsamples, bs, on_window_slide=self.notice):
            if args.format == "jsonl":
                sys.stdout.write(json.dumps(_record(c, prompt), ensure_ascii=False) + "\n")
            else:
                self._header(c.index, many)
                if args.include_prompt and prompt is not None:
                    sys.stdout.write(prompt)
                sys.stdout.write(c.text + "\n")
            sys.stdout.flush()

    def _header(self, i: int, many: bool) -> None:
        if many:
            sys.stdout.write(f"{SEPARATOR} SAMPLE {i + 1} {SEPARATOR}\n")


def _record(c, prompt: str | None) -> dict:
    return {"index": c.index, "prompt": prompt if prompt is not None else "", "text": c.text,
            "tokens": c.tokens, "finish_reason": c.finish_reason}


def _interactive(gen, cfg, args: argparse.Namespace, out: _Printer) -> int:
    nsamples = args.nsamples
    for k in itertools.count():
        try:
            text = input("Model prompt >>> ")
        except EOFError:  # Ctrl-D
            sys.stdout.write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
        if not text.strip():
            print("Prompt should not be empty!", file=sys.stderr)
            continue
        try:
            out.run(gen, text, _session_seed(cfg, k), nsamples, args.batch_size)
        except KeyboardInterrupt:  # Ctrl-C while sampling stops this prompt's samples, not the session
            sys.stdout.write("\n")
            sys.stdout.flush()
            print("stopped (Ctrl-D ends the session)", file=sys.stderr)


def _session_seed(cfg, k: int):
    """--seed seeds the session, as OpenAI's interactive script does: the first prompt's samples are those of
    `generate PROMPT --seed S`, later prompts get seeds drawn from (S, k), so asking again gives new text while
    a session replayed with the same seed and prompts gives the same text."""
    import numpy as np  # lazy: only interactive sessions with a seed need it

    if cfg.seed is None or k == 0:
        return cfg
    return dataclasses.replace(cfg, seed=int(np.random.SeedSequence([cfg.seed, k]).generate_state(1)[0]))


def _check_output(path: Path) -> None:
    """Fail on an --output that cannot be written before the model loads (minutes for big models)."""
    if path.is_dir():
        raise Gpt2kitError(f"--output {path} is a directory; give a file name, e.g. {path / 'samples.jsonl'}")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise Gpt2kitError(f"the folder of --output {path} {what}; create it or choose another path")
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):  # "a": an existing file is not truncated yet
            pass
    except OSError as e:
        raise Gpt2kitError(f"cannot write --output {path} ({e.strerror}); choose a writable location") from None
    if not existed:
        path.unlink(missing_ok=True)  # leave nothing behind if loading the model fails


def _to_file(gen, prompt: str | None, cfg, args: argparse.Namespace, notice) -> int:
    path = Path(args.output)
    # Samples go to PATH.partial, each written and flushed as it is finished, and PATH is replaced when
    # the job ends or is stopped with Ctrl-C (which keeps everything already generated). An existing PATH
    # survives a crash or kill -9 untouched, with the progress so far beside it in PATH.partial.
    partial = path.with_name(path.name + ".partial")
    written = 0
    try:
        with partial.open("w", encoding="utf-8") as f, \
                progress_bar(total=args.nsamples, unit="sample") as bar:
            for c in gen.completions(prompt, cfg, args.nsamples, args.batch_size, on_window_slide=notice):
                f.write(json.dumps(_record(c, prompt), ensure_ascii=False) + "\n")
                f.flush()
                written += 1
                bar.update(1)
    except KeyboardInterrupt:
        os.replace(partial, path)
        print(f"interrupted: wrote {written} of {args.nsamples} samples to {path}", file=sys.stderr)
        raise
    os.replace(partial, path)
    print(f"wrote {written} samples to {path}", file=sys.stderr)
    return 0
