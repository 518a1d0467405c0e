"""Numbered runs, Spell-style: `finetune --runs-dir runs --name jokes` trains into `runs/0007-jokes`, the
next number in `runs/`, and `--model runs/7` (or `--model 7`, for the default `runs/`) names it again.

A number names the entry of its folder whose name is that number, zero-padded to 4 digits or more, alone or
followed by `-NAME`. It is only looked up when the path as written does not exist, so a real file or folder
called `7` always wins."""

from __future__ import annotations

import os
import re
from pathlib import Path

from gpt2kit.errors import Gpt2kitError

DEFAULT_RUNS_DIR = "runs"
_NUMBERED = re.compile(r"^(\d+)(?:-.*)?$")  # 0007, 0007-jokes
_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")


def run_number(path: str | Path) -> int | None:
    """The number in a numbered run's name (`runs/0007-jokes` -> 7), else None."""
    m = _NUMBERED.match(Path(path).name)
    return int(m.group(1)) if m else None


def _numbered_entries(root: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(int(m.group(1)), root / n) for n in names if (m := _NUMBERED.match(n)) and not n.startswith(".")]


def new_run_dir(runs_dir: str | Path = DEFAULT_RUNS_DIR, name: str | None = None) -> Path:
    """Create and return the next numbered run directory in `runs_dir` (made if need be): one more than the
    highest number any entry there starts with, as 4 digits (`0001`), then `-NAME`. Two processes starting at
    once get different numbers (the directory is created exclusively, the next number tried if it exists)."""
    if name is not None and not _NAME.match(name):
        raise Gpt2kitError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it becomes part of the run's "
                           "folder name)")
    root = Path(runs_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise Gpt2kitError(f"--runs-dir {runs_dir} is a file; give a folder for the runs")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Gpt2kitError(f"cannot create --runs-dir {runs_dir} ({e.strerror or e}); choose a writable place"
                           ) from None
    n = max((k for k, _ in _numbered_entries(root)), default=0) + 1
    while True:
        path = root / (f"{n:04d}" + (f"-{name}" if name else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
        except OSError as e:
            raise Gpt2kitError(f"cannot create {path} ({e.strerror or e}); choose a writable --runs-dir") from None


def resolve_run_ref(ref: str | Path) -> str | Path:
    """`ref` itself, unless it does not exist and names a numbered run: `runs/7` (a folder, then a number) is
    the entry of `runs/` numbered 7 (`runs/0007-jokes`); a bare number `7` looks in the default `runs/` of the
    current directory. Two entries with the number are an error naming both; none leaves `ref` as it is (for
    the caller's own error, or a Hub name)."""
    s = str(ref)
    path = Path(s).expanduser()
    if not s or path.exists() or not path.name.isdigit():
        return ref
    root = path.parent if os.sep in s or (os.altsep and os.altsep in s) else Path(DEFAULT_RUNS_DIR)
    hits = sorted(p for k, p in _numbered_entries(root) if k == int(path.name))
    if len(hits) > 1:
        raise Gpt2kitError(f"{s} is ambiguous: {', '.join(map(str, hits))} have the number {int(path.name)}; "
                           "name the one you mean")
    return str(hits[0]) if hits else ref
