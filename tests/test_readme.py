"""The examples of README.md and docs/*.md run as written, offline.

Each Python block (of the README and of every docs page) runs as it is written, in a fresh folder
holding the files it names (jokes.csv, test.txt, runs/jokes), with "gpt2" answered by a private Hugging
Face cache that holds a tiny random GPT-2 and the Hub switched off. Blocks that need a running server
(the `openai` client) are left out."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from gpt2kit.checkpoints import save_model
from gpt2kit.config import GPTConfig
from gpt2kit.tokenizer import Tokenizer
from tests.conftest import JOKES, ROOT, VOCAB_DIR, random_model

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHA = "0123456789abcdef0123456789abcdef01234567"


def python_blocks(pages: list[Path] = DOCS) -> list[tuple[str, str]]:
    """(page name, code) of every ```python block of these pages."""
    return [(page.relative_to(ROOT).as_posix(), code) for page in pages
            for code in re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)]


def _needs_server(code: str) -> bool:
    return "from openai import" in code


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    """A Hugging Face hub cache in which "gpt2" is a tiny random GPT-2 with GPT-2's
    vocabulary, and the files the examples read."""
    root = tmp_path_factory.mktemp("readme")
    repo = root / "hf" / "models--openai-community--gpt2"
    model_dir = repo / "snapshots" / SHA
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=512)  # (the examples score 512-token windows)
    save_model(random_model(config, seed=1), Tokenizer.from_dir(VOCAB_DIR), model_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    files = root / "files"
    files.mkdir()
    with open(JOKES, newline="", encoding="utf-8") as f:  # 12 jokes: ten epochs of one short step
        rows = [r for _, r in zip(range(13), csv.reader(f))]
    with open(files / "jokes.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    (files / "test.txt").write_text(" ".join(r[1] for r in rows[1:]), encoding="utf-8")
    return {"hf": root / "hf", "files": files, "model": model_dir}


def test_the_docs_have_the_python_examples_this_file_runs():
    assert any("Generator.load(" in code for _, code in python_blocks([README]))
    blocks = python_blocks()
    assert any("gen.stream(" in code and page == "docs/python-api.md" for page, code in blocks)
    assert any("compare_runs(" in code and page == "docs/finetuning.md" for page, code in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_a_readme_python_block_runs_offline(index, sandbox, tmp_path, monkeypatch, capsys):
    page, code = python_blocks()[index]
    if _needs_server(code):
        pytest.skip("needs a running gpt2kit serve")
    for f in sandbox["files"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    if 'load_model("runs/jokes")' in code and "finetune(" not in code:
        shutil.copytree(sandbox["model"], tmp_path / "runs" / "jokes")  # a model where it expects its run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(sandbox["hf"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if "gen.stream(" in code:
        # the streamed text ends its line: the next example's output starts on a line of its own
        assert re.search(r"\n0 ", out), out
    if "compare_runs(" in code:
        assert "runs/jokes finished" in out  # list_runs, then a comparison of that one run



def test_the_readmes_first_generate_command_works_offline_as_written():
    # the command the README opens with, between the set-up and the test commands, after one paragraph
    # saying what gpt2kit is
    paragraphs = README.read_text(encoding="utf-8").split("\n\n")
    assert paragraphs[0] == "# gpt2kit" and not paragraphs[1].startswith("    ")
    head = paragraphs[2].splitlines()
    assert head[0].split()[:2] == ["bash", "scripts/setup.sh"]
    assert head[-1].split()[:4] == [".venv/bin/python", "-m", "pytest", "#"]
    argv = shlex.split(head[1].split("#")[0])
    assert argv[:2] == [".venv/bin/gpt2kit", "generate"] and argv[argv.index("--model") + 1] == "examples/shakespeare"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "gpt2kit", *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # (.venv/bin/gpt2kit is this interpreter's gpt2kit)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.split()) > 20 and "\n" in done.stdout.strip()


def test_the_demo_model_is_small():
    demo = ROOT / "examples" / "shakespeare"
    assert sum(f.stat().st_size for f in demo.iterdir()) < 10 * 2**20  # it is committed to git
    config = json.loads((demo / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (4, 64, 50257)
    assert config["dtype"] == "float16"
