"""Tensor files every format shares: safetensors written with the process's file mode, and the check that
weights read from any file are finite."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt2kit.errors import Gpt2kitError


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file to `path` through `path`.tmp, renamed when complete. safetensors writes through
    a temporary file of its own, created owner-only (0600): the file is given the mode every other file
    gets (0666 less the umask), so the weights are as readable as the config beside them."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(path)


def require_finite(sd: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights holding NaN or infinity (a run that diverged, a damaged file): such a model only
    produces garbage ("!!!!!", since every logit is NaN), so it is named here, where it is read."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise Gpt2kitError(f"{source} holds NaN or infinite weights ({k}), so the model cannot give "
                               "meaningful output; use an earlier checkpoint of the run that wrote it")
