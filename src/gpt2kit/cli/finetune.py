"""`gpt2kit finetune`: train a run directory; `--resume RUN` continues one. A thin wrapper over
gpt2kit.train.finetune / resume. The flags of TrainConfig's options are built from its fields' metadata
(gpt2kit.train.config.option); written here are only the flags that are not options of a run: --resume,
--runs-dir, --name, --overwrite, --prompts FILE and --no-progress."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from gpt2kit.cli.common import setup_logging
from gpt2kit.errors import Gpt2kitError
from gpt2kit.run_numbers import DEFAULT_RUNS_DIR, resolve_run_ref
from gpt2kit.train import estimate
from gpt2kit.train.config import GROUPS, TrainConfig

EXAMPLES = """examples:
  gpt2kit finetune --model gpt2 --data jokes.csv --column Joke --out runs/jokes --epochs 10
  gpt2kit finetune --model gpt2 --data corpus.tokens --out runs/big --steps 5000 --sample-every 500
  gpt2kit finetune --model gpt2-medium --data notes/ --out runs/lora --lora-rank 8
  gpt2kit finetune --init scratch --config tiny --tokenizer gpt2-dir --data shakespeare.txt --out runs/s
  gpt2kit finetune --resume runs/jokes
  gpt2kit finetune --model gpt2 --data jokes.csv --column Joke --runs-dir runs --name jokes   # runs/0007-jokes
  gpt2kit finetune --resume runs/7 --steps 2000          # continue run 7 (finished or not) to 2000 steps
  torchrun --nproc_per_node 2 -m gpt2kit finetune --model gpt2 --data d.txt --out runs/ddp
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune GPT-2 on your text (or train from scratch)",
        description="Fine-tune a GPT-2 model on your text. Writes a run directory with the resolved config, "
                    "metrics, samples, a loss plot, checkpoints and the final model (HuggingFace format); "
                    "--model RUN_DIR then works everywhere a model is accepted.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint, with its own "
                   "settings (nothing else needed; --steps or --epochs set a new total, to continue a finished run "
                   "for longer). A numbered run may be named runs/7, or 7 for runs/")
    for name in GROUPS:  # every TrainConfig option, as its metadata declares it, group by group
        g = p.add_argument_group(name)
        for f in fields(TrainConfig):
            if f.metadata.get("group") != name:
                continue
            _add_option(g, f)
            # the flags that are not TrainConfig options, where they belong
            if f.name == "out":
                g.add_argument("--runs-dir", metavar="DIR", help="without --out: train into the next numbered run "
                               f"in DIR, DIR/0007 (default {DEFAULT_RUNS_DIR}/)")
                g.add_argument("--name", help="with --runs-dir: add a name to the numbered run's folder "
                               "(DIR/0007-NAME)")
                g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its own "
                               "files only; refused for a folder that is not a run, or a run still training)")
            elif f.name == "prompts":
                g.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                               help="file with one sample prompt per line")
            elif f.name == "grad_checkpointing":
                g.add_argument("--estimate-memory", action="store_true", help="print what this run needs per "
                               "process (weights, gradients, AdamW, activations) and exit, loading neither "
                               "weights nor data; under torchrun (or with WORLD_SIZE=N) for that many processes")
            elif f.name == "tensorboard":
                g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    _DEFAULTS.update(vars(p.parse_args([])))
    _FLAGS.update({a.dest: a.option_strings[0] for a in p._actions if a.option_strings})


def _add_option(group: argparse._ArgumentGroup, f: Field) -> None:
    """The flag of TrainConfig field `f`: its type from the annotation, its default the field's (or the
    metadata's cli_default), the rest from the metadata (TrainConfig.option says which keys)."""
    meta = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help")}
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    kw["default"] = meta.get("cli_default", default)
    for key in ("metavar", "choices"):
        if key in meta:
            kw[key] = meta[key]
    kind = {"str": str, "int": int, "float": float, "bool": bool}[f.type.split(" | ")[0].removeprefix("list[")
                                                                   .removesuffix("]")]
    action = meta.get("action")
    if action == "extend":
        kw.update(nargs="+", action="extend")
    elif action == "append":
        kw.update(action="append")
    elif action == "comma":
        kw.update(type=_comma_list, default=",".join(default))
    elif kind is bool:
        kw["action"] = argparse.BooleanOptionalAction if "None" in f.type else "store_true"
    else:
        kw["type"] = kind
    group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kw)


def _comma_list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


# every option's default; with --resume the run's own settings are used, so any other value is refused
_DEFAULTS: dict[str, object] = {}
_FLAGS: dict[str, str] = {}  # each option's flag, by its name in the parsed arguments
# what may differ when resuming: where it runs and how it shows progress (and where a LoRA run's base moved)
# (and its length: --steps/--epochs give a new total)
_RESUME_OPTIONS = ("resume", "device", "no_progress", "func", "model", "steps", "epochs", "estimate_memory")
# the TrainConfig fields that are flags
OPTIONS = tuple(f.name for f in fields(TrainConfig) if "group" in f.metadata)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8-sig")  # (a byte-order mark is no prompt text)
        except OSError as e:
            raise Gpt2kitError(f"cannot read --prompts {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise Gpt2kitError(f"--prompts {args.prompts_file} is not UTF-8 text (byte {e.start}); save it as UTF-8"
                               ) from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise Gpt2kitError(f"--prompts {args.prompts_file} holds no prompts; write one per line")
        prompts += lines
    return [p.replace("\\n", "\n") for p in prompts]


def _estimate(args: argparse.Namespace) -> str:
    """--estimate-memory: the run's settings (a new run's flags, or --resume's config.json) and its memory
    per process, from the model's architecture alone."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if args.resume:
        return estimate.describe(estimate.run_config(resolve_run_ref(args.resume)), world)
    options = {name: getattr(args, name) for name in OPTIONS}
    return estimate.describe(TrainConfig(**{**options, "out": args.out or "", "prompts": _prompts(args)}), world)


def run(args: argparse.Namespace) -> int:
    if args.estimate_memory:
        report = _estimate(args)
        if os.environ.get("RANK", "0") == "0":  # (under torchrun every process estimates; one prints)
            print(report)
        return 0
    from gpt2kit import train  # lazy: loads torch, which the parser (and --help) must not
    setup_logging(speak=os.environ.get("RANK", "0") == "0")  # data preparation's notes; rank 0 speaks for all
    if args.resume:
        given = [_FLAGS[k] for k, default in _DEFAULTS.items()
                 if k not in _RESUME_OPTIONS and getattr(args, k) != default]
        if given:
            raise Gpt2kitError(f"--resume continues a run with its own settings; drop {', '.join(given)} "
                               "(to change them, start a new run with --model RUN_DIR)")
        device = None if args.device == "auto" else args.device  # e.g. resume a GPU run on a CPU
        result = train.resume(args.resume, progress=not args.no_progress, device=device, model=args.model,
                              steps=args.steps, epochs=args.epochs)
    else:
        if args.out and (args.runs_dir or args.name):
            raise Gpt2kitError(f"--out names the run's folder; --{'runs-dir' if args.runs_dir else 'name'} is for "
                               "numbered runs: give one or the other")
        runs_dir = None if args.out else args.runs_dir or DEFAULT_RUNS_DIR
        options = {name: getattr(args, name) for name in OPTIONS}
        cfg = train.TrainConfig(**{**options, "out": args.out or "", "prompts": _prompts(args)})
        result = train.finetune(cfg, progress=not args.no_progress, overwrite=args.overwrite, runs_dir=runs_dir,
                                name=args.name)
    if result.status == "interrupted":
        return 130
    if result.model_dir is not None:
        print(result.model_dir)
    if result.push_error:  # the run finished; only its upload did not
        print(f"error: {result.push_error}", file=sys.stderr)
        return 1
    return 0
