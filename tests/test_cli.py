"""The CLI verbs generate / eval / convert / download, in process (fast) and as real processes."""

import json
import subprocess
import sys

import pytest

from gpt2kit.cli import main
from tests.conftest import SHAKESPEARE, TF_TINY


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
    (("x", "--temperature", "-1"), "temperature"),
    (("x", "--length", "0"), "length"),
    (("x", "--unconditional"), "--unconditional takes no prompt"),
    (("x", "--nsamples", "-1"), "nsamples"),
    (("x", "--seed", "-1"), "seed"),
])
def test_generate_bad_input_is_one_line_and_exit_1(capsys, tiny_model_dir, argv, msg):
    code, out, err = run(capsys, "generate", *argv, "-m", tiny_model_dir)
    assert code == 1 and msg in err and err.count("\n") == 1 and err.startswith("error: ")


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
    assert code == 0 and set(rec) == {"perplexity", "loss", "tokens"} and rec["perplexity"] > 1
    (tmp_path / "empty.txt").write_text("  \n")
    assert run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "empty.txt")[2].startswith("error: ")
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "missing.txt")
    assert code == 1 and "does not exist" in err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    code, _, err = run(capsys, "eval", "-m", tiny_model_dir, "--data", tmp_path / "bin.txt")
    assert code == 1 and "--encoding" in err


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


def test_unwritable_output_paths_are_one_line_errors(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "generate", "Hi", "-m", tiny_model_dir, "--length", 2, "--output", tmp_path)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run(capsys, "convert", tiny_model_dir, afile)
    assert code == 1 and err.startswith("error: ") and str(afile) in err.splitlines()[-1]
    assert afile.read_text() == "mine"  # nothing of the user's is overwritten
