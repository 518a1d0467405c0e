"""Several machines: two torchrun launchers on loopback, one process each, meet through torchrun's c10d
rendezvous (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`) as two nodes would, on CPU/gloo.
Their run equals the 2-process `--standalone` run; when one node dies mid-run the other stops with one line
within a bounded time, and `--resume` continues from the last checkpoint to the uninterrupted result.

Marked `multinode` (each two-node run starts four Python processes: about a minute on a 2-core machine);
`pytest -m "not multinode"` leaves them out."""

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
from gpt2kit.runs import read_metrics
from gpt2kit.tokenizer import Tokenizer
from tests.conftest import JOKES, VOCAB_DIR, random_model

pytestmark = [pytest.mark.multinode,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

TIMEOUT = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode-model")
    save_model(random_model(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), seed=11),
               Tokenizer.from_dir(VOCAB_DIR), out)
    return out


def _args(model_dir: Path, out: Path) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "6",
            "--batch-size", "4", "--block-size", "16", "--lr", "2e-3", "--eval-every", "3", "--eval-batches", "4",
            "--sample-every", "0", "--save-every", "3", "--no-progress", "--no-tensorboard", "--out", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _launch(launcher: list[str], args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # a session of its own, so that killing it kills its workers too (a node going away)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gpt2kit", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _nodes(args: list[str], env: dict[str, str], port: int) -> list[subprocess.Popen]:
    """Two "nodes": torchrun launchers of one process each, meeting at the c10d endpoint 127.0.0.1:port."""
    return [_launch(["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}"], args, env)
            for r in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    try:
        return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # never leave a launcher or its workers behind: SIGTERM has it stop them
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-8), k


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run) if "loss" in r or "val_loss" in r]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_nodes(model_dir, tmp_path_factory, request) -> tuple[Path, Path]:
    """The two-node run, and beside it (at the same time) the 2-process --standalone run; data-parallel
    (DDP) and sharded (--fsdp) alike."""
    tmp = tmp_path_factory.mktemp("multinode")
    extra = ["--fsdp"] if request.param == "fsdp" else []
    nodes = _nodes(_args(model_dir, tmp / "nodes") + extra, _env(), _free_port())
    standalone = _launch(["--standalone", "--nproc-per-node", "2"], _args(model_dir, tmp / "standalone") + extra,
                         _env())
    results = _finish([*nodes, standalone])
    for rc, err in results:
        assert rc == 0, err
    return tmp / "nodes", tmp / "standalone"


def test_two_nodes_equal_the_standalone_run(two_nodes):
    nodes, standalone = two_nodes
    _same_weights(nodes, standalone)
    a, b = _losses(nodes), _losses(standalone)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 6 + 3  # 6 training losses, 3 validations
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-6)
    info = json.loads((nodes / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 6


def test_a_node_dying_stops_the_other_cleanly_and_resume_finishes_the_run(model_dir, two_nodes, tmp_path):
    # rank 1 (whichever node the rendezvous gave it) stalls in step 5, after the checkpoint of step 3, and
    # says which launcher is its node; that node is then killed, launcher and worker, as a machine going away
    # (rank 0's node survives: the one that writes the run directory)
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject/sitecustomize.py").write_text(
        "import os, time\n"
        "from pathlib import Path\n"
        "from gpt2kit import data\n"
        "real = data.Batcher.batch_at\n"
        "def batch_at(self, step):\n"
        "    if step >= 4 and self.rank == 1 and os.environ.get('STALL_DIR'):\n"
        "        d = Path(os.environ['STALL_DIR'])\n"
        "        (d / 'stalling').write_text(f'{os.getpid()} {os.getppid()}')\n"
        "        os.replace(d / 'stalling', d / 'stalled')\n"
        "        time.sleep(600)\n"
        "    return real(self, step)\n"
        "data.Batcher.batch_at = batch_at\n")
    run = tmp_path / "run"
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path / "inject"), *sys.path]), STALL_DIR=str(tmp_path))
    nodes = _nodes(_args(model_dir, run), env, _free_port())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "stalled").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), \
                [p.communicate()[1] for p in nodes if p.poll() is not None]
            time.sleep(0.2)
        worker, launcher = map(int, (tmp_path / "stalled").read_text().split())
        (dead,) = [p for p in nodes if p.pid == launcher]
        (alive,) = [p for p in nodes if p is not dead]
        os.killpg(dead.pid, signal.SIGKILL)  # (torchrun starts each worker in a session of its own)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        rc, err = _finish([alive], timeout=120)[0]
        took = time.monotonic() - killed
    finally:
        _finish(nodes, timeout=1)
    assert rc != 0
    assert took < 60, f"the surviving node took {took:.0f} s to stop"
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert ours == ["error: process 0: stopping, because another process of this torchrun job failed (its error "
                    "is printed above, or in its node's output)"], err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["step"] >= 3
    assert (run / "checkpoints/step-3").is_dir()

    # both nodes back, resuming: the run ends as the uninterrupted one did
    resumed = _nodes(["finetune", "--resume", str(run), "--no-progress"], _env(), _free_port())
    for rc, err in _finish(resumed):
        assert rc == 0, err
    _same_weights(run, two_nodes[0])
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
