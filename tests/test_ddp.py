"""Data-parallel training: `torchrun --nproc_per_node 2` with gloo on CPU gives the same model, losses and
validation as one process with twice the gradient accumulation (the same global batch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.runs import read_metrics
from gpt2kit.tokenizer import Tokenizer
from tests.conftest import JOKES, VOCAB_DIR, random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-model")
    save_model(random_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), seed=11),
               Tokenizer.from_dir(VOCAB_DIR), out)
    return out


def test_two_process_gloo_matches_one_process_with_double_accumulation(tmp_path, model_dir):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    common = ["finetune", "--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "6",
              "--batch-size", "4", "--block-size", "16", "--lr", "2e-3", "--eval-every", "3", "--eval-batches", "4",
              "--sample-every", "0", "--save-every", "3", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel test runs don't collide
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gpt2kit", *common, "--out", str(tmp_path / "ddp")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        one = subprocess.run([sys.executable, "-m", "gpt2kit", *common, "--grad-accum", "2",
                              "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
        out, err = ddp.communicate(timeout=300)
    finally:
        if ddp.poll() is None:  # never leave the launcher and its workers behind
            os.killpg(ddp.pid, signal.SIGKILL)
            ddp.wait()
    assert one.returncode == 0, one.stderr
    assert ddp.returncode == 0, err
    assert "2 processes, gloo" in err

    wa = load_file(str(tmp_path / "one/final/model.safetensors"))
    wb = load_file(str(tmp_path / "ddp/final/model.safetensors"))
    n_embd = 32
    for k in wa:
        a, b = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):
            # the key bias has an exactly-zero gradient (softmax ignores it), so Adam's g / (|g| + eps) turns
            # rounding noise into lr-sized steps; any change of summation order moves it
            a, b = torch.cat([a[:n_embd], a[2 * n_embd:]]), torch.cat([b[:n_embd], b[2 * n_embd:]])
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), k

    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    train_a = [(r["step"], r["loss"], r["tokens"]) for r in ma if "loss" in r]
    train_b = [(r["step"], r["loss"], r["tokens"]) for r in mb if "loss" in r]
    assert [s for s, _, _ in train_a] == [s for s, _, _ in train_b] == list(range(1, 7))
    for (_, la, ta), (_, lb, tb) in zip(train_a, train_b):
        assert la == pytest.approx(lb, rel=1e-6) and ta == tb
    val_a = [(r["step"], r["val_loss"]) for r in ma if "val_loss" in r]
    val_b = [(r["step"], r["val_loss"]) for r in mb if "val_loss" in r]
    assert len(val_a) == len(val_b) == 3
    for (sa, va), (sb, vb) in zip(val_a, val_b):
        assert sa == sb and va == pytest.approx(vb, rel=1e-6)


def _two_workers(finetune_args: list[str], **env: str) -> tuple[list[subprocess.Popen], list[str]]:
    """`gpt2kit finetune` as ranks 0 and 1 of a gloo job, started directly (not through torchrun) so that
    each one's stderr is its own; returns the processes and their stderr."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", **env}
    procs = [subprocess.Popen([sys.executable, "-m", "gpt2kit", "finetune", *finetune_args],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return procs, errs


def test_data_error_fails_every_process_with_one_line(tmp_path, model_dir):
    # rank 0 finds the column missing; rank 1 must get the same one-line error, not a gloo traceback at a
    # barrier (or an NCCL hang)
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    args = ["--model", str(model_dir), "--data", str(JOKES), "--column", "Nope", "--steps", "1", "--batch-size",
            "2", "--block-size", "16", "--no-progress", "--no-tensorboard", "--out", str(tmp_path / "ddp")]
    procs, errs = _two_workers(args)
    for p, err in zip(procs, errs):
        assert p.returncode == 1, err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Nope" in lines[0], err
    assert [line for line in errs[0].splitlines() if line.startswith("error:")] == \
           [line for line in errs[1].splitlines() if line.startswith("error:")]


def test_a_process_failing_mid_training_stops_the_other_with_one_line(tmp_path, model_dir):
    # rank 1 fails in its third step; rank 0 then meets a closed connection at its next collective call and
    # must say that in one line, not print gloo's traceback, and record the cause in run.json
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import json
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject/sitecustomize.py").write_text(
        "from gpt2kit import data\n"
        "from gpt2kit.errors import Gpt2kitError\n"
        "real = data.Batcher.batch_at\n"
        "def batch_at(self, step):\n"
        "    if step >= 2 and self.rank == 1:\n"
        "        raise Gpt2kitError('injected: bad data on this process')\n"
        "    return real(self, step)\n"
        "data.Batcher.batch_at = batch_at\n")
    args = ["--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "20", "--batch-size",
            "2", "--block-size", "16", "--no-progress", "--no-tensorboard", "--eval-every", "0", "--sample-every",
            "0", "--out", str(tmp_path / "ddp")]
    procs, errs = _two_workers(args, PYTHONPATH=os.pathsep.join([str(tmp_path / "inject"), *sys.path]))
    assert [p.returncode for p in procs] == [1, 1], errs
    for err in errs:
        assert "Traceback" not in err, err
    assert errs[1].strip().splitlines()[-1] == "error: injected: bad data on this process"
    assert errs[0].strip().splitlines()[-1].startswith("error: process 0: stopping, because another process")
    info = json.loads((tmp_path / "ddp/run.json").read_text())
    assert info["status"] == "failed" and "another process" in info["error"]


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, model_dir):
    # the global batch is batch x grad-accum x processes, and rank r reads micro-step step * W + r: another W
    # would replay or skip data
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import json
    run = tmp_path / "ddp"
    args = ["--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "1", "--batch-size",
            "2", "--block-size", "16", "--no-progress", "--no-tensorboard", "--eval-every", "0", "--sample-every",
            "0", "--out", str(run)]
    procs, errs = _two_workers(args)
    assert [p.returncode for p in procs] == [0, 0], errs
    cfg = json.loads((run / "config.json").read_text())
    cfg["steps"] = 2  # (a finished run resumes when its --steps is raised)
    (run / "config.json").write_text(json.dumps(cfg))
    one = subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", "--resume", str(run), "--no-progress"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert one.returncode == 1 and "Traceback" not in one.stderr, one.stderr
    assert (f"error: cannot resume {run}: it was trained with 2 processes and this job has 1 (the global batch"
            in one.stderr), one.stderr
    assert f"resume it with `torchrun --nproc_per_node 2 -m gpt2kit finetune --resume {run}`" in one.stderr


def test_a_run_directory_that_another_machine_cannot_see_is_refused(tmp_path, model_dir):
    # several machines without a shared filesystem: rank 1 does not see what rank 0 wrote in --out (here:
    # its reads of the probe fail, as on a machine whose --out is another, local, folder); both stop with one
    # line naming the requirement, and no run is left behind
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject/sitecustomize.py").write_text(
        "import os, pathlib\n"
        "real = pathlib.Path.read_text\n"
        "def read_text(self, *a, **k):\n"
        "    if self.name == '.shared-check' and os.environ.get('RANK') == '1':\n"
        "        raise FileNotFoundError(2, 'No such file or directory', str(self))\n"
        "    return real(self, *a, **k)\n"
        "pathlib.Path.read_text = read_text\n")
    args = ["--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "1", "--batch-size",
            "2", "--block-size", "16", "--no-progress", "--no-tensorboard", "--out", str(tmp_path / "ddp")]
    procs, errs = _two_workers(args, PYTHONPATH=os.pathsep.join([str(tmp_path / "inject"), *sys.path]))
    for p, err in zip(procs, errs):
        assert p.returncode == 1 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "process 1 (host" in lines[0] and "shares" in lines[0], err
    assert not (tmp_path / "ddp").exists()


def test_resume_hint_of_a_run_on_several_machines(monkeypatch):
    from gpt2kit.train.config import resume_hint
    assert resume_hint("runs/x", 16, 8) == ("the same torchrun command on each of the 2 machines with "
                                            "`-m gpt2kit finetune --resume runs/x` (16 processes in all)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun's, on each of two one-process "machines"
    assert "each of the 2 machines" in resume_hint("runs/x", 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_hint("runs/x", 2) == "`torchrun --nproc_per_node 2 -m gpt2kit finetune --resume runs/x`"


def test_a_failing_torchrun_worker_ignores_its_launchers_sigterm():
    # torchrun sends SIGTERM to a job's other processes once one fails; a process that is itself failing then
    # must still record the failure and say why (the two-node test met this race on a slow machine)
    from gpt2kit import train
    old = signal.getsignal(signal.SIGTERM)
    try:
        for distributed, after in ((True, signal.SIG_IGN), (False, old)):
            signal.signal(signal.SIGTERM, old)
            with pytest.raises(RuntimeError), train._Interrupt(print, distributed=distributed):
                assert signal.getsignal(signal.SIGTERM) is not old  # in the loop: finish the step, save
                raise RuntimeError("the other process is gone")
            assert signal.getsignal(signal.SIGTERM) is after
        signal.signal(signal.SIGTERM, old)
        with train._Interrupt(print, distributed=True):  # a loop that ends well gives the handler back
            pass
        assert signal.getsignal(signal.SIGTERM) is old
    finally:
        signal.signal(signal.SIGTERM, old)
