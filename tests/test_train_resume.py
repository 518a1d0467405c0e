"""A run killed at any moment (SIGKILL) or stopped with Ctrl-C, then `--resume`d, ends with exactly the
model and the losses of a run that was never interrupted: same bytes, not just close."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.runs import checkpoint_dirs, read_metrics, run_info
from gpt2kit.tokenizer import Tokenizer
from tests.conftest import JOKES, VOCAB_DIR, random_model

STEPS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume-model")
    save_model(random_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), seed=7),
               Tokenizer.from_dir(VOCAB_DIR), out)
    return out


def _start(model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    # dropout on, so the resumed run must also reproduce the dropout masks
    cmd = [sys.executable, "-m", "gpt2kit", "finetune", "--model", str(model_dir), "--data", str(JOKES),
           "--column", "Joke", "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--block-size",
           "16", "--lr", "2e-3", "--dropout", "0.1", "--save-every", "4", "--eval-every", "8",
           "--eval-batches", "2", "--sample-every", "12", "--sample-tokens", "4", "--no-progress",
           "--no-tensorboard", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every process: same float sums
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", "--resume", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(s >= step for s, _ in checkpoint_dirs(run)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def _history(run: Path) -> tuple[list, list]:
    recs = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    return train, val


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _history(a) == _history(b)
    assert (a / f"samples/step-{STEPS}.txt").read_text() == (b / f"samples/step-{STEPS}.txt").read_text()
    ia, ib = json.loads((a / "run.json").read_text()), json.loads((b / "run.json").read_text())
    assert ia["best_val_loss"] == ib["best_val_loss"] and ia["best_step"] == ib["best_step"]


def test_kill_9_and_ctrl_c_then_resume_match_an_uninterrupted_run(tmp_path, model_dir):
    ref = _start(model_dir, tmp_path / "ref")
    killed = _start(model_dir, tmp_path / "killed")

    # SIGKILL between checkpoints: no chance to save anything
    _wait_for_checkpoint(killed, tmp_path / "killed", 8)
    time.sleep(0.02)  # (a tiny model's step can take a few ms: longer could let it finish)
    killed.kill()
    killed.wait()
    assert run_info(tmp_path / "killed").status == "dead"
    last_ckpt = checkpoint_dirs(tmp_path / "killed")[-1][0]
    assert 8 <= last_ckpt < STEPS

    # Ctrl-C: finish the step, save, exit 130. Started only now: started with the others, it could already be
    # near its end while the test waited for the killed run
    stopped = _start(model_dir, tmp_path / "stopped")
    _wait_for_checkpoint(stopped, tmp_path / "stopped", 12)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130, err
    info = run_info(tmp_path / "stopped")
    assert info.status == "interrupted" and STEPS > info.step >= 12
    assert checkpoint_dirs(tmp_path / "stopped")[-1][0] == info.step  # saved where it stopped
    assert "--resume" in err

    for run in ("killed", "stopped"):
        res = _resume(tmp_path / run)
        assert res.returncode == 0, res.stderr
        assert "resuming at step" in res.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    for run in ("killed", "stopped"):
        assert run_info(tmp_path / run).status == "finished"
        _assert_same(tmp_path / "ref", tmp_path / run)
    # nothing half-written is left behind
    assert not [p for p in (tmp_path / "killed").rglob(".tmp-*")]


def test_two_resumes_of_one_run_one_is_refused_at_once(tmp_path, model_dir):
    run = tmp_path / "run"
    first = _start(model_dir, run)
    _wait_for_checkpoint(first, run, 4)
    first.kill()
    first.wait()
    # killed in "another container": its recorded host is elsewhere and its PID is one that is alive here
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "pid": 1, "host": "another-container"}))
    assert run_info(run).status == "dead"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gpt2kit", "finetune", "--resume", str(run), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    refused = [err for rc, err in results if rc == 1]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    assert refused[0] == f"error: run {run} is in use by another process (pid " \
        f"{procs[[rc for rc, _ in results].index(0)].pid} on {socket.gethostname()}): wait for it to end, or stop " \
        "it first\n"
    assert run_info(run).status == "finished" and run_info(run).step == STEPS
    assert not (run / ".lock").exists()


def test_ctrl_c_on_a_piped_finetune_saves_and_exits_130(tmp_path, model_dir):
    # `gpt2kit finetune ... 2>&1 | head -1`: the reader takes a line and goes; then Ctrl-C
    run = tmp_path / "run"
    proc = _start(model_dir, run, "--steps", "100000")
    proc.stderr.readline()
    proc.stderr.close()
    proc.stdout.close()
    _wait_for_checkpoint(proc, run, 8)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    info = run_info(run)
    assert info.status == "interrupted" and info.error is None and info.step >= 8
    assert checkpoint_dirs(run)[-1][0] == info.step  # saved where it stopped


def test_a_closed_stdout_and_stderr_do_not_fail_a_run(tmp_path, model_dir):
    proc = _start(model_dir, tmp_path / "run", "--steps", "4")
    proc.stdout.close()  # the model path printed at the end meets EPIPE
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 4 and "error" not in info or info["error"] is None
