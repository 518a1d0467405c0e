"""What defines a training run: TrainConfig (saved as RUN/config.json), what a run returns (RunResult) and
the default evaluation/sample/checkpoint cadence. Free of torch and numpy, so that the command line's parser
can build `gpt2kit finetune`'s flags from TrainConfig's fields without loading either."""

from __future__ import annotations

import fnmatch
import math
import os
import shlex
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from dataclasses import field as _field  # TrainConfig has a data option named `field`
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2kit.errors import Gpt2kitError

if TYPE_CHECKING:
    from gpt2kit.data import DataSpec

SCHEDULES = ("cosine", "linear", "constant")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_PROMPTS = ("<|endoftext|>",)  # unconditional: shows what the model writes on its own


# `gpt2kit finetune --help`'s groups, in the order they are shown
MODEL, DATA, TRAINING, LORA, HARDWARE, EVAL, SHARING = (
    "model", "data", "training", "LoRA", "hardware", "evaluation, samples, checkpoints", "sharing")
GROUPS = (MODEL, DATA, TRAINING, LORA, HARDWARE, EVAL, SHARING)


def option(default: Any = MISSING, *, group: str, help: str | None = None,  # noqa: A002 - argparse's word
           factory: Callable[[], Any] | None = None, **cli: Any) -> Any:
    """A TrainConfig field that is also a `gpt2kit finetune` flag, `--name-with-hyphens` unless `flag` says
    otherwise. Metadata: its help `group`, `help`, and for cli/finetune.py: `metavar`, `choices`, `action`
    ("extend": one or more values, repeatable; "append": one value, repeatable; "comma": one comma-separated
    value), `cli_default` (when the command line's default differs from the API's)."""
    meta = {"group": group, "help": help, **cli}
    if factory is not None:
        return _field(default_factory=factory, metadata=meta)
    return _field(default=default, metadata=meta)


def resume_hint(run_dir: str | Path, world: int = 1, per_machine: int | None = None) -> str:
    """How to continue a run, for callers of the command line and of the Python API alike; a run of several
    processes resumes with as many, on as many machines (`per_machine`: processes on each; default: torchrun's
    LOCAL_WORLD_SIZE)."""
    if per_machine is None:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    if world > per_machine >= 1:
        return (f"the same torchrun command on each of the {world // per_machine} machines with `-m gpt2kit finetune "
                f"--resume {shlex.quote(str(run_dir))}` ({world} processes in all)")
    if world > 1:
        return f"`torchrun --nproc_per_node {world} -m gpt2kit finetune --resume {shlex.quote(str(run_dir))}`"
    return f"`gpt2kit finetune --resume {shlex.quote(str(run_dir))}` (Python: resume({str(run_dir)!r}))"


FREEZE_GROUPS = {
    "embeddings": ("transformer.wte.", "transformer.wpe."),  # wte is also the (tied) output layer
    "wte": ("transformer.wte.",),
    "wpe": ("transformer.wpe.",),
    "ln_f": ("transformer.ln_f.",),
    "blocks": ("transformer.h.",),
}


def frozen_names(names: Sequence[str], specs: Sequence[str], n_layer: int) -> set[str]:
    """The parameter names (of `names`, a GPT's) that --freeze `specs` freezes. A spec is a group (embeddings,
    wte, wpe, ln_f, blocks), a block range `blocks:A-B` (0-based, inclusive) or `blocks:N`, a kind inside every
    block (attn, mlp, ln), or a glob over parameter names (`transformer.h.0.*`). `--freeze embeddings,ln_f`
    trains the transformer blocks only. Free of torch, so that a memory estimate can count what trains."""
    chosen: set[str] = set()
    for spec in (s.strip() for item in specs for s in item.split(",")):
        if not spec:
            continue
        if spec in FREEZE_GROUPS:
            hit = {n for n in names if n.startswith(FREEZE_GROUPS[spec])}
        elif spec.startswith("blocks:"):
            rng = spec[len("blocks:"):]
            try:
                lo, _, hi = rng.partition("-")
                lo_i, hi_i = int(lo), int(hi or lo)
            except ValueError:
                raise Gpt2kitError(f"--freeze {spec}: write blocks:A-B with block numbers, e.g. blocks:0-5") from None
            if not 0 <= lo_i <= hi_i < n_layer:
                raise Gpt2kitError(f"--freeze {spec}: the model has blocks 0-{n_layer - 1}")
            hit = {n for n in names for i in range(lo_i, hi_i + 1) if n.startswith(f"transformer.h.{i}.")}
        elif spec in ("attn", "mlp", "ln"):
            parts = (".ln_1.", ".ln_2.") if spec == "ln" else (f".{spec}.",)
            hit = {n for n in names if n.startswith("transformer.h.") and any(p in n for p in parts)}
        else:
            hit = set(fnmatch.filter(names, spec))
            if not hit:
                raise Gpt2kitError(f"--freeze {spec} matches no parameter; use embeddings, wte, wpe, ln_f, "
                                   "blocks, blocks:A-B, attn, mlp, ln or a glob like 'transformer.h.0.*'")
        chosen |= hit
    return chosen


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved, with every automatic value resolved, as RUN/config.json;
    `--resume RUN` restarts from that file alone. Each field declared with `option` is also a flag of
    `gpt2kit finetune` (cli/finetune.py builds them from the metadata: its group, help and argparse details);
    `%(default)s` in a help text shows the field's default."""
    # where the model comes from
    model: str | None = option(None, group=MODEL, help="model name (gpt2, gpt2-medium, ...), model directory or "
                               "run directory")
    init: str = option("pretrained", group=MODEL, choices=("pretrained", "scratch"),
                       help="start from --model's weights (default) or from random weights")
    config: str | None = option(None, group=MODEL, metavar="NAME", help="with --init scratch: gpt2, gpt2-medium, "
                                "gpt2-large, gpt2-xl, distilgpt2, tiny, or a config.json")
    tokenizer: str | None = option(None, group=MODEL, metavar="DIR", help="directory with vocab.json + merges.txt "
                                   "(default: the model's)")
    # data (see gpt2kit.data)
    data: list[str] = option(factory=list, group=DATA, action="extend", metavar="PATH",
                             help="training data: .txt/.csv/.tsv/.jsonl files, folders, globs, .npz/.npy/.bin token "
                             "files, or one .tokens cache (from `gpt2kit encode`); repeatable")
    val_data: list[str] = option(factory=list, group=DATA, action="extend", metavar="PATH",
                                 help="validation data (default: hold out --val-fraction of the documents)")
    val_fraction: float | None = option(None, group=DATA, help="fraction of documents held out for validation "
                                        "(default 0.05 without --val-data; 0 disables validation)")
    column: str | None = option(None, group=DATA, help="CSV/TSV column holding the text")
    field: str | None = option(None, group=DATA, help="JSONL field holding the text (default: text)")
    encoding: str = option("utf-8", group=DATA, help="text encoding of the input files (default %(default)s)")
    line_by_line: bool = option(False, group=DATA, help="each line of a .txt file is one document, and each "
                                "training sample is one document (padded), not a window of the stream")
    skip_bad_rows: bool = option(False, group=DATA, help=".csv/.tsv: skip rows whose number of fields differs from "
                                 "the header's, with a warning (default: such rows are an error)")
    # output (the command line's default: the next numbered run in --runs-dir)
    out: str = option("runs/finetune", group=TRAINING, metavar="RUN_DIR", cli_default=None,
                      help="run directory to create (default: the next numbered run in --runs-dir)")
    # length of training
    steps: int | None = option(None, group=TRAINING, help="optimizer steps (default: from --epochs)")
    epochs: float | None = option(None, group=TRAINING, help="passes over the training data (default 1)")
    # batch: global batch = batch_size * grad_accum * processes sequences of block_size tokens
    batch_size: int = option(4, group=TRAINING, help="sequences per process per micro-step (default %(default)s); "
                             "global batch = batch size x grad accum x processes")
    grad_accum: int = option(1, group=TRAINING, help="micro-steps per optimizer step (default %(default)s)")
    block_size: int | None = option(None, group=TRAINING, help="tokens per sequence (default: the model's context, "
                                    "at most 1024)")
    # optimizer and schedule
    lr: float | None = option(None, group=TRAINING, help="peak learning rate (default 1e-4; LoRA 1e-3; scratch "
                              "6e-4)")
    min_lr_ratio: float = option(0.1, group=TRAINING, help="final lr as a fraction of --lr (default %(default)s)")
    schedule: str = option("cosine", group=TRAINING, choices=SCHEDULES,
                           help="lr schedule after warmup (default %(default)s)")
    warmup_steps: int | None = option(None, group=TRAINING, help="linear warmup steps (default 5%% of the steps, at "
                                      "most 100)")
    weight_decay: float = option(0.01, group=TRAINING, help="AdamW weight decay (default %(default)s)")
    beta1: float = option(0.9, group=TRAINING)
    beta2: float = option(0.999, group=TRAINING)
    eps: float = 1e-8  # (no flag)
    grad_clip: float = option(1.0, group=TRAINING, help="max gradient norm (default %(default)s; 0 disables)")
    # numerics and memory
    dtype: str = option("auto", group=HARDWARE, choices=DTYPE_NAMES,
                        help="float32, or autocast mixed precision (float16 with loss scaling); auto: bfloat16 on "
                        "GPUs that have it, else float32")
    device: str = option("auto", group=HARDWARE, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    grad_checkpointing: bool = option(False, group=HARDWARE, help="recompute activations in backward: much less "
                                      "memory, ~30%% more compute")
    compile: bool = option(False, group=HARDWARE, help="torch.compile the model (slow start; helps on GPUs)")
    fsdp: bool = option(False, group=HARDWARE, help="under torchrun: shard weights, gradients and optimizer state "
                        "across the processes, per transformer block (PyTorch FSDP2), instead of a whole copy in each")
    fsdp_cpu_offload: bool = option(False, group=HARDWARE, help="with --fsdp: keep the sharded weights, gradients "
                                    "and optimizer state in CPU memory (the optimizer steps there)")
    dropout: float = option(0.0, group=TRAINING, help="dropout rate (default 0; 0.1 can help on small data)")
    freeze: list[str] = option(factory=list, group=TRAINING, action="append", metavar="PARTS",
                               help="freeze parts: embeddings, wte, wpe, ln_f, blocks, blocks:A-B, attn, mlp, ln, or a "
                               "parameter glob; comma-separated or repeated (e.g. embeddings,ln_f trains the blocks "
                               "only)")
    seed: int = option(0, group=TRAINING)
    # LoRA
    lora_rank: int = option(0, group=LORA, help="train rank-R adapters only (e.g. 8)")
    lora_alpha: float | None = option(None, group=LORA, help="adapter scale numerator (default 2 x rank)")
    lora_dropout: float = option(0.05, group=LORA, help="dropout on the adapter input (default %(default)s)")
    lora_targets: list[str] = option(factory=lambda: ["all"], group=LORA, action="comma",
                                     help="comma-separated: c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj, attn, mlp "
                                     "or all (default %(default)s)")
    # evaluation, samples, checkpoints
    # (defaults for these four: default_cadence, a small share of the training whatever its length)
    eval_every: int | None = option(None, group=EVAL, help="steps between validations (default: 10 per run, every "
                                    "20 steps in runs under 200 steps, at least 2; 0: never)")
    eval_batches: int | None = option(None, group=EVAL, help="validation batches per evaluation (default: about 32K "
                                      "target tokens, at most 50 batches of windows, fewer in short runs; with "
                                      "--line-by-line, as many documents as hold 32K, so all of a smaller set); the "
                                      "run's notes say how much each evaluation scores")
    early_stop: int = option(0, group=EVAL, metavar="N", help="stop after N evaluations without improvement "
                             "(default: never)")
    sample_every: int | None = option(None, group=EVAL, help="steps between samples (default: every second "
                                      "evaluation; 0: never)")
    sample_tokens: int = option(64, group=EVAL, help="tokens per sample (default %(default)s)")
    prompts: list[str] = option(factory=list, group=EVAL, flag="--prompt", action="append", metavar="PROMPT",
                                help="a sample prompt (repeatable)")
    sample_temperature: float = 0.8  # (no flag)
    sample_top_k: int = 40  # (no flag)
    save_every: int | None = option(None, group=EVAL, help="steps between checkpoints (default: with each "
                                    "evaluation, at most every 1000 steps)")
    keep: int = option(2, group=EVAL, help="checkpoints kept besides best/ and final/ (default %(default)s)")
    tensorboard: bool | None = option(None, group=EVAL, help="log to RUN/tensorboard (default: when tensorboard is "
                                      "installed)")
    # sharing: Weights & Biases (gpt2kit.tracking), a push to the Hub at the end (gpt2kit.push)
    wandb: bool = option(False, group=SHARING, help="log metrics, samples and the config to Weights & Biases (pip "
                         "install 'gpt2kit[wandb]'; WANDB_MODE=offline logs locally)")
    wandb_project: str | None = option(None, group=SHARING, metavar="P", help="W&B project (default gpt2kit)")
    wandb_run_name: str | None = option(None, group=SHARING, metavar="N", help="W&B run name (default: the run "
                                        "directory's name)")
    push_to_hub: str | None = option(None, group=SHARING, metavar="ORG/NAME", help="at the end of the run, upload "
                                     "its model (best, else final) with a model card to this Hugging Face Hub "
                                     "repository, as `gpt2kit push` does")
    push_private: bool = option(False, group=SHARING, help="create the --push-to-hub repository private")

    def __post_init__(self) -> None:
        # paths as str, so that config.json stays JSON; a single data path is a list of one
        for name in ("model", "config", "tokenizer", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if isinstance(v, (str, os.PathLike)):
                v = [v]
            if isinstance(v, (list, tuple)):
                setattr(self, name, [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v])

    def data_spec(self) -> DataSpec:
        """How the text inputs are read: --column, --field, --encoding, --line-by-line, --skip-bad-rows."""
        from gpt2kit.data import DataSpec  # lazy: gpt2kit.data loads numpy, which the CLI's parser must not
        return DataSpec(column=self.column, field=self.field, encoding=self.encoding, line_by_line=self.line_by_line,
                        skip_bad_rows=self.skip_bad_rows)

    def validate(self) -> TrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise Gpt2kitError(msg)
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # (the CLI's parser already typed them; this is for the Python API)
            value = getattr(self, f.name)
            need(_has_type(value, hints[f.name]), f"TrainConfig.{f.name} must be {_type_name(hints[f.name])}, not "
                 f"{value!r}")
            need(not isinstance(value, float) or math.isfinite(value) or f.name == "epochs",
                 f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        # (--init, --schedule and --dtype are choices the CLI's parser checks: these messages reach API callers only)
        need(self.init in ("pretrained", "scratch"),
             f"TrainConfig.init must be pretrained or scratch, not {self.init!r}")
        if self.init == "pretrained":
            need(bool(self.model), "no model to fine-tune: pass --model NAME_OR_DIR (e.g. gpt2), or "
                 "--init scratch --config NAME to train from random weights")
        else:
            need(bool(self.config or self.model), "--init scratch needs --config NAME (gpt2, gpt2-medium, "
                 "gpt2-large, gpt2-xl, distilgpt2, tiny) or a --model whose architecture to copy")
        need(bool(self.data), "no training data: pass --data FILE (text, .csv, .jsonl, a folder, a glob or a "
             ".tokens cache)")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.epochs is None or 0 < self.epochs < math.inf, f"--epochs must be a number > 0, got {self.epochs}")
        need(0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        need(self.block_size is None or self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}")
        need(self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, f"TrainConfig.schedule must be one of {', '.join(SCHEDULES)}, not "
             f"{self.schedule!r}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must be in [0, 1)")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        need(self.eps > 0, f"Adam's eps must be > 0, got {self.eps}")
        need(self.dtype in DTYPE_NAMES, f"TrainConfig.dtype must be one of {', '.join(DTYPE_NAMES)}, not "
             f"{self.dtype!r}")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.val_fraction is None or 0.0 <= self.val_fraction < 1.0,
             f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0, got {self.lora_rank}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        need(not (self.lora_rank and self.init == "scratch"),
             "LoRA adapts a pretrained model; with --init scratch train all weights (drop --lora-rank)")
        need(self.fsdp or not self.fsdp_cpu_offload, "--fsdp-cpu-offload offloads the shards of --fsdp: add --fsdp "
             "(under torchrun)")
        need(not (self.fsdp and self.dtype == "float16"), "--fsdp trains in float32 or bfloat16: float16's loss "
             "scaling is not supported on sharded gradients; use --dtype bfloat16")
        need(not (self.lora_rank and self.freeze), "--freeze and --lora-rank don't mix: LoRA already "
             "freezes every base weight")
        need(bool(self.lora_rank) or (self.lora_alpha is None and self.lora_dropout == 0.05
                                      and self.lora_targets == ["all"]),
             "--lora-alpha, --lora-dropout and --lora-targets shape LoRA adapters: add --lora-rank R (e.g. 8)")
        need(not (self.config and self.init == "pretrained"), f"--config {self.config} sets the architecture of "
             "a model trained from scratch; add --init scratch, or drop --config to fine-tune --model as it is")
        need(all(self.prompts), "a sample --prompt is empty; give it some text")
        for name in ("eval_every", "sample_every", "save_every"):
            v = getattr(self, name)
            need(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
        need(self.eval_batches is None or self.eval_batches >= 1, "--eval-batches must be >= 1")
        need(self.early_stop >= 0, "--early-stop must be >= 0")
        need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        need(self.sample_tokens >= 1, "--sample-tokens must be >= 1")
        need(bool(self.push_to_hub) or not self.push_private, "--push-private makes the --push-to-hub repository "
             "private: add --push-to-hub ORG/NAME")
        need(self.wandb or (self.wandb_project is None and self.wandb_run_name is None),
             "--wandb-project and --wandb-run-name name the Weights & Biases run: add --wandb")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise Gpt2kitError(f"unknown training option {unknown[0]!r} in the run's config.json")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not _has_type(value, hints[key]):
                raise Gpt2kitError(f"{key!r} in the run's config.json is {value!r}, which is not "
                                   f"{_type_name(hints[key])}; correct it (or delete the line to use the default)")
        return cls(**d)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _has_type(value: Any, hint: Any) -> bool:
    """A JSON value against a TrainConfig annotation (int | None, float, list[str], ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | interrupted
    step: int
    total_steps: int
    last_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    model_dir: Path | None  # best/ if validation chose one, else final/ (or the newest checkpoint)
    tokens_per_sec: float
    stopped_early: bool = False
    pushed: str | None = None  # the Hub repository's URL after --push-to-hub
    push_error: str | None = None  # why --push-to-hub failed (the run itself finished)


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates, samples and saves (steps between; 0: never) and how many validation batches
    one evaluation scores."""
    eval_every: int
    sample_every: int
    save_every: int
    eval_batches: int


def default_cadence(total_steps: int, *, has_val: bool, batch_size: int, block_size: int, grad_accum: int = 1,
                    world: int = 1, eval_every: int | None = None, sample_every: int | None = None,
                    save_every: int | None = None, eval_batches: int | None = None) -> Cadence:
    """The evaluation, sample and checkpoint cadence of a run of `total_steps`, for the values not given
    (given ones win), chosen so that they cost a small share of the training whatever its length:
    - 10 report points per run, or one per 20 steps in a run under 200 steps (at least 2): evaluation
      there (and at step 0);
    - samples at every second point (and at step 0 and the end), as decoding one token at a time is slow;
    - a checkpoint at every point, the interval at most 1000 steps (and always at the end);
    - an evaluation scores about 32K tokens (at most 50 batches), fewer when the run is short: all
      evaluations together score at most 0.3x the tokens trained on, about 10% of the training's compute
      (a forward pass alone costs about a third of a training step)."""
    interval = math.ceil(total_steps / min(10, max(2, total_steps // 20)))
    ev = (interval if eval_every is None else eval_every) if has_val else 0
    sample = 2 * (ev or interval) if sample_every is None else sample_every
    save = min(1000, interval) if save_every is None else save_every
    if eval_batches is None:
        n_evals = 1 + (math.ceil(total_steps / ev) if ev else 0)  # step 0, every ev steps, and the last step
        budget = int(0.3 * total_steps * grad_accum * world / n_evals)  # in batches of batch_size sequences
        eval_batches = max(1, min(50, 32768 // (batch_size * block_size), budget))
    return Cadence(eval_every=ev, sample_every=sample, save_every=save, eval_batches=eval_batches)
