"""`gpt2kit finetune`: train a run directory; `--resume RUN` continues one. A thin wrapper over
gpt2kit.train.finetune / resume."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpt2kit.cli.common import setup_logging
from gpt2kit.errors import Gpt2kitError
from gpt2kit.run_numbers import DEFAULT_RUNS_DIR

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

    g = p.add_argument_group("model")
    g.add_argument("--model", help="model name (gpt2, gpt2-medium, ...), model directory or run directory")
    g.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained",
                   help="start from --model's weights (default) or from random weights")
    g.add_argument("--config", metavar="NAME", help="with --init scratch: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                   "distilgpt2, tiny, or a config.json")
    g.add_argument("--tokenizer", metavar="DIR", help="directory with vocab.json + merges.txt (default: the "
                   "model's)")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", action="extend", metavar="PATH", default=[],
                   help="training data: .txt/.csv/.tsv/.jsonl files, folders, globs, .npz/.npy/.bin token files, or "
                   "one .tokens cache (from `gpt2kit encode`); repeatable")
    g.add_argument("--val-data", nargs="+", action="extend", metavar="PATH", default=[],
                   help="validation data (default: hold out --val-fraction of the documents)")
    g.add_argument("--val-fraction", type=float, help="fraction of documents held out for validation "
                   "(default 0.05 without --val-data; 0 disables validation)")
    g.add_argument("--column", help="CSV/TSV column holding the text")
    g.add_argument("--field", help="JSONL field holding the text (default: text)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help=".csv/.tsv: skip rows whose number of fields differs from the header's, with a warning "
                   "(default: such rows are an error)")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the input files (default utf-8)")
    g.add_argument("--line-by-line", action="store_true", help="each line of a .txt file is one document, "
                   "and each training sample is one document (padded), not a window of the stream")

    g = p.add_argument_group("training")
    g.add_argument("--out", metavar="RUN_DIR", help="run directory to create (default: the next numbered run in "
                   "--runs-dir)")
    g.add_argument("--runs-dir", metavar="DIR", help="without --out: train into the next numbered run in DIR, "
                   f"DIR/0007 (default {DEFAULT_RUNS_DIR}/)")
    g.add_argument("--name", help="with --runs-dir: add a name to the numbered run's folder (DIR/0007-NAME)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its own files "
                   "only; refused for a folder that is not a run, or a run still training)")
    g.add_argument("--steps", type=int, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per process per micro-step (default 4); "
                   "global batch = batch size x grad accum x processes")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's context, at most "
                   "1024)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4; LoRA 1e-3; scratch 6e-4)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (default 0.1)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="lr schedule after warmup (default cosine)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of the steps, at most 100)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default 1.0; 0 disables)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout rate (default 0; 0.1 can help on small "
                   "data)")
    g.add_argument("--freeze", action="append", default=[], metavar="PARTS",
                   help="freeze parts: embeddings, wte, wpe, ln_f, blocks, blocks:A-B, attn, mlp, ln, or a "
                   "parameter glob; comma-separated or repeated (e.g. embeddings,ln_f trains the blocks only)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters only (e.g. 8)")
    g.add_argument("--lora-alpha", type=float, help="adapter scale numerator (default 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    g.add_argument("--lora-targets", default="all", help="comma-separated: c_attn, attn.c_proj, c_fc, mlp.c_proj, "
                   "c_proj, attn, mlp or all (default all)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="float32, or autocast mixed precision (float16 with loss scaling); auto: bfloat16 on "
                   "GPUs that have it, else float32")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward: "
                   "much less memory, ~30%% more compute")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start; helps on GPUs)")

    g = p.add_argument_group("evaluation, samples, checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between validations (default: 10 per run, every 20 "
                   "steps in runs under 200 steps, at least 2; 0: never)")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: about 32K target "
                   "tokens, at most 50 batches of windows, fewer in short runs; with --line-by-line, as many "
                   "documents as hold 32K, so all of a smaller set); the run's notes say how much each evaluation "
                   "scores")
    g.add_argument("--early-stop", type=int, default=0, metavar="N", help="stop after N evaluations without "
                   "improvement (default: never)")
    g.add_argument("--sample-every", type=int, help="steps between samples (default: every second evaluation; "
                   "0: never)")
    g.add_argument("--prompt", action="append", default=[], help="a sample prompt (repeatable)")
    g.add_argument("--prompts", metavar="FILE", help="file with one sample prompt per line")
    g.add_argument("--sample-tokens", type=int, default=64, help="tokens per sample (default 64)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default: with each evaluation, at most "
                   "every 1000 steps)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept besides best/ and final/ (default 2)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="log to RUN/tensorboard (default: when tensorboard is installed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("sharing")
    g.add_argument("--wandb", action="store_true", help="log metrics, samples and the config to Weights & Biases "
                   "(pip install 'gpt2kit[wandb]'; WANDB_MODE=offline logs locally)")
    g.add_argument("--wandb-project", metavar="P", help="W&B project (default gpt2kit)")
    g.add_argument("--wandb-run-name", metavar="N", help="W&B run name (default: the run directory's name)")
    g.add_argument("--push-to-hub", metavar="ORG/NAME", help="at the end of the run, upload its model (best, else "
                   "final) with a model card to this Hugging Face Hub repository, as `gpt2kit push` does")
    g.add_argument("--push-private", action="store_true", help="create the --push-to-hub repository private")
    p.set_defaults(func=run)
    _DEFAULTS.update(vars(p.parse_args([])))


# every option's default; with --resume the run's own settings are used, so any other value is refused
_DEFAULTS: dict[str, object] = {}
# what may differ when resuming: where it runs and how it shows progress (and where a LoRA run's base moved)
# (and its length: --steps/--epochs give a new total)
_RESUME_OPTIONS = ("resume", "device", "no_progress", "func", "model", "steps", "epochs")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8-sig")  # (a byte-order mark is no prompt text)
        except OSError as e:
            raise Gpt2kitError(f"cannot read --prompts {args.prompts}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise Gpt2kitError(f"--prompts {args.prompts} is not UTF-8 text (byte {e.start}); save it as UTF-8"
                               ) from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise Gpt2kitError(f"--prompts {args.prompts} holds no prompts; write one per line")
        prompts += lines
    return [p.replace("\\n", "\n") for p in prompts]


def run(args: argparse.Namespace) -> int:
    from gpt2kit import train
    setup_logging(speak=os.environ.get("RANK", "0") == "0")  # data preparation's notes; rank 0 speaks for all
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, default in _DEFAULTS.items()
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
        cfg = train.TrainConfig(
            model=args.model, init=args.init, config=args.config, tokenizer=args.tokenizer,
            data=args.data, val_data=args.val_data, val_fraction=args.val_fraction, column=args.column,
            field=args.field, encoding=args.encoding, line_by_line=args.line_by_line, out=args.out or "",
            skip_bad_rows=args.skip_bad_rows,
            steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
            block_size=args.block_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio, schedule=args.schedule,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2,
            grad_clip=args.grad_clip, dtype=args.dtype, device=args.device,
            grad_checkpointing=args.grad_checkpointing, compile=args.compile, dropout=args.dropout,
            freeze=args.freeze, seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
            eval_every=args.eval_every, eval_batches=args.eval_batches, early_stop=args.early_stop,
            sample_every=args.sample_every, sample_tokens=args.sample_tokens, prompts=_prompts(args),
            save_every=args.save_every, keep=args.keep, tensorboard=args.tensorboard, wandb=args.wandb,
            wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name, push_to_hub=args.push_to_hub,
            push_private=args.push_private)
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
