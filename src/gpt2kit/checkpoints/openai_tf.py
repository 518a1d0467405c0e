"""Read OpenAI's original GPT-2 TensorFlow checkpoints into a HuggingFace-layout state dict.

Hand-written on purpose: TensorFlow is a multi-GB dependency that would be needed only to unpack a few
hundred raw tensors, so this module parses the on-disk format itself (numpy + torch only, never TF).

On-disk format (TF "tensor bundle" V2, as written by tf.train.Saver for OpenAI's 124M/355M/774M/1558M
releases and for nshepperd-style fine-tuning runs):
  checkpoint                     text proto: model_checkpoint_path: "model.ckpt" (or "model-1000", absolute...)
  <prefix>.index                 LevelDB-format SSTable: key = variable name, value = BundleEntryProto
                                 (key "" holds the BundleHeaderProto with the shard count)
  <prefix>.data-0000k-of-0000N   raw little-endian tensor bytes, located by (shard_id, offset, size)
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import is_openai_tf_dir  # noqa: F401  (also read from here)

# TF DataType enum values -> names (for list_tf_variables); only the float ones can be model weights.
_DTYPE_NAMES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32",
    23: "uint64",
}
_TORCH_DTYPES = {1: torch.float32, 19: torch.float16, 14: torch.bfloat16}

_TABLE_MAGIC = 0xDB4775248B80FB57  # last 8 bytes of every LevelDB/TF table file
_FOOTER_LEN = 48  # two varint BlockHandles padded to 40 bytes + magic
_BLOCK_TRAILER_LEN = 5  # compression type byte + masked crc32c


class _Corrupt(Exception):
    """Internal: malformed bytes; converted to a Gpt2kitError naming the file."""


# ---------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli). Both SSTable blocks and tensor data carry a *masked* crc32c. zlib only has CRC-32
# (another polynomial), so compute it with numpy: split the buffer into many equal lanes, run a slicing-by-4
# table CRC over all lanes at once (one numpy op per 4-byte column), then fold the lane CRCs together with
# the linear "append L zero bytes" operator. ~150-200 MB/s, versus ~5 MB/s for a pure-Python byte loop.

def _crc_tables() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, (c >> 1) ^ np.uint32(0x82F63B78), c >> 1).astype(np.uint32)
    t = np.empty((4, 256), np.uint32)  # t[k][b]: CRC contribution of byte b followed by k zero bytes
    t[0] = c
    for k in range(1, 4):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


_T4 = _crc_tables()
_T0 = _T4[0].tolist()


def _crc_bytes(crc: int, data: bytes) -> int:
    for b in data:
        crc = _T0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@functools.lru_cache(maxsize=64)
def _zeros_op(nbytes: int) -> tuple[list[int], ...]:
    # The raw (un-inverted) CRC state after nbytes zero bytes is linear in the starting state over GF(2).
    # Build that 32x32 bit matrix by repeated squaring of the one-zero-byte matrix, then expand it into four
    # 256-entry byte tables so applying it costs four lookups.
    def apply(mat: list[int], v: int) -> int:
        out, i = 0, 0
        while v:
            if v & 1:
                out ^= mat[i]
            v >>= 1
            i += 1
        return out

    power = [_T0[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
    result = [1 << i for i in range(32)]
    n = nbytes
    while n:
        if n & 1:
            result = [apply(power, r) for r in result]
        power = [apply(power, p) for p in power]
        n >>= 1
    tables = []
    for k in range(4):
        tbl = [0] * 256
        for v in range(1, 256):
            low = v & -v
            tbl[v] = tbl[v ^ low] ^ result[8 * k + low.bit_length() - 1]
        tables.append(tbl)
    return tuple(tables)


def _crc32c(buf: np.ndarray) -> int:
    buf = buf.reshape(-1).view(np.uint8)
    rows = min(4096, max(1, math.isqrt(buf.size // 4)))  # 4-byte words per lane; lanes ~= rows
    lane = 4 * rows
    lanes = buf.size // lane
    crc = 0xFFFFFFFF
    if lanes >= 8:
        words = buf[: lanes * lane].view("<u4").reshape(lanes, rows).T.copy()  # [rows, lanes], rows contiguous
        c = np.zeros(lanes, np.uint32)
        t0, t1, t2, t3 = _T4
        for row in words:
            c ^= row
            c = t3[c & 0xFF] ^ t2[(c >> 8) & 0xFF] ^ t1[(c >> 16) & 0xFF] ^ t0[c >> 24]
        z0, z1, z2, z3 = _zeros_op(lane)
        for r in c.tolist():  # crc(A || B) = zeros_op(crc(A)) ^ crc_from_zero(B)
            crc = z0[crc & 0xFF] ^ z1[(crc >> 8) & 0xFF] ^ z2[(crc >> 16) & 0xFF] ^ z3[crc >> 24] ^ r
        buf = buf[lanes * lane:]
    return _crc_bytes(crc, buf.tobytes()) ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    # LevelDB/TF store crc32c "masked" so that a CRC of data that itself contains CRCs stays well-distributed.
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Minimal protobuf + SSTable decoding.

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field_number, value): int for varint/fixed wire types, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise _Corrupt("protobuf field runs past its end")
        yield num, val


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class _Entry:
    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    shard: int = 0
    offset: int = 0
    size: int = 0
    crc: int | None = None
    sliced: bool = False  # partitioned variable: its data lives in slices (never used by GPT-2)


def _parse_entry(buf: bytes) -> _Entry:
    # BundleEntryProto: 1 dtype, 2 shape (TensorShapeProto: 2 = repeated Dim{1 size}), 3 shard_id,
    # 4 offset, 5 size, 6 crc32c (fixed32), 7 slices.
    e = _Entry()
    for num, val in _proto_fields(buf):
        if num == 1:
            e.dtype = val
        elif num == 2:
            for dnum, dim in _proto_fields(val):
                if dnum == 2:
                    e.shape.append(_int64(next((v for n, v in _proto_fields(dim) if n == 1), 0)))
        elif num == 3:
            e.shard = val
        elif num == 4:
            e.offset = val
        elif num == 5:
            e.size = val
        elif num == 6:
            e.crc = val
        elif num == 7:
            e.sliced = True
    return e


def _read_block(data: bytes, handle: bytes) -> list[tuple[bytes, bytes]]:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _BLOCK_TRAILER_LEN > len(data):
        raise _Corrupt(f"block at byte {offset} runs past the end of the file")
    block = data[offset:end]
    ctype = data[end]
    (stored_crc,) = struct.unpack_from("<I", data, end + 1)
    if _mask(_crc32c(np.frombuffer(data[offset:end + 1], np.uint8))) != stored_crc:
        raise _Corrupt(f"checksum mismatch in block at byte {offset}")
    if ctype != 0:
        # TF's BundleWriter never compresses (type 1 would be snappy); refuse rather than add a dependency.
        raise _Corrupt(f"block at byte {offset} is compressed (type {ctype}); only uncompressed tables are supported")
    # Block layout: entries, then uint32 restart offsets, then uint32 restart count. Each entry is
    # varint shared_key_len, varint unshared_key_len, varint value_len, key suffix, value.
    if len(block) < 4:
        raise _Corrupt("block too short")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise _Corrupt("bad restart count")
    out, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise _Corrupt("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((key, block[pos:pos + vlen]))
        pos += vlen
    return out


def _read_index(index_path: Path) -> tuple[dict[str, _Entry], int]:
    """Return ({variable name: entry}, number of data shards)."""
    try:
        data = index_path.read_bytes()
    except OSError as e:
        raise Gpt2kitError(f"cannot read {index_path}: {e.strerror}; check the file exists and is readable") from None
    try:
        if len(data) < _FOOTER_LEN:
            raise _Corrupt("shorter than a table footer")
        if int.from_bytes(data[-8:], "little") != _TABLE_MAGIC:
            raise _Corrupt("no table magic number at the end")
        footer = data[-_FOOTER_LEN:]
        _, pos = _varint(footer, 0)
        _, pos = _varint(footer, pos)  # skip the metaindex handle (TF writes no meta blocks we need)
        index_handle = footer[pos:]
        entries: dict[str, _Entry] = {}
        num_shards = None
        for _, block_handle in _read_block(data, index_handle):
            for key, value in _read_block(data, block_handle):
                if key == b"":
                    # BundleHeaderProto: 1 num_shards, 2 endianness (0 little, 1 big), 3 version.
                    hdr = dict(_proto_fields(value))
                    num_shards = hdr.get(1, 0)
                    if hdr.get(2, 0) != 0:
                        raise Gpt2kitError(
                            f"{index_path} was written on a big-endian machine, which is not supported; "
                            "re-save it on a little-endian (x86/ARM) machine"
                        )
                else:
                    entries[key.decode("utf-8", "replace")] = _parse_entry(value)
        if num_shards is None:
            raise _Corrupt("no bundle header entry")
    except (_Corrupt, struct.error, IndexError) as e:
        raise Gpt2kitError(
            f"{index_path} is truncated or corrupt ({e}); re-download or re-copy the checkpoint"
        ) from None
    return entries, num_shards


# ---------------------------------------------------------------------------------------------------------
# Locating the checkpoint files.

def _index_path(prefix: Path) -> Path:
    return Path(f"{prefix}.index")


def _pick_prefix(d: Path) -> Path:
    ckpt = d / "checkpoint"
    if ckpt.is_file():
        m = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', ckpt.read_text("utf-8", "replace"),
                      re.MULTILINE)
        if m:
            name = re.sub(r"\\(.)", r"\1", m.group(1))
            p = Path(name)
            # Fine-tuning runs (e.g. on Colab) often record an absolute path from another machine: fall back
            # to the same file name next to the `checkpoint` file.
            candidates = [p if p.is_absolute() else d / p, d / re.split(r"[\\/]", name)[-1]]
            for c in candidates:
                if _index_path(c).is_file():
                    return c
            raise Gpt2kitError(
                f"{ckpt} names checkpoint {name!r} but {_index_path(candidates[0])} does not exist; copy that "
                f"checkpoint's .index and .data-* files into {d} or fix model_checkpoint_path in {ckpt}"
            )
    indexes = [p for p in d.glob("*.index") if p.is_file()]
    if not indexes:
        raise Gpt2kitError(
            f"{d} has no TensorFlow checkpoint (no `checkpoint` file and no *.index file); pass the folder "
            "that holds model.ckpt.index and model.ckpt.data-*"
        )

    def rank(p: Path) -> tuple[int, int]:  # prefer model.ckpt, else the highest step number (model-1000)
        step = re.search(r"(\d+)$", p.name[: -len(".index")])
        return (p.name == "model.ckpt.index", int(step.group(1)) if step else -1)

    best = max(indexes, key=rank)
    return best.with_name(best.name[: -len(".index")])


def _locate(path: str | Path) -> tuple[Path, Path]:
    """Return (directory holding hparams.json, checkpoint prefix). Accepts the directory or a prefix."""
    path = Path(path)
    if path.is_dir():
        return path, _pick_prefix(path)
    if path.suffix == ".index" and path.is_file():
        path = path.with_suffix("")
    if _index_path(path).is_file():
        return path.parent, path
    raise Gpt2kitError(
        f"TensorFlow checkpoint {path} does not exist; pass the folder that holds hparams.json and model.ckpt.index"
    )


def _read_hparams(d: Path) -> dict:
    hp_path = d / "hparams.json"
    try:
        hparams = json.loads(hp_path.read_text("utf-8"))
    except FileNotFoundError:
        raise Gpt2kitError(
            f"{d} has no hparams.json; copy the hparams.json that came with this checkpoint "
            "(OpenAI's downloads and TF fine-tuning runs include it)"
        ) from None
    except (OSError, ValueError) as e:
        raise Gpt2kitError(f"cannot parse {hp_path} ({e}); restore it from the original download") from None
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    if not isinstance(hparams, dict):
        hparams = {}
    bad = [k for k in keys if not isinstance(hparams.get(k), int) or hparams[k] <= 0]
    if bad:
        raise Gpt2kitError(f"{hp_path} lacks positive integer {', '.join(bad)}; it needs {', '.join(keys)}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise Gpt2kitError(f"{hp_path}: n_embd={hparams['n_embd']} is not divisible by n_head={hparams['n_head']}")
    return hparams


def _expected(hp: dict) -> list[tuple[str, str, list[int]]]:
    """(TF name, HF key, TF shape). Conv1D weights are stored [1, nx, nf]; HF's Conv1D wants [nx, nf]."""
    e, v = hp["n_embd"], hp["n_vocab"]
    out = [("model/wte", "transformer.wte.weight", [v, e]), ("model/wpe", "transformer.wpe.weight", [hp["n_ctx"], e])]
    for i in range(hp["n_layer"]):
        tf, hf = f"model/h{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out += [(f"{tf}/{ln}/g", f"{hf}.{ln}.weight", [e]), (f"{tf}/{ln}/b", f"{hf}.{ln}.bias", [e])]
        for mod, nx, nf in (("attn/c_attn", e, 3 * e), ("attn/c_proj", e, e), ("mlp/c_fc", e, 4 * e),
                            ("mlp/c_proj", 4 * e, e)):
            hmod = mod.replace("/", ".")
            out += [(f"{tf}/{mod}/w", f"{hf}.{hmod}.weight", [1, nx, nf]), (f"{tf}/{mod}/b", f"{hf}.{hmod}.bias", [nf])]
    out += [("model/ln_f/g", "transformer.ln_f.weight", [e]), ("model/ln_f/b", "transformer.ln_f.bias", [e])]
    return out


def list_tf_variables(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    _, prefix = _locate(path)
    entries, _ = _read_index(_index_path(prefix))
    return {name: (_DTYPE_NAMES.get(e.dtype, f"dtype{e.dtype}"), e.shape) for name, e in sorted(entries.items())}


def read_openai_tf(path: str | Path, *, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """verify=True checks each tensor's crc32c like TF does on restore (~150 MB/s; ~3 s for 124M)."""
    d, prefix = _locate(path)
    hparams = _read_hparams(d)
    index_path = _index_path(prefix)
    entries, num_shards = _read_index(index_path)

    plan = []  # (entry, TF name, HF key, HF shape, dtype); only model weights: Adam slots, global_step... are skipped
    for tf_name, hf_key, shape in _expected(hparams):
        e = entries.get(tf_name)
        if e is None:
            raise Gpt2kitError(
                f"{index_path} has no variable {tf_name}; this is not a GPT-2 checkpoint matching {d / 'hparams.json'} "
                f"(n_layer={hparams['n_layer']}) - check that both files come from the same model"
            )
        hf_shape = shape[1:] if len(shape) == 3 else shape
        if e.shape != shape and e.shape != hf_shape:
            raise Gpt2kitError(
                f"{tf_name} has shape {e.shape} but {d / 'hparams.json'} implies {shape}; use the hparams.json "
                "that came with this checkpoint"
            )
        if e.dtype not in _TORCH_DTYPES or e.sliced:
            what = "is partitioned" if e.sliced else f"has dtype {_DTYPE_NAMES.get(e.dtype, e.dtype)}"
            raise Gpt2kitError(f"{tf_name} {what}; only unpartitioned float32/float16/bfloat16 weights are supported")
        dtype = _TORCH_DTYPES[e.dtype]
        if e.size != math.prod(shape) * dtype.itemsize or e.shard >= num_shards:
            raise Gpt2kitError(f"{index_path} is corrupt (bad size or shard for {tf_name}); re-download the checkpoint")
        plan.append((e, tf_name, hf_key, hf_shape, dtype))

    state: dict[str, torch.Tensor] = {}
    for shard in sorted({p[0].shard for p in plan}):
        data_path = Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
        try:
            file_size = data_path.stat().st_size
        except OSError as err:
            raise Gpt2kitError(
                f"cannot open {data_path} ({err.strerror}); the checkpoint needs all {num_shards} data file(s) "
                f"next to {index_path.name} - re-copy them"
            ) from None
        items = sorted((p for p in plan if p[0].shard == shard), key=lambda p: p[0].offset)
        last = max(items, key=lambda p: p[0].offset + p[0].size)
        if last[0].offset + last[0].size > file_size:
            raise Gpt2kitError(
                f"{data_path} is truncated ({file_size} bytes, {last[1]} needs up to byte "
                f"{last[0].offset + last[0].size}); re-download the checkpoint"
            )
        with open(data_path, "rb") as f:
            for e, tf_name, hf_key, hf_shape, dtype in items:
                buf = torch.empty(e.size, dtype=torch.uint8)
                f.seek(e.offset)
                if f.readinto(memoryview(buf.numpy())) != e.size:
                    raise Gpt2kitError(f"short read from {data_path} at {tf_name}; re-download the checkpoint")
                if verify and e.crc is not None and _mask(_crc32c(buf.numpy())) != e.crc:
                    raise Gpt2kitError(
                        f"{data_path} is corrupt (checksum mismatch in {tf_name}); re-download the checkpoint"
                    )
                state[hf_key] = buf.view(dtype).reshape(hf_shape)  # squeezes Conv1D [1, nx, nf] -> [nx, nf]
    return hparams, state
