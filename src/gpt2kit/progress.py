"""Progress for `finetune`, `eval` and `generate --output`, shown the way its destination wants it:

- a terminal: tqdm's bar, redrawn ten times a second;
- a Jupyter or Colab notebook: tqdm's widget (`tqdm.auto`), also redrawn ten times a second (a notebook's
  stderr is not a terminal, and a bar that took that to mean "log file" sat frozen for 30 s at a time);
- a log file or a pipe (`nohup`, Slurm, CI): `LineProgress`, tqdm's status text as whole lines, one every
  30 s and one at the end. tqdm itself would write each redraw as a carriage return plus the bar, and clear
  and redraw the bar around every message: in a file that is one endless line with the messages spliced in,
  which `tail -f`, `grep` and `less` show badly."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


def in_notebook() -> bool:
    """Whether this runs in an IPython kernel (Jupyter, Colab, VS Code, Spyder): tqdm.auto draws its widget
    there, or without ipywidgets a text bar, which these front ends redraw in place as a terminal does."""
    return "ipykernel" in sys.modules


def progress_bar(*, total: int | None = None, desc: str | None = None, unit: str = "it", initial: int = 0,
                 disable: bool = False, file: TextIO | None = None) -> Any:
    """A progress bar with tqdm's interface (update, set_postfix_str, write, close, a context manager)."""
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    if disable or (callable(isatty) and isatty()) or in_notebook():
        from tqdm.auto import tqdm  # lazy: slow to import (it probes for notebooks); only a bar shown needs it
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True, mininterval=0.1)
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial, file=file)


class LineProgress:
    """tqdm's status line (`finetune:  50%| 15/30 [00:02<00:02, 7.23step/s, loss 10.97]`) written as whole
    lines: at most every `interval` seconds while it runs, and once when it closes. `write` prints a message
    on its own line, with no bar cleared or redrawn around it."""

    def __init__(self, *, total: int | None = None, desc: str | None = None, unit: str = "it", initial: int = 0,
                 file: TextIO | None = None, interval: float = LOG_INTERVAL_S):
        self.total = total or None  # 0 (e.g. `generate --nsamples 0`: forever) has no percentage either
        self.desc, self.unit = desc, unit
        self.n = self.initial = initial
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._line(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, msg: str, file: TextIO | None = None, end: str = "\n") -> None:
        print(msg, file=file if file is not None else self.file, end=end, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        from tqdm import tqdm  # lazy: slow to import; only a bar shown needs it
        self.last = now
        fmt = ("{desc}: {percentage:3.0f}%| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
               if self.total else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc or "", unit=self.unit,
                                 postfix=self.postfix or None, bar_format=fmt, initial=self.initial)
        self.write(line if self.desc else line.removeprefix(": "))

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SafeStream:
    """A text stream whose writes never raise: once the reader has gone (`| head`, a closed `tee`: EPIPE) or
    the stream is closed, its descriptor is pointed at /dev/null and the text is dropped. Progress and
    messages are for the user; losing them must not stop the work they describe."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        # what is still buffered, and whatever else writes to the descriptor later (the interpreter's flush at
        # exit, C code), goes to /dev/null instead of failing again
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def safe_stderr() -> Iterator[None]:
    """sys.stderr, for the duration, as a stream whose writes never raise (see _SafeStream)."""
    old = sys.stderr
    if old is None or isinstance(old, _SafeStream):
        yield
        return
    sys.stderr = _SafeStream(old)
    try:
        yield
    finally:
        sys.stderr = old
