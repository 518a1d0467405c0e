"""Which device and dtype to run on: the --device and --dtype options, checked against this machine."""

from __future__ import annotations

import torch

from gpt2kit.errors import Gpt2kitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks cuda, then mps, then cpu. Otherwise only the devices gpt2kit runs on (cpu, cuda,
    cuda:N, mps), each checked to exist here: torch accepts more names ('meta', 'xpu', ...) that would
    fail later, deep inside loading."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    usage = "use cpu, cuda, cuda:N, mps or auto"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Gpt2kitError(f"unknown device {str(device)!r}: {usage}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise Gpt2kitError(f"device {str(device)!r} is not supported by gpt2kit: {usage}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise Gpt2kitError(f"device {str(device)!r} does not exist: use cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Gpt2kitError(f"--device {device} asked for, but this torch build sees no CUDA GPU; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise Gpt2kitError(f"--device {device} asked for, but only {n} CUDA GPU(s) are visible "
                               f"(cuda:0 to cuda:{n - 1}); pick one of those or use --device cpu")
    if dev.type == "mps":
        if not _mps_available():
            raise Gpt2kitError(f"--device {device} asked for, but MPS is not available here; use --device cpu")
        if dev.index not in (None, 0):
            raise Gpt2kitError(f"device {str(device)!r} does not exist: use mps")
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise Gpt2kitError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return DTYPES[dtype]
