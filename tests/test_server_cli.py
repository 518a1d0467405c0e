"""`gpt2kit serve` as a user runs it: a real process on 127.0.0.1 whose text equals `gpt2kit generate`'s,
and one-line errors for a missing extra, bad flags and a busy port."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpt2kit.cli import main

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"  # ../shared/data from the root
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest and robust to busy cores


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    q: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: q.put(proc.stdout.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return ""


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]], ids=["float32", "int8"])
def test_serve_process_matches_generate(tiny_dir, quantize):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    if quantize:
        from gpt2kit import kernels
        if kernels.load() is None:
            pytest.skip(f"no CPU kernel here: {kernels.failure()}")
    proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "serve", "--model", str(tiny_dir), "--port", "0",
                             "--api-key", "k", "--max-batch", "2", "--device", "cpu", "--log-level", "warning",
                             *quantize], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = read_line(proc, 60)
        assert ("int8 decoding" in line) == bool(quantize)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{m.group(1)}/v1", api_key="k", max_retries=0)
        r = client.completions.create(model=tiny_dir.name, prompt="Hello", n=3, max_tokens=20, temperature=0.9,
                                      seed=3, extra_body={"top_k": 40})
        served = [c.text for c in r.choices]
        assert r.model == tiny_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    gen = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--model", str(tiny_dir), "--prompt", "Hello",
                          "--nsamples", "3", "--length", "20", "--temperature", "0.9", "--top-k", "40", "--seed", "3",
                          "--format", "jsonl", "--device", "cpu", *quantize],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert served == [json.loads(ln)["text"] for ln in gen.stdout.splitlines()]


def test_missing_extra_is_one_line(tiny_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["serve", "--model", str(tiny_dir)]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: gpt2kit serve needs the server extra: pip install 'gpt2kit[server]'"


@pytest.mark.parametrize("flags, words", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-body", "0"], "--max-body must be >= 1"),
    (["--request-timeout", "0"], "--request-timeout must be a finite number of seconds > 0, got 0.0"),
    (["--request-timeout", "nan"], "--request-timeout must be a finite number of seconds > 0, got nan"),
    (["--request-timeout", "inf"], "--request-timeout must be a finite number of seconds > 0, got inf"),
    (["--request-timeout", "-5"], "--request-timeout must be a finite number of seconds > 0"),
    (["--api-key", ""], "--api-key is empty, which would let anyone in"),
    (["--api-key", "  "], "--api-key is empty"),
    (["--api-key", "key "], "--api-key begins or ends with whitespace"),
    (["--max-len", "1"], "--max-len must be >= 2"),
    (["--max-len", "300"], "--max-len 300 is longer than the model's context of 128 positions: give at most 128"),
    (["--max-prompt-tokens", "1000"], "--max-prompt-tokens 1000 is longer than the model's context of 128 tokens"),
    (["--port", "99999"], "--port 99999 is out of range"),
])
def test_bad_flags(tiny_dir, capsys, flags, words):
    pytest.importorskip("uvicorn")
    assert main(["serve", "--model", str(tiny_dir), *flags]) == 1
    err = capsys.readouterr().err
    assert words in err and err.startswith("error: ") and err.count("\n") == 1


def test_an_empty_api_key_from_the_environment_is_refused(tiny_dir, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    monkeypatch.setenv("GPT2KIT_API_KEY", "")
    assert main(["serve", "--model", str(tiny_dir)]) == 1
    assert capsys.readouterr().err == ("error: GPT2KIT_API_KEY is empty, which would let anyone in: give a key (for "
                                       "example `openssl rand -hex 16`), or unset GPT2KIT_API_KEY to serve without "
                                       "authentication\n")


def test_busy_port(tiny_dir, capsys):
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(tiny_dir), "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_default_model_name(tmp_path, monkeypatch):
    from gpt2kit.cli.serve import default_model_name

    (tmp_path / "runs" / "jokes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs" / "jokes")
    assert default_model_name(".") == "jokes" and default_model_name("./") == "jokes"  # not "." or "./"
    assert default_model_name("..") == "runs"
    assert default_model_name(str(tmp_path / "runs" / "jokes") + "/") == "jokes"
    assert default_model_name("gpt2") == "gpt2"
    assert default_model_name("openai-community/gpt2") == "openai-community/gpt2"  # GET /v1/models/org/name finds it


def test_model_aliases(tmp_path):
    from gpt2kit.cli.serve import model_aliases

    (tmp_path / "runs" / "jokes").mkdir(parents=True)
    run = str(tmp_path / "runs" / "jokes")
    assert model_aliases(run + "/", "jokes") == [run]
    assert model_aliases(run, "my-model") == [run, "jokes"]
    assert model_aliases("gpt2", "gpt2") == ["openai-community/gpt2"]
    assert model_aliases("124M", "124M") == ["gpt2", "openai-community/gpt2"]
    assert model_aliases("org/name", "org/name") == []
