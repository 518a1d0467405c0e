"""`finetune --fsdp` (PyTorch FSDP2) under torchrun with gloo on CPU: the same losses and model as one process
with the same global batch, each process holding half the optimizer state, frozen parts and LoRA, sharded
checkpoints that a killed run resumes from with 2 processes or 1, and a final model that transformers loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.checkpoints import load_model, save_model
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.runs import checkpoint_dirs, read_metrics
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import TrainConfig, finetune
from gpt2kit.train.distributed import _Dist
from gpt2kit.train.loop import _Run
from tests.conftest import JOKES, VOCAB_DIR, random_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every process: same float sums
N_EMBD = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-model")
    save_model(random_model(GPTConfig(n_layer=2, n_head=2, n_embd=N_EMBD, n_positions=64), seed=11),
               Tokenizer.from_dir(VOCAB_DIR), out)
    return out


def _args(model_dir: Path, out: Path) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(JOKES), "--column", "Joke", "--steps", "6",
            "--batch-size", "4", "--block-size", "16", "--lr", "2e-3", "--eval-every", "3", "--eval-batches", "4",
            "--sample-every", "0", "--save-every", "3", "--no-progress", "--no-tensorboard", "--out", str(out)]


def _torchrun(n: int, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node n -m gpt2kit ARGS` in its own session, killed whole if it hangs."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                          "-m", "gpt2kit", *args], env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:  # never leave the launcher and its workers behind
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir) -> Path:
    """The uninterrupted runs: one process with --grad-accum 2 (no FSDP), and 2 processes with --fsdp; the same
    global batch. Started together (the machine's two cores)."""
    d = tmp_path_factory.mktemp("fsdp-runs")
    fsdp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "gpt2kit", *_args(model_dir, d / "fsdp"), "--fsdp"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        one = subprocess.run([sys.executable, "-m", "gpt2kit", *_args(model_dir, d / "one"), "--grad-accum", "2"],
                             env=ENV, capture_output=True, text=True, timeout=300)
        _, err = fsdp.communicate(timeout=300)
    finally:
        if fsdp.poll() is None:
            os.killpg(fsdp.pid, signal.SIGKILL)
            fsdp.wait()
    assert one.returncode == 0, one.stderr
    assert fsdp.returncode == 0, err
    assert "2 processes, gloo, FSDP" in err
    return d


def _same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):
            # the key bias has an exactly-zero gradient (softmax ignores it), so Adam's g / (|g| + eps) turns
            # rounding noise into lr-sized steps; any change of summation order moves it (as in test_ddp)
            x, y = torch.cat([x[:N_EMBD], x[2 * N_EMBD:]]), torch.cat([y[:N_EMBD], y[2 * N_EMBD:]])
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), k


def _losses(run: Path) -> tuple[list, list]:
    recs = read_metrics(run)
    return ([(r["step"], r["loss"], r["tokens"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def _same_losses(a: Path, b: Path, since: int = 0) -> None:
    (ta, va), (tb, vb) = _losses(a), _losses(b)
    ta, tb = [r for r in ta if r[0] > since], [r for r in tb if r[0] > since]
    assert [r[0] for r in ta] == [r[0] for r in tb] and ta
    for (_, la, na), (_, lb, nb) in zip(ta, tb):
        assert la == pytest.approx(lb, rel=1e-6) and na == nb
    va, vb = [r for r in va if r[0] > since], [r for r in vb if r[0] > since]
    assert [s for s, _ in va] == [s for s, _ in vb] and va
    for (_, x), (_, y) in zip(va, vb):
        assert x == pytest.approx(y, rel=1e-6)


def test_fsdp_matches_one_process_with_the_same_global_batch(runs):
    _same_losses(runs / "one", runs / "fsdp")
    _same_model(runs / "one/final", runs / "fsdp/final")
    _same_model(runs / "one/best", runs / "fsdp/best")
    # checkpoints hold the shards of every process (DCP), the model's config and trainer.pt, no full model
    ckpt = checkpoint_dirs(runs / "fsdp")[-1][1]
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "trainer.pt").is_file() and (ckpt / "config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()


def test_gathered_final_model_loads_in_transformers_with_identical_logits(runs):
    transformers = pytest.importorskip("transformers")
    final = runs / "fsdp/final"
    ours, _ = load_model(final)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(final).eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_each_process_holds_half_the_optimizer_state_and_freeze_lora_offload_bf16_train():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests/fsdp_worker.py"), str(ROOT)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    got = json.loads(line.removeprefix("RESULT "))
    # measured from the sharded optimizer's own tensors: AdamW's two moments, split along dim 0 in two
    assert 0.45 < got["optimizer_bytes"] / got["unsharded_optimizer_bytes"] < 0.55, got
    assert got["tied"]
    assert got["freeze_wte_same"] and got["freeze_blocks_moved"]
    for name in ("lora", "offload"):
        assert got[f"{name}_base_same"] and got[f"{name}_adapter_moved"], got
        assert got[f"{name}_param_device"] == "cpu"
    assert got["mp_mode"] == "autocast" and got["mp_shard_dtypes"] == ["torch.float32"], got
    assert got["mp_gathered_dtype"] == "torch.bfloat16" and 9 < got["mp_loss"] < 12, got


def test_killed_run_resumes_with_two_processes_and_with_one(tmp_path, model_dir, runs):
    # rank 1 kills the whole job (SIGKILL, torchrun included) as its 5th step starts: step-3 is the checkpoint
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject/sitecustomize.py").write_text(
        "import os, signal\n"
        "from gpt2kit import data\n"
        "real = data.Batcher.batch_at\n"
        "def batch_at(self, step):\n"
        "    if step >= 4 and self.rank == 1:\n"
        "        os.killpg(os.getpgid(0), signal.SIGKILL)\n"
        "    return real(self, step)\n"
        "data.Batcher.batch_at = batch_at\n")
    killed = tmp_path / "killed"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), *sys.path])}
    done = _torchrun(2, *_args(model_dir, killed), "--fsdp", env=env)
    assert done.returncode != 0
    assert [s for s, _ in checkpoint_dirs(killed)] == [3]
    shutil.copytree(killed, tmp_path / "one")
    shutil.copytree(killed, tmp_path / "broken")

    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "gpt2kit", "finetune", "--resume", str(killed), "--no-progress"], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        one = _torchrun(1, "finetune", "--resume", str(tmp_path / "one"), "--no-progress")
        _, err = two.communicate(timeout=300)
    finally:
        if two.poll() is None:
            os.killpg(two.pid, signal.SIGKILL)
            two.wait()
    assert two.returncode == 0, err
    assert one.returncode == 0, one.stderr
    assert "resharding: 2 processes -> 1; --grad-accum 1 -> 2 keeps the global batch" in one.stderr
    for run in (killed, tmp_path / "one"):
        _same_losses(runs / "fsdp", run, since=3)
        _same_model(runs / "fsdp/final", run / "final")
    assert json.loads((tmp_path / "one/config.json").read_text())["grad_accum"] == 2

    # shards that cannot be read: one line, no traceback
    (checkpoint_dirs(tmp_path / "broken")[-1][1] / "sharded/.metadata").unlink()
    bad = _torchrun(1, "finetune", "--resume", str(tmp_path / "broken"), "--no-progress")
    assert bad.returncode != 0
    # (torchrun's own report of a failed worker follows gpt2kit's one line)
    said = bad.stderr.split("error: cannot read the sharded checkpoint")
    assert len(said) == 2 and "Traceback" not in said[0] and "sharded/.metadata" in said[1], bad.stderr


def test_fsdp_without_torchrun_and_offload_without_fsdp_are_one_line_errors(tmp_path, model_dir, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    for extra, words in (({"fsdp": True}, "--fsdp shards the model across the processes of a torchrun job"),
                         ({"fsdp_cpu_offload": True}, "--fsdp-cpu-offload offloads the shards of --fsdp"),
                         ({"fsdp": True, "dtype": "float16"}, "use --dtype bfloat16")):
        cfg = TrainConfig(model=str(model_dir), data=[str(JOKES)], column="Joke", steps=1, batch_size=2,
                          block_size=16, out=str(tmp_path / "run"), tensorboard=False, **extra)
        with pytest.raises(Gpt2kitError, match=re.escape(words)) as e:
            finetune(cfg, progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "run").exists()


def test_lora_run_of_one_process_continues_with_two(tmp_path, model_dir):
    # LoRA under --fsdp, started by one process (--grad-accum 2), continued for longer by two (--grad-accum 1,
    # resharded): the same adapters and merged model as one process without FSDP (constant lr: extending a run
    # changes a decaying schedule)
    lora = ["--lora-rank", "4", "--lora-dropout", "0", "--schedule", "constant", "--warmup-steps", "0",
            "--grad-accum", "2"]

    def args(out: Path, steps: int) -> list[str]:
        a = _args(model_dir, out)
        a[a.index("--steps") + 1] = str(steps)
        return a + lora

    ref = subprocess.Popen([sys.executable, "-m", "gpt2kit", *args(tmp_path / "ref", 4)], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _torchrun(1, *args(tmp_path / "run", 2), "--fsdp")
        assert first.returncode == 0, first.stderr
        more = _torchrun(2, "finetune", "--resume", str(tmp_path / "run"), "--steps", "4", "--no-progress")
        _, err = ref.communicate(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    assert ref.returncode == 0, err
    assert more.returncode == 0, more.stderr
    assert "resharding: 1 process -> 2; --grad-accum 2 -> 1 keeps the global batch" in more.stderr
    assert (checkpoint_dirs(tmp_path / "run")[-1][1] / "adapter_config.json").is_file()
    for f in ("adapter.safetensors", "model.safetensors"):  # the adapters, and the merged model
        a, b = load_file(str(tmp_path / "ref/final" / f)), load_file(str(tmp_path / "run/final" / f))
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (f, k)


def test_model_of_a_run_with_only_sharded_checkpoints_is_a_one_line_error(tmp_path, runs):
    run = tmp_path / "run"
    shutil.copytree(runs / "fsdp", run)
    shutil.rmtree(run / "best")
    shutil.rmtree(run / "final")
    with pytest.raises(Gpt2kitError, match="its checkpoints hold --fsdp shards, not a model; resume it"):
        load_model(run)


def test_resuming_with_a_number_of_processes_that_cannot_share_the_batch_is_refused(tmp_path, runs):
    # runs/fsdp: 2 processes x --grad-accum 1, so 2 micro-batches a step: 1 or 2 processes can resume it, 3 not
    run = _Run.__new__(_Run)  # (only what _regroup reads)
    run.dir, run.say = runs / "fsdp", lambda msg: None
    cfg = TrainConfig.from_dict(json.loads((runs / "fsdp/config.json").read_text()))
    ckpt = checkpoint_dirs(runs / "fsdp")[-1][1]
    run.dist = _Dist(world=1)
    assert run._regroup(cfg, ckpt).grad_accum == 2
    run.dist = _Dist(world=3)
    with pytest.raises(Gpt2kitError, match="each of its steps is 2 micro-batches of 4 sequences .* which 3 processes "
                                           "cannot share evenly; resume it with a number of processes that divides 2"):
        run._regroup(cfg, ckpt)
