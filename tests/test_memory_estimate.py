"""train/estimate.py against a real training step on the CPU: the weights', gradients' and AdamW state's bytes
counted tensor by tensor, and the activations as the exact bytes autograd saves for backward (every saved
tensor's storage, once, through torch.autograd.graph.saved_tensors_hooks). `gpt2kit finetune
--estimate-memory` prints the estimate and loads neither weights nor data."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.lora import LoraConfig, apply_lora
from gpt2kit.model import GPT
from gpt2kit.ops import GPTOps
from gpt2kit.train.config import TrainConfig
from gpt2kit.train.estimate import estimate_memory, parameter_shapes
from gpt2kit.train.trainer import Trainer, freeze

CFG = GPTConfig(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=1000)
# activations: what autograd saves is counted exactly; the estimate's model of it may miss small tensors
ACT_TOLERANCE = 0.02


def _saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None = None) -> int:
    """Bytes of the tensors autograd saves in a forward pass (each storage once, the parameters not)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(x, targets=y)
    loss.backward()
    return sum(seen.values())


def test_parameter_shapes_are_the_models():
    model = GPT(CFG)
    assert parameter_shapes(CFG) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(rank=4, targets=["attn", "mlp.c_fc"]))
    assert parameter_shapes(CFG, 4, ["attn", "mlp.c_fc"]) == {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("setup", ["full", "freeze", "lora"])
def test_weights_gradients_and_adamw_state_are_counted_exactly(setup):
    torch.manual_seed(0)
    model = GPT(CFG)
    kw = {}
    if setup == "freeze":
        freeze(model, ["embeddings,blocks:0"])
        kw = {"freeze": ["embeddings,blocks:0"]}
    elif setup == "lora":
        apply_lora(model, LoraConfig(rank=4))
        kw = {"lora_rank": 4}
    trainer = Trainer(model, TrainConfig(model="x", data=["x"], dtype="float32"), torch.device("cpu"))
    x = torch.randint(0, CFG.vocab_size, (2, 32))
    trainer.forward_backward([(x, x)])
    # the gradients as they are when the step reads them (optimizer_step frees them)
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    trainer.optimizer_step(1e-3)
    moments = sum(v.nbytes for st in trainer.optimizer.state.values() for k, v in st.items() if k != "step")
    est = estimate_memory(CFG, batch_size=2, block_size=32, **kw)
    assert est.weights == sum(p.nbytes for p in model.parameters())
    assert est.gradients == grads
    assert est.optimizer == moments
    assert est.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_are_what_autograd_saves(dtype, checkpointing):
    model = GPT(CFG, GPTOps())  # PyTorch's own ops: the unfused head, SDPA (what GPUs run)
    model.train()
    model.gradient_checkpointing = checkpointing
    B, T = 2, 64
    x, y = torch.randint(0, CFG.vocab_size, (B, T)), torch.randint(0, CFG.vocab_size, (B, T))
    low = dtype == "bfloat16"
    saved = _saved_bytes(model, x, y, torch.bfloat16 if low else None)
    est = estimate_memory(CFG, batch_size=B, block_size=T, dtype=dtype, grad_checkpointing=checkpointing)
    expected = est.activations + est.buffers  # (autocast's copies of the matrices are saved tensors too)
    if checkpointing:  # the block recomputed in backward is not saved in the forward pass
        one_block = estimate_memory(CFG, batch_size=B, block_size=T, dtype=dtype).activations - \
            estimate_memory(GPTConfig(**{**CFG.__dict__, "n_layer": 2}), batch_size=B, block_size=T,
                            dtype=dtype).activations
        matrices = sum(math.prod(s) for n, s in parameter_shapes(CFG).items()
                       if n.startswith("transformer.h.0.") and len(s) == 2)
        expected -= one_block + 2 * matrices * low  # (and autocast's copies of its matrices)
    assert saved == pytest.approx(expected, rel=ACT_TOLERANCE)


def test_sharding_divides_the_state_and_offload_moves_it_to_the_host():
    gpt2 = GPTConfig.from_name("gpt2")
    ddp = estimate_memory(gpt2, batch_size=4, block_size=1024, dtype="bfloat16", world=8)
    fsdp = estimate_memory(gpt2, batch_size=4, block_size=1024, dtype="bfloat16", strategy="fsdp", world=8)
    off = estimate_memory(gpt2, batch_size=4, block_size=1024, dtype="bfloat16", strategy="fsdp-offload", world=8)
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * ddp.parameters
    assert fsdp.weights + fsdp.gradients + fsdp.optimizer == 16 * fsdp.parameters // 8
    assert off.weights == off.gradients == off.optimizer == 0 and off.host == 16 * off.parameters // 8
    assert off.total < fsdp.total < ddp.total
    with pytest.raises(Gpt2kitError, match="strategy"):
        estimate_memory(gpt2, batch_size=1, block_size=8, strategy="zero3")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_estimate_memory_flag_prints_the_estimate_without_loading_anything(tmp_path):
    # a preset name: no download, no weights, no data needed
    r = _cli("--model", "gpt2-xl", "--estimate-memory", "--batch-size", "1", "--dtype", "bfloat16",
             "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "gpt2-xl" in r.stdout and "total" in r.stdout and "1,557,611,200 parameters" in r.stdout
    assert not (tmp_path / "run").exists()
    # under torchrun's environment it estimates for that many processes
    r = _cli("--model", "gpt2", "--estimate-memory", env={"WORLD_SIZE": "4"})
    assert r.returncode == 0 and "4 processes" in r.stdout, r.stderr
    # a model directory's config.json
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text(
        '{"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 100}')
    r = _cli("--model", str(tmp_path / "m"), "--estimate-memory")
    assert r.returncode == 0 and "2 layers" in r.stdout, r.stderr
    r = _cli("--model", str(tmp_path / "nowhere"), "--estimate-memory")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    # a run's own settings, for its --resume
    import json
    (tmp_path / "run").mkdir()
    cfg = TrainConfig(model="distilgpt2", data=["d.txt"], batch_size=2, block_size=128, dtype="float32")
    (tmp_path / "run/config.json").write_text(json.dumps(cfg.to_dict()))
    r = _cli("--resume", str(tmp_path / "run"), "--estimate-memory")
    assert r.returncode == 0 and "distilgpt2" in r.stdout and "2 x 128 tokens, float32" in r.stdout, r.stderr
    # the settings are checked as for a run
    r = _cli("--model", "gpt2", "--batch-size", "0", "--estimate-memory")
    assert r.returncode == 1 and "--batch-size must be >= 1" in r.stderr and "Traceback" not in r.stderr
