"""Run directories: listing and status (a killed run shows as dead), crash-safe directory replacement,
metrics that survive a torn last line, and the loss plot (skipped with one warning without matplotlib)."""

from __future__ import annotations

import builtins
import json
import logging
import math
import os

import pytest

from gpt2kit import plot, runs
from gpt2kit.cli import main


def _fake_run(path, **fields):
    path.mkdir(parents=True)
    runs.update_run_json(path, **fields)


def test_list_runs_status_and_table(tmp_path, capsys):
    _fake_run(tmp_path / "a", status="finished", step=100, total_steps=100, best_val_loss=2.5, last_loss=2.4)
    # running means "its lock is held", whatever run.json's pid and host say: b's process is gone, though its
    # recorded pid (this very process's) is alive; c's lock is held
    _fake_run(tmp_path / "group/b", status="running", step=7, total_steps=50, lora=True, **runs.process_stamp())
    _fake_run(tmp_path / "group/c", status="running", step=3, pid=1, host="elsewhere")
    lock = runs.RunLock.acquire(tmp_path / "group/c")
    (tmp_path / "not-a-run").mkdir()
    found = {r.path.name: r for r in runs.list_runs(tmp_path)}
    assert set(found) == {"a", "b", "c"}
    assert found["a"].status == "finished" and found["a"].best_val_loss == 2.5
    assert found["b"].status == "dead" and found["b"].lora
    assert found["c"].status == "running"
    assert runs.list_runs(tmp_path / "a")[0].path == tmp_path / "a"  # a run directory itself

    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "100/100" in out and "2.5000" in out and "dead" in out and "(lora)" in out
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["status"] for r in rows} == {"finished", "dead", "running"}
    assert main(["runs", str(tmp_path / "not-a-run")]) == 0
    assert "no runs found" in capsys.readouterr().out
    # looking does not take the lock from its holder, and a released lock leaves no file
    with pytest.raises(runs.RunInUse, match=f"in use by another process \\(pid {os.getpid()} on "):
        runs.RunLock.acquire(tmp_path / "group/c", wait=0)
    lock.release()
    assert not (tmp_path / "group/c/.lock").exists() and runs.run_info(tmp_path / "group/c").status == "dead"


def test_compare_runs_shows_the_settings_that_differ_and_the_results(tmp_path, capsys):
    base = {"model": "gpt2", "lr": 1e-4, "batch_size": 4, "freeze": [], "out": "x", "seed": 0}
    for name, cfg, loss, speeds in (("a", {}, 2.5, [100.0, 300.0, 200.0]),
                                    ("b", {"lr": 3e-4, "freeze": ["wte", "wpe"]}, 2.25, [50.0])):
        _fake_run(tmp_path / name, status="finished", step=10, total_steps=10, best_val_loss=loss, best_step=8,
                  last_loss=loss + 0.1)
        runs.write_json(tmp_path / name / runs.CONFIG_JSON, {**base, **cfg, "out": str(tmp_path / name)})
        runs.append_metrics(tmp_path / name, [{"step": i + 1, "tok_per_s": v} for i, v in enumerate(speeds)])
    c = runs.compare_runs(runs.list_runs(tmp_path))
    assert c.settings == {"lr": [1e-4, 3e-4], "freeze": [[], ["wte", "wpe"]]}  # not "out": every run's differs
    assert c.tokens_per_sec == [200.0, 50.0] and [r.best_step for r in c.runs] == [8, 8]

    assert main(["runs", str(tmp_path / "a"), str(tmp_path / "b"), "--compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["lr", "0.0001", "0.0003"] and lines[2].split() == ["freeze", "-", "wte,", "wpe"]
    assert "2.5000 (step 8)" in lines[6] and "2.2500 (step 8)" in lines[6]
    assert lines[-1].split() == ["tokens/s", "200", "50"]
    assert main(["runs", str(tmp_path), "--compare", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["best_val_loss"] for r in got["runs"]] == [2.5, 2.25] and got["settings"]["lr"] == [1e-4, 3e-4]

    assert main(["runs", str(tmp_path / "a"), str(tmp_path)]) == 0  # several DIRs; a run found twice is one row
    assert capsys.readouterr().out.count("finished") == 2

    runs.write_json(tmp_path / "b" / runs.CONFIG_JSON, base)
    runs.write_json(tmp_path / "a" / runs.CONFIG_JSON, base)
    assert main(["runs", str(tmp_path), "--compare"]) == 0 and "(same settings)" in capsys.readouterr().out
    # one run is a comparison of one: its results, no setting to differ on
    assert main(["runs", str(tmp_path / "a"), "--compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "(one run)" and lines[3].split() == ["status", "finished"]
    assert lines[-1].split() == ["tokens/s", "200"]
    one = runs.compare_runs(runs.list_runs(tmp_path / "a"))
    assert one.settings == {} and one.tokens_per_sec == [200.0] and len(one.runs) == 1
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty"), "--compare"]) == 1
    assert capsys.readouterr().err == "error: no runs to compare: name run directories, or a folder that holds runs\n"
    (tmp_path / "b" / runs.CONFIG_JSON).write_text("{torn")
    assert main(["runs", str(tmp_path), "--compare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot compare") and "config.json is unreadable" in err and err.count("\n") == 1


def test_metrics_torn_line_and_truncate(tmp_path):
    runs.append_metrics(tmp_path, [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    runs.truncate_metrics(tmp_path, 3)
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2, 3]


def test_replace_dir_and_recovery(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best/w").write_text("old")
    new = tmp_path / ".tmp-best"
    new.mkdir()
    (new / "w").write_text("new")
    runs.replace_dir(new, tmp_path / "best")
    assert (tmp_path / "best/w").read_text() == "new" and not new.exists()

    # a crash after moving the old directory aside, before the new one arrived
    (tmp_path / "best").rename(tmp_path / ".old-best")
    (tmp_path / "checkpoints/.tmp-step-9").mkdir(parents=True)
    (tmp_path / ".run.json.1670.tmp").write_text("{")  # atomic_write_text's, of a process killed mid-write
    (tmp_path / "notes.tmp").write_text("mine")  # not ours: kept
    runs.recover_dirs(tmp_path)
    assert (tmp_path / "best/w").read_text() == "new"
    assert not (tmp_path / "checkpoints/.tmp-step-9").exists()
    assert not (tmp_path / ".run.json.1670.tmp").exists() and (tmp_path / "notes.tmp").exists()

    (tmp_path / "checkpoints/step-4").mkdir()  # no trainer.pt: incomplete, never listed
    (tmp_path / "checkpoints/step-2").mkdir()
    (tmp_path / "checkpoints/step-2/trainer.pt").write_bytes(b"x")
    assert [s for s, _ in runs.checkpoint_dirs(tmp_path)] == [2]


def test_smoothing_is_debiased_and_does_not_lag_above_the_loss():
    assert plot.smooth([3.0] * 20, 0.9) == pytest.approx([3.0] * 20)  # a constant from its first point
    falling = [2 + 8 * math.exp(-s / 15) + 0.3 * math.sin(s) for s in range(200)]
    smoothed = plot.smooth(falling, 0.96)
    assert smoothed[0] == pytest.approx(falling[0])
    for t, v in enumerate(smoothed):  # a weighted mean of the values so far, weights beta**age
        assert min(falling[:t + 1]) - 1e-9 <= v <= max(falling[:t + 1]) + 1e-9
        w = [0.96 ** (t - i) for i in range(t + 1)]
        assert v == pytest.approx(sum(wi * x for wi, x in zip(w, falling)) / sum(w))
    # after a drop, the first (high) loss weighs as one of the points so far, not as 0.96**t of the curve
    drop = plot.smooth([10.0] + [2.0] * 30, 0.96)
    assert drop[20] < 2.5 and drop[30] < 2.3
    with pytest.raises(ValueError):
        plot.smooth([1.0], 1.0)


def test_plot_and_missing_matplotlib(tmp_path, monkeypatch, caplog):
    records = [{"step": s, "loss": 5.0 - s * 0.1} for s in range(1, 30)]
    records += [{"step": 10, "val_loss": 4.5}, {"step": 20, "val_loss": 4.0}]
    assert plot.plot_metrics(records, tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot.plot_metrics([], tmp_path / "empty.png")

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(plot, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        assert not plot.plot_metrics(records, tmp_path / "x.png")
        assert not plot.plot_metrics(records, tmp_path / "x.png")
    warnings = [r for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(warnings) == 1 and "gpt2kit[plot]" in warnings[0].getMessage()


def test_not_a_run(tmp_path):
    from gpt2kit.errors import Gpt2kitError
    with pytest.raises(Gpt2kitError, match="not a gpt2kit run"):
        runs.read_run_json(tmp_path)
    # a file named as the run (`finetune --resume data.txt`) is said so, not as an OS error number
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(Gpt2kitError, match=r"data.txt is not a gpt2kit run directory \(no run.json\)$"):
        runs.read_run_json(tmp_path / "data.txt")


def test_broken_run_json_is_listed_as_unreadable(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text("{bad")
    (tmp_path / "s").mkdir()  # valid JSON, fields of the wrong types (hand-edited)
    (tmp_path / "s" / "run.json").write_text('{"format": "gpt2kit-run", "step": "x", "best_val_loss": "low"}')
    assert [(r.path.name, r.status) for r in runs.list_runs(tmp_path)] == [("r", "unreadable"), ("s", "unreadable")]
    from gpt2kit.errors import Gpt2kitError
    with pytest.raises(Gpt2kitError, match="'step' is 'x', not an integer"):
        runs.run_info(tmp_path / "s")
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "no runs found" not in out


def test_list_runs_searches_the_whole_tree(tmp_path):
    _fake_run(tmp_path / "a/b/c/d/e/deep", status="finished")  # 5 folders down
    _fake_run(tmp_path / "top", status="finished")
    _fake_run(tmp_path / "top/checkpoints/inner", status="finished")  # inside a run: not looked at
    _fake_run(tmp_path / ".hidden/run", status="finished")
    (tmp_path / "a/loop").symlink_to(tmp_path / "a")  # a symlinked folder, here a loop
    (tmp_path / "a/alias").symlink_to(tmp_path / "top")
    locked = tmp_path / "locked"
    _fake_run(locked / "run", status="finished")
    locked.chmod(0)
    try:
        found = [r.path.relative_to(tmp_path).as_posix() for r in runs.list_runs(tmp_path)]
    finally:
        locked.chmod(0o755)
    assert found[:2] == ["a/b/c/d/e/deep", *(["locked/run"] if os.geteuid() == 0 else [])][:2] and "top" in found
    assert len(found) == (3 if os.geteuid() == 0 else 2)  # root reads the locked folder anyway


def test_failed_runs_say_why_and_other_tools_run_json_is_skipped(tmp_path, capsys, monkeypatch):
    why = "Gpt2kitError: the loss became nan at step 2; lower --lr (e.g. 3e-5) " + "or use --dtype float32 " * 9
    _fake_run(tmp_path / "failed", status="failed", step=2, total_steps=30, error=why)
    _fake_run(tmp_path / "resumed", status="running", error="Gpt2kitError: an old failure", **runs.process_stamp())
    (tmp_path / "other").mkdir()
    (tmp_path / "other/run.json").write_text('{"run_id": "abc"}')  # another tool's run.json
    _fake_run(tmp_path / "other/mine", status="finished")  # a run below it is still found
    assert [r.path.name for r in runs.list_runs(tmp_path)] == ["failed", "mine", "resumed"]

    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 0  # DIR defaults to the current directory
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ERROR") and "failed 2/30" in " ".join(lines[1].split())
    assert lines[1].split("  ")[-1].startswith("the loss became nan at step 2; lower --lr")
    assert lines[1].endswith("...") and len(lines[1]) == 119
    assert "old failure" not in lines[3]
    assert main(["runs", "--json"]) == 0
    rows = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["failed"]["error"] == why and rows["resumed"]["error"] is None


def test_remove_run_deletes_only_the_runs_own_entries(tmp_path):
    run = tmp_path / "r"
    _fake_run(run, status="failed", step=0)
    for d in ("data", "tokenizer", "checkpoints/step-2", ".tmp-best", ".old-final"):
        (run / d).mkdir(parents=True)
    for f in ("config.json", "metrics.jsonl", ".run.json.123.tmp", "notes.txt", ".tmp-notes", "data.csv"):
        (run / f).write_text("x")
    (run / "mine").mkdir()
    removed = runs.remove_run(run)
    assert sorted(p.name for p in run.iterdir()) == [".tmp-notes", "data.csv", "mine", "notes.txt"]
    assert "run.json" in removed and "checkpoints" in removed


def test_a_checkpoint_deleted_while_it_is_loaded_is_picked_again(tmp_path, monkeypatch):
    # a run still training rotates its checkpoints (--keep): `--model RUN` may pick one that then vanishes
    import shutil

    import torch

    import gpt2kit.checkpoints as ckpts
    from gpt2kit.config import GPTConfig
    from gpt2kit.tokenizer import Tokenizer
    from tests.conftest import VOCAB_DIR, random_model
    run = tmp_path / "run"
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32)
    for step, seed in ((2, 1), (4, 2)):
        ckpts.save_model(random_model(cfg, seed=seed), Tokenizer.from_dir(VOCAB_DIR), run / f"checkpoints/step-{step}")
    runs.write_json(run / "run.json", {"status": "running"})
    real = ckpts.read_checkpoint

    def rotated_away(path):
        out = real(path)
        if path.name == "step-4":
            shutil.rmtree(path)
        return out
    monkeypatch.setattr(ckpts, "read_checkpoint", rotated_away)
    model, _ = ckpts.load_model(run)
    assert torch.equal(model.transformer.wte.weight, random_model(cfg, seed=1).transformer.wte.weight)


def test_an_early_stopped_run_is_listed_as_such(tmp_path, capsys):
    _fake_run(tmp_path / "a", status="finished", step=40, total_steps=40, best_val_loss=2.5, last_loss=2.4)
    _fake_run(tmp_path / "b", status="finished", step=12, total_steps=40, best_val_loss=2.6, last_loss=2.7,
              stopped_early=True)
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:3] == ["finished", "40/40"] and lines[2].split()[1:3] == ["early-stopped", "12/40"]
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["status"], r["stopped_early"]) for r in rows] == [("finished", False), ("finished", True)]
    for name, lr in (("a", 1e-4), ("b", 3e-4)):
        (tmp_path / name / "config.json").write_text(json.dumps({"lr": lr}))
    assert main(["runs", str(tmp_path / "a"), str(tmp_path / "b"), "--compare"]) == 0
    assert "early-stopped" in capsys.readouterr().out


def test_a_runs_checkpoints_are_listed_in_one_place(tmp_path):
    """layout.checkpoint_dirs names a run's checkpoints (checkpoints/step-N, oldest first); --resume takes
    those with trainer.pt, --model RUN the newest that holds a model. Other names there are not checkpoints."""
    from gpt2kit import layout
    from gpt2kit.checkpoints import run_model_dir
    from gpt2kit.config import GPTConfig
    from tests.conftest import random_model
    runs.write_json(tmp_path / "run.json", {"status": "running"})
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32)
    for name in ("step-2", "step-10", "step-old", ".tmp-step-12"):
        from gpt2kit.checkpoints import save_model
        save_model(random_model(cfg, seed=1), None, tmp_path / "checkpoints" / name)
    (tmp_path / "checkpoints/step-2/trainer.pt").write_bytes(b"x")
    assert [s for s, _ in layout.checkpoint_dirs(tmp_path)] == [2, 10]
    assert [s for s, _ in runs.checkpoint_dirs(tmp_path)] == [2]
    assert run_model_dir(tmp_path) == tmp_path / "checkpoints/step-10"
