"""Progress output: tqdm's bar on a terminal and in notebooks, whole lines in logs (gpt2kit/progress.py)."""

import io
import sys
import types

import pytest

from gpt2kit import progress
from gpt2kit.progress import LineProgress, progress_bar


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_line_progress_writes_a_line_per_interval_and_one_at_the_end(clock):
    f = io.StringIO()
    bar = LineProgress(total=100, desc="finetune", unit="step", initial=20, file=f, interval=30)
    for i in range(80):
        clock.t += 1.0  # one step a second
        bar.set_postfix_str(f"loss {i}")
        bar.update(1)
        if i == 40:
            bar.write("step 61: validation loss 3.1")
    bar.close()
    bar.close()  # closing twice (as the trainer's error paths may) adds nothing
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue()
    assert lines == [
        "finetune:  50%| 50/100 [00:30<00:50,  1.00step/s, loss 29]",  # 30 s in: 30 new steps, not 50
        "step 61: validation loss 3.1",  # on its own line, no bar redrawn around it
        "finetune:  80%| 80/100 [01:00<00:20,  1.00step/s, loss 59]",
        "finetune: 100%| 100/100 [01:20<00:00,  1.00step/s, loss 79]",
    ]


def test_line_progress_without_a_total(clock):
    f = io.StringIO()
    with LineProgress(total=0, unit="sample", file=f) as bar:  # generate --nsamples 0: no end known
        clock.t += 4
        bar.update(8)
    assert f.getvalue() == "8 [00:04,  2.00sample/s]\n"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_suits_its_destination(monkeypatch):
    from tqdm import tqdm

    assert not progress.in_notebook()  # no IPython kernel here
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert progress.in_notebook()
    monkeypatch.delitem(sys.modules, "ipykernel")
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LineProgress)  # a log file or a pipe
    on_terminal = progress_bar(total=3, file=_Tty())
    assert isinstance(on_terminal, tqdm) and on_terminal.mininterval == 0.1
    on_terminal.close()
    # a notebook's stderr is no terminal, but its widget is redrawn like one
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    in_notebook = progress_bar(total=3, file=io.StringIO())
    assert isinstance(in_notebook, tqdm) and in_notebook.mininterval == 0.1
    in_notebook.close()
