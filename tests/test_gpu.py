"""Training paths on a CUDA GPU (skipped without one; bench/gpu_check.sh runs them on a GPU machine): an
interrupted run resumed there ends like an uninterrupted one, in float32 and in bf16 autocast."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.runs import read_metrics
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import TrainConfig, finetune, resume
from tests.conftest import JOKES, VOCAB_DIR, ctrl_c_in_the_first_step, random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_interrupted_and_resumed_on_a_gpu_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, dtype):
    model = tmp_path / "model"
    save_model(random_model(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128), seed=1),
               Tokenizer.from_dir(VOCAB_DIR), model)
    cfg = TrainConfig(model=str(model), data=[str(JOKES)], column="Joke", out=str(tmp_path / "a"), steps=6,
                      batch_size=4, block_size=32, eval_batches=2, eval_every=3, save_every=2, sample_every=0,
                      tensorboard=False, device="cuda", dtype=dtype)
    assert finetune(cfg, progress=False).status == "finished"
    ctrl_c_in_the_first_step(monkeypatch)
    assert finetune(replace(cfg, out=str(tmp_path / "b")), progress=False).status == "interrupted"
    monkeypatch.undo()
    assert resume(tmp_path / "b", progress=False).status == "finished"  # the trainer state read onto the GPU

    def history(run):
        recs = read_metrics(run)
        return [(r["step"], r["loss"]) for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]
    (ta, va), (tb, vb) = history(tmp_path / "a"), history(tmp_path / "b")
    assert [s for s, _ in ta] == [s for s, _ in tb] == list(range(1, 7))
    # some CUDA kernels (atomic adds in backward passes) need not repeat bit for bit: equal to rounding
    assert [x for _, x in tb] == pytest.approx([x for _, x in ta], rel=1e-4)
    assert vb == pytest.approx(va, rel=1e-4)
    wa, wb = (load_file(str(tmp_path / run / "final/model.safetensors")) for run in "ab")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
