"""Write a GPT-2 in OpenAI's original TensorFlow checkpoint layout: the reverse of openai_tf.py.

Hand-written for the reader's reason: TensorFlow is a multi-GB dependency, and the format is a few hundred
raw tensors plus a small index. For the same tensors the index and data files are byte for byte what
tf.compat.v1.train.Saver writes (a test compares them with ../shared/data/tf-gpt2-tiny, written by TF 2.21),
so OpenAI's sampling scripts, nshepperd's train.py and gpt-2-simple restore them as their own. The one file
left out is model.ckpt.meta, the saved graph: those scripts build the graph in Python and restore the
variables by name, never from the .meta file.

Files written (openai_tf.py describes their layout):
  checkpoint, hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001, encoder.json, vocab.bpe
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from gpt2kit.checkpoints.openai_tf import _TABLE_MAGIC, _crc32c, _expected, _mask
from gpt2kit.config import GPTConfig
from gpt2kit.errors import Gpt2kitError

_FLOAT32 = 1  # TF's DataType DT_FLOAT
_BLOCK_SIZE = 262144  # TF's table::Options block_size: a data block is closed once it reaches this
_RESTART_INTERVAL = 16  # keys between full (not prefix-compressed) keys in a data block, as in LevelDB


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# protobuf fields (proto3: a zero scalar is left out, as TF's serializer does)
def _uint_field(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v) if v else b""


def _bytes_field(num: int, b: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(b)) + b


def _entry(shape: list[int], offset: int, size: int, crc: int) -> bytes:
    """BundleEntryProto: 1 dtype, 2 shape (TensorShapeProto: 2 = repeated Dim{1 size}), 3 shard_id,
    4 offset, 5 size, 6 crc32c (fixed32)."""
    dims = b"".join(_bytes_field(2, _uint_field(1, d)) for d in shape)
    return (_uint_field(1, _FLOAT32) + _bytes_field(2, dims) + _uint_field(4, offset) + _uint_field(5, size)
            + _varint(6 << 3 | 5) + struct.pack("<I", crc))


_HEADER = _uint_field(1, 1) + _bytes_field(3, _uint_field(1, 1))  # BundleHeaderProto: 1 shard, version{producer 1}


class _Block:
    """A LevelDB table block: prefix-compressed keys, a full key every `interval` entries, then the
    restart offsets and their count."""

    def __init__(self, interval: int):
        self.interval, self.buf, self.restarts, self.count, self.last = interval, bytearray(), [0], 0, b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.interval:
            n = min(len(key), len(self.last))
            while shared < n and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        self.last, self.count = key, self.count + 1

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts)}I", *self.restarts) + \
            struct.pack("<I", len(self.restarts))


def _separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB's FindShortestSeparator: a short key >= start and < limit, for the index block."""
    i, n = 0, min(len(start), len(limit))
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _successor(key: bytes) -> bytes:
    """LevelDB's FindShortSuccessor: a short key >= key, for the last index entry."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """An SSTable of sorted (key, value) entries, laid out as LevelDB's (and TF's) TableBuilder does:
    data blocks, an empty metaindex block, the index block, the footer."""
    out = bytearray()

    def write(raw: bytes) -> bytes:  # a block + its trailer (no compression, masked crc32c); its handle
        offset = len(out)
        out.extend(raw + b"\x00")
        out.extend(struct.pack("<I", _mask(_crc32c(np.frombuffer(raw + b"\x00", np.uint8)))))
        return _varint(offset) + _varint(len(raw))

    index, data, pending, last = _Block(1), _Block(_RESTART_INTERVAL), None, b""
    for key, value in entries:
        if pending is not None:
            index.add(_separator(last, key), pending)
            pending = None
        data.add(key, value)
        last = key
        if data.size() >= _BLOCK_SIZE:
            pending, data = write(data.finish()), _Block(_RESTART_INTERVAL)
    if data.buf:
        pending = write(data.finish())
    meta = write(_Block(_RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(_successor(last), pending)
    footer = meta + write(index.finish())
    out += footer.ljust(40, b"\x00") + struct.pack("<Q", _TABLE_MAGIC)
    return bytes(out)


def openai_hparams(config: GPTConfig, n_vocab: int | None = None) -> dict:
    """hparams.json for `config` (`n_vocab` in place of its vocab_size); a one-line error for what OpenAI's
    format cannot say (its code fixes the MLP at 4 x n_embd and the layer norms' epsilon at 1e-5)."""
    if config.n_inner != 4 * config.n_embd or config.layer_norm_epsilon != 1e-5:
        raise Gpt2kitError(f"this model (n_inner {config.n_inner}, layer_norm_epsilon {config.layer_norm_epsilon}) "
                           f"cannot be written as an OpenAI TensorFlow checkpoint, whose code fixes them at "
                           f"4 x n_embd ({4 * config.n_embd}) and 1e-5; convert it to the HuggingFace format")
    return {"n_vocab": n_vocab or config.vocab_size, "n_ctx": config.n_positions, "n_embd": config.n_embd,
            "n_head": config.n_head, "n_layer": config.n_layer}


def write_openai_tf(out: Path, hparams: dict, state: dict[str, torch.Tensor],
                    vocab_files: tuple[Path, Path] | None = None, prefix: str = "model.ckpt") -> None:
    """Write `state` (HuggingFace GPT-2 keys and layout) as OpenAI's checkpoint `prefix` in `out`, an existing
    directory, with `hparams` (n_vocab, n_ctx, n_embd, n_head, n_layer) and, given (encoder.json or
    vocab.json, vocab.bpe or merges.txt), the vocabulary under OpenAI's names. Weights are written in float32,
    the dtype OpenAI's code builds its variables in."""
    tensors = []  # (TF name, TF shape, float32 bytes), sorted by name as Saver writes them
    for tf_name, hf_key, shape in _expected(hparams):
        t = state[hf_key].detach().to("cpu", torch.float32).contiguous()
        if t.numel() != int(np.prod(shape)):
            raise ValueError(f"{hf_key} has shape {list(t.shape)}, but hparams imply {shape}")
        tensors.append((tf_name, shape, t.reshape(shape).numpy().tobytes()))
    tensors.sort(key=lambda x: x[0].encode())
    entries, offset = [(b"", _HEADER)], 0
    data_path, index_path = out / f"{prefix}.data-00000-of-00001", out / f"{prefix}.index"
    with open(data_path, "wb") as f:
        for name, shape, raw in tensors:
            f.write(raw)
            crc = _mask(_crc32c(np.frombuffer(raw, np.uint8)))
            entries.append((name.encode(), _entry(shape, offset, len(raw), crc)))
            offset += len(raw)
    index_path.write_bytes(_table(entries))
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    (out / "hparams.json").write_text(json.dumps({k: hparams[k] for k in keys}, indent=2))
    if vocab_files is not None:
        (out / "encoder.json").write_bytes(vocab_files[0].read_bytes())
        (out / "vocab.bpe").write_bytes(vocab_files[1].read_bytes())
    (out / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')
