"""Fine-tuning: one step equals transformers (loss, every gradient, the AdamW update), a short run on the
jokes CSV lowers validation loss and leaves a complete run directory whose model transformers loads with
identical logits, plus the schedule, freezing, mixed precision, odd data and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import runs
from gpt2kit.checkpoints import load_model, save_model
from gpt2kit.checkpoints.hf import CONV1D_SUFFIXES
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import (
    EmulatedAutocast,
    TrainConfig,
    Trainer,
    default_cadence,
    finetune,
    freeze,
    lr_at,
    param_groups,
    resume,
)
from tests.conftest import JOKES, VOCAB_DIR, ctrl_c_in_the_first_step, random_model

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models gain nothing from a second thread, and a busy neighbour core makes OpenMP's
    # two-thread hand-offs stall; one thread keeps these tests fast and steady
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-train-model")
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), out)
    return out


def _cfg(tmp_path: Path, model: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), data=[str(JOKES)], column="Joke", out=str(tmp_path / "run"), steps=6,
                batch_size=4, block_size=32, eval_batches=4, sample_every=0, tensorboard=False)
    return TrainConfig(**{**base, **kw})


# ---- one step against transformers -----------------------------------------------------------------

def test_one_step_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = random_model(TINY, seed=3).train()
    save_model(ours, None, tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").train()  # dropout 0 in config.json
    cfg = TrainConfig(model="x", data=["x"], lr=3e-3, weight_decay=0.1, beta2=0.99, grad_clip=0.5, dtype="float32")
    trainer = Trainer(ours, cfg, torch.device("cpu"))
    hf_opt = torch.optim.AdamW(
        [{"params": [p for p in hf.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.99), eps=1e-8)

    seq = torch.randint(0, TINY.vocab_size, (3, 33), generator=torch.Generator().manual_seed(5))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[0, :5] = -100  # padded targets are ignored by both
    loss = trainer.forward_backward([(x, y)])
    hf_loss = hf(input_ids=x, labels=x, shift_labels=y.contiguous()).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 1e-6 * abs(hf_loss.item())

    hf_params = dict(hf.named_parameters())
    n_checked = 0
    for name, p in ours.named_parameters():
        hp = hf_params[name if name != "lm_head.weight" else "transformer.wte.weight"]
        g_hf = hp.grad.t() if name.endswith(CONV1D_SUFFIXES) else hp.grad
        scale = g_hf.abs().max().item()
        assert torch.allclose(p.grad, g_hf, rtol=1e-4, atol=1e-6 * scale + 1e-10), name
        n_checked += 1
    assert n_checked == len(hf_params)

    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    trainer.optimizer_step(lr=3e-3)
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
    hf_opt.step()
    for name, p in ours.named_parameters():
        hp = hf_params[name if name != "lm_head.weight" else "transformer.wte.weight"]
        w_hf = (hp.t() if name.endswith(CONV1D_SUFFIXES) else hp).detach()
        # Adam's first step is ~lr * sign(grad): where the exact gradient is 0 (the key bias, which
        # softmax ignores) both sides hold rounding noise, so compare only where the gradient is real
        real = grads[name].abs() > 1e-5 * grads[name].abs().max()
        # (updates are ~lr = 3e-3; tiny gradients make Adam's lr * g / (|g| + eps) sensitive to rounding)
        assert torch.allclose(p.detach()[real], w_hf[real], rtol=1e-5, atol=2e-6), name
        assert (p.detach() - w_hf).abs().max() <= 2 * 3e-3, name


@pytest.mark.parametrize("line_by_line", [False, True])
def test_grad_accumulation_equals_one_big_batch(line_by_line):
    # --line-by-line pads each micro-batch: two short documents in one micro-batch and two long ones in the
    # next must count by their target tokens, as in one batch of all four (--batch-size 4 == 2 x --grad-accum 2),
    # not as two equal halves
    torch.manual_seed(0)
    a, b = random_model(TINY, seed=4).train(), random_model(TINY, seed=4).train()
    cfg = TrainConfig(model="x", data=["x"], lr=1e-3, line_by_line=line_by_line)
    ta, tb = Trainer(a, cfg, torch.device("cpu")), Trainer(b, cfg, torch.device("cpu"))
    seq = torch.randint(0, TINY.vocab_size, (4, 17))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    if line_by_line:
        y[:2, 2:] = -100  # padding: the first two documents have 2 targets each, the others 16
    la = ta.forward_backward([(x[:2], y[:2]), (x[2:], y[2:])])
    lb = tb.forward_backward([(x, y)])
    assert torch.allclose(la, lb, rtol=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-8), n


def test_padded_lm_head_gives_the_same_loss_and_gradients():
    # the GPU path (Trainer.pad_head, on for CUDA devices) forced on the CPU against the plain one
    a, b = random_model(TINY, seed=5).train(), random_model(TINY, seed=5).train()
    cfg = TrainConfig(model="x", data=["x"], lr=1e-3)
    ta, tb = Trainer(a, cfg, torch.device("cpu")), Trainer(b, cfg, torch.device("cpu"))
    assert not ta.pad_head and TINY.vocab_size % 64
    tb.pad_head, tb.fused_head = True, False
    seq = torch.randint(0, TINY.vocab_size, (2, 17))
    seq[0, -3:] = TINY.vocab_size - 1  # the last real row of the head is a target too
    x, y = seq[:, :-1], seq[:, 1:]
    assert tb._padded_head_logits(x).shape[-1] == -(-TINY.vocab_size // 64) * 64
    la, lb = ta.forward_backward([(x, y)]), tb.forward_backward([(x, y)])
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=n)


# ---- pieces ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [1e-3, 1e6])  # clipping and not
def test_clipping_reaches_the_optimizer(clip):
    """Adam's first update is ~lr * sign(grad) whatever the gradient's scale, so the parity test above
    cannot see whether clipping happened; the first moment it stores, (1 - beta1) * grad, can."""
    model = random_model(TINY, seed=2).train()
    trainer = Trainer(model, TrainConfig(model="x", data=["x"], lr=1e-3, grad_clip=clip), torch.device("cpu"))
    seq = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    trainer.forward_backward([(seq[:, :-1], seq[:, 1:])])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    total = torch.stack([g.double().square().sum() for g in grads.values()]).sum().sqrt()
    norm = trainer.optimizer_step(lr=1e-3)
    # (torch's own float32 norm, used without gpt2kit's CPU kernels, was measured 5e-5 off here)
    assert norm.item() == pytest.approx(total.item(), rel=1e-4)
    factor = min(1.0, clip / (norm.item() + 1e-6))  # the factor of the norm it computed
    beta1 = trainer.optimizer.defaults["betas"][0]
    for n, p in model.named_parameters():
        exp_avg = trainer.optimizer.state[p]["exp_avg"]
        torch.testing.assert_close(exp_avg, (1 - beta1) * factor * grads[n], rtol=1e-5, atol=1e-12)
    assert not hasattr(trainer.optimizer, "grad_scale")


@pytest.mark.parametrize("accum, checkpointing", [(1, False), (2, False), (2, True)])
def test_clipping_norm_is_summed_during_backward(monkeypatch, accum, checkpointing):
    """With gpt2kit's CPU kernels, each gradient's sum of squares is taken by a hook as autograd completes
    it, and the rows the tied embedding adds afterwards report their change: the norm handed to AdamW must
    be the exact norm of the final gradients, with no pass over them after backward."""
    from gpt2kit import kernels
    if kernels.load() is None:
        pytest.skip("the CPU kernels cannot be built here")
    model = random_model(TINY, seed=2).train()
    model.gradient_checkpointing = checkpointing
    trainer = Trainer(model, TrainConfig(model="x", data=["x"], lr=1e-3, grad_clip=1e-3), torch.device("cpu"))
    assert trainer.norm_in_backward is not None
    seq = torch.randint(0, TINY.vocab_size, (2 * accum, 17), generator=torch.Generator().manual_seed(3))
    trainer.forward_backward([(seq[i:i + 2, :-1], seq[i:i + 2, 1:]) for i in range(0, 2 * accum, 2)])
    assert all(s is not None for s in trainer.norm_in_backward.slots)  # every gradient had its hook run
    want = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt().item()
    monkeypatch.setattr(kernels, "total_norm", lambda ts: pytest.fail("a pass over the gradients after backward"))
    norm = trainer.optimizer_step(lr=1e-3)
    assert norm.item() == pytest.approx(want, rel=1e-6)
    # the next step's gradients are new: slots from this one are not reused
    assert not trainer.norm_in_backward.ready


def test_lr_schedule():
    cfg = TrainConfig(model="x", data=["x"], lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(109, cfg, 110) == pytest.approx(0.1)  # the last step ends at lr * min_lr_ratio
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    lin = TrainConfig(model="x", data=["x"], lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [round(lr_at(s, lin, 5), 6) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    const = TrainConfig(model="x", data=["x"], lr=2.0, warmup_steps=0, schedule="constant")
    assert lr_at(3, const, 5) == 2.0


def _points(every: int, total: int) -> list[int]:
    """The steps that evaluate (or sample): step 0, every `every` steps and the last (the loop's rule)."""
    return [0, *sorted({s for s in range(every, total + 1, every)} | {total})] if every else []


@pytest.mark.parametrize("total", [1, 2, 10, 37, 100, 199, 200, 1000, 12345, 10**6])
def test_default_cadence_is_a_small_share_of_any_run(total):
    c = default_cadence(total, has_val=True, batch_size=4, block_size=128)
    evals, samples = _points(c.eval_every, total), _points(c.sample_every, total)
    assert 2 <= len(evals) <= 11 and len(evals) - 1 <= max(2, total // 20)  # 10 per run at most, fewer if short
    assert len(samples) <= len(evals) and set(samples) <= set(evals) | {total}  # less often, with an evaluation
    assert 1 <= c.save_every <= 1000 and total // c.save_every <= max(10, total // 1000)  # (+ always the end)
    # all evaluations together score at most 0.3x the training tokens (a forward is ~1/3 of a training step)
    assert 1 <= c.eval_batches <= 50 and (c.eval_batches * len(evals) <= 0.3 * total or c.eval_batches == 1)
    assert c.eval_batches * 4 * 128 <= 32768


def test_default_cadence_examples_and_given_values_win():
    c = default_cadence(10, has_val=True, batch_size=4, block_size=128)
    assert (c.eval_every, c.sample_every, c.save_every, c.eval_batches) == (5, 10, 5, 1)
    c = default_cadence(5000, has_val=True, batch_size=4, block_size=1024, grad_accum=2, world=2)
    assert (c.eval_every, c.sample_every, c.save_every, c.eval_batches) == (500, 1000, 500, 8)
    c = default_cadence(30000, has_val=False, batch_size=8, block_size=128)
    assert (c.eval_every, c.sample_every, c.save_every) == (0, 6000, 1000)  # no validation: samples still
    given = default_cadence(10, has_val=True, batch_size=4, block_size=128, eval_every=1, sample_every=0,
                            save_every=3, eval_batches=7)
    assert (given.eval_every, given.sample_every, given.save_every, given.eval_batches) == (1, 0, 3, 7)
    assert default_cadence(10, has_val=True, batch_size=4, block_size=128, eval_every=2).sample_every == 4
    assert default_cadence(10, has_val=False, batch_size=4, block_size=128, eval_every=2).eval_every == 0


def test_a_ten_step_run_evaluates_samples_and_saves_a_few_times(tmp_path, tiny_dir):
    res = finetune(_cfg(tmp_path, tiny_dir, steps=10, eval_batches=None, sample_every=None, sample_tokens=4),
                   progress=False)
    run = tmp_path / "run"
    assert res.status == "finished"
    evals = [r["step"] for r in runs.read_metrics(run) if "val_loss" in r]
    assert evals == [0, 5, 10]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0.txt", "step-10.txt"]
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["eval_every"], cfg["sample_every"], cfg["save_every"], cfg["eval_batches"]) == (5, 10, 5, 1)


def test_weight_decay_groups_and_freeze():
    model = random_model(TINY)
    groups = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups) == n_unique  # the tied lm_head counts once

    frozen = freeze(model, ["embeddings,ln_f"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.h.") for n in trainable)
    assert "transformer.wte.weight" in frozen and "transformer.ln_f.bias" in frozen

    model = random_model(TINY)
    freeze(model, ["blocks:0", "mlp"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("transformer.h.0.") or ".mlp." in n for n in trainable)
    assert "transformer.h.1.attn.c_attn.weight" in trainable
    for bad in (["blocks:0-7"], ["nothing.matches*"], ["blocks:x"]):
        with pytest.raises(Gpt2kitError):
            freeze(random_model(TINY), bad)


def test_emulated_bfloat16_matches_autocast():
    """On CPUs without bf16 arithmetic, bf16 'autocast' runs float32 kernels on rounded values. A linear
    layer then equals torch's autocast exactly, forward and backward; a whole model agrees to bf16
    precision (attention keeps float32 internally where the bf16 kernel rounds its probabilities)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 96)
    x = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 96)
    outs = []
    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), EmulatedAutocast(torch.bfloat16)):
        lin.zero_grad()
        x.grad = None
        with ctx:
            out = lin(x)
        (out.float() * g).sum().backward()
        outs.append((out.float().detach(), x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=0) or (a - b).abs().max() <= 2 ** -8 * a.abs().max()

    cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, n_positions=32)
    model = random_model(cfg, seed=2).train()
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)

    def run(mode):
        model.zero_grad()
        ctx = {"autocast": torch.autocast("cpu", dtype=torch.bfloat16),
               "emulated": EmulatedAutocast(torch.bfloat16)}.get(mode, torch.enable_grad())
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, 512), y.view(-1))
        with EmulatedAutocast(torch.bfloat16) if mode == "emulated" else torch.enable_grad():
            loss.backward()
        return logits.float().detach(), loss.item(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_loss, ref_grads = run("autocast")
    emu_logits, emu_loss, emu_grads = run("emulated")
    f32_logits, _, _ = run("float32")
    assert (emu_logits == ref_logits).float().mean() > 0.3  # bf16-rounded values, many identical
    assert (f32_logits == ref_logits).float().mean() < 0.01  # float32 is not
    assert abs(emu_loss - ref_loss) < 2e-3
    for g_emu, g_ref in zip(emu_grads, ref_grads):
        assert F.cosine_similarity(g_emu.flatten(), g_ref.flatten(), dim=0) > 0.999


# ---- whole runs ------------------------------------------------------------------------------------

def test_finetune_jokes_lowers_validation_loss(tmp_path, tiny_dir):
    transformers = pytest.importorskip("transformers")
    cfg = _cfg(tmp_path, tiny_dir, steps=40, lr=3e-3, eval_every=20, sample_every=40, sample_tokens=8,
               prompts=["Why did the"], save_every=10, keep=2)
    res = finetune(cfg, progress=False)
    run = res.run_dir
    assert res.status == "finished" and res.step == 40
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 3  # steps 0, 20, 40
    assert vals[-1] < vals[0] - 0.3, vals
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 41))

    # the run directory
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 40 and saved["block_size"] == 32 and saved["lr"] == 3e-3
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 40
    assert info["best_val_loss"] == pytest.approx(min(vals[1:]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-30", "step-40"]  # --keep 2
    assert (run / "checkpoints/step-40/trainer.pt").is_file()
    assert (run / "loss.png").stat().st_size > 1000
    sample = (run / "samples/step-40.txt").read_text()
    assert sample.startswith("Why did the")
    assert res.model_dir == run / "best"

    # --model RUN_DIR loads the best model; transformers loads it with identical logits
    model, tok = load_model(run)
    ids = torch.tensor([tok.encode("What do you call a fish with no eyes?")])
    with torch.no_grad():
        ours = model(ids)
        hf = transformers.GPT2LMHeadModel.from_pretrained(run / "final").eval()
        final, _ = load_model(run / "final")
        assert torch.allclose(final(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours, final(ids)) or res.best_step == 40


def test_scratch_init_and_tiny_odd_data(tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("Just a few words.\n")
    cfg = TrainConfig(init="scratch", config="tiny", tokenizer=str(VOCAB_DIR), data=[str(one_line)],
                      out=str(tmp_path / "run"), steps=3, batch_size=2, sample_every=0, tensorboard=False)
    res = finetune(cfg, progress=False)  # 5 tokens: fewer than a block; validation gets the last 2
    assert res.status == "finished" and res.step == 3 and math.isfinite(res.best_val_loss)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["init"] == "scratch" and saved["block_size"] == 4  # the block actually used: 5 tokens - 1
    model, _ = load_model(tmp_path / "run")
    assert model.config.n_embd == GPTConfig.from_name("tiny").n_embd


def test_float16_with_loss_scaling_and_lora_bf16(tmp_path, tiny_dir):
    res = finetune(_cfg(tmp_path, tiny_dir, steps=3, dtype="float16", eval_every=3), progress=False)
    assert res.status == "finished" and math.isfinite(res.last_loss) and math.isfinite(res.best_val_loss)
    state = torch.load(tmp_path / "run/checkpoints/step-3/trainer.pt", weights_only=True)
    assert state["scaler"] is not None
    res = finetune(_cfg(tmp_path, tiny_dir, out=str(tmp_path / "lora"), steps=3, dtype="bfloat16", lora_rank=2,
                        grad_checkpointing=True), progress=False)
    assert res.status == "finished" and math.isfinite(res.last_loss)


def test_progress_into_a_log_is_whole_lines(tmp_path, tiny_dir, capsys):
    res = finetune(_cfg(tmp_path, tiny_dir, steps=30, eval_every=15))
    err = capsys.readouterr().err  # captured, not a terminal
    assert res.status == "finished" and "\r" not in err  # no redraws spliced into the log
    lines = err.splitlines()
    assert [ln.split(" loss ")[0] for ln in lines if ln.startswith("step ")] == [
        "step 0: validation", "step 15: validation", "step 30: validation"]
    # the status line once, at the end (the run is far shorter than the 30 s between lines), then the summary
    bars = [ln for ln in lines if ln.startswith("finetune: ")]
    assert len(bars) == 1 and "100%| 30/30 [" in bars[0] and "step/s, loss " in bars[0]
    assert lines[-1].startswith("done: 30 steps") and lines[-2] == bars[0]


# ---- CLI -------------------------------------------------------------------------------------------

def test_cli_finetune_checks_its_data_before_the_model(tmp_path, capsys):
    # --model gpt2 cannot be downloaded here; bad data is still the error named, and no run is left behind
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n\n")
    for data, extra, msg in (([tmp_path / "gone.txt"], [], "gone.txt does not exist"),
                             ([JOKES], ["--val-data", tmp_path / "empty"], "has no .txt, .csv"),
                             ([JOKES], ["--column", "Joke", "--field", "text"], "--field"),
                             ([tmp_path / "blank.txt"], [], "blank.txt: the input is empty or blank")):
        out = tmp_path / "run"
        argv = ["finetune", "--model", "gpt2", "--data", *data, *extra, "--out", out, "--no-progress"]
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "download" not in err, err
        assert not out.exists()


def test_cli_finetune_runs_resume_errors(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--data", str(JOKES), "--column", "Joke", "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--block-size", "16", "--eval-batches", "2",
            "--sample-every", "0", "--no-progress", "--no-tensorboard"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "best")
    assert "device cpu" in captured.err  # the device is always said

    assert main(args) == 1  # the run exists
    assert f"--model {out}" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(out), "--lr", "0.1"]) == 1
    assert "drop --lr" in capsys.readouterr().err
    # every option that would change the run is refused, not silently dropped; where it runs may change
    assert main(["finetune", "--resume", str(out), "--batch-size", "8", "--seed", "7", "--grad-checkpointing",
                 "--device", "cpu", "--no-progress"]) == 1
    assert "drop --batch-size, --seed, --grad-checkpointing (to change" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(out)]) == 1  # finished already
    assert f"already finished (2 steps); its model is in {out / 'best'}." in capsys.readouterr().err
    edited = json.loads((out / "config.json").read_text())
    del edited["steps"]  # (as a config-type error suggests for a bad line): still finished, not a new epoch
    (out / "config.json").write_text(json.dumps(edited))
    assert main(["finetune", "--resume", str(out)]) == 1
    assert "already finished" in capsys.readouterr().err
    assert main(["finetune", "--data", str(JOKES), "--out", str(tmp_path / "x")]) == 1
    assert "--model" in capsys.readouterr().err
    bad = ["finetune", "--model", str(tiny_dir), "--data", str(JOKES), "--out", str(tmp_path / "y"), "--steps", "1",
           "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--no-progress"]
    assert main(bad + ["--column", "Nope"]) == 1
    assert "column" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # a start that failed before training leaves no run behind
    assert main(bad + ["--column", "Joke"]) == 0

    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and "2/2" in table
    assert main(args + ["--overwrite"]) == 0


def test_early_stop_keeps_best(tmp_path, tiny_dir):
    # learning one repeated token makes every other token (the validation text) less likely
    (tmp_path / "train.txt").write_text("a " * 400)
    (tmp_path / "val.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    cfg = _cfg(tmp_path, tiny_dir, data=[str(tmp_path / "train.txt")], val_data=[str(tmp_path / "val.txt")],
               column=None, steps=30, lr=5e-3, eval_every=2, early_stop=2, save_every=100)
    res = finetune(cfg, progress=False)
    assert res.stopped_early and res.step < 30
    assert res.step == res.best_step + 2 * 2  # two evaluations (every 2 steps) without a new best
    records = map(json.loads, (res.run_dir / "metrics.jsonl").open())
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert res.best_val_loss == min(v for s, v in vals.items() if s > 0) == vals[res.best_step]
    assert res.model_dir == res.run_dir / "best"
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["stopped_early"] and info["step"] == res.step
    assert (res.run_dir / "final/model.safetensors").is_file()
    with pytest.raises(Gpt2kitError, match="stopped early"):  # not resumed past its early stop
        resume(res.run_dir, progress=False)


def test_early_stop_without_evaluations_is_refused(tmp_path, tiny_dir):
    # --eval-every 0 turns evaluation off, so --early-stop would never count anything: refused before the run
    # directory is made, not silently ignored (with --val-data there is no warning either)
    (tmp_path / "val.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    cfg = _cfg(tmp_path, tiny_dir, val_data=[str(tmp_path / "val.txt")], eval_every=0, early_stop=2)
    with pytest.raises(Gpt2kitError, match=r"^--early-stop 2 counts evaluations, and --eval-every 0 turns them off"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_best_must_beat_the_starting_model(tmp_path, tiny_dir, capsys):
    # a learning rate that wrecks the model: no evaluation after step 0 is better than step 0
    res = finetune(_cfg(tmp_path, tiny_dir, steps=4, lr=5.0, eval_every=2, save_every=100), progress=False)
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, (res.run_dir / "metrics.jsonl").open())
            if "val_loss" in r}
    assert sorted(vals) == [0, 2, 4] and min(vals[2], vals[4]) > vals[0]
    assert res.best_step is None and res.best_val_loss is None  # no best/: nothing to report for it
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["best_val_loss"] is None and info["best_step"] is None
    assert not (res.run_dir / "best").exists() and res.model_dir == res.run_dir / "final"
    err = capsys.readouterr().err
    assert "(best)" not in err and "no step beat the starting model's validation loss" in err
    for step in (2, 4):  # the perplexity said is exp(loss), however large, not a capped figure
        ppl = math.exp(vals[step]) if vals[step] < 700 else math.inf
        assert f"step {step}: validation loss {vals[step]:.4f}, perplexity {ppl:.3g}" in err


def test_tokens_cache_input_and_chained_runs(tmp_path, tiny_dir, capsys):
    # nshepperd style: encode once, then train on the cache; then start a second run from the first
    assert main(["encode", str(JOKES), "--column", "Joke", "--tokenizer", str(VOCAB_DIR),
                 "--out", str(tmp_path / "jokes.tokens")]) == 0
    first = finetune(_cfg(tmp_path, tiny_dir, data=[str(tmp_path / "jokes.tokens")], column=None, steps=2,
                          out=str(tmp_path / "first")), progress=False)
    second = finetune(_cfg(tmp_path, first.run_dir, data=[str(tmp_path / "jokes.tokens")], column=None,
                           steps=2, out=str(tmp_path / "second")), progress=False)
    assert second.status == "finished"
    # each run's validation split is two small views of the cache, not a copy of it
    for run in (first.run_dir, second.run_dir):
        kept = list((Path(run) / "data").iterdir())
        assert {p.suffix for p in kept} == {".json"} and sum(p.stat().st_size for p in kept) < 20_000
    w1, _ = load_model(first.run_dir)
    w2, _ = load_model(tmp_path / "second/checkpoints/step-2")
    assert not torch.equal(w1.transformer.wte.weight, w2.transformer.wte.weight)


def test_gradient_checkpointing_gives_the_same_gradients():
    a, b = random_model(TINY, seed=5).train(), random_model(TINY, seed=5).train()
    b.gradient_checkpointing = True
    cfg = TrainConfig(model="x", data=["x"])
    seq = torch.randint(0, TINY.vocab_size, (2, 17))
    la = Trainer(a, cfg, torch.device("cpu")).forward_backward([(seq[:, :-1], seq[:, 1:])])
    lb = Trainer(b, cfg, torch.device("cpu")).forward_backward([(seq[:, :-1], seq[:, 1:])])
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-9), n


def test_tensorboard_logging(tmp_path, tiny_dir, monkeypatch):
    import sys
    import types
    calls = []

    class FakeWriter:  # tensorboard itself is an optional extra, absent here
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    finetune(_cfg(tmp_path, tiny_dir, steps=2, eval_every=2, tensorboard=True), progress=False)
    assert calls[0] == ("init", str(tmp_path / "run/tensorboard"))
    assert ("train/loss", 2) in calls and ("val/loss", 2) in calls and calls[-1] == ("close",)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_allocator_tuning_reuses_memory_instead_of_faulting_it_in_again(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import resource, torch\n"
        "from gpt2kit.train import tune_cpu_allocator\n"
        "tuned = tune_cpu_allocator()\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(3):\n"
        "        t = torch.empty(64 * 2**20 // 4); t.fill_(1.0); del t  # 64 MiB, like a step's big tensors\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "faults(); faults()  # settle: the first rounds may still grow the heap\n"
        # the fewest over several rounds: a stray small allocation can split the freed block once and make
        # one round fault a fresh block in (seen once in CI), but it cannot happen in every round
        "print(tuned, min(faults() for _ in range(5)))\n")
    out = {}
    for setting in ("1", "0"):
        env = {**os.environ, "GPT2KIT_MALLOC_TUNING": setting}
        res = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, check=True)
        tuned, faults = res.stdout.split()
        out[setting] = (tuned, int(faults))
    assert out["0"][0] == "False" and out["0"][1] > 3 * 10_000  # every 64 MiB block faulted in afresh
    assert out["1"][0] == "True" and out["1"][1] < 1_000  # the freed block is reused


# ---- --out: gpt2kit deletes only what it wrote --------------------------------------------------------

def _tiny_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(JOKES), "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--sample-every", "0",
            "--no-progress", "--no-tensorboard", *extra]


def test_out_folder_with_user_files_is_refused_and_kept(tmp_path, tiny_dir, capsys):
    u = tmp_path / "u"
    u.mkdir()
    (u / "notes.txt").write_text("x")
    assert main(_tiny_args(tiny_dir, u, "--column", "Nope")) == 1
    err = capsys.readouterr().err
    assert "not a gpt2kit run" in err and "empty folder" in err and len(err.strip().splitlines()) == 1
    assert main(_tiny_args(tiny_dir, u, "--column", "Joke")) == 1
    assert main(_tiny_args(tiny_dir, u, "--column", "Joke", "--overwrite")) == 1
    assert "--overwrite only replaces runs" in capsys.readouterr().err
    assert sorted(p.name for p in u.iterdir()) == ["notes.txt"] and (u / "notes.txt").read_text() == "x"


def test_failed_start_is_replaced_but_files_beside_the_run_stay(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out . : the current directory must survive
    assert main(_tiny_args(tiny_dir, Path("."), "--column", "Nope")) == 1
    assert list(tmp_path.iterdir()) == []  # nothing of the failed start is left, and the folder stays
    # a failed start recorded by an earlier gpt2kit (or one killed between its run.json and config.json)
    (tmp_path / "run.json").write_text(json.dumps({"format": "gpt2kit-run", "version": 1, "status": "running",
                                                  "step": 0}))
    (tmp_path / "notes.txt").write_text("mine")  # put beside the failed run afterwards
    assert main(_tiny_args(tiny_dir, Path("."), "--column", "Joke")) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


def test_overwrite_replaces_only_a_stopped_run(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(tiny_dir, out, "--column", "Joke")) == 0
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer" / "old.txt").write_text("old")
    info = json.loads((out / "run.json").read_text())
    # a live run (one whose lock is held, here by this very process) is never deleted
    capsys.readouterr()
    with runs.RunLock.acquire(out):
        assert main(_tiny_args(tiny_dir, out, "--column", "Joke", "--overwrite")) == 1
    assert capsys.readouterr().err == f"error: run {out} is in use by another process (pid {os.getpid()} on " \
        f"{socket.gethostname()}): wait for it to end, or stop it first\n"
    assert (out / "final/model.safetensors").is_file()
    # a run recorded as running by a process that is gone (killed in another container, or as PID 1 here: the
    # PID is alive) is replaced
    (out / "run.json").write_text(json.dumps({**info, "status": "running", "pid": 1}))
    assert main(_tiny_args(tiny_dir, out, "--column", "Joke", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "tokenizer" / "old.txt").exists()
    capsys.readouterr()
    # a finished run is not resumable: the advice is to start from its model
    assert main(_tiny_args(tiny_dir, out, "--column", "Joke")) == 1
    assert f"start a new run from its model with --model {out}" in capsys.readouterr().err
    # nor can a run replace the run (or the run's model) it would start from
    for model in (out, out / "final"):
        assert main(_tiny_args(model, out, "--column", "Joke", "--overwrite")) == 1
        assert "cannot replace the one it starts from" in capsys.readouterr().err
        assert (out / "final/model.safetensors").is_file() and (out / "notes.txt").is_file()


def test_overwrite_refuses_an_input_inside_the_run_before_deleting_anything(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(tiny_dir, out, "--column", "Joke")) == 0
    (cache,) = [p for p in (out / "data").glob("*.tokens") if "-val" not in p.name]
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    capsys.readouterr()
    jokes = ["--data", str(JOKES), "--column", "Joke"]
    for extra in (["--data", str(cache)],  # (each --data replaces _tiny_args' JOKES below)
                  ["--data", str(out / "data" / "*.tokens")],  # a glob matching files in the run
                  [*jokes, "--val-data", str(cache)],
                  [*jokes, "--tokenizer", str(out / "tokenizer")],
                  [*jokes, "--init", "scratch", "--config", str(out / "final" / "config.json")]):
        args = _tiny_args(tiny_dir, out, "--overwrite", *extra[2:])
        args[args.index(str(JOKES))] = extra[1]
        assert main(args) == 1
        err = capsys.readouterr().err
        opt = extra[0] if extra[0] != "--data" or len(extra) == 2 else extra[-2]
        assert err.startswith(f"error: {opt} ") and "is inside --out" in err and "choose another --out" in err, err
        assert len(err.strip().splitlines()) == 1
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    # a file the user put beside the run is no run entry: it stays, and may be trained on
    (out / "notes.txt").write_text("Some notes of mine to train on. " * 40)
    args = _tiny_args(tiny_dir, out, "--overwrite")
    args[args.index(str(JOKES))] = str(out / "notes.txt")
    assert main(args) == 0 and (out / "notes.txt").is_file()
    # a data folder that holds --out would read the run's own files (its tokenizer's merges.txt) as text
    args = _tiny_args(tiny_dir, tmp_path / "corpus" / "run")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Some text. " * 40)
    args[args.index(str(JOKES))] = str(tmp_path / "corpus")
    capsys.readouterr()
    assert main(args) == 1
    assert "error: --data " + str(tmp_path / "corpus") + " holds --out" in capsys.readouterr().err
    assert not (tmp_path / "corpus" / "run").exists()


def test_messages_name_the_python_api_too_and_quote_paths(tmp_path, tiny_dir, monkeypatch, capsys):
    out = tmp_path / "sp ace" / "my run"
    cfg = _cfg(tmp_path, tiny_dir, out=str(out), steps=3, eval_every=0, val_fraction=0.0)
    ctrl_c_in_the_first_step(monkeypatch)
    assert finetune(cfg, progress=False).status == "interrupted"
    err = capsys.readouterr().err
    assert f"continue with `gpt2kit finetune --resume '{out}'` (Python: resume({str(out)!r}))" in err
    with pytest.raises(Gpt2kitError, match=r"already holds a run \(interrupted at step 1\); continue it with "
                                           r"`gpt2kit finetune --resume '.*my run'`.*overwrite=True"):
        finetune(cfg, progress=False)
    with pytest.raises(Gpt2kitError, match=r"TrainConfig.schedule must be one of cosine, linear, constant, not 'cos'"):
        finetune(_cfg(tmp_path, tiny_dir, schedule="cos"), progress=False)
    monkeypatch.undo()
    assert resume(out, progress=False).status == "finished"
    err = capsys.readouterr().err
    assert "steps: 3 of 4 sequences x 32 tokens" in err and "done: 3 steps," in err
    assert main(["finetune", "--resume", str(out)]) == 1
    assert f"already finished (3 steps); its model is in {out}/final. Continue it for longer with --resume '{out}' " \
        f"--steps N (the new total), or start a new run from it with --model '{out}'" in capsys.readouterr().err


def test_one_step_one_sequence_and_a_prompts_file_with_a_byte_order_mark(tmp_path, tiny_dir, capsys):
    (tmp_path / "wp.txt").write_bytes(b"\xef\xbb\xbfHello\r\nWorld\r\n")
    args = _tiny_args(tiny_dir, tmp_path / "run", "--column", "Joke", "--prompts", str(tmp_path / "wp.txt"))
    args[args.index("--batch-size") + 1] = "1"
    assert main(args) == 0
    assert json.loads((tmp_path / "run/config.json").read_text())["prompts"] == ["Hello", "World"]
    err = capsys.readouterr().err
    assert "steps: 1 of 1 sequence x 16 tokens" in err and "done: 1 step," in err
    (tmp_path / "bad.txt").write_bytes(b"Hello \xff\n")
    assert main(_tiny_args(tiny_dir, tmp_path / "b", "--prompts", str(tmp_path / "bad.txt"))) == 1
    assert capsys.readouterr().err == f"error: --prompts {tmp_path / 'bad.txt'} is not UTF-8 text (byte 6); " \
        "save it as UTF-8\n"


def test_resuming_a_read_only_run_says_it_must_be_writable(tmp_path, tiny_dir, monkeypatch, capsys):
    import errno
    import tempfile

    from gpt2kit import runs
    run = tmp_path / "run"
    finetune(_cfg(tmp_path, tiny_dir, steps=2, save_every=1, eval_every=0, val_fraction=0.0), progress=False)
    info = {**json.loads((run / "run.json").read_text()), "status": "interrupted", "step": 1}
    (run / "run.json").write_text(json.dumps(info))

    def read_only(*a, **kw):  # (as root, a chmod would not stop this process)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(runs, "atomic_write_text", read_only)  # run.json, config.json
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 1
    assert capsys.readouterr().err == (f"error: cannot resume {run}: cannot write in it (Read-only file system); a "
                                       "run directory must be writable to resume: make it writable, or copy it "
                                       "elsewhere and resume the copy\n")
    assert json.loads((run / "run.json").read_text()) == info


@pytest.mark.parametrize("free_mb", [3, 100_000])
def test_a_full_disk_in_pytorchs_words_is_said_plainly(tmp_path, tiny_dir, monkeypatch, free_mb):
    import shutil

    def torch_save(*a, **kw):
        raise torch_save.error
    torch_save.error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6444224 vs 6444112")
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, free_mb * 10**6))
    cfg = _cfg(tmp_path, tiny_dir, steps=2, save_every=2, eval_every=0, val_fraction=0.0)
    why = "no space left on device, 3 MB free" if free_mb == 3 else str(torch_save.error)
    with pytest.raises(Gpt2kitError, match=r"cannot write .*step-2 \(" + re.escape(why) + r"\); no checkpoint"):
        finetune(cfg, progress=False)


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_dir, monkeypatch,
                                                                         failure):
    import errno

    from safetensors import SafetensorError

    import gpt2kit.checkpoints.hf as hf
    from gpt2kit.runs import checkpoint_dirs
    real = hf.write_hf_dir
    calls = {"n": 0}

    def full_disk(out, *a, **kw):
        calls["n"] += 1
        result = real(out, *a, **kw)
        if calls["n"] > 1:  # the first checkpoint is written; the next write finds the disk full (half written)
            if failure == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", str(out))
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return result

    monkeypatch.setattr(hf, "write_hf_dir", full_disk)
    cfg = _cfg(tmp_path, tiny_dir, steps=4, save_every=2, eval_every=0, val_fraction=0.0)
    with pytest.raises(Gpt2kitError, match=r"cannot write .*step-4 .*the last checkpoint, .*step-2, is kept: free "
                                           r"some disk space.*--resume") as e:
        finetune(cfg, progress=False)
    assert "\n" not in str(e.value)
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint_dirs(run)] == [2]
    assert (run / "checkpoints/step-2/model.safetensors").is_file()
    leftovers = [p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "cannot write" in info["error"]
    monkeypatch.setattr(hf, "write_hf_dir", real)  # space freed: the resumed run no longer carries the error
    from gpt2kit.train import resume
    assert resume(run, progress=False).status == "finished"
    assert json.loads((run / "run.json").read_text()).get("error") is None


def test_disk_full_at_the_first_checkpoint_says_there_is_none_and_resume_starts_over(tmp_path, tiny_dir,
                                                                                     monkeypatch):
    import errno

    import gpt2kit.checkpoints.hf as hf
    from gpt2kit.runs import checkpoint_dirs
    from gpt2kit.train import resume
    real = hf.write_hf_dir

    def full_disk(out, *a, **kw):
        real(out, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(hf, "write_hf_dir", full_disk)
    cfg = _cfg(tmp_path, tiny_dir, steps=4, save_every=2, eval_every=0, val_fraction=0.0)
    with pytest.raises(Gpt2kitError, match=r"cannot write .*step-2 \(No space left on device\); no checkpoint has "
                                           r"been written yet: free some disk space, then .*--resume") as e:
        finetune(cfg, progress=False)
    assert "\n" not in str(e.value) and "previous checkpoint" not in str(e.value)
    run = tmp_path / "run"
    assert checkpoint_dirs(run) == [] and json.loads((run / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(hf, "write_hf_dir", real)  # space freed: --resume does what the message says
    res = resume(run, progress=False)
    assert res.status == "finished" and res.step == 4 and [s for s, _ in checkpoint_dirs(run)] == [2, 4]


def test_a_full_disk_for_metrics_and_samples_warns_once_and_training_goes_on(tmp_path, tiny_dir, monkeypatch,
                                                                            capsys):
    import errno

    from gpt2kit import runs

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_write = runs.atomic_write_text

    def samples_full(path, *a, **kw):  # (run.json and config.json are written this way too)
        return full() if Path(path).parent.name == "samples" else real_write(path, *a, **kw)
    monkeypatch.setattr(runs, "append_metrics", full)
    monkeypatch.setattr(runs, "atomic_write_text", samples_full)
    res = finetune(_cfg(tmp_path, tiny_dir, steps=4, eval_every=2, sample_every=2, sample_tokens=4), progress=False)
    assert res.status == "finished" and (res.run_dir / "final/model.safetensors").is_file()
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot write {res.run_dir / 'metrics.jsonl'} (No space left on device)") == 1
    assert err.count(f"warning: cannot write {res.run_dir / 'samples'}") == 1


def test_resume_rejects_a_hand_broken_config_and_a_corrupt_trainer_state(tmp_path, tiny_dir):
    run = tmp_path / "run"
    finetune(_cfg(tmp_path, tiny_dir, steps=2, save_every=1, eval_every=0, val_fraction=0.0), progress=False)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    good = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**good, "steps": "forty"}))
    with pytest.raises(Gpt2kitError, match=r"'steps' in the run's config.json is 'forty', which is not int \| None"):
        resume(run, progress=False)
    (run / "config.json").write_text(json.dumps({**good, "batch_size": "big"}))
    with pytest.raises(Gpt2kitError, match=r"'batch_size' in the run's config.json is 'big', which is not int;"):
        resume(run, progress=False)
    (run / "config.json").write_text(json.dumps({**good, "steps": 3}))
    (run / "checkpoints/step-2/trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Gpt2kitError, match=r"cannot read .*step-2.*trainer\.pt.*delete"):
        resume(run, progress=False)
    # a raw pickle (not torch.save's format): our error alone, without torch's "Detected pickle protocol" warning
    import pickle
    import warnings
    (run / "checkpoints/step-2/trainer.pt").write_bytes(pickle.dumps({"version": 1, "step": Path("x")}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Gpt2kitError, match=r"cannot read .*step-2.*trainer\.pt \(UnpicklingError\); delete"):
            resume(run, progress=False)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("bad, expect", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--epochs", "2"], "not both"),  # with --steps 1
    (["--epochs", "inf", "--steps"], "--epochs must be a number > 0"),  # (--steps dropped)
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--lora-alpha", "16"], "add --lora-rank"),
    (["--lora-targets", "mlp"], "add --lora-rank"),
    (["--config", "tiny"], "add --init scratch"),
    (["--prompt", ""], "--prompt is empty"),
    # before the data is read: no notes about encoding it come first
    (["--block-size", "100000"], "--block-size 100000 exceeds the model's context of 64 tokens: give at most 64"),
])
def test_rejected_values_are_one_line_and_create_nothing(tmp_path, tiny_dir, capsys, bad, expect):
    out = tmp_path / "run"
    args = _tiny_args(tiny_dir, out, "--column", "Joke", *bad)
    if args[-1] == "--steps":
        del args[-1], args[args.index("--steps"):args.index("--steps") + 2]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and expect in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_lora_rank_above_the_layer_size_and_device_file_as_data(tmp_path, tiny_dir, capsys):
    assert main(_tiny_args(tiny_dir, tmp_path / "a", "--column", "Joke", "--lora-rank", "1000")) == 1
    assert "exceeds the smaller side" in capsys.readouterr().err
    if Path("/dev/null").exists():
        args = _tiny_args(tiny_dir, tmp_path / "b")
        args[args.index(str(JOKES))] = "/dev/null"
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "not a regular file" in err and "does not exist" not in err


def test_short_data_warnings_and_resume_before_the_first_checkpoint(tmp_path, tiny_dir, capsys):
    import shutil
    one_line = tmp_path / "one.txt"
    one_line.write_text("Just a few words of text.\n")
    cfg = _cfg(tmp_path, tiny_dir, data=[str(one_line)], column=None, val_data=[str(one_line)], steps=2,
               eval_every=2, early_stop=3, save_every=10)
    finetune(cfg, progress=False)
    err = capsys.readouterr().err
    # (the warning itself names no internal cache file; `note:` lines may, when an earlier test raised the
    # log level)
    warning = [line for line in err.splitlines() if line.startswith("warning: the training data has only 9 tokens")]
    assert len(warning) == 1 and ".tokens" not in warning[0]
    assert json.loads((tmp_path / "run/config.json").read_text())["block_size"] == 8
    # killed before its first checkpoint: resume starts over and records step 0 once
    run = tmp_path / "run"
    for d in ("checkpoints", "best", "final"):
        shutil.rmtree(run / d, ignore_errors=True)
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), "status": "interrupted"}))
    resume(run, progress=False)
    vals = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in r]
    assert vals == [0, 2]
    # --early-stop without validation data says so
    finetune(_cfg(tmp_path, tiny_dir, out=str(tmp_path / "nv"), steps=1, val_fraction=0.0, early_stop=2),
             progress=False)
    assert capsys.readouterr().err.count("--early-stop 2 needs validation data") == 1


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError("Unable to allocate 1.2 TiB for an array"),  # numpy's, building a batch
])
def test_out_of_memory_is_one_line_with_the_fix(tmp_path, tiny_dir, capsys, monkeypatch, error):
    def oom(self, batches):
        raise error
    monkeypatch.setattr(Trainer, "forward_backward", oom)
    assert main(_tiny_args(tiny_dir, tmp_path / "run", "--column", "Joke")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the start-up lines: one error, no traceback
    assert last.startswith("error: out of memory on cpu at batch 2 x 16 tokens; lower --batch-size"), last
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "failed"


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(tmp_path, tiny_dir, capsys):
    args = _tiny_args(tiny_dir, tmp_path / "run", "--column", "Joke")
    args[args.index("--batch-size") + 1] = "100000000"
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # one error, no traceback
    assert re.match(r"error: --batch-size 100000000 x --block-size 16 needs roughly [\d,.]+ GiB, more than the "
                    r"[\d,.]+ GiB of memory on cpu; lower --batch-size", last), last
    assert not (tmp_path / "run").exists()  # refused before the run was recorded: nothing to clean up


def test_a_diverged_loss_says_to_start_again_not_resume(tmp_path, tiny_dir, capsys):
    args = _tiny_args(tiny_dir, tmp_path / "run", "--column", "Joke", "--lr", "1e6", "--eval-every", "0")
    args[args.index("--steps") + 1] = "30"
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the loss became nan at step ") and "start a new run with a lower --lr" in last
    info = json.loads((tmp_path / "run/run.json").read_text())  # the failed run says how far it got
    assert info["status"] == "failed" and info["step"] == int(last.split("at step ")[1].split(";")[0]) > 0
    assert "--dtype" not in last  # already float32
    assert "--resume would repeat" in last


def test_data_too_small_to_split_warns_once_or_fails_when_asked(tmp_path, tiny_dir, capsys):
    (tmp_path / "one.txt").write_text("Hi")
    args = _tiny_args(tiny_dir, tmp_path / "run")
    args[args.index(str(JOKES))] = str(tmp_path / "one.txt")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "note: encoding 1 file into" in err  # data preparation is not silent
    warnings = [line for line in err.splitlines() if "hold out" in line]
    assert warnings == ["warning: the data has only 2 tokens, too few to hold out validation data; training "
                        "without validation (add --val-data FILE to validate)"], warnings
    # the split asked for explicitly: an error with the fix
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    assert main(args + ["--val-fraction", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the data has only 2 tokens") and err.endswith("or --val-fraction 0")


@pytest.mark.parametrize("kw, expect", [
    (dict(steps=2.5), "TrainConfig.steps must be int | None, not 2.5"),
    (dict(lr="1e-4"), "TrainConfig.lr must be float | None, not '1e-4'"),
    (dict(freeze="embeddings"), "TrainConfig.freeze must be list[str], not 'embeddings'"),
    (dict(prompts="Hello"), "TrainConfig.prompts must be list[str]"),
    (dict(eps=-1.0), "eps must be > 0"),
    (dict(lr=math.nan), "--lr must be a finite number"),
])
def test_the_python_api_checks_types_and_values_up_front(tmp_path, kw, expect):
    cfg = TrainConfig(model="m", data=["d"], out=str(tmp_path / "run"), **kw)
    with pytest.raises(Gpt2kitError) as e:
        finetune(cfg, progress=False)
    assert expect in str(e.value) and not (tmp_path / "run").exists()
    with pytest.raises(Gpt2kitError, match="takes a TrainConfig, not dict"):
        finetune({"model": "m"}, progress=False)


def test_options_that_cannot_apply_are_said(tmp_path, tiny_dir, capsys):
    long = tmp_path / "long.txt"
    long.write_text("a short line\n" + "word " * 40 + "\n")  # the second document is longer than 16 + 1 tokens
    args = _tiny_args(tiny_dir, tmp_path / "a", "--line-by-line", "--val-fraction", "0", "--eval-every", "2")
    args[args.index(str(JOKES))] = str(long)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: --line-by-line: 1 of 2 documents are longer than block size 16 + 1 tokens" in err
    assert "warning: --eval-every 2 needs validation data and this run has none" in err
    (tmp_path / "prompts.txt").write_text("\n  \n")
    args = _tiny_args(tiny_dir, tmp_path / "b", "--column", "Joke", "--prompts", str(tmp_path / "prompts.txt"))
    assert main(args) == 1
    assert "holds no prompts" in capsys.readouterr().err


def _extend(run: Path, steps: int) -> None:
    """Raise a finished run's --steps, so that it can be resumed (as the README says)."""
    cfg = json.loads((run / "config.json").read_text())
    cfg["steps"] = steps
    (run / "config.json").write_text(json.dumps(cfg))


def test_resume_refuses_a_replaced_tokens_cache(tmp_path, tiny_dir, capsys):
    cache = tmp_path / "g.tokens"
    other = tmp_path / "other.txt"
    other.write_text("something else entirely, " * 200)

    def encode(src: Path, *extra: str) -> None:
        assert main(["encode", str(src), *extra, "--tokenizer", str(VOCAB_DIR), "--out", str(tmp_path / "new.tokens")
                     ]) == 0
        os.replace(tmp_path / "new.tokens", cache)
    encode(JOKES, "--column", "Joke")
    run = tmp_path / "gt"
    finetune(_cfg(tmp_path, tiny_dir, data=[str(cache)], column=None, val_fraction=0.0, steps=2, save_every=1,
                  out=str(run)), progress=False)
    _extend(run, 3)
    encode(other)
    recorded = json.loads((run / "run.json").read_text())
    with pytest.raises(Gpt2kitError, match=f"cannot resume {run}: its training data {cache} has changed since the "
                                           r"run started \(\d[\d,]* tokens then, [\d,]+ now\); put the original back"):
        resume(run, progress=False)
    assert json.loads((run / "run.json").read_text()) == recorded  # a failed resume keeps the run's progress
    assert recorded["step"] == 2 and not (run / ".lock").exists()
    encode(JOKES, "--column", "Joke")  # the original back
    assert resume(run, progress=False).status == "finished"


def test_a_moved_run_that_prepares_its_data_again_records_the_new_caches(tmp_path, tiny_dir):
    import shutil
    run, moved = tmp_path / "r", tmp_path / "moved"
    finetune(_cfg(tmp_path, tiny_dir, steps=2, save_every=1, out=str(run)), progress=False)
    _extend(run, 3)
    shutil.copytree(run, moved)
    shutil.rmtree(run)  # the caches run.json names are gone with it: the resume encodes the data again
    assert resume(moved, progress=False).status == "finished"
    info = json.loads((moved / "run.json").read_text())
    assert Path(info["train_tokens"]).parent == (moved / "data").resolve() and Path(info["train_tokens"]).is_file()


def test_lora_resume_with_a_moved_base_and_paths_in_the_python_api(tmp_path, tiny_dir, capsys):
    import shutil
    base, moved, other = tmp_path / "tinyB", tmp_path / "tinyC", tmp_path / "other"
    shutil.copytree(tiny_dir, base)
    save_model(random_model(TINY, seed=2), Tokenizer.from_dir(VOCAB_DIR), other)
    run = tmp_path / "mv"
    assert main(_tiny_args(base, run, "--column", "Joke", "--lora-rank", "4", "--lora-targets", "c_attn, c_fc",
                           "--steps", "2", "--save-every", "1")) == 0
    err = capsys.readouterr().err
    assert re.search(r"\d,\d{3} trained \(LoRA rank 4\)", err), err  # not "0.00M"
    _extend(run, 3)
    base.rename(moved)
    assert main(["finetune", "--resume", str(run), "--no-progress"]) == 1
    assert f"the base model {base} of this LoRA run is gone; pass --model WHERE_IT_IS_NOW with --resume" in \
        capsys.readouterr().err
    assert main(["finetune", "--resume", str(run), "--model", str(other), "--no-progress"]) == 1
    assert "whose weights have changed since" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(run), "--model", str(moved), "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["step"] == 3
    # a full run resumes from its own weights: --model has nothing to do there
    full = tmp_path / "full"
    assert main(_tiny_args(moved, full, "--column", "Joke")) == 0
    assert main(["finetune", "--resume", str(full), "--model", str(moved)]) == 1
    assert "drop --model" in capsys.readouterr().err

    # paths in the Python API: as str, so config.json stays JSON; a single data path is a list of one
    cfg = TrainConfig(model=moved, data=JOKES, val_data=[JOKES], out=tmp_path / "p").validate()
    assert (cfg.model, cfg.data, cfg.val_data, cfg.out) == (str(moved), [str(JOKES)], [str(JOKES)],
                                                          str(tmp_path / "p"))
    json.dumps(cfg.to_dict())


def test_an_interrupted_lora_run_names_its_newest_checkpoint(tmp_path, tiny_dir, monkeypatch):
    from gpt2kit.checkpoints import open_base
    ctrl_c_in_the_first_step(monkeypatch)
    result = finetune(_cfg(tmp_path, tiny_dir, lora_rank=4, steps=3, eval_every=0), progress=False)
    assert result.status == "interrupted" and result.model_dir == tmp_path / "run/checkpoints/step-1"
    open_base(str(result.model_dir), device="cpu", dtype=torch.float32)  # (what --model RUN loads too)


def test_the_resume_hint_names_torchrun_for_a_run_of_several_processes():
    from gpt2kit.train import _resume_hint
    assert _resume_hint("my run") == "`gpt2kit finetune --resume 'my run'` (Python: resume('my run'))"
    # a run of 2 processes is refused by a 1-process resume, so the hint must not offer one
    assert _resume_hint("my run", 2) == "`torchrun --nproc_per_node 2 -m gpt2kit finetune --resume 'my run'`"


# ---- durability: --overwrite deletes last; failed starts leave nothing; numbered runs; longer runs --------

def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_overwrite_checks_everything_before_it_deletes_the_old_run(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    args = _tiny_args(tiny_dir, out, "--column", "Joke", "--save-every", "1")
    assert main(args) == 0
    before = _snapshot(out)
    assert {"best/model.safetensors", "final/model.safetensors", "checkpoints/step-1/trainer.pt"} <= set(before)
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 50)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    capsys.readouterr()
    for data, extra in ((tmp_path / "bin.dat", []),  # a binary file
                        (JOKES, []),  # a CSV without --column
                        (tmp_path / "latin.txt", []),  # not UTF-8
                        (JOKES, ["--column", "Joke", "--model", str(corrupt)]),
                        (JOKES, ["--column", "Joke", "--block-size", "1000"])):  # the model's context is 64
        bad = _tiny_args(tiny_dir, out, "--overwrite", *extra)
        bad[bad.index(str(JOKES))] = str(data)
        assert main(bad) == 1, (data, extra)
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: "), err
        assert _snapshot(out) == before, (data, extra)  # the old run is whole, and nothing was added
        assert sorted(p.name for p in out.iterdir()) == sorted({k.split("/")[0] for k in before})
    assert main(args + ["--overwrite"]) == 0  # the checks pass: now it is replaced


def test_numbered_runs_and_naming_them_by_number(tmp_path, tiny_dir, capsys, monkeypatch):
    from gpt2kit.checkpoints import resolve_model_dir
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(tiny_dir, Path("x"), "--column", "Joke")
    i = args.index("--out")
    numbered = args[:i] + args[i + 2:]
    # a start that fails before training (a model that cannot be downloaded offline) leaves no folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(numbered[:1] + ["--model", "gpt2"] + numbered[3:]) == 1
    assert "cannot download 'gpt2'" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert main(numbered + ["--runs-dir", "runs", "--name", "jokes"]) == 0
    assert capsys.readouterr().out.strip() == "runs/0001-jokes/best"
    assert main(numbered) == 0  # without --out: the next number in runs/
    assert capsys.readouterr().out.strip() == "runs/0002/best"
    # a start that fails before training leaves no numbered folder (its number is used again)
    assert main(numbered + ["--column", "Nope"]) == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["0001-jokes", "0002"]
    (tmp_path / "runs" / "0041-mine").mkdir()  # the next number follows the highest there is
    assert main(numbered + ["--name", "x", "--runs-dir", "runs"]) == 0
    assert capsys.readouterr().out.strip() == "runs/0042-x/best"
    (tmp_path / "runs" / "0041-mine").rmdir()
    # runs/N, or N alone for runs/, names the run wherever --model (or --resume, or `runs DIR`) is taken
    assert resolve_model_dir("runs/1") == Path("runs/0001-jokes/best")
    assert resolve_model_dir("2") == Path("runs/0002/best")
    Path("few.txt").write_text("A few words to score. " * 10)
    assert main(["eval", "--model", "1", "--data", "few.txt"]) == 0
    capsys.readouterr()
    assert main(["runs", "runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["#", "RUN"] and [ln.split()[:2] for ln in table[1:]] == [
        ["1", "runs/0001-jokes"], ["2", "runs/0002"], ["42", "runs/0042-x"]]
    assert main(["runs", "42", "--json"]) == 0 and json.loads(capsys.readouterr().out)["number"] == 42
    assert main(["runs", "43"]) == 1  # a number no run has
    assert capsys.readouterr().err == "error: no run numbered 43 in runs/: `gpt2kit runs runs` lists them\n"
    # a new run started from run 1 records its real path
    start = _tiny_args(Path("1"), Path("from-one"), "--column", "Joke")
    assert main(start) == 0
    assert json.loads(Path("from-one/config.json").read_text())["model"] == str(tmp_path / "runs/0001-jokes")
    (tmp_path / "runs" / "0002-copy").mkdir()
    with pytest.raises(Gpt2kitError, match="2 is ambiguous: runs/0002, runs/0002-copy have the number 2"):
        resolve_model_dir("2")
    capsys.readouterr()
    assert main(numbered + ["--out", "y", "--name", "z"]) == 1
    assert "give one or the other" in capsys.readouterr().err


def test_resume_with_steps_continues_a_finished_run_with_its_optimizer(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    args = _tiny_args(tiny_dir, out, "--column", "Joke", "--lr", "1e-3", "--eval-every", "0")
    args[args.index("--steps") + 1] = "4"
    assert main(args) == 0
    assert main(["finetune", "--resume", str(out), "--steps", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resuming at step 4" in err and "steps: 6 of" in err
    info, cfg = json.loads((out / "run.json").read_text()), json.loads((out / "config.json").read_text())
    assert info["status"] == "finished" and info["step"] == 6 and info["total_steps"] == 6 and cfg["steps"] == 6
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "lr" in r}
    # the schedule is the one of a 6-step run from where it stood (step 5 is optimizer step 4, 0-based)
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    assert lrs[5] == pytest.approx(lr_at(4, TrainConfig(**cfg), 6)) and lrs[6] == pytest.approx(1e-4)
    # continued, not restarted: the AdamW state holds every step's moments (its step count is 6)
    state = torch.load(out / "checkpoints/step-6/trainer.pt", weights_only=True)
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 6
    assert main(["finetune", "--resume", str(out), "--steps", "6"]) == 1
    err = capsys.readouterr().err
    assert "already finished (6 steps)" in err and "--steps 6 is no more than that" in err
    assert main(["finetune", "--resume", str(out), "--epochs", "0.0001"]) == 1
    assert "it has done 6 already" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text()) == info  # refused: the run is as it was
    assert main(["finetune", "--resume", str(out), "--steps", "7", "--epochs", "2"]) == 1
    assert "not both" in capsys.readouterr().err


def test_every_file_of_a_run_follows_the_umask(tmp_path, tiny_dir):
    import stat

    old = os.umask(0o022)
    try:
        res = finetune(_cfg(tmp_path, tiny_dir, steps=2, save_every=1, eval_every=1, eval_batches=1), progress=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(res.run_dir)): stat.S_IMODE(p.stat().st_mode) for p in res.run_dir.rglob("*")}
    assert "best/model.safetensors" in modes and "checkpoints/step-2/trainer.pt" in modes
    assert {p: oct(m) for p, m in modes.items() if m not in (0o644, 0o755)} == {}  # weights were 0600


def test_every_train_option_is_a_finetune_flag_with_the_configs_default():
    """The finetune flags are built from TrainConfig's fields: each option's flag exists, parses to the field's
    own default, and a value given on the command line reaches the TrainConfig the CLI builds."""
    import dataclasses

    from gpt2kit.cli import _verb_parsers, build_parser
    from gpt2kit.cli.finetune import OPTIONS

    parser = _verb_parsers(build_parser())["finetune"]
    args = vars(parser.parse_args([]))
    options = [f for f in dataclasses.fields(TrainConfig) if "group" in f.metadata]
    assert {f.name for f in options} == set(OPTIONS) <= set(args)
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(TrainConfig)} - {"eps", "sample_temperature",
                                                                                 "sample_top_k"}
    defaults = TrainConfig()
    for f in options:
        want = None if f.name == "out" else getattr(defaults, f.name)  # (without --out: a numbered run)
        assert args[f.name] == want, f.name
    got = vars(parser.parse_args(["--lora-targets", "c_attn, mlp", "--prompt", "a", "--no-tensorboard"]))
    assert got["lora_targets"] == ["c_attn", "mlp"] and got["prompts"] == ["a"] and got["tensorboard"] is False


def test_trainer_state_writes_the_v1_keys(tmp_path):
    from gpt2kit.data import Batcher, TokenCache, prepare_data
    from gpt2kit.train.state import TrainState

    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 200)
    train, _ = prepare_data([str(text)], Tokenizer.from_dir(VOCAB_DIR), val_fraction=0.0, cache_dir=tmp_path / "c")
    assert isinstance(train, TokenCache)
    model = random_model(TINY, seed=1).train()
    trainer = Trainer(model, TrainConfig(model="x", data=["x"]), torch.device("cpu"))
    state = TrainState(trainer, Batcher(train, 16, 2, seed=0), step=3, best_val=1.5, best_step=2)
    saved = state.state_dict(schedule="cosine", total_steps=10, world=1)
    assert set(saved) == {"version", "step", "world_size", "optimizer", "scaler", "scheduler", "batcher", "rng",
                          "best_val_loss", "best_step", "bad_evals", "tokens", "train_time", "last_loss"}
    assert saved["version"] == 1 and saved["step"] == 3
    again = TrainState(trainer, Batcher(train, 16, 2, seed=0))
    again.load_state_dict(saved)
    assert (again.step, again.best_val, again.best_step) == (3, 1.5, 2)
