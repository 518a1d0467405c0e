import math
import re

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.errors import Gpt2kitError
from gpt2kit.evaluate import check_window, perplexity, read_eval_text, windows
from tests.conftest import SHAKESPEARE

transformers = pytest.importorskip("transformers")


def test_windows_score_every_token_after_the_first_exactly_once():
    for n, block, stride in [(1000, 128, 64), (100, 128, 64), (129, 128, 1), (1000, 128, 127)]:
        scored = [p for _, end, first in windows(n, block, stride) for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(e - b <= block for b, e, _ in windows(n, block, stride))
    # stride == block: disjoint windows, so each window's first token has no context (as in transformers)
    scored = [p for _, end, first in windows(300, 100, 100) for p in range(first, end)]
    assert scored == [p for p in range(300) if p % 100]


@pytest.mark.parametrize("stride", [32, 128])
def test_perplexity_equals_transformers_losses_on_the_guides_windows(tiny_model_dir, tokenizer, stride):
    model, _ = load_model(tiny_model_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer.encode(SHAKESPEARE.read_text()[:4000])
    ours = perplexity(model, ids, stride=stride, batch_size=3)
    # the windows of transformers' perplexity guide, each window's mean loss weighted by the tokens it
    # really scores (every token once). The guide's own code weights it by (valid labels - 1), one token
    # short for every window after the first, so the figure it prints differs slightly from this one.
    enc, max_len, nll, count, prev_end = torch.tensor([ids]), 128, 0.0, 0, 0
    guide_nll, guide_count = 0.0, 0
    for begin in range(0, enc.size(1), stride):
        end = min(begin + max_len, enc.size(1))
        trg_len = end - prev_end
        inp = enc[:, begin:end]
        tgt = inp.clone()
        tgt[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = hf(inp, labels=tgt).loss.item()
        n = int((tgt[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        guide_n = int((tgt != -100).sum()) - 1
        guide_nll, guide_count = guide_nll + loss * guide_n, guide_count + guide_n
        if end == enc.size(1):
            break
    assert ours.tokens == count
    assert count == len(ids) - 1 if stride < 128 else count < len(ids) - 1
    assert ours.loss == pytest.approx(nll / count, rel=1e-5)
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    if stride < 128:  # overlapping windows: the guide's weights are one short per later window
        assert guide_count < count
    assert ours.loss == pytest.approx(guide_nll / guide_count, rel=1e-3)


def test_bad_arguments(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(Gpt2kitError, match="fewer than 2 tokens"):
        perplexity(model, [5])
    with pytest.raises(Gpt2kitError, match="stride"):
        perplexity(model, list(range(300)), stride=500)

    for stride in (0, -1):  # 0 used to mean "the default" silently
        with pytest.raises(Gpt2kitError, match=f"stride must be >= 1 token.*got {stride}"):
            perplexity(model, list(range(300)), stride=stride)
    with pytest.raises(Gpt2kitError, match="block size must be >= 2"):
        perplexity(model, list(range(300)), block_size=1)
    with pytest.raises(Gpt2kitError, match="batch size must be > 0"):
        perplexity(model, list(range(300)), batch_size=0)


def test_check_window_resolves_defaults_and_clamps_to_the_context():
    assert check_window(128) == (128, 64)
    assert check_window(128, block_size=64) == (64, 32)
    assert check_window(128, block_size=1000, stride=100) == (128, 100)
    with pytest.raises(Gpt2kitError, match="fewer than 2 tokens"):
        check_window(128, n_tokens=1)


def test_unknown_encoding_is_one_line(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(Gpt2kitError, match="^unknown encoding 'bogus'; use e.g. --encoding utf-8 or latin-1$"):
        read_eval_text(tmp_path / "d.txt", "bogus")


def test_eval_data_that_is_binary_is_refused_not_decoded(tmp_path):
    import numpy as np
    np.savez_compressed(tmp_path / "ids.npz", np.arange(50, dtype=np.int32))
    for enc in ("utf-8", "latin-1"):  # latin-1 decodes any bytes: the refusal comes before decoding
        with pytest.raises(Gpt2kitError, match=r"ids.npz looks like a binary file, not text") as e:
            read_eval_text(tmp_path / "ids.npz", enc)
        assert "--encoding" not in str(e.value)
    (tmp_path / "w.txt").write_bytes(b"a\r\nb\xe9")
    with pytest.raises(Gpt2kitError, match=r"w.txt: byte 4 .*--encoding latin-1"):
        read_eval_text(tmp_path / "w.txt")
    assert read_eval_text(tmp_path / "w.txt", "latin-1") == "a\nb\u00e9"


def test_eval_line_by_line_gives_the_line_by_line_runs_validation_loss(tiny_model_dir, tmp_path, capsys):
    import json

    from gpt2kit.cli import main
    lines = SHAKESPEARE.read_text().split("\n")
    lines = [ln for ln in lines if ln.strip()]
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n".join(lines[:60]) + "\n")
    # 300 short lines: the default cap on validation (~32K tokens, counted as padded windows of the block) used
    # to score 256 of them
    val.write_text("\n".join(lines[60:360]) + "\n")
    common = ["--block-size", "128", "--batch-size", "16"]
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model_dir), "--data", str(train), "--val-data", str(val),
                 "--line-by-line", "--steps", "2", "--eval-every", "2", "--sample-every", "0", "--no-progress",
                 "--no-tensorboard", "--out", str(run), *common]) == 0
    err = capsys.readouterr().err
    # validation covers what the run says it has: every one of the 300 lines, at every evaluation
    assert "validation: each evaluation scores all 300 documents (" in err, err
    val_losses = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in r}
    assert set(val_losses) == {0, 2}
    # eval --line-by-line scores the same data the same way: the run's validation loss, for the model it
    # started from (step 0) and for its final model (step 2)
    for model, step in ((tiny_model_dir, 0), (run / "final", 2)):
        assert main(["eval", "--model", str(model), "--data", str(val), "--line-by-line", "--format", "jsonl",
                     *common]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["tokens"] == val_losses[step]["val_tokens"]
        assert got["loss"] == pytest.approx(val_losses[step]["val_loss"], rel=1e-6, abs=1e-6)
    # a cap on validation says exactly how much it covers
    assert main(["finetune", "--model", str(tiny_model_dir), "--data", str(train), "--val-data", str(val),
                 "--line-by-line", "--steps", "1", "--eval-batches", "2", "--sample-every", "0", "--no-progress",
                 "--no-tensorboard", "--out", str(tmp_path / "capped"), *common]) == 0
    err = capsys.readouterr().err
    assert re.search(r"validation: each evaluation scores 32 of 300 documents \([\d,]+ of [\d,]+ target tokens\), "
                     r"spread evenly, to keep evaluation quick; --eval-batches 19 scores them all", err), err
    # --stride has no meaning for whole documents
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(val), "--line-by-line", "--stride", "4"]) == 1
    assert "--stride moves a window" in capsys.readouterr().err


def test_eval_batch_size_too_large_for_memory_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from gpt2kit import memory
    from gpt2kit.cli import main
    for extra in ([], ["--line-by-line"]):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(SHAKESPEARE), "--batch-size", "100000000",
                     *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: scoring ") and "lower --batch-size" in err, err
    # an allocation that fails all the same (the estimate passed) is one line naming --batch-size too
    monkeypatch.setattr(memory, "device_memory", lambda device: None)
    import gpt2kit.model

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 135862763520 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(gpt2kit.model.GPT, "forward", oom)
    short = tmp_path / "short.txt"
    short.write_text("Some text to score.\nAnother line.\n")
    for extra in ([], ["--line-by-line"]):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(short), "--format", "jsonl", *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: out of memory on cpu scoring ") and \
            "lower --batch-size" in err, err
