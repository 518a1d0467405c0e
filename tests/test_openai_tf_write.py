"""Writing OpenAI's TensorFlow checkpoint layout (`convert --to openai-tf`), checked against the files
TensorFlow's own Saver wrote for the same weights (../shared/data/tf-gpt2-tiny)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2kit.checkpoints import convert, load_model, save_model
from gpt2kit.checkpoints import openai_tf_write as w
from gpt2kit.checkpoints.openai_tf import _read_index, read_openai_tf
from gpt2kit.cli import main
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError
from tests.conftest import random_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tf-gpt2-tiny"
TF_DIR = DATA / "tf"
pytestmark = pytest.mark.skipif(not TF_DIR.is_dir(), reason="shared test data not available")
FILES = ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "encoder.json",
         "vocab.bpe")


def test_written_checkpoint_is_byte_for_byte_what_tensorflow_wrote(tmp_path):
    hparams, state = read_openai_tf(TF_DIR)
    w.write_openai_tf(tmp_path, hparams, state, (TF_DIR / "encoder.json", TF_DIR / "vocab.bpe"))
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (TF_DIR / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no .meta: the scripts never read it


def test_convert_hf_to_openai_tf_gives_tensorflows_files_and_the_same_logits(tmp_path):
    out = convert(DATA / "hf", tmp_path / "tf", to="openai-tf")
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001", "hparams.json", "checkpoint"):
        assert (out / name).read_bytes() == (TF_DIR / name).read_bytes(), name
    ref = json.loads((DATA / "reference.json").read_text())
    model, tok = load_model(out, device="cpu", dtype="float32")
    assert tok.encode(ref["text"]) == ref["input_ids"]  # encoder.json + vocab.bpe came along
    with torch.inference_mode():
        logits = model(torch.tensor([ref["input_ids"]]))[0].numpy()
    np.testing.assert_allclose(logits, np.load(DATA / "reference_logits.npy"), atol=1e-4, rtol=0)


def test_an_index_of_several_blocks_reads_back(tmp_path, monkeypatch):
    # GPT-2's index fits one 256 KiB block at every size; a small block size exercises the separators
    monkeypatch.setattr(w, "_BLOCK_SIZE", 200)
    hparams, state = read_openai_tf(TF_DIR)
    w.write_openai_tf(tmp_path, hparams, state)
    entries, shards = _read_index(tmp_path / "model.ckpt.index")
    ref, _ = _read_index(TF_DIR / "model.ckpt.index")
    assert shards == 1 and entries == ref
    data = tmp_path / "model.ckpt.index"
    assert len(data.read_bytes()) > (TF_DIR / "model.ckpt.index").stat().st_size  # several blocks, more index
    _, back = read_openai_tf(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_separators_are_leveldbs():
    assert w._separator(b"model/h0/mlp", b"model/h1/attn") == b"model/h0/mlp"  # '0' + 1 is not < '1'
    assert w._separator(b"model/h0/mlp", b"model/h5") == b"model/h1"
    assert w._separator(b"abc", b"abcd") == b"abc"  # a prefix: kept whole
    assert w._successor(b"model/ln_f/g") == b"n" and w._successor(b"\xff\xffa") == b"\xff\xffb"


def test_padded_vocabulary_rows_are_left_out(tmp_path, tokenizer):
    model = random_model(GPTConfig(vocab_size=50304, n_layer=1, n_head=2, n_embd=32, n_positions=64))
    save_model(model, tokenizer, tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "tf", to="openai-tf")
    assert json.loads((out / "hparams.json").read_text())["n_vocab"] == 50257
    back, _ = load_model(out, device="cpu", dtype="float32")
    x = torch.tensor([[1, 2, 3, 50256]])
    with torch.inference_mode():
        torch.testing.assert_close(back(x), model.eval()(x)[..., :50257])


def test_what_openais_format_cannot_hold_is_refused_before_writing(tmp_path, tokenizer):
    save_model(random_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, n_inner=48)), tokenizer,
               tmp_path / "hf")
    with pytest.raises(Gpt2kitError, match="n_inner 48.*cannot be written as an OpenAI TensorFlow checkpoint"):
        convert(tmp_path / "hf", tmp_path / "tf", to="openai-tf")
    assert not (tmp_path / "tf").exists()  # left as it was found


def test_cli_convert_to_openai_tf(tmp_path, capsys):
    assert main(["convert", str(DATA / "hf"), str(tmp_path / "tf"), "--to", "openai-tf"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'tf'}\n"
    assert (tmp_path / "tf" / "model.ckpt.index").read_bytes() == (TF_DIR / "model.ckpt.index").read_bytes()
    assert main(["convert", str(DATA / "hf"), str(tmp_path / "tf16"), "--to", "openai-tf", "--dtype", "float16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --dtype float16: OpenAI's TensorFlow checkpoints hold float32")
    assert err.count("\n") == 1
    assert not (tmp_path / "tf16").exists()


@pytest.mark.parametrize("to, names", [("hf", "vocab.json and merges.txt"),
                                       ("openai-tf", "encoder.json and vocab.bpe")])
def test_convert_warns_when_the_source_has_no_vocabulary(tmp_path, capsys, to, names):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (src / name).write_bytes((TF_DIR / name).read_bytes())
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", to]) == 0
    err = capsys.readouterr().err
    assert err == f"warning: {src} has no vocabulary files: copy the base model's {names} into {tmp_path / 'out'} " \
                  "before using it\n"
    assert main(["convert", str(TF_DIR), str(tmp_path / "out2"), "--to", to]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("to", ["openai-tf", "hf"])
def test_a_corrupt_vocabulary_is_one_line_naming_the_file(tmp_path, capsys, to):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "merges.txt"):
        (src / name).write_bytes((DATA / "hf" / name).read_bytes())
    (src / "vocab.json").write_text('{"!": 0, "\\"": 1')  # cut short
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", to])
    err = capsys.readouterr().err
    if to == "hf":  # copied as it is (convert does not read it); loading the result names it
        assert code == 0
        assert main(["generate", "x", "-m", str(tmp_path / "out"), "--length", "1"]) == 1
        err = capsys.readouterr().err
        src = tmp_path / "out"
    assert err.startswith(f"error: cannot read vocabulary {src / 'vocab.json'} (") and err.count("\n") == 1
    assert "copy them from the base model's directory" in err
