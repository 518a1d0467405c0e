"""`gpt2kit push` and `finetune --push-to-hub` against the stand-in Hub of test_hub.py (127.0.0.1 only): the
files arrive, the card holds the run's facts, and every failure is one line."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

from gpt2kit.checkpoints import hub as hub_mod
from gpt2kit.checkpoints import save_model
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.push import push
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import TrainConfig, finetune
from tests.conftest import JOKES, VOCAB_DIR, random_model
from tests.test_hub import FakeHub, _isolated  # noqa: F401 - _isolated: autouse (own HF cache, loopback only)

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt"}


@pytest.fixture
def fake(monkeypatch):
    h = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", h.url)  # (HF_ENDPOINT was read at import)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield h
    h.stop()


@pytest.fixture(autouse=True)
def _token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))  # never the user's login


def _data(d: Path) -> Path:
    lines = [row for row in JOKES.read_text(encoding="utf-8").splitlines()[1:400] if row.strip()]
    (d / "jokes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "jokes.txt"


def _cfg(d: Path, **kw) -> TrainConfig:
    base = dict(model=str(d / "base"), data=[str(d / "jokes.txt")], out=str(d / "run"), steps=4, batch_size=4,
                block_size=32, eval_every=2, eval_batches=2, sample_every=0, tensorboard=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run with validation (best/ and final/) and a loss plot."""
    d = tmp_path_factory.mktemp("push")
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), d / "base")
    _data(d)
    r = finetune(_cfg(d), progress=False)
    assert r.status == "finished" and (d / "run" / "best").is_dir() and (d / "run" / "loss.png").is_file()
    return d / "run"


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_push_run_uploads_best_model_plot_and_card(run_dir, fake):
    url = push(run_dir, "me/jokes")
    assert url == f"{fake.url}/me/jokes" and fake.private["me/jokes"] is False
    files = fake.repos["me/jokes"]
    assert set(files) == MODEL_FILES | {"loss.png", "README.md"}
    for f in MODEL_FILES:  # best/ by default: the lowest validation loss
        assert files[f] == (run_dir / "best" / f).read_bytes(), f
    assert files["loss.png"] == (run_dir / "loss.png").read_bytes()
    assert len(fake.commits) == 1 and "best" in fake.commits[0]["summary"]

    text = files["README.md"].decode()
    meta = ModelCard(text).data.to_dict()
    assert meta["tags"] == ["gpt2", "gpt2kit", "text-generation"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta and "license" not in meta  # a local base model: no Hub id, licence unknown
    info = json.loads((run_dir / "run.json").read_text())
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_val = [r["val_loss"] for r in vals if "val_loss" in r][-1]
    from gpt2kit.data import TokenCache
    n_train = len(TokenCache.open(info["train_tokens"]))
    for fact in (f"| validation loss, best | {info['best_val_loss']:.4f} (step {info['best_step']}) |",
                 f"| validation loss, final | {final_val:.4f} |", "| steps | 4 of 4 |",
                 f"jokes.txt ({n_train:,} tokens", "![training and validation loss](loss.png)",
                 "gpt2kit finetune --model base --data jokes.txt --val-fraction 0.05 --steps 4 --block-size 32",
                 "gpt2kit generate \"Once upon a time\" --model me/jokes",
                 'pipeline("text-generation", model="me/jokes")'):
        assert fact in text, fact
    assert str(run_dir.parent) not in text  # local paths by name only

    # and what was pushed downloads and loads again
    from gpt2kit.checkpoints import load_model
    got = hub_mod.download("me/jokes", endpoint=fake.url)
    ours, _ = load_model(got)
    ref, _ = load_model(run_dir / "best")
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))


def test_push_final_private_and_a_hub_base_model(run_dir, fake, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("run.json", "config.json"):  # as if it had been fine-tuned from gpt2 on the Hub
        d = json.loads((copy / name).read_text())
        d["model"] = "gpt2"
        (copy / name).write_text(json.dumps(d))
    assert main(["push", str(copy), "--repo", "me/final", "--which", "final", "--private"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{fake.url}/me/final" and "final" in err and "after the last step" in err
    assert fake.private["me/final"] is True
    files = fake.repos["me/final"]
    assert files["model.safetensors"] == (copy / "final" / "model.safetensors").read_bytes()
    meta = ModelCard(files["README.md"].decode()).data.to_dict()
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] == "mit"
    assert "fine-tuned from [openai-community/gpt2]" in files["README.md"].decode()


def test_push_a_model_dir_and_again_into_the_same_repo(fake, tmp_path):
    d = tmp_path / "m"
    save_model(random_model(TINY), Tokenizer.from_dir(VOCAB_DIR), d)
    (d / "trainer.pt").write_bytes(b"not for the Hub")
    push(d, "me/plain")
    assert set(fake.repos["me/plain"]) == {p.name for p in d.iterdir()} - {"trainer.pt"} | {"README.md"}
    assert "A GPT-2 model shared with" in fake.repos["me/plain"]["README.md"].decode()
    (d / "README.md").write_text("# my own card\n")
    push(d, "me/plain")  # an existing repository is fine (exist_ok), and the directory's own card is kept
    assert fake.repos["me/plain"]["README.md"] == b"# my own card\n"


def test_not_a_model_dir_is_one_line(fake, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["push", str(tmp_path), "--repo", "me/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a gpt2kit run nor a model directory" in err
    assert main(["push", str(tmp_path / "nope"), "--repo", "me/x"]) == 1
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(Gpt2kitError) as e:
        push(tmp_path, "not a repo id")
    assert "ORG/NAME" in _one_line(e)
    assert fake.requests == []


def test_no_token_is_one_line_naming_hf_token(run_dir, fake, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(Gpt2kitError) as e:
        push(run_dir, "me/x")
    msg = _one_line(e)
    assert "HF_TOKEN" in msg and "hf auth login" in msg and "huggingface-cli login" in msg
    assert fake.requests == []


def test_rejected_token_and_foreign_namespace(run_dir, fake, monkeypatch):
    with pytest.raises(Gpt2kitError) as e:
        push(run_dir, "not-mine/x")
    assert "no permission to write to not-mine/x" in _one_line(e)
    monkeypatch.setenv("HF_TOKEN", "bad")
    with pytest.raises(Gpt2kitError) as e:
        push(run_dir, "me/x")
    assert "rejected the access token" in _one_line(e) and "HF_TOKEN" in str(e.value)


def test_hub_unreachable_is_one_line(run_dir, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    with pytest.raises(Gpt2kitError) as e:
        push(run_dir, "me/x")
    assert "unreachable" in _one_line(e)


def test_a_hub_that_never_answers_or_offline_mode_is_one_line(run_dir, monkeypatch):
    from gpt2kit.checkpoints import hub
    from tests.test_hub import silent_server

    monkeypatch.setattr(hub, "READ_TIMEOUT_S", 0.5)  # (60 s in use)
    with silent_server() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        with pytest.raises(Gpt2kitError) as e:
            push(run_dir, "me/x")
    assert "unreachable (no network connection, no answer" in _one_line(e)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Gpt2kitError) as e:
        push(run_dir, "me/x")
    assert _one_line(e) == "cannot push to me/x: HF_HUB_OFFLINE is set; unset it to push"


def test_adapter_only_and_unfinished_runs_say_what_to_do(tmp_path, run_dir):
    from gpt2kit.push import pick_model
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "best")
    assert pick_model(copy).which == "final"  # no best/: auto takes final/
    with pytest.raises(Gpt2kitError) as e:
        pick_model(copy, "best")
    assert "use --which final" in _one_line(e)
    shutil.rmtree(copy / "final")
    with pytest.raises(Gpt2kitError) as e:
        pick_model(copy)
    assert "no final/ model" in _one_line(e)
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter.safetensors").write_bytes(b"")
    (ad / "adapter_config.json").write_text("{}")
    with pytest.raises(Gpt2kitError) as e:
        pick_model(ad)
    assert "gpt2kit merge" in _one_line(e)


def test_finetune_push_to_hub_failure_keeps_the_run_and_says_how_to_retry(fake, tmp_path, capsys):
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    data = _data(tmp_path)
    args = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--sample-every", "0",
            "--no-progress", "--no-tensorboard", "--push-to-hub", "not-mine/run", "--push-private"]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the run finished, but pushing it to not-mine/run failed: no permission")
    retry = f"gpt2kit push {tmp_path / 'run'} --repo not-mine/run --private"
    assert last.endswith(f"retry with `{retry}`")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"
    # the retry it names works (to a repository we may write to)
    assert main(retry.split()[1:-3] + ["--repo", "me/run", "--private"]) == 0
    assert fake.private["me/run"] is True and "model.safetensors" in fake.repos["me/run"]
    assert "--push-to-hub" not in fake.repos["me/run"]["README.md"].decode()


def test_finetune_push_to_hub_checks_before_training(fake, tmp_path, monkeypatch, capsys):
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    data = _data(tmp_path)
    base = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "run"),
            "--steps", "1", "--no-progress"]
    assert main([*base, "--push-to-hub", "no-slash"]) == 1
    assert "ORG/NAME" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    assert main([*base, "--push-to-hub", "me/x"]) == 1
    assert "HF_TOKEN" in capsys.readouterr().err
    assert main([*base, "--push-private"]) == 1
    assert "add --push-to-hub" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and fake.requests == []


def test_finetune_push_to_hub_success(fake, tmp_path, capsys):
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    r = finetune(_cfg(tmp_path, steps=2, eval_every=0, val_fraction=0.0, data=[str(_data(tmp_path))],
                      push_to_hub="me/auto"), progress=False)
    assert r.pushed == f"{fake.url}/me/auto" and r.push_error is None
    files = fake.repos["me/auto"]
    assert files["model.safetensors"] == (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert "| validation loss, best | - |" in files["README.md"].decode()
    assert "pushed to" in capsys.readouterr().err
