"""Shared fixtures: the real GPT-2 vocabulary from ../shared/data and small random models."""

from __future__ import annotations

import os

# The suite tests the CPU paths, which is what `--device auto` means on a machine without a GPU; on one with
# a GPU, auto would pick it and change dtypes and devices under the tests. So GPUs are hidden (before torch
# looks for them; subprocesses inherit it) unless GPT2KIT_TEST_GPU=1 asks for the GPU tests (test_gpu.py,
# test_cuda_graphs.py; bench/gpu_check.sh runs them so).
if os.environ.get("GPT2KIT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import platform
import shutil
from pathlib import Path

import pytest
import torch

from gpt2kit import kernels
from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer

# One thread per test process: tests run beside server and DDP subprocesses, and with two threads a busy
# core stalls every parallel region of a small model (seen: 40x slower tiny-model generation).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOCAB_DIR = SHARED / "gpt2-vocab"
TF_TINY = SHARED / "tf-gpt2-tiny"
JOKES = SHARED / "datasets" / "onelinefun.csv"
SHAKESPEARE = SHARED / "datasets" / "tinyshakespeare.txt"


def random_model(config: GPTConfig, seed: int = 0, std: float = 0.02) -> GPT:
    """A GPT with random weights. A wide `std` spreads the logits so that argmax margins sit far above
    float32 noise, which makes greedy-token parity a meaningful test."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def padded_vocab_model() -> GPT:
    """A model whose vocabulary is padded past the GPT-2 tokenizer's (50257 -> 50304, as checkpoints padded
    for speed are), with the pad ids, which have no text, by far the likeliest next tokens."""
    model = random_model(GPTConfig(vocab_size=50304, n_layer=2, n_head=4, n_embd=64, n_positions=128), std=0.2)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(0.01)
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[50257:] = 10.0
    return model


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(VOCAB_DIR)


@pytest.fixture(scope="session")
def tiny_config() -> GPTConfig:
    return GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    save_model(random_model(tiny_config, std=0.2), tokenizer, out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A small default-initialised model (as the server tests use)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny"))


# On the machines this project targets (x86-64 with AVX2 and g++) the CPU kernels must build: a broken
# build would otherwise go unnoticed behind the fallback.
CAN_BUILD = (platform.machine() in ("x86_64", "AMD64") and shutil.which("c++") is not None
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.fixture(scope="module")
def ext():
    """The compiled CPU kernels' extension (built if need be); the test is skipped where they cannot be had."""
    e = kernels.load(build=True)
    if e is None and os.environ.get("GPT2KIT_CPU_KERNELS") == "0":
        pytest.skip("kernels turned off by GPT2KIT_CPU_KERNELS=0")
    if e is None:
        assert not CAN_BUILD, f"the kernel should build here: {kernels.failure()}"
        pytest.skip(f"kernel unavailable: {kernels.failure()}")
    return e


def ctrl_c_in_the_first_step(monkeypatch) -> None:
    """Make the next training run behave as if Ctrl-C came during its first step (monkeypatch.undo() ends it)."""
    from gpt2kit import train
    real_enter = train._Interrupt.__enter__

    def enter(self):
        real_enter(self)
        self.flag = True
        return self
    monkeypatch.setattr(train._Interrupt, "__enter__", enter)

