"""loss.png for a run: training loss (raw and smoothed) and validation loss against steps.

matplotlib is an optional extra (`pip install 'gpt2kit[plot]'`): it is imported on first use, with the
Agg backend (no display needed), and when it is missing plotting is skipped with a single warning."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2kit.runs import read_metrics

log = logging.getLogger("gpt2kit")
_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            log.warning("matplotlib is not installed, so no loss.png is drawn "
                        "(install it with: pip install 'gpt2kit[plot]')")
            _warned = True
        return None
    return plt


def smooth(values: Sequence[float], beta: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): the t-th value is the average of
    the first t values weighted beta**age, so the curve starts at the first value without being held
    there (an average started from the first value keeps weight beta**t on it, and lags above a falling
    loss for long). A constant series stays that constant; every value lies within the values so far."""
    if not 0 <= beta < 1:
        raise ValueError(f"smoothing beta must be in [0, 1), got {beta}")
    out, m = [], 0.0
    for t, v in enumerate(values, 1):
        m = beta * m + (1 - beta) * v  # (starts from 0: biased towards 0 by beta**t, which the division removes)
        out.append(m / (1 - beta**t))
    return out


def plot_metrics(records: list[dict[str, Any]], out: str | Path, title: str | None = None) -> bool:
    """Draw `records` (metrics.jsonl rows) into the PNG `out`; False when matplotlib is missing or
    there is nothing to draw. Written to a temporary file and renamed."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "step" in r]
    if not train and not val:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
            if len(train) > 10:
                # an EMA spanning a fifth of the points (at most 50): beta = 1 - 2 / (span + 1)
                ax.plot(steps, smooth(losses, 1 - 2 / (1 + min(50, len(train) // 5))), color="tab:blue",
                        linewidth=1.5, label="train loss (smoothed)")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, color="tab:orange", marker="o", markersize=3, linewidth=1.5,
                    label="validation loss")
            best = min(range(len(val)), key=lambda i: val[i][1])
            ax.annotate(f"best {val[best][1]:.3f}", val[best], textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8, color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        out = Path(out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
    return True


def plot_run(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return plot_metrics(read_metrics(run_dir), run_dir / "loss.png", title=run_dir.name)
