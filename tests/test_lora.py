"""LoRA: adapters start as the identity, train alone, save small, and merging them gives the same logits as
applying them (in memory, through `gpt2kit merge`, and from a LoRA run directory)."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2kit import checkpoints, lora
from gpt2kit.checkpoints import load_model, save_model
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import TrainConfig, finetune
from tests.conftest import JOKES, VOCAB_DIR, random_model

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds hand-off stalls on a busy machine
    yield
    torch.set_num_threads(n)


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_adapters_start_as_identity_and_train_alone():
    model = random_model(TINY, seed=1)
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(ids)
    wrapped = lora.apply_lora(model, lora.LoraConfig(rank=4, targets=["all"]))
    assert len(wrapped) == 4 * TINY.n_layer
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # the base parameters keep their names, so plain checkpoints still map onto the model
    assert "transformer.h.0.attn.c_attn.weight" in dict(model.named_parameters())

    cfg = lora.LoraConfig(rank=2, targets=["c_attn", "mlp"])
    assert cfg.targets == ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"] and cfg.scale == 2.0
    with pytest.raises(Gpt2kitError):
        lora.LoraConfig(rank=2, targets=["wte"])
    for kw, msg in [(dict(dropout=1.5), "LoRA dropout (--lora-dropout) must be in [0, 1), got 1.5"),
                    (dict(rank=0), "LoRA rank (--lora-rank) must be >= 1, got 0"),
                    (dict(alpha=-1.0), "LoRA alpha (--lora-alpha) must be > 0, got -1.0")]:
        with pytest.raises(Gpt2kitError) as e:
            lora.LoraConfig(**kw)
        assert str(e.value) == msg


def test_merge_equals_adapters_applied(tmp_path):
    model = random_model(TINY, seed=2)
    cfg = lora.LoraConfig(rank=4, alpha=8, targets=["all"], base_model=str(tmp_path / "base"))
    save_model(model, Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    lora.apply_lora(model, cfg)
    _randomise_adapters(model)
    model.eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        applied = model(ids)
        merged_sd = lora.merged_state_dict(model)  # the model itself is untouched
        assert torch.equal(model(ids), applied)

    # save the adapter: small, and it round-trips
    lora.save_adapter(model, cfg, tmp_path / "adapter")
    size = (tmp_path / "adapter" / lora.ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.1 * (tmp_path / "base/model.safetensors").stat().st_size
    again, _ = checkpoints.load_lora_model(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(ids), applied, atol=1e-6)

    # merged in memory
    with torch.no_grad():
        lora.merge_lora(model)
        assert not lora.lora_modules(model)
        assert torch.allclose(model(ids), applied, atol=1e-5, rtol=1e-5)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, merged_sd[k], atol=1e-7), k

    # merged on disk by the CLI verb, loaded as a plain model
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    plain, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(plain(ids), applied, atol=1e-5, rtol=1e-5)


def test_lora_run_saves_small_checkpoints_and_merges(tmp_path):
    save_model(random_model(TINY, seed=3), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), data=[str(JOKES)], column="Joke", out=str(tmp_path / "run"),
                      steps=4, batch_size=4, block_size=16, lr=1e-2, lora_rank=4, lora_dropout=0.0,
                      eval_every=4, eval_batches=2, sample_every=0, save_every=2, tensorboard=False)
    res = finetune(cfg, progress=False)
    run = res.run_dir
    ckpt = run / "checkpoints/step-4"
    assert (ckpt / lora.ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())["base_model"] == str((tmp_path / "base").resolve())
    # best/ and final/ hold the adapter and the merged model, so --model RUN works like any model
    ids = torch.randint(0, TINY.vocab_size, (1, 10))
    adapted, _ = checkpoints.load_lora_model(run)
    merged_run, _ = load_model(run)
    base, _ = load_model(tmp_path / "base")
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged_cli, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        ref = adapted(ids)
        assert not torch.allclose(base(ids), ref, atol=1e-4)  # training moved the adapters
        assert torch.allclose(merged_run(ids), ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(merged_cli(ids), ref, atol=1e-5, rtol=1e-5)

    assert main(["merge", str(tmp_path / "base"), "--out", str(tmp_path / "x")]) == 1  # not an adapter
    assert not (tmp_path / "x").exists()
    # convert reads whole models: an adapter checkpoint is pointed to merge
    with pytest.raises(Gpt2kitError, match=r"is a LoRA adapter, not a whole model: `gpt2kit merge .*step-4 --out DIR`"):
        checkpoints.convert(ckpt, tmp_path / "c")


def test_merge_writes_only_into_a_new_or_empty_directory(tmp_path, capsys):
    save_model(random_model(TINY, seed=3), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    model = random_model(TINY, seed=3)
    cfg = lora.LoraConfig(rank=2, targets=["all"], base_model=str(tmp_path / "base"))
    lora.apply_lora(model, cfg)
    _randomise_adapters(model)
    lora.save_adapter(model, cfg, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    weights = (tmp_path / "m/model.safetensors").read_bytes()
    # a second merge into it, or into any folder with files (a run directory, say), is refused untouched
    (tmp_path / "run").mkdir()
    (tmp_path / "run/run.json").write_text('{"status": "finished"}')
    for out in ("m", "run"):
        assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / out)]) == 1
        assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "m/model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]
    # a missing adapter or --base path is named, and --out is not created
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m3")]) == 1
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m3"), "--base",
                 str(tmp_path / "gone")]) == 1
    assert "--base" in capsys.readouterr().err and not (tmp_path / "m3").exists()
    # a --base that is a file, or a relative path that does not exist, is named as --base, not --model
    (tmp_path / "notes.txt").write_text("x")
    for base in (str(tmp_path / "notes.txt"), "no-such/base-dir"):
        assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m3"), "--base", base]) == 1
        err = capsys.readouterr().err
        assert f"--base {base}" in err or "pass --base" in err, err
        assert "--model" not in err, err


def test_lora_resume_from_checkpoint_matches(tmp_path):
    import shutil

    from gpt2kit.runs import update_run_json
    from gpt2kit.train import resume
    save_model(random_model(TINY, seed=4), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    kw = dict(model=str(tmp_path / "base"), data=[str(JOKES)], column="Joke", steps=4, batch_size=4, block_size=16,
              lora_rank=2, lora_dropout=0.1, eval_every=0, sample_every=0, save_every=2, tensorboard=False)
    finetune(TrainConfig(out=str(tmp_path / "a"), **kw), progress=False)
    finetune(TrainConfig(out=str(tmp_path / "b"), **kw), progress=False)
    # make b look like a run that died after its step-2 checkpoint
    for name in ("checkpoints/step-4", "final"):
        shutil.rmtree(tmp_path / "b" / name)
    update_run_json(tmp_path / "b", status="interrupted", step=2)
    res = resume(tmp_path / "b", progress=False)
    assert res.status == "finished" and res.step == 4
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a/final" / lora.ADAPTER_WEIGHTS))
    wb = load_file(str(tmp_path / "b/final" / lora.ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_model_run_with_adapter_checkpoints_only(tmp_path, capsys):
    # a LoRA run killed before best/ and final/ existed: --model RUN merges its newest adapter onto the base
    import shutil

    from gpt2kit import runs
    save_model(random_model(TINY, seed=5), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), data=[str(JOKES)], column="Joke", out=str(tmp_path / "run"),
                      steps=2, batch_size=4, block_size=16, lr=1e-2, lora_rank=4, lora_dropout=0.0, eval_every=0,
                      val_fraction=0.0, sample_every=0, save_every=1, tensorboard=False)
    run = finetune(cfg, progress=False).run_dir
    shutil.rmtree(run / "best", ignore_errors=True)
    shutil.rmtree(run / "final")
    runs.update_run_json(run, status="interrupted")
    assert runs.adapter_only_checkpoint(run) == run / "checkpoints/step-2"
    merged, tok = checkpoints.load_adapter_run(run)
    adapted, _ = checkpoints.load_lora_model(run / "checkpoints/step-2")
    ids = torch.randint(0, TINY.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    assert tok.encode("Why did the") == Tokenizer.from_dir(VOCAB_DIR).encode("Why did the")
    via_load, _ = load_model(run)  # what generate / eval / serve --model RUN load
    with torch.no_grad():
        assert torch.allclose(via_load(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    assert main(["generate", "Why", "--model", str(run), "--length", "3", "-t", "0"]) == 0
    assert capsys.readouterr().out.strip()
    # an adapter checkpoint directory itself is a model too: its base with it merged in, and the run's tokenizer
    step1, tok1 = load_model(run / "checkpoints/step-1")
    adapted1, _ = checkpoints.load_lora_model(run / "checkpoints/step-1")
    with torch.no_grad():
        assert torch.allclose(step1(ids), adapted1(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(step1(ids), adapted(ids), atol=1e-4)
    assert tok1.encode("Why did the") == tok.encode("Why did the")
    assert main(["generate", "Why", "--model", str(run / "checkpoints/step-1"), "--length", "3", "-t", "0"]) == 0
    assert capsys.readouterr().out.strip()

    # finetune --model RUN starts from those merged weights
    res = finetune(TrainConfig(model=str(run), data=[str(JOKES)], column="Joke", out=str(tmp_path / "next"),
                               steps=1, batch_size=4, block_size=16, lr=1e-12, eval_every=0, val_fraction=0.0,
                               sample_every=0, tensorboard=False), progress=False)
    nxt, _ = load_model(res.run_dir / "final")
    with torch.no_grad():
        assert torch.allclose(nxt(ids), adapted(ids), atol=1e-4)
    # merge on a run trained without LoRA is a one-line error
    assert main(["merge", str(res.run_dir), "--out", str(tmp_path / "m")]) == 1
    assert "no LoRA adapter" in capsys.readouterr().err
    # the base model moved: every command says how to merge the adapter onto it where it is now
    shutil.move(tmp_path / "base", tmp_path / "moved")
    ckpt = run / "checkpoints/step-2"
    for argv in (["merge", str(run), "--out", str(tmp_path / "m2")], ["generate", "Why", "--model", str(run)],
                 ["generate", "Why", "--model", str(ckpt)]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{tmp_path / 'base'}, is gone; move it back" in err, argv
        assert f"`gpt2kit merge {ckpt} --base MODEL --out DIR`" in err, argv
    assert main(["merge", str(run), "--out", str(tmp_path / "m2"), "--base", str(tmp_path / "moved")]) == 0


# ---- the base an adapter was trained on ------------------------------------------------------------------


def _lora_cfg(model, out, **kw):
    base = dict(model=str(model), data=[str(JOKES)], column="Joke", out=str(out), steps=2, batch_size=4,
                block_size=16, lr=1e-2, lora_rank=4, lora_dropout=0.0, eval_every=0, val_fraction=0.0,
                sample_every=0, save_every=1, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _logits(model_dir, ids):
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return model(ids)


def test_weights_fingerprint_follows_content_not_place(tmp_path, monkeypatch):
    import shutil

    from gpt2kit import runs
    monkeypatch.setattr(runs, "_WHOLE", 1 << 20)  # sample files over 1 MiB, as 500 MB ones are
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(torch.randint(0, 256, (8 << 20,), dtype=torch.uint8).numpy().tobytes())
    fp = checkpoints.weights_fingerprint(a)
    assert fp and fp.startswith("v1:")
    shutil.copytree(a, tmp_path / "b")
    assert checkpoints.weights_fingerprint(tmp_path / "b") == fp  # a copy elsewhere: the same weights
    with open(tmp_path / "b/model.safetensors", "r+b") as f:  # a change inside any one MiB of the file
        f.seek(5 << 20)
        f.write(b"\xff" * (1 << 20))
    assert checkpoints.weights_fingerprint(tmp_path / "b") != fp
    assert checkpoints.weights_fingerprint(tmp_path) is None  # no weights


def test_merge_refuses_a_base_trained_on_since_and_base_forces_it(tmp_path, capsys):
    import shutil

    from gpt2kit.train import resume
    save_model(random_model(TINY, seed=6), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "m0")
    # a full fine-tuning run is the base: --model RUN resolves to RUN/final
    base_run = finetune(_lora_cfg(tmp_path / "m0", tmp_path / "base", lora_rank=0, lora_dropout=0.05,
                                 lr=1e-3), progress=False).run_dir
    run = finetune(_lora_cfg(base_run, tmp_path / "run"), progress=False).run_dir
    rec = json.loads((run / "final" / lora.ADAPTER_CONFIG).read_text())
    assert rec["base_model"] == str((base_run / "final").resolve())
    assert rec["base_fingerprint"] == checkpoints.weights_fingerprint(base_run / "final")
    shutil.copytree(base_run / "final", tmp_path / "copy")  # the weights it was trained on, elsewhere
    ids = torch.randint(0, TINY.vocab_size, (1, 10))

    # base unchanged: merge gives the run's own merged model, exactly
    assert main(["merge", str(run), "--out", str(tmp_path / "m1")]) == 0
    assert torch.equal(_logits(tmp_path / "m1", ids), _logits(run / "final", ids))

    # the base run trains on (resumed with more steps): its final/ holds other weights under the same path
    cfg = json.loads((base_run / "config.json").read_text())
    (base_run / "config.json").write_text(json.dumps({**cfg, "steps": 3}))
    assert resume(base_run, progress=False).step == 3
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m2").exists()
    assert f"adapter {run / 'best'}" in err or f"adapter {run / 'final'}" in err
    assert f"trained on {base_run / 'final'}" in err and "changed since" in err and "--base" in err
    with pytest.raises(Gpt2kitError, match="changed since"):
        checkpoints.load_lora_model(run)
    with pytest.raises(Gpt2kitError, match="changed since"):
        checkpoints.load_lora_model(run / "checkpoints/step-2")

    # --base the copy of the weights it was trained on: the same model as before; --base the new weights
    # forces them (with a warning), and gives another model
    assert main(["merge", str(run), "--out", str(tmp_path / "m3"), "--base", str(tmp_path / "copy")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert torch.equal(_logits(tmp_path / "m3", ids), _logits(run / "final", ids))
    assert main(["merge", str(run), "--out", str(tmp_path / "m4"), "--base", str(base_run)]) == 0
    assert "warning: adapter" in capsys.readouterr().err
    assert not torch.allclose(_logits(tmp_path / "m4", ids), _logits(run / "final", ids), atol=1e-4)

    # adapters saved before fingerprints were recorded are not checked
    for d in (run / "final", run / "checkpoints/step-2"):
        c = json.loads((d / lora.ADAPTER_CONFIG).read_text())
        del c["base_fingerprint"]
        (d / lora.ADAPTER_CONFIG).write_text(json.dumps(c))
    assert main(["merge", str(run), "--out", str(tmp_path / "m5")]) == 0


def test_lora_on_an_adapter_only_run_keeps_the_checkpoint_it_merged(tmp_path, capsys):
    # a LoRA run stopped before best/ and final/ is the base of a second LoRA run: the second records the
    # adapter checkpoint that was merged, not the run, whose newest adapter moves on when it is resumed
    import shutil

    from gpt2kit import runs
    from gpt2kit.train import resume
    save_model(random_model(TINY, seed=7), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "m0")
    first = finetune(_lora_cfg(tmp_path / "m0", tmp_path / "first", steps=3), progress=False).run_dir
    shutil.rmtree(first / "checkpoints/step-3")
    shutil.rmtree(first / "final")
    runs.update_run_json(first, status="interrupted", step=2)
    second = finetune(_lora_cfg(first, tmp_path / "second", lr=1e-2), progress=False).run_dir
    rec = json.loads((second / "final" / lora.ADAPTER_CONFIG).read_text())
    assert rec["base_model"] == str((first / "checkpoints/step-2").resolve()) and rec["base_fingerprint"]
    ids = torch.randint(0, TINY.vocab_size, (1, 10))
    want = _logits(second / "final", ids)

    # the first run goes on to its final/ (step-2 stays, --keep 2): merge still uses the step-2 adapter
    assert resume(first, progress=False).step == 3 and (first / "final").is_dir()
    assert main(["merge", str(second), "--out", str(tmp_path / "m1")]) == 0
    assert torch.equal(_logits(tmp_path / "m1", ids), want)

    # step-2 rewritten with other adapter weights: refused, and --base forces it
    shutil.copy(first / "checkpoints/step-3" / lora.ADAPTER_WEIGHTS, first / "checkpoints/step-2")
    capsys.readouterr()
    assert main(["merge", str(second), "--out", str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert f"trained on {(first / 'checkpoints/step-2').resolve()}" in err and "changed since" in err
    assert main(["merge", str(second), "--out", str(tmp_path / "m2"), "--base",
                 str(first / "checkpoints/step-2")]) == 0
    assert not torch.allclose(_logits(tmp_path / "m2", ids), want, atol=1e-5)


def test_lora_resume_refuses_a_changed_base(tmp_path):
    import shutil

    from gpt2kit import runs
    from gpt2kit.train import resume
    tok = Tokenizer.from_dir(VOCAB_DIR)
    save_model(random_model(TINY, seed=8), tok, tmp_path / "m0")
    run = finetune(_lora_cfg(tmp_path / "m0", tmp_path / "run"), progress=False).run_dir
    shutil.rmtree(run / "checkpoints/step-2")
    shutil.rmtree(run / "final")
    runs.update_run_json(run, status="interrupted", step=1)
    save_model(random_model(TINY, seed=9), tok, tmp_path / "m0")  # other weights under the same path
    with pytest.raises(Gpt2kitError, match=r"cannot resume .*trained on .*m0, whose weights have changed since"):
        resume(run, progress=False)
    save_model(random_model(TINY, seed=8), tok, tmp_path / "m0")  # the same weights again: it goes on
    assert resume(run, progress=False).step == 2


def test_weights_fingerprint_leaves_a_missing_shard_to_the_loader(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}))
    (d / names[0]).write_bytes(b"\0" * 64)
    assert checkpoints.weights_fingerprint(d) is None  # not an OSError: loading then names the missing shard
    (d / names[1]).write_bytes(b"\1" * 64)
    assert checkpoints.weights_fingerprint(d).startswith("v1:")


def test_an_adapter_of_a_newer_format_is_refused_not_merged(tmp_path, capsys):
    save_model(random_model(TINY, seed=3), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    model = random_model(TINY, seed=3)
    cfg = lora.LoraConfig(rank=2, base_model=str(tmp_path / "base"))
    lora.apply_lora(model, cfg)
    lora.save_adapter(model, cfg, tmp_path / "adapter")
    conf = tmp_path / "adapter" / lora.ADAPTER_CONFIG
    written = json.loads(conf.read_text())
    assert written["version"] == lora.FORMAT_VERSION == 1
    for change, complaint in [({"version": 99}, "adapter format version 99, and this gpt2kit reads version 1"),
                              ({"version": "2"}, "adapter format version '2'"),
                              ({"format": "peft"}, "not a gpt2kit LoRA adapter")]:
        conf.write_text(json.dumps({**written, **change}))
        assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {conf}: ") and complaint in err and err.count("\n") == 1
        assert not (tmp_path / "merged").exists()
    del written["version"]  # none recorded: read as version 1
    conf.write_text(json.dumps(written))
    assert lora.read_adapter_config(tmp_path / "adapter").rank == 2


def test_adapter_weights_holding_nan_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(random_model(TINY, seed=3), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    model = random_model(TINY, seed=3)
    cfg = lora.LoraConfig(rank=2, base_model=str(tmp_path / "base"))
    lora.apply_lora(model, cfg)
    lora.save_adapter(model, cfg, tmp_path / "adapter")
    f = tmp_path / "adapter" / lora.ADAPTER_WEIGHTS
    tensors = load_file(str(f))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(Gpt2kitError, match=f"{f} holds NaN or infinite weights"):
        checkpoints.load_lora_model(tmp_path / "adapter")
