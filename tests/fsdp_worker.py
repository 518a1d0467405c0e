"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): one --fsdp Trainer step in each
setting the test names, measured; rank 0 prints one JSON line of results."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from gpt2kit import lora
from gpt2kit.config import GPTConfig
from gpt2kit.train import precision
from gpt2kit.train.config import TrainConfig
from gpt2kit.train.fsdp import local_bytes
from gpt2kit.train.trainer import Trainer, freeze

sys.path.insert(0, sys.argv[1])  # the repository root, for tests.conftest
from tests.conftest import random_model  # noqa: E402

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


def step(model, **cfg) -> Trainer:
    trainer = Trainer(model, TrainConfig(model="m", data=["d"], lr=1e-2, **cfg), torch.device("cpu"), fsdp=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (2, 16), generator=g)
    trainer.forward_backward([(x, x)])
    trainer.optimizer_step(1e-2)
    return trainer


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main() -> None:
    dist.init_process_group("gloo")
    out: dict = {}

    # optimizer state: this process's shards against the whole of it (measured on an unsharded optimizer)
    plain = random_model(CONFIG, seed=1)
    ref = torch.optim.AdamW(plain.parameters())
    plain(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
    ref.step()
    model = random_model(CONFIG, seed=1)
    trainer = step(model)
    out["optimizer_bytes"] = local_bytes(trainer.optimizer.state_dict()["state"])
    out["unsharded_optimizer_bytes"] = local_bytes(ref.state_dict()["state"])
    out["tied"] = model.lm_head.weight is model.transformer.wte.weight

    # --freeze embeddings: frozen shards get no gradient and stay as they were
    model = random_model(CONFIG, seed=1)
    freeze(model, ["embeddings"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, grad_checkpointing=True)
    after = {n: full(p) for n, p in model.named_parameters()}
    out["freeze_wte_same"] = torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    out["freeze_blocks_moved"] = not torch.equal(before["transformer.h.0.attn.c_attn.weight"],
                                                 after["transformer.h.0.attn.c_attn.weight"])

    # LoRA with gradient checkpointing and bfloat16, then CPU offload
    for name, extra in (("lora", {"dtype": "bfloat16"}), ("offload", {"fsdp_cpu_offload": True})):
        model = random_model(CONFIG, seed=1)
        lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=["all"]))
        model.gradient_checkpointing = True
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = step(model, **extra)
        after = {n: full(p) for n, p in model.named_parameters()}
        out[f"{name}_base_same"] = torch.equal(before["transformer.h.0.mlp.c_fc.weight"],
                                               after["transformer.h.0.mlp.c_fc.weight"])
        out[f"{name}_adapter_moved"] = not torch.equal(before["transformer.h.0.mlp.c_fc.lora_B"],
                                                       after["transformer.h.0.mlp.c_fc.lora_B"])
        out[f"{name}_param_device"] = str(next(model.parameters()).to_local().device)
    # bfloat16 through torch.autocast (as on GPUs and CPUs with bfloat16 arithmetic; forced here): FSDP2 gathers
    # the weights in bfloat16 (MixedPrecisionPolicy), the shards and AdamW stay float32
    precision._native_cpu = lambda dtype: True
    model = random_model(CONFIG, seed=1)
    trainer = step(model, dtype="bfloat16")
    out["mp_mode"] = trainer.precision.mode
    out["mp_shard_dtypes"] = sorted({str(p.to_local().dtype) for p in model.parameters()})
    x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    seen: list = []
    hook = model.transformer.h[0].attn.c_attn.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    out["mp_loss"] = float(trainer.forward_backward([(x, x)]))
    hook.remove()
    out["mp_gathered_dtype"] = str(seen[0])
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
