"""Data-parallel training under torchrun: the process group, this process's device, and sharing one
outcome between processes."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt2kit import memory
from gpt2kit.checkpoints import pick_device
from gpt2kit.errors import Gpt2kitError
from gpt2kit.train.config import TrainConfig
from gpt2kit.train.fsdp import check_launch


def _peer_failed(e: BaseException) -> bool:
    """A collective call failed because another process of the job went away (gloo's and NCCL's words)."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe",
        "remote process exited or there was a network error"))


def _out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory error, the CPU allocator's (a plain RuntimeError), or numpy's MemoryError."""
    return memory.is_out_of_memory(e)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def agree(self, fn: Callable[[], Any] | None) -> Any:
        """Run `fn` in this process (None: nothing) and share the outcome with every process: when it
        failed anywhere, it fails everywhere with the same one-line error, instead of leaving the others
        waiting at their next collective call (a gloo traceback, or an NCCL hang). Every process must call
        this at the same point; use it around work only some processes do (writing files)."""
        err: Exception | None = None
        result = None
        try:
            result = fn() if fn is not None else None
        except Exception as e:  # noqa: BLE001 - shared below, then raised again
            err = e
        if self.initialized:
            msgs: list[str | None] = [None] * self.world
            dist.all_gather_object(msgs, None if err is None else _one_line(err, self.rank))
            first = next((m for m in msgs if m is not None), None)
            if err is None and first is not None:
                raise Gpt2kitError(first)
        if err is not None:
            raise err
        return result

    def check_shared_dir(self, path: Path) -> None:
        """Every process must see the run directory the main process writes (its checkpoints are what
        --resume loads on every process, its data caches what each one reads): on several machines it has
        to be on a filesystem they share. The main process leaves a random token in it; a process that
        cannot read the same token back stops the job, on every process, with one line naming its host."""
        if not self.initialized:
            return
        probe = path / ".shared-check"
        token = [secrets.token_hex(8) if self.main else None]
        dist.broadcast_object_list(token, src=0)
        self.agree((lambda: probe.write_text(token[0])) if self.main else None)

        def read() -> None:
            try:
                seen = probe.read_text()
            except OSError:
                seen = None
            if seen != token[0]:
                raise Gpt2kitError(
                    f"process {self.rank} (host {socket.gethostname()}) does not see the run directory {path} that "
                    "process 0 writes: with several machines, --out (and --resume's run) must be on a filesystem "
                    "every node shares (NFS, Lustre, ...), at the same path")
        try:
            self.agree(None if self.main else read)
        finally:
            self.agree((lambda: probe.unlink(missing_ok=True)) if self.main else None)

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.initialized:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.initialized:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def _one_line(e: Exception, rank: int) -> str:
    if isinstance(e, Gpt2kitError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"process {rank}: {e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return f"process {rank} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _init_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device, str]:
    """Process group (under torchrun) and this process's device, plus a sentence saying why."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_launch(cfg.fsdp)
    if world <= 1 and not cfg.fsdp:  # (--fsdp shards over a process group, one process's too)
        dev = pick_device(cfg.device)
        return _Dist(), dev, _device_reason(cfg.device, dev)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device in ("auto", None):
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = pick_device(cfg.device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    reason = (f"{_device_reason(cfg.device, dev)}; {world} process{'es' if world > 1 else ''}, {backend}"
              + (", FSDP" + (" with CPU offload" if cfg.fsdp_cpu_offload else "") if cfg.fsdp else ""))
    return _Dist(rank, world, local, True), dev, reason


def _device_reason(asked: str | None, dev: torch.device) -> str:
    if asked not in (None, "auto"):
        return f"{dev} (as asked)"
    if dev.type == "cpu":
        return "cpu (no CUDA GPU or Apple MPS found; training on CPU is slow for large models)"
    return f"{dev} (found)"
