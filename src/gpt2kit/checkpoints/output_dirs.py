"""New output directories and files for a model: refused up front when they would clobber something, written
through a staging folder so that a killed write never leaves half a model."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from gpt2kit.errors import Gpt2kitError

log = logging.getLogger("gpt2kit")

# The folder inside an output directory that a model is written into before its files are moved into place:
# a write that is killed leaves only this, which the next write into the same directory removes.
PARTIAL = ".gpt2kit-partial"


def make_new_output_dir(out: str | Path) -> list[Path]:
    """Create `out` to write a model into, refusing up front (before any loading) anything that would
    clobber something or fail later: an existing file, a non-empty directory, an unwritable place.
    A directory holding only the leftover of a killed write (PARTIAL) counts as empty; the leftover is
    removed. Returns the directories it created, outermost first."""
    out = Path(out).expanduser()
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if PARTIAL in entries:
            if entries != {PARTIAL}:
                raise Gpt2kitError(f"output directory {out} holds a model write that was interrupted while its "
                                   f"files were moved into place ({PARTIAL} is left in it): remove {out} and "
                                   "run again")
            log.info("removing %s, left by an interrupted write", out / PARTIAL)
            shutil.rmtree(out / PARTIAL)
            entries = set()
        if entries:
            raise Gpt2kitError(f"output directory {out} already exists and is not empty: choose a new directory "
                               "(nothing in it is overwritten)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise Gpt2kitError(f"output directory {out} is not writable: check its permissions or choose another")
        return []
    if out.exists() or out.is_symlink():
        raise Gpt2kitError(f"output {out} is an existing file, not a directory: choose a new directory name "
                           "(the file is left as it is)")
    created = [p for p in (out, *out.absolute().parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise Gpt2kitError(f"cannot create output directory {out} ({e.strerror or e}): choose a writable "
                           "location") from None
    return created


@contextlib.contextmanager
def new_model_dir(out: str | Path) -> Iterator[Path]:
    """Write a model into `out`, a new (or empty) directory (make_new_output_dir's checks, before any
    loading). Yields the folder to write into, `out`/PARTIAL; its files are moved into `out` when the block
    ends. A failed write leaves `out` as it was found, a killed one only PARTIAL (removed by the next)."""
    out = Path(out).expanduser()
    created = make_new_output_dir(out)
    stage = out / PARTIAL
    moved: list[Path] = []
    try:
        stage.mkdir()
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
            moved.append(out / f.name)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for f in moved:
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise


def new_output_file(out: Path) -> None:
    """Refuse, before any loading, an output file that exists or cannot be created."""
    if out.exists() or out.is_symlink():
        raise Gpt2kitError(f"output {out} already exists: choose a new file name (nothing is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Gpt2kitError(f"cannot create {out.parent} ({e.strerror or e}): choose a writable location") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise Gpt2kitError(f"{out.parent} is not writable: check its permissions or choose another location")
