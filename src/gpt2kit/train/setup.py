"""Setting up a run, as functions of what they need: the model to train (`build_model`), the data
(`prepare_run_data`, `make_batchers`), the configuration with every automatic value resolved
(`resolve_config`), and the checks made before anything is written (`check_paths`, `check_sharing`,
`memory_warning`)."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2kit import checkpoints, lora, memory, push, runs, tracking
from gpt2kit.checkpoints import pick_dtype, read_checkpoint, resolve_model_dir, vocab_dir
from gpt2kit.config import GPTConfig
from gpt2kit.data import Batcher, TokenCache, TooLittleData, cache_identity, plural, prepare_data
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import GenerationConfig, Generator
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer, find_vocab_files
from gpt2kit.train.config import DEFAULT_PROMPTS, TrainConfig, default_cadence
from gpt2kit.train.distributed import _Dist
from gpt2kit.train.estimate import run_estimate
from gpt2kit.train.fsdp import is_sharded_checkpoint
from gpt2kit.train.rundir import STAGING
from gpt2kit.train.trainer import freeze, set_dropout

_EVAL_TOKENS = 32768  # validation targets an evaluation scores by default


def memory_warning(config: GPTConfig, cfg: TrainConfig, block: int, device: torch.device, world: int) -> str | None:
    """train/estimate.py's peak-memory estimate of one process, to warn before the OS kills the process (CPU)
    or CUDA runs out; a run that needs more than the device's whole memory is refused (a Gpt2kitError) before
    it starts. With CPU offload on a GPU, the weights and optimizer state are in host RAM, not counted here."""
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32" if device.type == "cpu" else "bfloat16"
    need = run_estimate(cfg, config, block, world, dtype, fused_head=device.type == "cpu" and not cfg.compile).total
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    elif device.type == "cpu":
        free, total = _available_ram(), memory.meminfo("MemTotal")
        if free is None:
            return None
    else:
        return None
    if total is not None and need > total:  # cannot fit even with everything else freed
        raise Gpt2kitError(f"--batch-size {cfg.batch_size} x --block-size {block} needs roughly {memory.gib(need)}, "
                           f"more than the {memory.gib(total)} of memory on {device.type}; lower --batch-size (raise "
                           "--grad-accum to keep the batch), add --grad-checkpointing, or use --lora-rank 8")
    if need > 0.9 * free:
        return (f"this run needs roughly {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free on "
                f"{device.type}; if it runs out, lower --batch-size (raise --grad-accum to keep the batch), "
                "add --grad-checkpointing, or use --lora-rank 8")
    return None


def _available_ram() -> int | None:
    return memory.meminfo("MemAvailable")


def sample_texts(model: GPT, tok: Tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int,
                  temperature: float = 0.8, top_k: int = 40) -> list[str]:
    """One completion per prompt (prompt included), seeded, without touching global random state."""
    was_training = model.training
    model.eval()
    try:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        outs = Generator(model, tok).generate(list(prompts), cfg)
    finally:
        model.clear_caches()
        model.train(was_training)
    return [(o.prompt if o.prompt != "<|endoftext|>" else "") + o.text for o in outs]


def check_sharing(cfg: TrainConfig) -> None:
    """Before training, not after it: --wandb's package is installed, --push-to-hub names a repository and a
    token is there to push with."""
    if cfg.wandb:
        tracking.check_available(True)
    if cfg.push_to_hub:
        push.check_ready(cfg.push_to_hub)


def check_paths(cfg: TrainConfig) -> None:
    """Replacing a run in --out deletes its own entries before the new run reads its inputs: an input among
    them is refused before anything is deleted. So is a data folder holding --out, which would read the run's
    own files (tokenizer/merges.txt, samples/) as training text."""
    out = Path(cfg.out).expanduser().resolve()
    named = [("--model", cfg.model), ("--config", cfg.config), ("--tokenizer", cfg.tokenizer)]
    named += [("--data", d) for d in cfg.data] + [("--val-data", d) for d in cfg.val_data]
    for opt, value in named:
        if not value:
            continue
        path = Path(value).expanduser()
        found = [path] if path.exists() or not glob.has_magic(value) else \
            [Path(m) for m in glob.glob(os.path.expanduser(value), recursive=True)]
        for p in (f.resolve() for f in found if f.exists()):
            if p == out or (out in p.parents and p.relative_to(out).parts[0] in runs.RUN_ENTRIES):
                fix = "" if opt == "--model" else f"copy it out of {cfg.out} first, or "
                raise Gpt2kitError(f"{opt} {value} is inside --out {cfg.out}: a new run cannot replace the one it "
                                   f"{'starts from' if opt == '--model' else 'reads from'}; {fix}choose another --out")
            if (opt in ("--data", "--val-data") and p.is_dir() and p in out.parents
                    and not any(part.startswith(".") for part in out.relative_to(p).parts)):  # (hidden: skipped)
                raise Gpt2kitError(f"{opt} {value} holds --out {cfg.out}, whose own files (tokenizer, samples) would "
                                   "be read as training text; choose an --out outside it")


def load_model(cfg: TrainConfig, ckpt: Path | None, *, run_dir: Path, device: torch.device, resuming: bool,
               moved_base: bool) -> tuple[GPT, Tokenizer, str | None, str | None]:
    """fp32 master weights on the device: from the checkpoint, the pretrained model, or random. Also the
    directory the base weights came from and their fingerprint (LoRA runs record both in their adapters)."""
    # the run keeps its own copy of the vocabulary (checkpoints come and go; the base may move)
    own = run_dir / "tokenizer"
    own_tok = resuming and find_vocab_files(own) is not None
    full_ckpt = ckpt is not None and not cfg.lora_rank  # needs nothing from the base model
    needs_base = cfg.model and not (full_ckpt and (own_tok or cfg.tokenizer))
    base_dir = base_fp = None
    if needs_base and cfg.init == "pretrained" and not full_ckpt:
        src, expect = cfg.model, None
        if ckpt is not None:  # resuming a LoRA run: its adapters go on the weights they were trained on
            rec = lora.read_adapter_config(ckpt)
            if rec.base_model and not moved_base and (Path(rec.base_model).exists()
                                                           or Path(cfg.model).is_absolute()):
                src = rec.base_model
            expect = rec.base_fingerprint
        if resuming and not moved_base and Path(src).is_absolute() and not Path(src).exists():
            raise Gpt2kitError(f"cannot resume {run_dir}: the base model {src} of this LoRA run is gone; pass "
                               "--model WHERE_IT_IS_NOW with --resume (Python: resume(..., model=...))")
        # The base is read once, here, and base_dir names exactly what was read: a model directory, or for
        # a LoRA run with adapter checkpoints only, the adapter checkpoint merged onto its base (not the run,
        # whose newest adapter changes as it trains on). The fingerprint catches what a path cannot: weights
        # replaced under the same name (a run resumed, best/ rewritten).
        model, tok, base_fp, src_dir = checkpoints.open_base(
            src, device=device, dtype=torch.float32, tokenizer_dir=str(own) if own_tok else cfg.tokenizer,
            fingerprint=bool(cfg.lora_rank))
        if expect and base_fp != expect:
            raise Gpt2kitError(f"cannot resume {run_dir}: its adapters were trained on {src}, whose weights have "
                               f"changed since (fingerprint {base_fp}, recorded {expect}; the same weights saved "
                               "again in another form count as changed too); put those weights back, or start a "
                               "new run")
        base_dir = str(src_dir.resolve())
    else:
        base_dir = str(resolve_model_dir(cfg.model).resolve()) if needs_base else None
        # a single-file base (nanoGPT ckpt.pt, llm.c .bin) has its vocabulary beside it or uses GPT-2's
        tok_dir = str(own) if own_tok else cfg.tokenizer or (str(vocab_dir(Path(base_dir))) if base_dir else None)
        if tok_dir is None:
            raise Gpt2kitError("training from scratch needs a tokenizer: pass --tokenizer DIR (a directory "
                               "with vocab.json + merges.txt, e.g. a GPT-2 model directory)")
        if full_ckpt and is_sharded_checkpoint(ckpt):
            # an --fsdp checkpoint: the architecture here, the weights from its shards once the model is sharded
            # (fsdp.load_sharded)
            model, tok = GPT(GPTConfig.from_json_file(ckpt / "config.json")).to(device), Tokenizer.from_dir(tok_dir)
        elif full_ckpt:
            model, tok = checkpoints.load_model(ckpt, device=device, dtype=torch.float32, tokenizer_dir=tok_dir)
        else:
            if cfg.config and Path(cfg.config).is_file():
                gcfg = GPTConfig.from_json_file(cfg.config)
            elif cfg.config:
                gcfg = GPTConfig.from_name(cfg.config)
            elif Path(base_dir).is_file():
                gcfg = read_checkpoint(Path(base_dir))[0]
            else:
                gcfg = GPTConfig.from_json_file(Path(base_dir) / "config.json")
            tok = Tokenizer.from_dir(tok_dir)
            torch.manual_seed(cfg.seed)
            model = GPT(gcfg).to(device)
    if tok.vocab_size > model.config.vocab_size:
        raise Gpt2kitError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{model.config.vocab_size}; pass the model's own --tokenizer")
    model.train()
    set_dropout(model, cfg.dropout)
    return model, tok, base_dir, base_fp


def build_model(cfg: TrainConfig, ckpt: Path | None, *, run_dir: Path, device: torch.device, resuming: bool,
                moved_base: bool, say: Callable[[str], None]) -> tuple[GPT, Tokenizer, lora.LoraConfig | None]:
    """The model to train (LoRA adapters applied, --freeze done) and its tokenizer, plus the LoRA config."""
    model, tok, base_dir, base_fp = load_model(cfg, ckpt, run_dir=run_dir, device=device, resuming=resuming,
                                               moved_base=moved_base)
    lora_cfg = None
    if cfg.lora_rank:
        lora_cfg = lora.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   targets=cfg.lora_targets, base_model=base_dir, base_fingerprint=base_fp)
        torch.manual_seed(cfg.seed)
        lora.apply_lora(model, lora_cfg)
        if ckpt is not None and not is_sharded_checkpoint(ckpt):  # (an --fsdp checkpoint's: fsdp.load_sharded)
            lora.load_adapter_weights(model, ckpt)
    if cfg.freeze:
        frozen = freeze(model, cfg.freeze)
        say(f"frozen: {plural(len(frozen), 'parameter tensor')} ({', '.join(cfg.freeze)})")
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model, tok, lora_cfg


def prepare_run_data(cfg: TrainConfig, tok: Tokenizer, *, run_dir: Path, resuming: bool, dist: _Dist,
                     say: Callable[[str], None]) -> tuple[TokenCache, TokenCache | None, dict[str, Any]]:
    """The training and validation token caches (prepared by the main process, then opened by the others),
    and the run.json fields that record them (the main process's; the others get {})."""
    record: dict[str, Any] = {}
    info = runs.read_run_json(run_dir) if runs.is_run_dir(run_dir) else {}
    recorded = info.get("train_tokens"), info.get("val_tokens")
    if resuming and recorded[0] and Path(recorded[0]).is_file():
        # the caches this run trained on: the same tokens even if the raw files changed or moved
        train = TokenCache.open(recorded[0])
        val = TokenCache.open(recorded[1]) if recorded[1] and Path(recorded[1]).is_file() else None
        same_data(run_dir, info.get("data_ids") or {}, train, val)
        return train, val, record
    spec = cfg.data_spec()
    frac = cfg.val_fraction if cfg.val_fraction is not None else (0.0 if cfg.val_data else 0.05)
    if cfg.eval_every == 0 and not cfg.val_data and cfg.val_fraction is None:
        frac = 0.0

    # a new run stages its caches, so that the run it replaces stays whole until every check has passed
    cache_dir = run_dir / ("data" if resuming else STAGING)

    def prep():
        try:
            return prepare_data(cfg.data, tok, spec, val_data=cfg.val_data or None, val_fraction=frac,
                                seed=cfg.seed, cache_dir=cache_dir)
        except TooLittleData as e:
            if not (frac and cfg.val_fraction is None):  # the user asked for this split
                raise TooLittleData(e.n_tokens, "pass --val-data FILE, or --val-fraction 0") from None
            say(f"warning: the data has only {e.n_tokens} tokens, too few to hold out validation data; "
                     "training without validation (add --val-data FILE to validate)")
            return prepare_data(cfg.data, tok, spec, cache_dir=cache_dir)
    # the main process writes the caches (the others wait for its outcome, a data error included), then
    # the others open them
    first = dist.agree(prep if dist.main else None)
    second = dist.agree(None if dist.main else prep)
    train, val = first if dist.main else second
    checked = resuming and "data_ids" in info
    if checked:
        same_data(run_dir, info["data_ids"], train, val)
    if dist.main:  # (a resume that prepared the data again records where its caches now are)
        own, data = cache_dir.resolve(), (run_dir / "data").resolve()

        def where(c) -> str:  # where the cache is once RunDir.commit has moved the staged ones into RUN/data
            p = c.path.resolve()
            return str(data / p.relative_to(own)) if own in p.parents else str(p)
        paths = dict(train_tokens=where(train), val_tokens=where(val) if val is not None else None)
        # caches read in place (not the run's own copies in RUN/data) may be replaced under the same name
        ids = {k: cache_identity(c) for k, c in (("train", train), ("val", val))
               if c is not None and own not in c.path.resolve().parents}
        record.update(paths, **({} if checked else {"data_ids": ids}))
    return train, val, record


def same_data(run_dir: Path, recorded: dict[str, Any], train: TokenCache, val: TokenCache | None) -> None:
    """A resumed run trains on the tokens it started with: refused when a cache it read in place has changed."""
    for key, what, cache in (("train", "training", train), ("val", "validation", val)):
        then = recorded.get(key)
        if cache is None or not then:
            continue
        now = cache_identity(cache)
        if now != then:
            raise Gpt2kitError(f"cannot resume {run_dir}: its {what} data {cache.path} has changed since the "
                               f"run started ({then['tokens']:,} tokens then, {now['tokens']:,} now); put the "
                               "original back, or start a new run")


def check_block_size(cfg: TrainConfig, model: GPT) -> int:
    """The block size the run trains on (--block-size, default the model's context up to 1,024), refused when
    longer than the model's context; called before the data is read, so that a wrong flag fails at once."""
    ctx = model.config.n_positions
    block = cfg.block_size or min(ctx, 1024)
    if block > ctx:
        raise Gpt2kitError(f"--block-size {block} exceeds the model's context of {ctx} tokens: give at most {ctx}")
    return block


def resolve_config(cfg: TrainConfig, model: GPT, train: TokenCache, val: TokenCache | None, *, world: int,
                   device: torch.device, say: Callable[[str], None]) -> TrainConfig:
    """Fill every automatic value, so config.json records exactly what runs."""
    block = check_block_size(cfg, model)
    if not cfg.line_by_line and 2 <= len(train) < block + 1:  # (Batcher would shrink it; record it here)
        say(f"warning: the training data has only {len(train)} tokens, fewer than block size {block} + 1; "
                 f"using blocks of {len(train) - 1} (pass --block-size {len(train) - 1} or less, or add data, "
                 "to silence this)")
        block = len(train) - 1
    units = train.n_docs if cfg.line_by_line else len(train)
    per_step = cfg.batch_size * cfg.grad_accum * world * (1 if cfg.line_by_line else block)
    steps_per_epoch = max(1, math.ceil(units / per_step))
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    lr = cfg.lr or (1e-3 if cfg.lora_rank else 6e-4 if cfg.init == "scratch" else 1e-4)
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, total // 20)
    has_val = val is not None
    cadence = default_cadence(total, has_val=has_val, batch_size=cfg.batch_size, block_size=block,
                              grad_accum=cfg.grad_accum, world=world, eval_every=cfg.eval_every,
                              sample_every=cfg.sample_every, save_every=cfg.save_every,
                              eval_batches=cfg.eval_batches)
    tb = cfg.tensorboard
    if tb is None:
        tb = importlib.util.find_spec("tensorboard") is not None
    def absolute(p: str | None) -> str | None:  # so that --resume works from any directory
        return str(Path(p).resolve()) if p and Path(p).exists() else p
    eval_batches = cadence.eval_batches
    if cfg.eval_batches is None and cfg.line_by_line and val is not None:
        # validation covers what the run says it has: every document while they hold ~32K target tokens
        # (which short documents spread over many more padded batches than windows of the stream), else an
        # even spread of them; the run's notes say how much each evaluation scores
        targets = np.maximum(np.minimum(np.diff(val.doc_offsets), block + 1) - 1, 0)
        docs = min(val.n_docs, math.ceil(val.n_docs * _EVAL_TOKENS / max(1, int(targets.sum()))))
        per_batch = cfg.batch_size * world
        eval_batches = world * max(1, math.ceil(docs / per_batch))  # (divisible by the world)
    dtype = str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")  # "auto" as chosen on this device
    return replace(cfg, dtype=dtype, eval_batches=eval_batches, model=absolute(cfg.model),
                   tokenizer=absolute(cfg.tokenizer),
                   config=absolute(cfg.config), data=[absolute(d) for d in cfg.data],
                   val_data=[absolute(d) for d in cfg.val_data], block_size=block, steps=total, lr=lr,
                   warmup_steps=warm, eval_every=cadence.eval_every,
                   sample_every=cadence.sample_every, save_every=cadence.save_every, tensorboard=tb,
                   prompts=list(cfg.prompts) or list(DEFAULT_PROMPTS),
                   val_fraction=cfg.val_fraction if cfg.val_fraction is not None else
                   (0.0 if cfg.val_data or not has_val else 0.05),
                   epochs=cfg.epochs if cfg.steps is None else None)


def make_batchers(cfg: TrainConfig, train: TokenCache, val: TokenCache | None, tok: Tokenizer, *, dist: _Dist,
                  device: torch.device, say: Callable[[str], None]) -> tuple[Batcher, Batcher | None]:
    """The training batches and, with validation data, the validation ones; warns about data the run cannot
    use as asked."""
    kw = dict(seed=cfg.seed, line_by_line=cfg.line_by_line, rank=dist.rank, world_size=dist.world,
              device=device, eot_token=tok.eot_token)
    batcher = Batcher(train, cfg.block_size, cfg.batch_size, **kw)
    val_batcher = None
    if val is not None:
        val_block = cfg.block_size
        if not cfg.line_by_line and 2 <= len(val) < val_block + 1:  # what Batcher would do, said plainly
            val_block = len(val) - 1
            say(f"warning: the validation data has only {len(val)} tokens; validating on blocks of {val_block}")
        val_batcher = Batcher(val, val_block, cfg.batch_size, **kw)
    if cfg.line_by_line:
        lengths = np.diff(train.doc_offsets)  # (n_docs,), each with its closing <|endoftext|>
        long = lengths > cfg.block_size + 1
        if long.any():
            unused = int((lengths[long] - (cfg.block_size + 1)).sum())
            say(f"warning: --line-by-line: {int(long.sum()):,} of {len(lengths):,} documents are longer than "
                f"block size {cfg.block_size} + 1 tokens and are cut to it ({unused / len(train):.0%} of "
                "the training tokens unused); raise --block-size, or drop --line-by-line to train on "
                "windows of the whole text")
    return batcher, val_batcher
