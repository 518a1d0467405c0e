"""Run directories: what a fine-tuning run leaves on disk, and how to read it back.

    RUN/
      run.json               status (running/finished/interrupted/failed), step, best val loss, times
      config.json            the resolved TrainConfig (what `--resume RUN` restarts from)
      metrics.jsonl          one JSON object per line: train steps and evaluations
      samples/step-N.txt     samples from the fixed prompts
      loss.png               training and validation loss
      data/                  the raw inputs' token cache, the validation split's views of it
      checkpoints/step-N/    model (HF format; LoRA runs: the adapter) + trainer.pt
      best/                  the model with the lowest validation loss
      final/                 the model at the end of training
      .lock                  held (flock) by the process training the run, for as long as it lives

Every file is written to a temporary name and renamed, so a crash never leaves half a file; a checkpoint
directory is assembled under a temporary name and renamed last."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2kit import layout
from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import (  # noqa: F401  (also read from here)
    CHECKPOINTS,
    CONFIG_JSON,
    LOCK,
    METRICS,
    RUN_ENTRIES,
    RUN_JSON,
    is_adapter_dir,
    is_resumable,
    is_run_dir,
    run_model_dir,
)
from gpt2kit.run_numbers import run_number

try:
    import fcntl
except ImportError:  # (Windows)
    fcntl = None  # type: ignore[assignment]

RUN_FORMAT = "gpt2kit-run"
RUN_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


_SAMPLE = 1 << 16  # bytes in one sample of a large file
_WHOLE = 64 << 20  # files up to this size are hashed whole


def hash_file(h: Any, f: Path) -> None:
    """Name, size and content: the whole file up to 64 MiB, else one 64 KiB sample per MiB at evenly spaced
    offsets (at most 1024; ~30 ms for a cached 500 MB file), into the hashlib object `h`: the identity of a
    base model's weights (lora) and of the token caches a run reads in place (train). Training changes nearly
    every byte of each tensor it updates, and other data other bytes, so the samples differ; a copy of the
    file has the same ones."""
    size = f.stat().st_size
    h.update(f"{f.name}\0{size}\0".encode())
    with open(f, "rb") as fh:
        if size <= _WHOLE:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            return
        n = min(size >> 20, 1024)
        for i in range(n):
            fh.seek(i * (size - _SAMPLE) // (n - 1))
            h.update(fh.read(_SAMPLE))


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _is_run_entry(name: str) -> bool:
    if name in RUN_ENTRIES:
        return True
    # temporaries: .tmp-best, .old-final (directories), .run.json.123.tmp (files; see atomic_write_text)
    if name.startswith((".tmp-", ".old-")):
        return name[5:] in RUN_ENTRIES
    parts = name[1:].rsplit(".", 2)
    return name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and parts[0] in RUN_ENTRIES


def is_leftover(name: str) -> bool:
    """Whether a hidden entry is one gpt2kit leaves in a run directory that never became a run (a start
    killed before it trained): its lock file, or a temporary of a run entry (.tmp-data)."""
    return name == LOCK or (name.startswith(".") and _is_run_entry(name))


def remove_run(run_dir: str | Path, keep: Iterable[str] = ()) -> list[str]:
    """Delete what a run wrote into `run_dir` (the entries named in RUN_ENTRIES and their temporaries, except
    those named in `keep`) and nothing else: files a user put beside them stay, and so does the directory.
    Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for p in sorted(run_dir.iterdir()):
        if not _is_run_entry(p.name) or p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # (a file given as the run: --resume data.txt)
        raise Gpt2kitError(f"{run_dir} is not a gpt2kit run directory (no {RUN_JSON})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise Gpt2kitError(f"cannot read {path}: {e}") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise Gpt2kitError(f"{path} is not a gpt2kit run file")
    return info


def update_run_json(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Read-modify-write run.json (atomically); `updated` is stamped on every write."""
    path = Path(run_dir) / RUN_JSON
    info = read_run_json(run_dir) if path.is_file() else {"format": RUN_FORMAT, "version": RUN_VERSION}
    info.update(fields)
    info["updated"] = now()
    write_json(path, info)
    return info


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def process_stamp() -> dict[str, Any]:
    """Who trains the run, for information only: liveness is the run's lock (RunLock), not these."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


# ---- the run's lock ------------------------------------------------------------------------------

class RunInUse(Gpt2kitError):
    """Another process holds the run's lock."""


class RunLock:
    """An exclusive flock on RUN/.lock, held by the process that trains the run for its whole life. The OS
    drops it when that process ends in any way (kill -9 included), on any host or container and whatever its
    PID, so "is the run being trained?" is "is its lock held?", never a guess from a recorded host and PID.
    flock (not fcntl's POSIX locks, which a process shares among all its descriptors) so that a second
    lock from the same process conflicts too. The file holds the holder's PID and host, for messages only.
    `release` deletes the file; a process that locked a file that was deleted meanwhile locks it again."""

    def __init__(self, run_dir: str | Path, fd: int):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: str | Path, wait: float = 1.0) -> RunLock:
        """Lock `run_dir` (an existing directory), or raise RunInUse naming the holder. `wait`: how long to
        retry a held lock, so that a momentary probe (is_locked) is not taken for a trainer."""
        path = Path(run_dir) / LOCK
        end = time.monotonic() + wait
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:  # (no flock on this system: the lock file is written, nothing is locked)
                return cls(run_dir, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < end:
                    time.sleep(0.05)
                    continue
                holder = _lock_holder(path)
                raise RunInUse(f"run {run_dir} is in use by another process{holder}: wait for it to end, or stop "
                               "it first") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder released and deleted it between our open and flock: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return cls(run_dir, fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock_holder(path: Path) -> str:
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return ""
    return f" (pid {pid} on {host})"


def is_locked(run_dir: str | Path) -> bool | None:
    """Whether a process holds the run's lock: a non-blocking lock is tried and dropped at once. None when it
    cannot be told (the lock file is unreadable, or this system has no flock)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # (closing drops a lock taken)
    return False


# ---- metrics -------------------------------------------------------------------------------------


def append_metrics(run_dir: str | Path, records: Iterable[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if lines:
        with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
            f.write(lines)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records; a torn last line (the process was killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after `step`: a resumed run re-computes them (and gets the same numbers)."""
    path = Path(run_dir) / METRICS
    if path.is_file():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first: those of layout.checkpoint_dirs that hold the trainer
    state --resume reads. Half-written ones live under temporary names (.tmp-step-N) and are never listed."""
    return [(s, p) for s, p in layout.checkpoint_dirs(run_dir) if is_resumable(p)]


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory `tmp` to `final`, replacing what was there. The old one is moved
    aside first, so at every moment either the old or the new directory is complete under some name."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_dirs(run_dir: str | Path) -> None:
    """After a crash: restore a directory that was moved aside but not replaced; delete temporaries."""
    run_dir = Path(run_dir)
    for parent in (run_dir, run_dir / CHECKPOINTS):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".old-") and p.is_dir():
                final = p.with_name(p.name[len(".old-"):])
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, final)
            elif p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():  # atomic_write_text's
                p.unlink(missing_ok=True)


# ---- listing -------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    path: Path
    status: str
    step: int
    total_steps: int | None
    best_val_loss: float | None
    last_loss: float | None
    updated: str | None
    model: str | None
    lora: bool
    error: str | None = None  # why a run failed, or why its run.json is unreadable
    best_step: int | None = None  # the step of best_val_loss
    stopped_early: bool = False  # finished by --early-stop before its last step

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "status": self.status, "step": self.step,
                "total_steps": self.total_steps, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "last_loss": self.last_loss, "updated": self.updated, "model": self.model, "lora": self.lora,
                "error": self.error, "stopped_early": self.stopped_early, "number": self.number}

    @property
    def number(self) -> int | None:
        """A numbered run's number (`runs/0007-jokes`: 7, which `--model runs/7` names), else None."""
        return run_number(self.path)

    @property
    def shown_status(self) -> str:
        return "early-stopped" if self.status == "finished" and self.stopped_early else self.status


def run_info(run_dir: str | Path, locked: bool | None = None) -> RunInfo:
    """The run's status as recorded, except that a run whose lock is held is `running` and a run recorded as
    running whose lock is free is `dead`. `locked`: whether the lock is held by another process, when the
    caller knows (it holds the lock itself); None: try it."""
    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    status = str(info.get("status", "unknown"))
    if locked is None:
        locked = is_locked(run_dir)
    if locked:
        status = "running"  # (also while a resume or --overwrite prepares, before it records it)
    elif status == "running" and locked is False:
        status = "dead"  # the process was killed without a chance to record it; `--resume` continues
    kinds = {"step": (int, "an integer"), "total_steps": (int, "an integer"), "best_step": (int, "an integer"),
             "best_val_loss": ((int, float), "a number"), "last_loss": ((int, float), "a number"),
             "updated": (str, "a string"), "model": (str, "a string")}
    for key, (kind, what) in kinds.items():  # a hand-edited run.json: one line naming the field, not a crash later
        value = info.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise Gpt2kitError(f"{run_dir / RUN_JSON}: {key!r} is {value!r}, not {what}; correct or remove it")
    error = info.get("error") if status == "failed" else None  # a resumed run keeps its old error
    return RunInfo(run_dir, status, info.get("step") or 0, info.get("total_steps"),
                   info.get("best_val_loss"), info.get("last_loss"), info.get("updated"),
                   info.get("model"), bool(info.get("lora")), error if isinstance(error, str) else None,
                   info.get("best_step") if info.get("best_val_loss") is not None else None,
                   info.get("stopped_early") is True)


def _listed_as_run(d: Path) -> bool:
    """Whether `d`, holding a run.json, is a gpt2kit run for `list_runs`: its run.json is ours, or too
    damaged to tell (shown as unreadable); a valid run.json of another tool is not. (is_run_dir stays
    looser: --out must not treat such a folder as an empty one.)"""
    try:
        info = json.loads((d / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return isinstance(info, dict) and info.get("format") == RUN_FORMAT


def list_runs(root: str | Path = ".") -> list[RunInfo]:
    """Run directories at or below `root`, sorted by path. The whole tree is searched except inside runs,
    hidden folders, symlinked folders (no loops) and folders that cannot be read."""
    root = Path(root)
    if not root.is_dir():
        raise Gpt2kitError(f"{root} is not a directory")
    found: list[RunInfo] = []
    todo = [root]
    while todo:
        d = todo.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
            if any(e.name == RUN_JSON and e.is_file() for e in entries) and _listed_as_run(d):
                try:
                    found.append(run_info(d))
                except Gpt2kitError as e:  # a torn or hand-broken run.json: still a run, shown as such
                    found.append(RunInfo(d, "unreadable", 0, None, None, None, None, None, False, str(e)))
                continue
            todo += [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
    return sorted(found, key=lambda r: r.path)


def _short_error(error: str | None, width: int) -> str:
    """"Gpt2kitError: the loss became nan ..." -> "the loss became nan ...", on one line, cut to `width`."""
    if not error:
        return ""
    text = " ".join(re.sub(r"^[A-Z]\w*: ", "", error).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_runs(runs: list[RunInfo]) -> str:
    if not runs:
        return "no runs found"
    numbered = any(r.number is not None for r in runs)  # a first column with the numbers, when there are any
    rows = [("#",) * numbered + ("RUN", "STATUS", "STEP", "BEST VAL", "LOSS", "UPDATED")]
    for r in runs:
        steps = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        rows.append((("" if r.number is None else str(r.number)),) * numbered
                    + (str(r.path) + (" (lora)" if r.lora else ""), r.shown_status, steps, _fmt(r.best_val_loss),
                       _fmt(r.last_loss), (r.updated or "")[:19].replace("T", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if any(r.error for r in runs):  # last, cut to what the terminal has left (at least 40 characters)
        room = max(40, shutil.get_terminal_size().columns - 1 - sum(w + 2 for w in widths))
        rows = [rows[0] + ("ERROR",)] + [row + (_short_error(r.error, room),) for row, r in zip(rows[1:], runs)]
        widths.append(0)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4f}"


# ---- comparing ------------------------------------------------------------------------------------

# settings that differ between any two runs without saying how they were trained
_NOT_COMPARED = ("out",)


def _setting(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "-"
    return "-" if value is None else str(value)


def _median_tokens_per_sec(run_dir: Path) -> float | None:
    speeds = sorted(r["tok_per_s"] for r in read_metrics(run_dir) if isinstance(r.get("tok_per_s"), (int, float)))
    return speeds[len(speeds) // 2] if speeds else None


@dataclass
class Comparison:
    """Runs side by side: the settings (config.json) on which they differ, each run's value, and results."""
    runs: list[RunInfo]
    settings: dict[str, list[Any]]  # name -> each run's value, only the names where the runs differ
    tokens_per_sec: list[float | None]  # each run's median over its logged steps

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [{**r.to_dict(), "tokens_per_sec": t} for r, t in zip(self.runs, self.tokens_per_sec)],
                "settings": self.settings}


def compare_runs(found: list[RunInfo]) -> Comparison:
    """Compare runs (as list_runs gives them): one run compares to nothing, so it is its own results with
    no differing settings; none is an error, as is a run whose config.json cannot be read."""
    if not found:
        raise Gpt2kitError("no runs to compare: name run directories, or a folder that holds runs")
    configs = []
    for r in found:
        path = r.path / CONFIG_JSON
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise Gpt2kitError(f"cannot compare {r.path}: its {CONFIG_JSON} is unreadable ({e}); "
                               "leave it out") from None
        if not isinstance(cfg, dict):
            raise Gpt2kitError(f"cannot compare {r.path}: its {CONFIG_JSON} is not a JSON object; leave it out")
        configs.append(cfg)
    names = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in _NOT_COMPARED]
    settings = {k: [c.get(k) for c in configs] for k in names
                if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1}
    return Comparison(found, settings, [_median_tokens_per_sec(r.path) for r in found])


def format_comparison(c: Comparison) -> str:
    results = {
        "status": [r.shown_status for r in c.runs],
        "step": [f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step) for r in c.runs],
        "best val loss": [_fmt(r.best_val_loss) + (f" (step {r.best_step})" if r.best_step is not None else "")
                          for r in c.runs],
        "last loss": [_fmt(r.last_loss) for r in c.runs],
        "tokens/s": [f"{t:,.0f}" if t is not None else "-" for t in c.tokens_per_sec]}
    head = [""] + [str(r.path) for r in c.runs]
    alike = "(same settings)" if len(c.runs) > 1 else "(one run)"
    body = [[k, *map(_setting, v)] for k, v in c.settings.items()] or [[alike] + [""] * len(c.runs)]
    rows = [head, *body, None, *([k, *v] for k, v in results.items())]
    widths = [max(len(row[i]) for row in rows if row is not None) for i in range(len(head))]
    return "\n".join("" if row is None else "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in rows)


def adapter_only_checkpoint(run_dir: str | Path) -> Path | None:
    """A LoRA run stopped before best/ or final/ (which hold the merged model) were written: its newest
    adapter checkpoint. None for any other directory."""
    p = Path(run_dir)
    if not is_run_dir(p):
        return None
    try:
        if run_model_dir(p) is not None:
            return None
    except Gpt2kitError:  # "no saved model yet": only adapters, if anything
        pass
    for _, c in reversed(checkpoint_dirs(p)):
        if is_adapter_dir(c):
            return c
    return None


def model_dir(run_dir: str | Path) -> Path | None:
    """The model `--model RUN_DIR` loads (best, else final, else the newest checkpoint), or None."""
    try:
        return run_model_dir(Path(run_dir))
    except Gpt2kitError:
        return None


# Loading a run's adapter onto its base is resolving `--model`, which gpt2kit.checkpoints owns; the name is
# kept here for callers of the library (nothing in gpt2kit imports it from here).
