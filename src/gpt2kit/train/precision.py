"""Mixed precision for training: torch.autocast where the hardware has the low-precision type, its
numerics emulated at float32 speed on CPUs without it (EmulatedAutocast), loss scaling for float16."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gpt2kit.checkpoints import pick_dtype


def _native_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU computes `dtype` matrix products in hardware (AVX512-BF16/AMX, AVX512-FP16)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


_ROUNDED_OPS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
                torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}


class EmulatedAutocast(TorchFunctionMode):
    """Autocast's numerics on CPUs without bfloat16/float16 arithmetic, at float32 speed.

    Autocast rounds the inputs of every matrix product (and attention) to the low-precision type,
    multiplies with float32 accumulation and rounds the result. Without AVX512-BF16/AMX, PyTorch runs
    those products on a slow fallback (20-60x slower than float32 on the benchmark machine). A product of
    two bfloat16 numbers is exact in float32, so rounding the inputs, multiplying in float32 and rounding
    the output gives the same values up to summation order. Gradients get the same roundings through the
    autograd of the casts. Active around forward and backward (so gradient-checkpoint recomputation is
    rounded too)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _r(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            return t.to(self.dtype).to(torch.float32)
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ROUNDED_OPS:
            return self._r(func(*[self._r(a) for a in args], **{k: self._r(v) for k, v in kwargs.items()}))
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            return self._r(func(self._r(q), self._r(k), self._r(v), *rest, **kwargs))
        return func(*args, **kwargs)


class Precision:
    """float32, or mixed precision with float32 master weights: torch.autocast where the hardware has
    the low-precision type, EmulatedAutocast on CPUs without it; float16 adds dynamic loss scaling."""

    def __init__(self, name: str, device: torch.device):
        self.dtype = pick_dtype(name, device)
        self.device = device
        if self.dtype == torch.float32:
            self.mode = "float32"
        elif device.type == "cpu" and not _native_cpu(self.dtype):
            self.mode = "emulated"
        else:
            self.mode = "autocast"
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self._emulating = False

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        if self.mode == "float32":
            return "float32"
        if self.mode == "emulated":
            return (f"{self.name} autocast numerics with float32 kernels (this CPU has no native {self.name} "
                    "arithmetic, where PyTorch's own would be far slower)")
        return f"{self.name} autocast" + (" with loss scaling" if self.scaler else "")

    def forward(self) -> contextlib.AbstractContextManager:
        """Around the forward pass."""
        if self.mode == "autocast":
            return torch.autocast(self.device.type, dtype=self.dtype)
        if self.mode == "emulated":
            return self._emulate()
        return contextlib.nullcontext()

    def backward(self) -> contextlib.AbstractContextManager:
        """Around forward and backward (autocast itself must not cover the backward pass)."""
        return self._emulate() if self.mode == "emulated" else contextlib.nullcontext()

    @contextlib.contextmanager
    def _emulate(self) -> Iterator[None]:
        if self._emulating:  # already inside: rounding twice is harmless but costs copies
            yield
            return
        self._emulating = True
        try:
            with EmulatedAutocast(self.dtype):
                yield
        finally:
            self._emulating = False
