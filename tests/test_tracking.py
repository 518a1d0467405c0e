"""`finetune --wandb`: what a run logs to Weights & Biases, read back from wandb's offline run file, and the
one-line errors when the extra is missing; a tracker that fails never stops training."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from gpt2kit import tracking
from gpt2kit.checkpoints import save_model
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.train import TrainConfig, finetune
from tests.conftest import JOKES, VOCAB_DIR, random_model

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture
def base(tmp_path) -> tuple[Path, Path]:
    save_model(random_model(TINY, seed=1), Tokenizer.from_dir(VOCAB_DIR), tmp_path / "base")
    lines = [row for row in JOKES.read_text(encoding="utf-8").splitlines()[1:300] if row.strip()]
    (tmp_path / "jokes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "base", tmp_path / "jokes.txt"


def _wandb_records(wandb_dir: Path) -> list:
    """The records of the one offline run under `wandb_dir`, parsed with wandb's own protobuf classes. The
    .wandb file is a LevelDB-style log: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks
    of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_logs_metrics_samples_and_config(base, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    model, data = base
    # (~20 s on a busy 2-core machine: wandb's import, its service process and a tiny run; one run covers
    # metrics, samples and config)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "4", "--batch-size", "2", "--block-size", "16", "--eval-every", "2",
                 "--eval-batches", "1", "--sample-every", "2", "--sample-tokens", "4", "--prompt", "Knock knock",
                 "--no-progress", "--no-tensorboard", "--wandb", "--wandb-project", "jokes",
                 "--wandb-run-name", "tiny"]) == 0
    # wandb's service may still be flushing its log when finish() returns: read until the run record is there
    deadline = time.monotonic() + 20
    while True:
        recs = _wandb_records(tmp_path / "wb")
        found = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    (run,) = found
    assert run.project == "jokes" and run.display_name == "tiny"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["steps"] == 4 and config["block_size"] == 16 and config["prompts"] == ["Knock knock"]

    history: dict[int, dict] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items: dict = {}
            for i in r.history.item:  # a table's fields come as nested keys: ("samples", "nrows")
                *outer, last = list(i.nested_key) or [i.key]
                d = items
                for k in outer:
                    d = d.setdefault(k, {})
                d[last] = json.loads(i.value_json)
            history.setdefault(items["_step"], {}).update(items)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:  # every record of metrics.jsonl, as logged there
        h = history[m["step"]]
        if "loss" in m:
            assert h["train/loss"] == pytest.approx(m["loss"]) and h["train/lr"] == pytest.approx(m["lr"])
            assert h["train/tokens_per_sec"] == pytest.approx(m["tok_per_s"])
        else:
            assert h["val/loss"] == pytest.approx(m["val_loss"])
    assert {s for s, h in history.items() if "val/loss" in h} == {0, 2, 4}
    samples = {s: h["samples"] for s, h in history.items() if "samples" in h}
    assert set(samples) == {0, 2, 4} and all(t["_type"] == "table-file" and t["nrows"] == 1
                                             for t in samples.values())
    (table,) = (tmp_path / "wb").glob("wandb/offline-run-*/files/media/table/samples_4_*.table.json")
    rows = json.loads(table.read_text())
    assert rows["columns"] == ["step", "prompt", "text"]
    sample_file = (tmp_path / "run" / "samples" / "step-4.txt").read_text()
    assert rows["data"][0][:2] == [4, "Knock knock"] and rows["data"][0][2].strip() in sample_file


def test_wandb_missing_is_one_line_naming_the_extra(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    model, data = base
    assert main(["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress", "--wandb"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --wandb needs the wandb package: pip install 'gpt2kit[wandb]'\n"
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(tracking.Gpt2kitError, match=r"gpt2kit\[wandb\]"):
        tracking.WandbTracker({}, tmp_path, None, None)
    assert main(["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--wandb-project", "p"]) == 1
    assert "add --wandb" in capsys.readouterr().err


class _Broken:
    def __init__(self):
        self.calls = []

    def log_metrics(self, step, metrics):
        self.calls.append(("metrics", step))
        raise RuntimeError("the tracker's server went away")

    def log_samples(self, step, prompts, texts):
        self.calls.append(("samples", step))

    def finish(self, status):
        self.calls.append(("finish", status))


def test_a_failing_tracker_warns_once_and_training_goes_on(base, tmp_path, monkeypatch, caplog):
    broken = _Broken()
    monkeypatch.setattr(tracking, "open_trackers", lambda *a, **k: tracking.Trackers([broken]))
    model, data = base
    cfg = TrainConfig(model=str(model), data=[str(data)], out=str(tmp_path / "run"), steps=3, batch_size=2,
                      block_size=16, eval_every=0, val_fraction=0.0, sample_every=3, sample_tokens=2,
                      tensorboard=False, wandb=True)
    monkeypatch.setattr(tracking, "check_available", lambda use: None)
    with caplog.at_level("WARNING", logger="gpt2kit"):
        r = finetune(cfg, progress=False)
    assert r.status == "finished" and r.step == 3
    assert [c for c in broken.calls if c[0] == "metrics"] == [("metrics", 1), ("metrics", 2), ("metrics", 3)]
    assert ("samples", 3) in broken.calls and broken.calls[-1] == ("finish", "finished")
    warned = [m for m in caplog.messages if "failed" in m]
    assert len(warned) == 1 and "the tracker's server went away" in warned[0]
