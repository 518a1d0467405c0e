"""The CLI verbs generate / eval / convert / download, in process (fast) and as real processes."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gpt2kit.cli import main
from gpt2kit.errors import Gpt2kitError
from tests.conftest import JOKES, SHAKESPEARE, TF_TINY


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prompted_is_reproducible_with_a_seed(capsys, tiny_model_dir):
    args = ("generate", "Hello there", "-m", tiny_model_dir, "--length", 12, "--seed", 3, "--top-k", 40)
    code, out1, _ = run(capsys, *args)
    assert code == 0 and out1.strip()
    assert run(capsys, *args)[1] == out1
    assert run(capsys, *args[:-2], "--seed", 4)[1] != out1
    _, with_prompt, _ = run(capsys, *args, "--include-prompt")
    assert with_prompt == "Hello there" + out1


def test_generate_typical_p_samples_from_the_typical_set(capsys, tiny_model_dir):
    args = ("generate", "Hello there", "-m", tiny_model_dir, "--length", 12, "--seed", 3, "--format", "jsonl")
    code, out, _ = run(capsys, *args, "--typical-p", "1e-6")
    assert code == 0 and json.loads(out)["tokens"]
    assert run(capsys, *args, "--typical-p", "1e-6")[1] == out  # a set of one or a few tokens, seeded
    assert run(capsys, *args)[1] != out


def test_generate_max_new_tokens_is_another_name_for_length(capsys, tiny_model_dir):
    args = ("generate", "--prompt", "Hi", "-m", tiny_model_dir, "--seed", 1, "--format", "jsonl", "--no-stop-at-eot")
    code, out, _ = run(capsys, *args, "--max-new-tokens", 7)
    assert code == 0 and len(json.loads(out)["tokens"]) == 7
    assert run(capsys, *args, "--length", 7)[1] == out


def test_generate_jsonl_many_samples(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "generate", "--prompt", "Hi", "-m", tiny_model_dir, "--length", 5, "--seed", 1,
                       "--nsamples", 3, "--batch-size", 2, "--format", "jsonl", "--no-stop-at-eot")
    recs = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["index"] for r in recs] == [0, 1, 2]
    assert all(r["prompt"] == "Hi" and len(r["tokens"]) == 5 and "text" in r for r in recs)


def test_generate_unconditional_text_has_sample_headers(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "generate", "--unconditional", "-m", tiny_model_dir, "--length", 4,
                       "--nsamples", 2, "--seed", 0)
    assert code == 0 and "SAMPLE 1" in out and "SAMPLE 2" in out


def test_generate_prompt_file_and_output_file(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("From a file\n")
    dest = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "generate", "--prompt-file", tmp_path / "p.txt", "-m", tiny_model_dir,
                       "--length", 3, "--nsamples", 5, "--batch-size", 2, "--output", dest, "--seed", 2)
    recs = [json.loads(line) for line in dest.read_text().splitlines()]
    assert code == 0 and len(recs) == 5 and recs[0]["prompt"] == "From a file"
    assert "wrote 5 samples" in err


@pytest.mark.parametrize("argv,msg", [
    ((), "no prompt"),
    (("--prompt", ""), "empty prompt"),
    (("x", "--top-p", "0"), "top-p"),
    (("x", "--top-p", "1.5"), "top-p"),
    (("x", "--typical-p", "0"), "typical-p"),
    (("x", "--temperature", "-1"), "temperature"),
    (("x", "--length", "0"), "length"),
    (("x", "--unconditional"), "--unconditional takes no prompt"),
    (("x", "--nsamples", "-1"), "nsamples"),
    (("x", "--seed", "-1"), "seed"),
    (("x", "--seed", str(2**63)), "seed must be in [0, 2**63)"),  # as the server's range
    (("x", "--temperature", "inf"), "temperature must be a finite number"),
    (("x", "--repetition-penalty", "inf"), "repetition penalty must be a finite number"),
    (("x", "--batch-size", "0"), "--batch-size must be > 0"),
    (("--prompt-file", "/nonexistent/prompt.txt"), "cannot read --prompt-file /nonexistent/prompt.txt"),
    (("x", "--dtype", "float8"), "unknown dtype 'float8'"),
])
def test_generate_bad_input_is_one_line_and_exit_1(capsys, tiny_model_dir, argv, msg):
    code, out, err = run(capsys, "generate", *argv, "-m", tiny_model_dir)
    assert code == 1 and msg in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("argv,what", [(("x",), "a PROMPT"), (("--prompt", "x"), "--prompt"),
                                        (("--unconditional",), "--unconditional"),
                                        (("--output", "o.jsonl"), "--output")])
def test_interactive_with_a_prompt_or_output_it_would_ignore_is_an_error(capsys, tmp_path, argv, what):
    code, _, err = run(capsys, "generate", "-i", *argv, "-m", tmp_path / "no-model")  # before the model loads
    assert code == 1 and err == (f"error: --interactive reads its prompts from the keyboard and prints the samples; "
                                 f"drop {what} or --interactive\n")
    code, _, err = run(capsys, "generate", "-i", "--nsamples", 0, "-m", tmp_path / "no-model")
    assert code == 1 and err.startswith("error: --nsamples 0 (endless) would never ask for the next prompt")


def test_prompt_file_byte_order_mark_and_non_utf8_input(capsys, tiny_model_dir, tmp_path, monkeypatch):
    import io
    args = ("-m", tiny_model_dir, "--length", 2, "-t", 0, "--format", "jsonl")
    (tmp_path / "p.txt").write_bytes("\ufeffHello\r\nthere\r\n".encode())  # as Windows Notepad saves it
    code, out, _ = run(capsys, "generate", "--prompt-file", tmp_path / "p.txt", *args)
    assert code == 0 and json.loads(out)["prompt"] == "Hello\nthere"
    assert run(capsys, "generate", "--prompt", "Hello\nthere", *args)[1] == out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffHello\r\nthere".encode())))
    assert run(capsys, "generate", "--prompt-file", "-", *args)[1] == out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hi \xff")))
    code, _, err = run(capsys, "generate", "--prompt-file", "-", *args)
    assert code == 1 and err == "error: --prompt-file - is not UTF-8 text\n"
    # bytes that are not UTF-8 in the command line reach Python as lone surrogates
    assert run(capsys, "generate", "Hi \udcff", *args)[:3:2] == (1, "error: the prompt is not UTF-8 text\n")


def test_ctrl_c_while_sampling_interactively_goes_back_to_the_prompt(capsys, tiny_model_dir, monkeypatch):
    import builtins

    from gpt2kit.cli import generate as cli_generate
    lines = iter(["Hello", "World"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    real_run, calls = cli_generate._Printer.run, []

    def ctrl_c_first(self, gen, prompt, *a):
        calls.append(prompt)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_run(self, gen, prompt, *a)
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(cli_generate._Printer, "run", ctrl_c_first)
    code, out, err = run(capsys, "generate", "-i", "-m", tiny_model_dir, "--length", 3, "-t", 0)
    assert code == 0 and calls == ["Hello", "World"] and "stopped (Ctrl-D ends the session)" in err
    assert out.strip()  # the second prompt's sample
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run(capsys, "generate", "-i", "-m", tiny_model_dir, "--length", 3)
    assert code == 130 and err == "interrupted\n"  # Ctrl-C at the prompt ends the session


def test_missing_and_corrupt_models(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "x", "-m", tmp_path / "nope")
    assert code == 1 and "no such directory" in err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "generate", "x", "-m", tmp_path)
    assert code == 1 and "corrupt" in err and err.count("\n") == 1


def test_eval_jsonl_and_errors(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(SHAKESPEARE.read_text()[:3000])
    code, out, _ = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--stride", 64, "--format", "jsonl")
    rec = json.loads(out)
    assert code == 0 and set(rec) == {"perplexity", "loss", "tokens", "word_perplexity", "byte_perplexity",
                                  "bits_per_byte"} and rec["perplexity"] > 1
    (tmp_path / "empty.txt").write_text("  \n")
    assert run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "empty.txt")[2].startswith("error: ")
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "missing.txt")
    assert code == 1 and "does not exist" in err
    (tmp_path / "bin.txt").write_bytes(b"ab\xffcd")  # not UTF-8 (NUL bytes would make it binary: refused)
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "bin.txt")
    assert code == 1 and "--encoding" in err


def test_eval_reads_data_as_finetune_does(capsys, tiny_model_dir, tmp_path):
    from gpt2kit.checkpoints import load_model
    from gpt2kit.data import DataSpec, encode_documents, read_documents
    from gpt2kit.evaluate import perplexity

    model, tok = load_model(tiny_model_dir)
    jokes = read_documents(JOKES, DataSpec(column="Joke"))[:300]
    with open(tmp_path / "j.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["Joke"], *([j] for j in jokes)])
    stream = [t for ids in encode_documents(jokes, tok) for t in ids]  # each joke followed by <|endoftext|>
    want = perplexity(model, stream, 64, 32).to_dict()

    def ev(*argv):
        code, out, err = run(capsys, "eval", "-m", tiny_model_dir, "--block-size", 64, "--stride", 32,
                             "--format", "jsonl", "--data", *argv)
        assert code == 0, err
        return json.loads(out)

    got = ev(tmp_path / "j.csv", "--column", "Joke")
    assert got["tokens"] == want["tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert main(["encode", str(tmp_path / "j.csv"), "--column", "Joke", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "j.tokens")]) == 0
    capsys.readouterr()
    assert ev(tmp_path / "j.tokens") == got  # its .tokens cache: the same stream
    # several text files: one document each, as in training; one text file alone is scored as it is
    for i, j in enumerate(jokes[:40]):
        (tmp_path / "docs" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(j)
    several = [t for ids in encode_documents(jokes[:40], tok) for t in ids]
    assert ev(tmp_path / "docs")["tokens"] == len(several) - 1
    one = ev(tmp_path / "docs" / "00.txt")
    assert one["tokens"] == len(tok.encode(jokes[0])) - 1
    # options that do not apply fail in one line, before the model loads
    (tmp_path / "j.jsonl").write_text(json.dumps({"text": jokes[0]}) + "\n")
    for argv, msg in (((tmp_path / "j.csv", "--field", "text"), "--field applies to .jsonl files"),
                      ((tmp_path / "j.jsonl", "--column", "Joke"), "--column applies to .csv/.tsv files"),
                      ((tmp_path / "j.tokens", "--column", "Joke"), "--column")):
        code, _, err = run(capsys, "eval", "-m", tmp_path / "no-model", "--data", *argv)
        assert code == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1


def test_eval_progress_bar_knows_its_total_and_does_not_flood_a_log(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(SHAKESPEARE.read_text()[:3000])
    from gpt2kit.evaluate import windows
    from gpt2kit.tokenizer import Tokenizer

    n = len(Tokenizer.from_dir(tiny_model_dir).encode(data.read_text()))
    total = len(windows(n, 32, 8))
    assert total > 50
    code, out, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--block-size", 32, "--stride", 8,
                         "--batch-size", 1)
    assert code == 0 and out.startswith("perplexity ")
    # stderr is captured, not a terminal: one whole line at the end (and one every 30 s), not one per window
    assert err.splitlines() == [ln for ln in err.splitlines() if ln.startswith(f"100%| {total}/{total} [")]
    assert len(err.splitlines()) == 1 and "\r" not in err


def test_convert_tf_checkpoint(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", TF_TINY / "tf", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    code, out, _ = run(capsys, "generate", "Human reason", "-m", tmp_path / "out", "--length", 4, "-t", 0)
    assert code == 0


def test_real_process_interactive_and_errors_have_no_traceback(tiny_model_dir):
    p = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "--interactive", "-m", str(tiny_model_dir),
                        "--length", "3", "--seed", "1"],
                       input="\nHello\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    assert p.stdout.count("Model prompt >>> ") == 3 and "Prompt should not be empty!" in p.stderr
    p = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "x", "-m", str(tiny_model_dir), "--top-p", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith("error: top-p")


def test_nsamples_zero_samples_until_stopped(tiny_model_dir):
    p = subprocess.Popen([sys.executable, "-m", "gpt2kit", "generate", "--unconditional", "-m", str(tiny_model_dir),
                          "--length", "3", "--nsamples", "0", "--seed", "1"], stdout=subprocess.PIPE, text=True)
    try:
        headers = []
        while len(headers) < 4:
            line = p.stdout.readline()
            if "SAMPLE" in line:
                headers.append(line.split()[2])
        assert headers == ["1", "2", "3", "4"]
    finally:
        p.kill()
        p.wait()


def test_a_huge_nsamples_streams_at_once_in_bounded_memory(tiny_model_dir):
    import select
    import time

    def rss(pid: int) -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    # every prompt used to be built before the first sample: no output while memory grew by ~180 MB/s
    p = subprocess.Popen([sys.executable, "-m", "gpt2kit", "generate", "Hi", "-m", str(tiny_model_dir), "--length",
                          "2", "--nsamples", "10000000000000", "--format", "jsonl", "--seed", "1"],
                         stdout=subprocess.PIPE, bufsize=0)
    try:
        deadline = time.monotonic() + 60  # (interpreter and torch start-up on a busy machine)
        out = b""
        while out.count(b"\n") < 40 and time.monotonic() < deadline:
            assert rss(p.pid) < 2 * 2**30, "memory grows before any output"
            if select.select([p.stdout], [], [], 0.5)[0]:
                out += os.read(p.stdout.fileno(), 1 << 16)
        lines = out.decode().splitlines()[:40]
        assert [json.loads(x)["index"] for x in lines] == list(range(40))  # two batches of 32 started, in order
        first = rss(p.pid)
        time.sleep(1)
        assert rss(p.pid) < first + 100 * 2**20  # still streaming, and not growing
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_unwritable_output_paths_are_one_line_errors(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "generate", "Hi", "-m", tiny_model_dir, "--length", 2, "--output", tmp_path)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run(capsys, "convert", tiny_model_dir, afile)
    assert code == 1 and err.startswith("error: ") and str(afile) in err.splitlines()[-1]
    assert afile.read_text() == "mine"  # nothing of the user's is overwritten


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(capsys, tiny_model_dir):
    code, out, err = run(capsys, "generate", "x", "-m", tiny_model_dir, "--device", "cuda")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --device cuda") and "--device cpu" in err


def test_output_path_is_checked_before_the_model_loads(capsys, tmp_path):
    no_model = tmp_path / "no-model"  # loading it would fail: an --output error must come first
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for dest, what in [(tmp_path, "is a directory"), (tmp_path / "nope" / "o.jsonl", "does not exist"),
                       (afile / "o.jsonl", "is not a folder")]:
        code, _, err = run(capsys, "generate", "Hi", "-m", no_model, "--output", dest)
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
        assert f"--output {dest}" in err and what in err, err
    code, _, err = run(capsys, "generate", "Hi", "-m", no_model, "--output", afile, "--nsamples", 0)
    assert code == 1 and "finite --nsamples" in err
    # a good --output is neither created nor truncated when the model then fails to load
    code, _, err = run(capsys, "generate", "Hi", "-m", no_model, "--output", afile)
    assert code == 1 and "no such directory" in err and afile.read_text() == "mine"
    code, _, err = run(capsys, "generate", "Hi", "-m", no_model, "--output", tmp_path / "new.jsonl")
    assert code == 1 and not (tmp_path / "new.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder_is_checked_before_the_model_loads(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(capsys, "generate", "Hi", "-m", tmp_path / "no-model", "--output", locked / "o.jsonl")
    finally:
        locked.chmod(0o700)
    assert code == 1 and err.count("\n") == 1 and f"cannot write --output {locked / 'o.jsonl'}" in err


def test_window_notice_is_printed_once_per_run_not_per_batch(capsys, tiny_model_dir):
    code, out, err = run(capsys, "generate", "Hello", "-m", tiny_model_dir, "--length", 300, "--nsamples", 4,
                         "--batch-size", 1, "--no-stop-at-eot", "--seed", 1)
    assert code == 0 and out.count("SAMPLE") == 4
    assert err.count("the model sees only the most recent tokens") == 1


def _first_jsonl_records(tiny_model_dir, n, *argv):
    p = subprocess.Popen([sys.executable, "-m", "gpt2kit", "generate", "-m", str(tiny_model_dir), "--format", "jsonl",
                          *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return [json.loads(p.stdout.readline()) for _ in range(n)]
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_endless_samples_equal_a_finite_run_whatever_the_batch_size(capsys, tiny_model_dir):
    args = ("The dog", "--length", 8, "--seed", 5, "--top-k", 40, "--no-stop-at-eot")
    code, out, _ = run(capsys, "generate", *args, "-m", tiny_model_dir, "--nsamples", 4, "--format", "jsonl")
    finite = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len({r["text"] for r in finite}) == 4
    for bs in (1, 2):
        endless = _first_jsonl_records(tiny_model_dir, 4, *args, "--nsamples", 0, "--batch-size", bs)
        assert endless == finite


def test_endless_window_notice_comes_once(tiny_model_dir, tmp_path):
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "gpt2kit", "generate", "Hello", "-m", str(tiny_model_dir),
                              "--length", "150", "--nsamples", "0", "--no-stop-at-eot", "--seed", "1"],
                             stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            while "SAMPLE 3 " not in p.stdout.readline():  # samples 1-2 have finished, each slid its window
                assert p.poll() is None
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
    assert (tmp_path / "err").read_text().count("the model sees only the most recent tokens") == 1


@pytest.mark.parametrize("verb", [("generate", "x"), ("eval", "--data", "d.txt")])
def test_unknown_flags_point_at_the_verbs_help(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--bogus"])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and err == f"error: unrecognized arguments: --bogus (see 'gpt2kit {verb[0]} --help')\n"


def test_generate_stop_tokens_match_the_text(capsys, tiny_model_dir, tokenizer):
    args = ("generate", "Hello", "-m", tiny_model_dir, "--length", 40, "-t", 0, "--no-stop-at-eot", "--format", "jsonl")
    base = json.loads(run(capsys, *args)[1])
    ends = [len(tokenizer.decode(base["tokens"][:k + 1])) for k in range(len(base["tokens"]))]
    k = next(i for i in range(4, len(ends) - 1) if ends[i + 1] - ends[i] >= 3)
    for stop in (base["text"][ends[k]:ends[k] + 2], base["text"][ends[k] + 1:ends[k] + 3]):
        rec = json.loads(run(capsys, *args, "--stop", stop)[1])
        assert rec["finish_reason"] == "stop" and rec["text"] == base["text"][:base["text"].index(stop)]
        assert rec["tokens"] == base["tokens"][:len(rec["tokens"])]
        assert rec["text"].startswith(tokenizer.decode(rec["tokens"]))
        assert len(tokenizer.decode(base["tokens"][:len(rec["tokens"]) + 1])) > len(rec["text"])


def test_padded_vocabulary_model_generates_without_crashing(capsys, tmp_path, tokenizer):
    from gpt2kit.checkpoints import save_model
    from tests.conftest import padded_vocab_model

    save_model(padded_vocab_model(), tokenizer, tmp_path / "m")  # the pad ids (no text) are the likeliest
    code, out, err = run(capsys, "generate", "Hello", "-m", tmp_path / "m", "--length", 100, "--seed", 4,
                         "--no-stop-at-eot", "--format", "jsonl")
    rec = json.loads(out)
    assert code == 0 and err == "" and len(rec["tokens"]) == 100 and max(rec["tokens"]) < 50257


def test_eval_bad_window_and_data_fail_in_one_line_before_the_model_loads(capsys, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text to score\n")
    for argv, msg in [(("--stride", 0), "--stride must be >= 1"), (("--stride", -3), "--stride must be >= 1"),
                      (("--stride", 65, "--block-size", 64), "--stride must be at most --block-size (64)"),
                      (("--encoding", "bogus"), "unknown encoding 'bogus'; use e.g. --encoding utf-8 or latin-1")]:
        code, _, err = run(capsys, "eval", "-m", tmp_path / "no-model", "--data", data, *argv)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err


def test_eval_errors_that_need_the_model_come_before_the_progress_bar(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text to score\n")
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--stride", 500)
    assert code == 1 and err == ("error: --stride must be at most the window of 128 tokens (--block-size, at most "
                                 "the model's context), got 500\n")
    (tmp_path / "one.txt").write_text("Hello")
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "one.txt")
    assert code == 1 and err.count("\n") == 1 and "fewer than 2 tokens" in err


def test_eval_block_longer_than_the_context_says_what_it_scores(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text to score, " * 40)
    code, out, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--format", "jsonl")
    code2, out2, err2 = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--format", "jsonl",
                            "--block-size", 500)
    assert code == code2 == 0 and out == out2 and err == ""  # the same 128-token windows either way
    assert err2 == "note: --block-size 500 is longer than the model's context; scoring windows of 128 tokens\n"


def test_download_offline_hint_fits_the_download_verb(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the Hub cannot be reached
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for offline in (False, True):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        code, out, err = run(capsys, "download", "gpt2", "--cache-dir", tmp_path / "cache")
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: cannot download 'gpt2'")
        assert "pass --model a local" not in err and "as --model to generate, eval or serve" in err, err


def test_convert_and_download_errors_name_their_own_arguments(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing cached in tmp_path: an offline error
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "f.txt").write_text("x")
    for src, msg in (("gpt2", "or pass SRC as a local directory"), (tmp_path / "f.txt", "error: SRC "),
                     (tmp_path / "gone" / "x", "no such directory: ")):
        code, out, err = run(capsys, "convert", src, tmp_path / "out")
        assert code == 1 and err.count("\n") == 1 and msg in err and "--model" not in err, err
    code, out, err = run(capsys, "download", "./some/dir")  # not a Hub name; a directory is not what it takes
    assert code == 1 and "not a valid Hub model name" in err and "or a local directory" not in err, err
    assert "as --model to generate, eval or serve" in err


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Gpt2kitError])
def test_output_file_is_replaced_only_when_the_job_ends_or_is_interrupted(capsys, tiny_model_dir, tmp_path,
                                                                          monkeypatch, stop):
    from gpt2kit.generate import Generator
    dest = tmp_path / "out.jsonl"
    dest.write_text("precious\n")
    real = Generator.completions

    def two_then_stop(self, *a, **kw):
        for i, c in enumerate(real(self, *a, **kw)):
            if i == 2:
                raise stop("stopped")
            yield c
    monkeypatch.setattr(Generator, "completions", two_then_stop)
    code, _, err = run(capsys, "generate", "Hi", "-m", tiny_model_dir, "--length", 2, "--nsamples", 5,
                       "--batch-size", 1, "--output", dest)
    partial = tmp_path / "out.jsonl.partial"
    if stop is KeyboardInterrupt:  # Ctrl-C: the samples so far replace the file
        assert code == 130 and "wrote 2 of 5 samples" in err and not partial.exists()
        assert len(dest.read_text().splitlines()) == 2
    else:  # a failure part way: the old file is untouched, the progress sits beside it
        assert code == 1 and dest.read_text() == "precious\n" and len(partial.read_text().splitlines()) == 2


def test_interactive_seed_seeds_the_session(capsys, tiny_model_dir, monkeypatch):
    import builtins

    def session(*prompts: str) -> list[str]:
        lines = iter(prompts)

        def fake_input(prompt=""):
            sys.stdout.write(prompt)  # as input() shows it
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None
        monkeypatch.setattr(builtins, "input", fake_input)
        code, out, _ = run(capsys, "generate", "-i", "-m", tiny_model_dir, "--length", 12, "--seed", 5)
        assert code == 0
        return [s for s in out.split("Model prompt >>> ") if s.strip()]
    first, again = session("Hello", "Hello")
    assert first != again  # asking again gives a new sample, as in OpenAI's interactive script
    assert session("Hello", "Hello") == [first, again]  # the same session replays exactly
    code, out, _ = run(capsys, "generate", "Hello", "-m", tiny_model_dir, "--length", 12, "--seed", 5)
    assert out.strip() == first.strip()  # the first prompt's samples are those of `generate PROMPT --seed S`


def test_the_parser_does_not_import_torch():
    # `gpt2kit --help`, a typo'd flag and Ctrl-C in the first second answer at once, without torch's import
    code = ("import sys; from gpt2kit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    from gpt2kit.checkpoints import CONVERT_FORMATS
    from gpt2kit.cli.convert import FORMATS
    assert FORMATS == CONVERT_FORMATS


def test_underscore_spellings_of_every_verbs_flags_are_accepted():
    from gpt2kit.cli import _verb_parsers, build_parser
    from gpt2kit.cli.flags import translate

    verbs = _verb_parsers(build_parser())
    checked = 0
    for verb, parser in verbs.items():
        for flag in {s for a in parser._actions for s in a.option_strings if s.startswith("--") and "-" in s[2:]}:
            underscored = "--" + flag[2:].replace("-", "_")
            assert translate(verb, parser, [underscored, "1"]) == [flag, "1"]
            assert translate(verb, parser, [f"{underscored}=1"]) == [f"{flag}=1"]
            checked += 1
    assert checked > 40
    gen = verbs["generate"]
    # values are left alone, and so is everything after --
    assert translate("generate", gen, ["--stop", "--top_k", "--", "--top_k"]) == ["--stop", "--top_k", "--", "--top_k"]


def test_underscore_flags_generate_what_the_hyphenated_ones_do(capsys, tiny_model_dir):
    args = ["generate", "Hello", "-m", tiny_model_dir, "--length", 8, "--seed", 3]
    code, want, _ = run(capsys, *args, "--top-k", 5, "--top-p", 0.9, "--batch-size", 2, "--nsamples", 2)
    assert code == 0
    code, got, _ = run(capsys, *args, "--top_k", 5, "--top_p=0.9", "--batch_size", 2, "--nsamples", 2)
    assert code == 0 and got == want


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--model_name", "124M"],
     "--model_name is a flag of OpenAI's gpt-2 scripts and gpt-2-simple; gpt2kit generate uses --model"),
    (["generate", "--text", "Hello"], "--text is a flag of graykode's gpt-2-Pytorch; gpt2kit generate uses PROMPT "
                                      "(or --prompt)"),
    (["generate", "x", "--num_samples", "3"], "--num_samples is a flag of Hugging Face's run_generation.py; gpt2kit "
                                              "generate uses --nsamples"),
    (["generate", "x", "--num_return_sequences=3"], "gpt2kit generate uses --nsamples"),
    (["generate", "x", "--model_name_or_path", "gpt2"], "gpt2kit generate uses --model"),
    (["eval", "--model_name", "gpt2", "--data", "d.txt"], "gpt2kit eval uses --model"),
    (["finetune", "--run_name", "run1"], "--run_name is a flag of gpt-2-simple and nshepperd's train.py; gpt2kit "
                                         "finetune uses --out RUN_DIR"),
    (["finetune", "--dataset", "d.txt"], "gpt2kit finetune uses --data"),
    (["finetune", "--learning_rate", "1e-4"], "gpt2kit finetune uses --lr"),
])
def test_other_tools_flags_name_the_gpt2kit_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --") and err.count("\n") == 1
    assert err.endswith(f"{message} (see 'gpt2kit {argv[0]} --help')\n")
