import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.checkpoints import convert, load_model, pick_device, resolve_model_dir, save_model
from gpt2kit.checkpoints.hf import gpt2kit_to_hf
from gpt2kit.errors import Gpt2kitError
from tests.conftest import TF_TINY

transformers = pytest.importorskip("transformers")


def test_what_we_write_loads_in_transformers_with_identical_logits(tiny_model_dir):
    ours, _ = load_model(tiny_model_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)
    names = set(load_file(str(tiny_model_dir / "model.safetensors")))
    assert "transformer.h.0.attn.c_attn.weight" in names and "lm_head.weight" not in names
    for f in ("config.json", "vocab.json", "merges.txt"):
        assert (tiny_model_dir / f).is_file()


def test_convert_tf_to_ours_matches_hf_reference(tmp_path):
    out = convert(TF_TINY / "tf", tmp_path / "conv")
    ref = load_file(str(TF_TINY / "hf" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_positions"]) == (2, 64, 4, 128)
    transformers.GPT2LMHeadModel.from_pretrained(out)  # loads


def test_convert_to_bfloat16_halves_the_file(tiny_model_dir, tmp_path):
    out = convert(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    assert next(iter(load_file(str(out / "model.safetensors")).values())).dtype == torch.bfloat16
    model, _ = load_model(out, dtype="float32")
    assert model.dtype == torch.float32


def test_pytorch_model_bin_is_read_safely(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    tok.save(d)
    # old HF files: no prefix, causal-mask buffers included
    sd = {k.removeprefix("transformer."): v for k, v in gpt2kit_to_hf(model.state_dict()).items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    torch.save(sd, d / "pytorch_model.bin")
    again, _ = load_model(d)
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), again(x))
    # a pickle that would run code is refused, not executed
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(Gpt2kitError, match="not loaded"):
        load_model(d)


def test_bad_checkpoints_give_one_line_errors(tiny_model_dir, tmp_path):
    with pytest.raises(Gpt2kitError, match="not a GPT-2 checkpoint"):
        load_model(tmp_path)
    d = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Gpt2kitError, match="corrupt or truncated") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    cfg = json.loads((d / "config.json").read_text())
    (d / "model.safetensors").write_bytes(data)
    cfg["n_embd"] = 32
    cfg["n_head"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Gpt2kitError, match="shape"):
        load_model(d)
    (d / "config.json").write_text("{")
    with pytest.raises(Gpt2kitError, match="cannot read model config"):
        load_model(d)
    with pytest.raises(Gpt2kitError, match="no such directory"):
        load_model(tmp_path / "does-not-exist")


def test_unknown_model_name_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Gpt2kitError) as e:
        load_model("gpt2-medium")
    assert "gpt2-medium" in str(e.value) and "\n" not in str(e.value)


def test_run_directory_resolves_to_its_best_then_final_model(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(Gpt2kitError, match="no saved model"):
        resolve_model_dir(run)
    shutil.copytree(tiny_model_dir, run / "final")
    assert resolve_model_dir(run) == run / "final"
    shutil.copytree(tiny_model_dir, run / "best")
    assert resolve_model_dir(run) == run / "best"


def test_save_then_load_roundtrip(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    save_model(model, tok, tmp_path / "again")
    a = load_file(str(tiny_model_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _hf_model_dir(d, **save_kwargs):
    """A random tiny transformers GPT-2 saved by save_pretrained, plus the GPT-2 vocabulary files."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(d, **save_kwargs)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TF_TINY / "hf" / f, d)
    return model


def _assert_same_logits(ours, theirs):
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_save_by_transformers_loads(tmp_path):
    d = tmp_path / "sharded"
    theirs = _hf_model_dir(d, max_shard_size="5MB")
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (d / "model.safetensors").exists()
    ours, _ = load_model(d)
    _assert_same_logits(ours, theirs)
    # converting writes one file that loads the same
    _assert_same_logits(load_model(convert(d, tmp_path / "one"))[0], theirs)
    (d / shards[-1]).unlink()
    with pytest.raises(Gpt2kitError) as e:
        load_model(d)
    assert shards[-1] in _one_line(e) and "missing" in str(e.value)
    (d / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(Gpt2kitError, match="no weight_map") as e:
        load_model(d)
    _one_line(e)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": "../x.safetensors"}}))
    with pytest.raises(Gpt2kitError, match="not a file beside it"):
        load_model(d)


def test_sharded_pytorch_model_bin_loads(tmp_path):
    d = tmp_path / "binshards"
    theirs = _hf_model_dir(d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, d / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ours, _ = load_model(d)
    _assert_same_logits(ours, theirs)
    (d / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(Gpt2kitError) as e:
        load_model(d)
    assert "pytorch_model-00001-of-00002.bin" in _one_line(e)


def test_legacy_non_zip_pytorch_model_bin_loads_without_unpickling_code(tmp_path):
    d = tmp_path / "legacy"
    theirs = _hf_model_dir(d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # pre-torch-1.6 format
    ours, _ = load_model(d)
    _assert_same_logits(ours, theirs)

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))
    torch.save({"x": Evil()}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(Gpt2kitError, match="not loaded") as e:
        load_model(d)
    _one_line(e)
    import pickle
    import warnings
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Path("x")}))  # raw pickle, protocol 4+: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Gpt2kitError, match="or a raw pickle rather than what torch.save writes "
                                               r"\(Unsupported operand 149\); re-download") as e:
            load_model(d)
    _one_line(e)
    assert [str(w.message) for w in caught] == []
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(Gpt2kitError, match="corrupt or truncated") as e:
        load_model(d)
    _one_line(e)


@pytest.mark.parametrize("text, complaint", [
    ("[1, 2]", "holds an array, not a JSON object"),
    ('"gpt2"', "holds a string, not a JSON object"),
    ('{"n_embd": "64", "n_head": 4, "n_layer": 2, "n_positions": 128}', "n_embd must be a positive integer, not '64'"),
    ('{"n_embd": 64, "n_head": 4, "n_layer": 2.5}', "n_layer must be a positive integer"),
    ('{"n_embd": 64, "n_head": 4, "n_inner": "wide"}', "n_inner must be a positive integer"),
    ('{"n_embd": 64, "n_head": 4, "layer_norm_epsilon": "small"}', "layer_norm_epsilon must be a number"),
    ('{"n_embd": 64, "n_head": 4, "eos_token_id": -1}', "eos_token_id must be a token id"),
    ('{"n_embd": 64, "n_head": 5}', "must be divisible by n_head"),
])
def test_malformed_config_json_is_one_line_naming_the_file(tiny_model_dir, tmp_path, text, complaint):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "config.json").write_text(text)
    with pytest.raises(Gpt2kitError) as e:
        load_model(d)
    assert str(d / "config.json") in _one_line(e) and complaint in str(e.value)


def test_config_file_near_miss_keys_are_errors_and_hf_keys_pass(tiny_model_dir, tmp_path):
    from gpt2kit.config import GPTConfig
    typo = tmp_path / "typo.json"
    typo.write_text('{"n_embd": 64, "n_head": 4, "n_layer": 2, "n_position": 64}')
    with pytest.raises(Gpt2kitError) as e:
        GPTConfig.from_json_file(typo)
    assert _one_line(e) == f"{typo}: unknown key 'n_position' (did you mean 'n_positions'?)"
    # every key of HF's GPT-2 config (and of the config.json files we write) loads; unrelated keys are ignored
    hf = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64).to_dict()
    (tmp_path / "hf.json").write_text(json.dumps({**hf, "my_note": "x"}))
    assert GPTConfig.from_json_file(tmp_path / "hf.json").n_positions == 64
    assert GPTConfig.from_json_file(tiny_model_dir / "config.json") == load_model(tiny_model_dir)[0].config
    mpt = tmp_path / "mpt.json"  # another architecture's names are not typos of GPT-2's
    mpt.write_text('{"model_type": "mpt", "n_heads": 32, "n_layers": 32}')
    with pytest.raises(Gpt2kitError) as e:
        GPTConfig.from_json_file(mpt)
    assert "describes a 'mpt' model, not GPT-2" in _one_line(e)


def test_bad_config_says_re_download_only_for_a_model_directory(tiny_model_dir, tmp_path):
    from gpt2kit.config import GPTConfig
    bad = '{"n_embd": 64, "n_head": 5}'
    (tmp_path / "badhead.json").write_text(bad)
    with pytest.raises(Gpt2kitError) as e:
        GPTConfig.from_json_file(tmp_path / "badhead.json")
    assert _one_line(e).endswith("must be divisible by n_head (5); fix the file")
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "config.json").write_text(bad)
    with pytest.raises(Gpt2kitError) as e:
        load_model(d)
    assert _one_line(e).endswith("fix the file or re-download the model")


def test_only_supported_devices_are_accepted(monkeypatch, tiny_model_dir, capsys):
    assert pick_device("cpu") == pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device(None).type in ("cpu", "cuda", "mps") and pick_device("auto") == pick_device(None)
    for bad, complaint in [("meta", "not supported by gpt2kit"), ("xpu", "not supported by gpt2kit"),
                           ("ipu:0", "not supported by gpt2kit"), ("gpu", "unknown device"),
                           ("cpu:1", "does not exist"), ("cuda:", "unknown device")]:
        with pytest.raises(Gpt2kitError) as e:
            pick_device(bad)
        assert complaint in _one_line(e) and "cpu" in str(e.value), bad
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Gpt2kitError, match="no CUDA GPU"):
        pick_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(Gpt2kitError, match=r"only 2 CUDA GPU\(s\)"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(Gpt2kitError, match="MPS is not available"):
        pick_device("mps")
    with pytest.raises(Gpt2kitError, match="not supported"):
        load_model(tiny_model_dir, device="meta")
    from gpt2kit.cli import main
    for dev in ("meta", "xpu"):
        assert main(["generate", "x", "-m", str(tiny_model_dir), "--device", dev, "--length", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: device ") and len(err.strip().splitlines()) == 1


def test_convert_refuses_outputs_it_would_clobber_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import gpt2kit.checkpoints as ck
    from gpt2kit.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the checkpoint was read before OUT was checked")
    monkeypatch.setattr(ck, "read_checkpoint", no_loading)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, complaint in [(full, "already exists and is not empty"), (afile, "is an existing file"),
                           (afile / "sub", "cannot create output directory")]:
        with pytest.raises(Gpt2kitError) as e:
            convert(tiny_model_dir, out)
        assert str(out) in _one_line(e) and complaint in str(e.value)
        assert main(["convert", str(tiny_model_dir), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and complaint in err and len(err.strip().splitlines()) == 1
    assert afile.read_text() == "mine" and [p.name for p in full.iterdir()] == ["notes.txt"]
    with pytest.raises(Gpt2kitError, match="unknown dtype"):
        convert(tiny_model_dir, tmp_path / "new", dtype="float8")
    with pytest.raises(Gpt2kitError, match="its own source"):
        convert(tiny_model_dir, tiny_model_dir)
    monkeypatch.undo()
    # a failed conversion leaves no directory behind; an empty existing directory is fine
    with pytest.raises(Gpt2kitError):
        convert(tmp_path / "no-such-model", tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    assert (convert(tiny_model_dir, tmp_path / "empty") / "model.safetensors").is_file()


def test_convert_to_an_unwritable_place_is_one_line(tiny_model_dir, tmp_path):
    if Path("/proc/self").is_dir():  # writable by nobody, root included
        with pytest.raises(Gpt2kitError, match="cannot create output directory") as e:
            convert(tiny_model_dir, "/proc/gpt2kit-out")
        _one_line(e)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(Gpt2kitError, match="cannot create output directory"):
            convert(tiny_model_dir, ro / "out")


def test_config_vocab_padded_beyond_the_tokenizer_still_loads(tokenizer, tmp_path):
    from gpt2kit.config import GPTConfig
    from tests.conftest import random_model

    config = GPTConfig(vocab_size=50304, n_layer=1, n_head=2, n_embd=16, n_positions=32)  # padded to 64 * 786
    d = save_model(random_model(config), tokenizer, tmp_path / "padded")
    model, tok = load_model(d)
    assert model.config.vocab_size == 50304 and tok.vocab_size == 50257
    with torch.inference_mode():
        assert model(torch.tensor([tok.encode("Hello")])).shape[-1] == 50304
    assert load_model(convert(d, tmp_path / "conv"))[0].config.vocab_size == 50304


def test_a_convert_killed_mid_write_does_not_block_the_rerun(tiny_model_dir, tmp_path, capsys):
    import subprocess
    import sys

    from gpt2kit.checkpoints import PARTIAL
    from gpt2kit.cli import main

    out = tmp_path / "out"
    # kill -9 while safetensors writes its temporary file (.tmpXXXXXX), as the field report did
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "import gpt2kit.weights_io as hf  # (where save_safetensors writes)\n"
              "def killed(tensors, path, metadata):\n"
              "    (Path(path).parent / '.tmpAbC123').write_bytes(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "hf.save_file = killed\n"
              "from gpt2kit.checkpoints import convert\n"
              "convert(sys.argv[1], sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(out)], env=env)
    assert r.returncode == -9
    assert [p.name for p in out.iterdir()] == [PARTIAL]  # nothing half written in OUT itself
    assert (out / PARTIAL / ".tmpAbC123").is_file()
    assert main(["convert", str(tiny_model_dir), str(out)]) == 0
    assert capsys.readouterr().err == f"note: removing {out / PARTIAL}, left by an interrupted write\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "gpt2kit.json",
                                                     "merges.txt", "model.safetensors", "vocab.json"]
    load_model(out)
    # killed while the finished files were moved in: say so instead of mixing two writes
    (out / PARTIAL).mkdir()
    assert main(["convert", str(tiny_model_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert "was interrupted" in err and f"remove {out}" in err and err.count("\n") == 1


@pytest.mark.parametrize("to", ["hf", "openai-tf"])
def test_written_weights_follow_the_umask_like_the_files_beside_them(tiny_model_dir, tmp_path, to):
    import stat

    from gpt2kit import lora

    old = os.umask(0o022)
    try:
        out = convert(tiny_model_dir, tmp_path / "out", to=to)
        model, _ = load_model(tiny_model_dir)
        cfg = lora.LoraConfig(rank=2)
        lora.apply_lora(model, cfg)
        lora.save_adapter(model, cfg, tmp_path / "adapter")
        written = [*out.iterdir(), *(tmp_path / "adapter").iterdir()]
        assert {p.name for p in written} >= {"model.safetensors" if to == "hf" else "model.ckpt.index",
                                             lora.ADAPTER_WEIGHTS}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == \
               {p.name: "0o644" for p in written}
        os.umask(0o077)  # a private umask is kept too
        private = save_model(model, None, tmp_path / "private") if to == "hf" else None
        if private is not None:
            assert stat.S_IMODE((private / "model.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_on_load(tiny_model_dir, tmp_path, capsys, bad):
    from safetensors.torch import save_file

    from gpt2kit.cli import main

    d = tmp_path / "diverged"
    shutil.copytree(tiny_model_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(Gpt2kitError) as e:
        load_model(d)
    assert _one_line(e) == (f"{d / 'model.safetensors'} holds NaN or infinite weights (transformer.h.1.mlp.c_fc"
                            ".weight), so the model cannot give meaningful output; use an earlier checkpoint of "
                            "the run that wrote it")
    with pytest.raises(Gpt2kitError, match="NaN or infinite"):
        convert(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["generate", "Hello", "-m", str(d), "--length", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NaN or infinite" in err and err.count("\n") == 1


def test_a_symlink_loop_or_dangling_link_as_model_is_named_not_downloaded(tmp_path, monkeypatch, capsys):
    from gpt2kit.checkpoints import hub
    from gpt2kit.cli import main

    def no_download(*a, **k):
        raise AssertionError("a local link was sent to the Hub")
    monkeypatch.setattr(hub, "download", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    os.symlink("gpt2", "models/gpt2")  # "models/gpt2" reads as a Hub id (org/name)
    os.symlink("b", "a")
    os.symlink("a", "b")
    os.symlink("missing-dir", "dangling")
    for name in ("models/gpt2", "models/gpt2/sub", "a", str(tmp_path / "a")):
        with pytest.raises(Gpt2kitError) as e:
            resolve_model_dir(name)
        assert _one_line(e).startswith(f"--model {name}: its symbolic links form a loop")
    with pytest.raises(Gpt2kitError) as e:
        resolve_model_dir("dangling")
    assert _one_line(e).startswith("--model dangling is a symbolic link to missing-dir, which does not exist")
    assert main(["convert", "a", "out"]) == 1
    assert capsys.readouterr().err.startswith("error: SRC a: its symbolic links form a loop")
