"""Fully sharded data parallel training with PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard): each process
holds 1/W of the weights, gradients and AdamW moments, sharded per transformer block; the checkpoints written
with torch.distributed.checkpoint (DCP), one shard file per process, readable by any number of processes; and
the whole model gathered for best/, final/ and samples."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gpt2kit import lora
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.train.precision import Precision

SHARDS = "sharded"  # a checkpoint's DCP folder (model + optimizer), beside trainer.pt and config.json


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or with its environment: RANK, WORLD_SIZE, MASTER_ADDR)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def check_launch(fsdp: bool) -> None:
    if fsdp and not under_torchrun():
        raise Gpt2kitError("--fsdp shards the model across the processes of a torchrun job; start it with "
                           "`torchrun --nproc_per_node N -m gpt2kit finetune ... --fsdp` (N = 1 for one GPU with "
                           "--fsdp-cpu-offload), or drop --fsdp")


def shard_model(model: GPT, precision: Precision, *, cpu_offload: bool = False) -> None:
    """fully_shard every transformer block, then the root, which holds the embeddings, ln_f and the LM head:
    wte and the LM head are one tied parameter, so they stay tied in one shard group. Parameters become DTensors
    sharded on dim 0; a block's weights are gathered just before its forward (and backward) and freed after.
    Frozen parameters (--freeze, LoRA's base weights) are sharded too and get no gradient."""
    kw: dict[str, Any] = {}
    if precision.mode == "autocast":
        # gather the weights in the low-precision type (half the traffic and the unsharded memory), reduce the
        # gradients in float32; autocast still keeps layer norms and the softmax in float32. (Emulated autocast,
        # on CPUs without bfloat16 arithmetic, rounds float32 weights itself.)
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=precision.device.type == "cuda")
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():  # (checkpoint loading may keep HF's transposed storage)
                p.data = p.data.contiguous()
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if model.lm_head.weight is not model.transformer.wte.weight:  # (FSDP2 keeps shared parameters shared)
        raise Gpt2kitError("internal error: sharding untied the LM head from wte")


def is_sharded_model(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded_checkpoint(ckpt: Path | None) -> bool:
    return ckpt is not None and (ckpt / SHARDS).is_dir()


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds of the tensors in a nested state (a DTensor counts its local shard only)."""
    if isinstance(tensors, DTensor):
        t = tensors.to_local()
        return t.numel() * t.element_size()
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(local_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(local_bytes(v) for v in tensors)
    return 0


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, out: Path) -> None:
    """Every process writes its shards of the weights and the optimizer state into `out` (collective)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.save(state, checkpoint_id=str(out))
    except CheckpointException as e:  # (a BaseException): as an error rundir.writing reports in one line
        raise RuntimeError((str(e).strip().splitlines() or ["DCP save failed"])[-1]) from None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Weights and optimizer state from checkpoint `ckpt`'s shards, resharded for this job's processes
    (collective)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    # DCP's loader logs each failed attempt's traceback on the root logger: quiet while it reads, since a
    # failure is reported below in one line
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        dcp.load(state, checkpoint_id=str(ckpt / SHARDS))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - (CheckpointException is a BaseException)
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise Gpt2kitError(f"cannot read the sharded checkpoint {ckpt / SHARDS} ({why}); it must come from an "
                           "--fsdp run of this model with the same trained parameters (--freeze, LoRA); delete "
                           f"{ckpt} to resume from the checkpoint before it") from None
    finally:
        root.setLevel(level)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def gathered_model(model: GPT, lora_cfg: lora.LoraConfig | None) -> GPT | None:
    """The whole model as a plain GPT on the CPU in the first process (None in the others): every process
    must call this (the weights are gathered from all of them)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # (cpu_offload=True hands the gathered weights to rank 0 only)
        return None
    with torch.device("meta"):
        plain = GPT(model.config)
        if lora_cfg is not None:
            lora.apply_lora(plain, lora_cfg)
    plain.load_state_dict(full, assign=True)
    plain.lm_head.weight = plain.transformer.wte.weight  # (assign gave the tied names two tensors)
    return plain.eval()
