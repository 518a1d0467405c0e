"""How much memory a device has, and whether an exception means it ran out: for refusing a batch that
cannot fit before it is tried, and for a one-line error (naming the flag to lower) when one does not fit."""

from __future__ import annotations

import torch


def meminfo(key: str) -> int | None:
    """A /proc/meminfo value in bytes (e.g. "MemAvailable", "MemTotal"); None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on `device`: RAM for the CPU (MemAvailable, MemTotal), the GPU's own for CUDA; None
    where it is not known (MPS, a system without /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "cpu":
        free, total = meminfo("MemAvailable"), meminfo("MemTotal")
        return (free, total) if free is not None and total is not None else None
    return None


def is_out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory error, the CPU allocator's (a plain RuntimeError), or Python's / numpy's."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(e))


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"
