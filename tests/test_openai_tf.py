import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2kit.checkpoints.openai_tf import (
    _crc32c,
    _crc_bytes,
    _mask,
    is_openai_tf_dir,
    list_tf_variables,
    read_openai_tf,
)
from gpt2kit.errors import Gpt2kitError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tf-gpt2-tiny"
TF_DIR = DATA / "tf"
needs_data = pytest.mark.skipif(not TF_DIR.is_dir(), reason="shared test data not available")


def _copy_ckpt(dst: Path, prefix: str = "model.ckpt") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(TF_DIR / "hparams.json", dst)
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(TF_DIR / f"model.ckpt{suffix}", dst / f"{prefix}{suffix}")
    (dst / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')
    return dst


@needs_data
def test_matches_hf_safetensors():
    from safetensors.torch import load_file

    hparams, sd = read_openai_tf(TF_DIR)
    assert hparams == {"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
    ref = load_file(DATA / "hf" / "model.safetensors")
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    assert is_openai_tf_dir(TF_DIR) and not is_openai_tf_dir(DATA / "hf")
    assert list_tf_variables(TF_DIR)["model/h0/attn/c_attn/w"] == ("float32", [1, 64, 192])


@needs_data
def test_checkpoint_file_prefix_is_honoured(tmp_path):
    d = _copy_ckpt(tmp_path / "run1", "model-1000")
    _, sd = read_openai_tf(d)
    assert sd["transformer.wte.weight"].shape == (50257, 64)
    # An absolute path recorded on another machine (e.g. Colab) falls back to the same name in this folder.
    (d / "checkpoint").write_text('model_checkpoint_path: "/content/checkpoint/run1/model-1000"\n')
    assert read_openai_tf(d)[1].keys() == sd.keys()
    (d / "checkpoint").write_text('model_checkpoint_path: "model-2000"\n')
    with pytest.raises(Gpt2kitError, match="model-2000"):
        read_openai_tf(d)


@needs_data
@pytest.mark.parametrize("damage", ["truncate_end", "truncate_middle", "flip_byte", "empty"])
def test_damaged_index(tmp_path, damage):
    d = _copy_ckpt(tmp_path)
    index = d / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    if damage == "truncate_end":
        raw = raw[:-20]
    elif damage == "truncate_middle":
        raw = raw[:300] + raw[400:]
    elif damage == "flip_byte":
        raw[100] ^= 0x40
    else:
        raw = b""
    index.write_bytes(bytes(raw))
    with pytest.raises(Gpt2kitError, match="truncated or corrupt"):
        read_openai_tf(d)


@needs_data
def test_damaged_or_missing_data(tmp_path):
    d = _copy_ckpt(tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(Gpt2kitError, match="checksum"):
        read_openai_tf(d)
    read_openai_tf(d, verify=False)  # the escape hatch still loads
    data.write_bytes(bytes(raw[:-100]))
    with pytest.raises(Gpt2kitError, match="truncated"):
        read_openai_tf(d)
    data.unlink()
    with pytest.raises(Gpt2kitError, match="data-00000-of-00001"):
        read_openai_tf(d)


@needs_data
def test_hparams_mismatch_and_missing_files(tmp_path):
    d = _copy_ckpt(tmp_path)
    hp = json.loads((d / "hparams.json").read_text())
    (d / "hparams.json").write_text(json.dumps({**hp, "n_ctx": 1024}))
    with pytest.raises(Gpt2kitError, match="model/wpe has shape"):
        read_openai_tf(d)
    (d / "hparams.json").write_text(json.dumps({**hp, "n_layer": 3}))
    with pytest.raises(Gpt2kitError, match="no variable model/h2"):
        read_openai_tf(d)
    (d / "hparams.json").unlink()
    with pytest.raises(Gpt2kitError, match="hparams.json"):
        read_openai_tf(d)
    with pytest.raises(Gpt2kitError, match="does not exist"):
        read_openai_tf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gpt2kitError, match="no TensorFlow checkpoint"):
        read_openai_tf(tmp_path / "empty")


# --- a minimal tensor-bundle writer, to test dtypes and sharding without TensorFlow -------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(num: int, val) -> bytes:
    if isinstance(val, bytes):
        return _varint(num << 3 | 2) + _varint(len(val)) + val
    return _varint(num << 3) + _varint(val)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    # Every key written in full (shared=0), a single restart point at 0.
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def _with_trailer(block: bytes) -> bytes:
    crc = _mask(_crc32c(np.frombuffer(block + b"\0", np.uint8)))
    return block + b"\0" + struct.pack("<I", crc)


def _write_bundle(prefix: Path, tensors: dict[str, tuple[int, bytes, list[int]]], num_shards: int) -> None:
    shards = [bytearray() for _ in range(num_shards)]
    entries = [(b"", _field(1, num_shards) + _field(3, _field(1, 1)))]  # BundleHeaderProto
    for i, (name, (dtype, raw, shape)) in enumerate(sorted(tensors.items())):
        shard = shards[i % num_shards]
        shape_proto = b"".join(_field(2, _field(1, s)) for s in shape)
        crc = _mask(_crc32c(np.frombuffer(raw, np.uint8)))
        value = (_field(1, dtype) + _field(2, shape_proto) + _field(3, i % num_shards) + _field(4, len(shard))
                 + _field(5, len(raw)) + b"\x35" + struct.pack("<I", crc))
        entries.append((name.encode(), value))
        shard += raw
    data_block = _block(entries)
    meta_block = _block([])
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block)))])
    out = _with_trailer(data_block)
    meta_handle = _varint(len(out)) + _varint(len(meta_block))
    out += _with_trailer(meta_block)
    index_handle = _varint(len(out)) + _varint(len(index_block))
    out += _with_trailer(index_block)
    out += (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(out)
    for k, shard in enumerate(shards):
        Path(f"{prefix}.data-{k:05d}-of-{num_shards:05d}").write_bytes(bytes(shard))


@pytest.mark.parametrize("dtype,tf_dtype", [(torch.float16, 19), (torch.bfloat16, 14), (torch.float32, 1)])
def test_synthetic_bundle_dtypes_and_shards(tmp_path, dtype, tf_dtype):
    hp = {"n_vocab": 11, "n_ctx": 5, "n_embd": 8, "n_head": 2, "n_layer": 2}
    (tmp_path / "hparams.json").write_text(json.dumps(hp))
    g = torch.Generator().manual_seed(0)
    tensors, expect = {}, {}

    def add(tf_name, hf_key, shape):
        t = torch.randn(shape, generator=g).to(dtype)
        tensors[tf_name] = (tf_dtype, t.view(torch.uint8).numpy().tobytes(), list(shape))
        expect[hf_key] = t.squeeze(0) if len(shape) == 3 else t  # Conv1D [1, nx, nf] -> [nx, nf]

    add("model/wte", "transformer.wte.weight", (11, 8))
    add("model/wpe", "transformer.wpe.weight", (5, 8))
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            add(f"model/h{i}/{ln}/g", f"transformer.h.{i}.{ln}.weight", (8,))
            add(f"model/h{i}/{ln}/b", f"transformer.h.{i}.{ln}.bias", (8,))
        for mod, nx, nf in (("attn/c_attn", 8, 24), ("attn/c_proj", 8, 8), ("mlp/c_fc", 8, 32), ("mlp/c_proj", 32, 8)):
            add(f"model/h{i}/{mod}/w", f"transformer.h.{i}.{mod.replace('/', '.')}.weight", (1, nx, nf))
            add(f"model/h{i}/{mod}/b", f"transformer.h.{i}.{mod.replace('/', '.')}.bias", (nf,))
    add("model/ln_f/g", "transformer.ln_f.weight", (8,))
    add("model/ln_f/b", "transformer.ln_f.bias", (8,))
    # Optimizer state and counters a fine-tuning script saves alongside the weights: must be skipped.
    tensors["model/h0/attn/c_attn/w/Adam"] = (1, bytes(4 * 8 * 24), [1, 8, 24])
    tensors["global_step"] = (9, struct.pack("<q", 1000), [])
    _write_bundle(tmp_path / "model-1000", tensors, num_shards=3)

    assert is_openai_tf_dir(tmp_path)  # no `checkpoint` file: found via the *.index glob
    hparams, sd = read_openai_tf(tmp_path)
    assert hparams == hp
    assert sd.keys() == expect.keys()
    for k, t in expect.items():
        assert sd[k].dtype == dtype and torch.equal(sd[k], t), k
    vars_ = list_tf_variables(tmp_path / "model-1000")
    assert vars_["global_step"] == ("int64", []) and vars_["model/wte"][0] == str(dtype).split(".")[1]


def test_crc32c_known_values():
    assert _crc32c(np.frombuffer(b"123456789", np.uint8)) == 0xE3069283
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 100_003, dtype=np.uint8)
    # The lane-parallel path must agree with the byte-at-a-time path (small prefixes take the latter).
    assert _crc32c(buf) == _crc_bytes(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
