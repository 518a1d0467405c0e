"""What a training setup needs per device, before anything is loaded: `estimate_memory` counts the bytes of
the weights, gradients, AdamW state and activations of one process from the model's architecture alone
(`gpt2kit finetune --estimate-memory`; the table in docs/finetuning.md). Free of torch.

The counts follow what PyTorch keeps (tests/test_memory_estimate.py measures them on a real step):
- weights float32 (under autocast too: mixed precision keeps float32 master weights, and autocast's cache
  holds a bfloat16/float16 copy of every matrix for the step); gradients float32 for the trainable
  parameters only (LoRA's adapters, what --freeze leaves); AdamW's two moments float32, likewise;
- DDP adds its gradient buckets, a second float32 copy of the trainable gradients;
- FSDP (`fully_shard`) over W processes keeps 1/W of weights, gradients and moments, and gathers whole
  units while computing: the root (embeddings, ln_f) and one block plus the one prefetched, with one
  unit's float32 gradient before it is reduce-scattered; with CPU offload the shards and the optimizer
  step live in host RAM and the device holds only the gathered units and the activations;
- activations: what autograd saves per block (16 values per token and channel: the block input, two layer
  norm outputs, q/k/v, the attention output, the residual, the MLP's two 4x-wide tensors; float32 4 bytes
  each, under autocast 36 bytes in all, bf16 FSDP 2 bytes each), the attention's log-sum-exp and layer norm
  statistics; with gradient checkpointing only each block's input plus one block being recomputed; the head:
  ln_f and the log-softmax over the vocabulary (float32), and while the loss is differentiated two more
  vocabulary-wide float32 tensors (none with the CPU's fused head, which works in chunks).
Not counted: the CUDA context and allocator slack (~0.5-1 GiB on a GPU), dropout masks (dropout is 0 by
default), the evaluation and sampling passes (smaller than a training step's)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpt2kit.config import PRESETS, GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import CONFIG_JSON, run_model_dir
from gpt2kit.train.config import TrainConfig, frozen_names

STRATEGIES = ("ddp", "fsdp", "fsdp-offload")
# LoRA's target projections (gpt2kit.lora's ALL_TARGETS and aliases, which need torch to import)
_LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LORA_ALIASES = {"all": _LORA_TARGETS, "attn": _LORA_TARGETS[:2], "mlp": _LORA_TARGETS[2:],
                 "c_proj": ("attn.c_proj", "mlp.c_proj")}
_LOW = {"bfloat16": 2, "float16": 2}  # autocast's compute dtypes


def parameter_shapes(config: GPTConfig, lora_rank: int = 0,
                     lora_targets: Sequence[str] = ("all",)) -> dict[str, tuple[int, ...]]:
    """A GPT's parameters by name, as `GPT(config).named_parameters()` lists them (the LM head is tied to
    wte, so it is not listed), plus LoRA's lora_A (rank, in) and lora_B (out, rank) on the targets."""
    C, F, V, P = config.n_embd, config.n_inner, config.vocab_size, config.n_positions
    linear = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}
    targets = {t for name in lora_targets for t in _LORA_ALIASES.get(name, (name,))}
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[h + ln + ".weight"] = shapes[h + ln + ".bias"] = (C,)
        for name, (n_in, n_out) in linear.items():
            shapes[h + name + ".weight"], shapes[h + name + ".bias"] = (n_out, n_in), (n_out,)
            if lora_rank and name in targets:
                shapes[h + name + ".lora_A"], shapes[h + name + ".lora_B"] = (lora_rank, n_in), (n_out, lora_rank)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs on its device (and, with CPU offload, in host RAM), by what holds them."""
    parameters: int  # how many the model has (a count, not bytes)
    trainable: int  # of which trainable
    weights: int
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq
    buffers: int  # DDP's gradient buckets; autocast's low-precision copies of the matrices; FSDP's gathered units
    activations: int  # what autograd saves for backward at its peak (end of the forward pass)
    transient: int  # the loss's vocabulary-wide gradients while backward starts
    host: int = 0  # host RAM per process (FSDP CPU offload: shards, gradients, optimizer state)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations + self.transient

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                ("buffers", self.buffers), ("activations", self.activations), ("loss gradients", self.transient)]
        lines = [f"  {name:<16}{_gib(b):>12}" for name, b in rows]
        lines.append(f"  {'total':<16}{_gib(self.total):>12}")
        if self.host:
            lines.append(f"  {'host RAM':<16}{_gib(self.host):>12}  (per process: shards, gradients, AdamW)")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def estimate_memory(config: GPTConfig, *, batch_size: int, block_size: int, dtype: str = "float32",
                    grad_checkpointing: bool = False, strategy: str = "ddp", world: int = 1,
                    lora_rank: int = 0, lora_targets: Sequence[str] = ("all",), freeze: Sequence[str] = (),
                    fused_head: bool = False) -> MemoryEstimate:
    """Peak bytes of one training process: micro-batch `batch_size` x `block_size` tokens, `dtype` float32
    or autocast's bfloat16/float16 (float32 master weights), `strategy` ddp (every process holds everything;
    world 1 is a single process), fsdp or fsdp-offload over `world` processes. `fused_head`: the LM head and
    loss in chunks (what CPU training runs), so no vocabulary-wide tensor is kept."""
    if strategy not in STRATEGIES:
        raise Gpt2kitError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if world < 1 or batch_size < 1 or block_size < 1:
        raise Gpt2kitError("world size, batch size and block size must be >= 1")
    shapes = parameter_shapes(config, lora_rank, lora_targets)
    frozen = frozen_names(list(shapes), freeze, config.n_layer) if freeze else set()
    if lora_rank:  # LoRA trains its adapters only
        frozen = {n for n in shapes if not n.endswith((".lora_A", ".lora_B"))}
    n_all = sum(_numel(s) for s in shapes.values())
    n_train = sum(_numel(s) for n, s in shapes.items() if n not in frozen)
    block = sum(_numel(s) for n, s in shapes.items() if n.startswith("transformer.h.0."))
    root = n_all - config.n_layer * block  # wte (also the LM head), wpe, ln_f
    # what autocast casts (wte as the LM head): with gradient checkpointing a block's copies live only while
    # it is computed, as its other activations
    head_matrix = config.vocab_size * config.n_embd
    block_matrices = sum(_numel(s) for n, s in shapes.items() if n.startswith("transformer.h.0.")
                         and n.endswith(".weight") and len(s) == 2)
    matrices = head_matrix + block_matrices * (1 if grad_checkpointing else config.n_layer)

    low = _LOW.get(dtype)
    sharded = strategy != "ddp"
    W = world if sharded else 1
    weights, grads, moments = 4 * n_all // W, 4 * n_train // W, 8 * n_train // W
    host = 0
    notes = []
    if strategy == "ddp":
        buffers = 4 * n_train if world > 1 else 0  # the reducer's buckets
        if low:
            buffers += low * matrices
    else:
        pb = low or 4  # FSDP's MixedPrecisionPolicy gathers the weights in the compute dtype
        buffers = (root + 2 * block) * pb + 4 * max(root, block)
        if strategy == "fsdp-offload":
            host, weights, grads, moments = weights + grads + moments, 0, 0, 0
            notes.append("host RAM holds each process's shard of weights, gradients and AdamW state")

    B, T, C, V, L = batch_size, block_size, config.n_embd, config.vocab_size, config.n_layer
    tokens = B * T
    if sharded and low:
        per_value = 2 * 16  # every saved tensor in the compute dtype
    elif low:
        per_value = 36  # the residual stream (block input, after attention) float32, the rest low
    else:
        per_value = 4 * 16
    stats = 4 * tokens * (4 + config.n_head)  # two layer norms' mean and rstd, attention's log-sum-exp
    layer = tokens * C * per_value + stats
    # ln_f's input and output; ids, targets and positions (int64)
    head = tokens * C * (4 + (low or 4)) + 8 * tokens + 16 * tokens + 8 * T
    if not fused_head:
        head += 4 * tokens * V  # the log-softmax cross-entropy saves (float32)
    if grad_checkpointing:
        acts = L * tokens * C * 4 + layer + head  # each block's input, and one block recomputed
    else:
        acts = L * layer + head
    transient = 0 if fused_head else 2 * 4 * tokens * V
    return MemoryEstimate(parameters=n_all, trainable=n_train, weights=weights, gradients=grads,
                          optimizer=moments, buffers=buffers, activations=acts, transient=transient, host=host,
                          notes=tuple(notes))


def model_config(cfg: TrainConfig) -> tuple[GPTConfig, str]:
    """The architecture a run would train, and its name, from a preset name or a config.json: no weights are
    read and nothing is downloaded."""
    ref = cfg.config if cfg.init == "scratch" and cfg.config else cfg.model
    if not ref:
        raise Gpt2kitError("--estimate-memory needs the model: --model NAME_OR_DIR, or --init scratch --config NAME")
    if ref in PRESETS:
        return GPTConfig.from_name(ref), ref
    path = Path(ref).expanduser()
    if path.is_file():
        return GPTConfig.from_json_file(path), ref
    if path.is_dir():
        found = run_model_dir(path) or path
        if (found / "config.json").is_file():
            return GPTConfig.from_json_file(found / "config.json"), ref
    raise Gpt2kitError(f"--estimate-memory reads the model's architecture from a name ({', '.join(PRESETS)}) or a "
                       f"directory with config.json; {ref} is neither (a Hub name: download it first with "
                       "`gpt2kit download`)")


def run_config(run_dir: str | Path) -> TrainConfig:
    """The settings of an existing run (its config.json), for estimating its --resume."""
    path = Path(run_dir) / CONFIG_JSON
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Gpt2kitError(f"cannot read {path} ({e}); is {run_dir} a run directory?") from None
    if not isinstance(d, dict):
        raise Gpt2kitError(f"{path} does not hold a JSON object")
    return TrainConfig.from_dict(d)


def run_strategy(cfg: TrainConfig) -> str:
    """estimate_memory's strategy for a run's settings."""
    return "fsdp-offload" if cfg.fsdp_cpu_offload else "fsdp" if cfg.fsdp else "ddp"


def run_estimate(cfg: TrainConfig, config: GPTConfig, block: int, world: int, dtype: str,
                 fused_head: bool) -> MemoryEstimate:
    """estimate_memory for the run `cfg` of the architecture `config` over `world` processes, `dtype` the
    precision it trains in (float32, or bfloat16/float16 autocast)."""
    return estimate_memory(config, batch_size=cfg.batch_size, block_size=block, dtype=dtype,
                           grad_checkpointing=cfg.grad_checkpointing, strategy=run_strategy(cfg), world=world,
                           lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, freeze=cfg.freeze,
                           fused_head=fused_head)


def describe(cfg: TrainConfig, world: int) -> str:
    """`gpt2kit finetune --estimate-memory`'s report for the run `cfg` over `world` processes (its settings
    are checked first; an estimate needs no data and no run directory)."""
    replace(cfg, data=cfg.data or ["-"], out=cfg.out or "-").validate()
    config, name = model_config(cfg)
    dtype = cfg.dtype
    assumed = ""
    if dtype == "auto":
        dtype = "float32" if cfg.device == "cpu" else "bfloat16"
        assumed = f" (--dtype auto, taken as {dtype}{'' if cfg.device == 'cpu' else ', a GPU with bfloat16'})"
    block = cfg.block_size or min(config.n_positions, 1024)
    est = run_estimate(cfg, config, block, world, dtype, fused_head=cfg.device == "cpu" and not cfg.compile)
    strategy = run_strategy(cfg)
    how = {"ddp": "DDP" if world > 1 else "one process", "fsdp": "FSDP", "fsdp-offload": "FSDP with CPU offload"}
    precision = "float32" if dtype == "float32" else f"{dtype} autocast"
    lines = [f"memory estimate for {name} ({est.parameters:,} parameters, {config.n_layer} layers; "
             f"{est.trainable:,} trainable), per process:",
             f"micro-batch {cfg.batch_size} x {block} tokens, {precision}{assumed}"
             f"{', gradient checkpointing' if cfg.grad_checkpointing else ''}, {how[strategy]}"
             f"{f', {world} processes' if world > 1 else ''}",
             est.table(),
             "buffers: autocast's low-precision copies of the matrices, DDP's gradient buckets, FSDP's gathered "
             "units; not counted: the CUDA context and allocator slack (about 0.5-1 GiB on a GPU)"]
    if world == 1:
        lines.append("for N processes: WORLD_SIZE=N gpt2kit finetune ... --estimate-memory (torchrun sets it)")
    return "\n".join(lines)
