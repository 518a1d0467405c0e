"""Fine-tuning data: raw files -> documents -> a memmapped token cache -> (x, y) batches.

Raw inputs are .txt files (one document per file, or per line with line_by_line), folders (searched
recursively), globs, .csv/.tsv (one document per row of one column) and .jsonl (one document per line,
one field). Pre-encoded token files are read as they are, without re-encoding: .npz (gpt-2-simple /
nshepperd encode.py: each array one document), .npy (an integer array, or an object array of them) and .bin:
llm.c's token shards (a 256-int32 header, magic 20240520, then uint16 ids) or nanoGPT's raw uint16 ids.
Documents are encoded with the model's tokenizer, each followed by <|endoftext|>, and stored in a `.tokens`
file (format below) that is read back with np.memmap, so a corpus larger than memory trains without loading
it.

Undecodable bytes are an error, not a warning: replacing them with U+FFFD would silently train the model
on garbage, and the fix (`--encoding latin-1`, or the file's real encoding) is one flag away.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import numbers
import os
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2kit.errors import Gpt2kitError
from gpt2kit.runs import hash_file
from gpt2kit.tokenizer import Tokenizer

if TYPE_CHECKING:  # only Batcher needs torch; importing it lazily keeps `gpt2kit encode` quick to start
    import torch

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")  # what a folder is searched for
TOKEN_SUFFIXES = (".npz", ".npy", ".bin")  # other tools' token ids (a gpt2kit cache named .bin: told by its header)
_BINARY_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"\x93NUMPY")  # zip (and .npz), gzip, .npy


@dataclass
class DataSpec:
    column: str | None = None  # .csv/.tsv: the column holding one document per row
    field: str | None = None  # .jsonl: the field holding the text (None means "text")
    encoding: str = "utf-8"  # a leading BOM is dropped; CRLF and CR become LF
    line_by_line: bool = False  # .txt: each non-empty line is a document (and, in Batcher, a sample)
    skip_bad_rows: bool = False  # .csv/.tsv: skip rows whose field count differs from the header's (else an error)

    def __post_init__(self) -> None:
        # checked here, where the mistake is made: a non-str encoding fails only once a file is read, and a
        # str line_by_line ("false") would silently be true
        for name in ("column", "field"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise Gpt2kitError(f"DataSpec.{name} must be a str or None, not {v!r}")
        if not isinstance(self.encoding, str):
            raise Gpt2kitError(f"DataSpec.encoding must be a str (e.g. 'utf-8'), not {self.encoding!r}")
        for name in ("line_by_line", "skip_bad_rows"):
            if not isinstance(getattr(self, name), bool):
                raise Gpt2kitError(f"DataSpec.{name} must be True or False, not {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------------
# argument checks at the public entry points: a wrong kind of argument otherwise fails far from the call,
# in pathlib, numpy or torch, with a message that names neither the argument nor the fix


def _path_arg(name: str, value: object) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    hint = " (for an open TokenCache, pass cache.path)" if isinstance(value, TokenCache) else ""
    raise TypeError(f"{name} must be a path (str or Path), not {type(value).__name__}{hint}")


def _inputs_arg(name: str, value: object) -> list[str | Path]:
    """A path, a glob or an iterable of them -> a list."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
        bad = [x for x in items if not isinstance(x, (str, os.PathLike))]
        if not bad:
            return items
        what, culprit = f"a list holding {type(bad[0]).__name__}", bad[0]
    else:
        what, culprit = type(value).__name__, value
    hint = " (for an open TokenCache, pass cache.path)" if isinstance(culprit, TokenCache) else ""
    raise TypeError(f"{name} must be a path, a glob or a list of them, not {what}{hint}")


def _spec_arg(spec: object) -> DataSpec:
    if spec is None:
        return DataSpec()
    if isinstance(spec, DataSpec):
        return spec
    hint = "DataSpec(**spec)" if isinstance(spec, Mapping) else "e.g. DataSpec(column='text')"
    raise TypeError(f"spec must be a DataSpec or None, not {type(spec).__name__}; pass {hint}")


def _tok_arg(tok: object) -> Tokenizer:
    if not isinstance(tok, Tokenizer):
        raise TypeError(f"tok must be a gpt2kit Tokenizer (e.g. Tokenizer.from_dir(VOCAB_DIR)), not "
                        f"{type(tok).__name__}")
    return tok


def plural(n: int, word: str) -> str:
    """"1 file", "2 files", "1,000 documents"."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _json_kind(v: object) -> str:
    return {bool: "true/false", type(None): "null", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(v), "a string")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy ints too; bool is never meant


def _int_arg(name: str, value: object, minimum: int | None = None) -> int:
    # a float or str would fail (or be truncated) only later, inside numpy
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise Gpt2kitError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# raw inputs -> documents


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursive, sorted, hidden entries skipped) and globs -> a de-duplicated file list."""
    items = _inputs_arg("inputs", inputs)
    if not items:
        raise Gpt2kitError("no input files given")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in RAW_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                caches = sorted(p.rglob("*.tokens"))
                raise Gpt2kitError(f"folder {p} has no {', '.join(RAW_SUFFIXES)} files" + (
                    f"; for a token cache, pass the file itself (e.g. {caches[0]})" if caches else ""))
            files += found
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(os.path.expanduser(str(item)), recursive=True))
            if not matches:
                raise Gpt2kitError(f"no files match {item}")
            files += expand_inputs(matches)
        elif p.exists():
            raise not_regular_error(item)
        else:
            raise Gpt2kitError(f"input {item} does not exist")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def not_regular_error(item: str | Path) -> Gpt2kitError:
    """/dev/null, a FIFO, a socket: nothing a cache could be keyed on, and reading a FIFO would wait forever
    for a writer."""
    return Gpt2kitError(f"input {item} is not a regular file or folder; save the data to a file first")


def _binary_error(path: Path, why: str = "") -> Gpt2kitError:
    return Gpt2kitError(f"{path} looks like a binary file, not text{why}; gpt2kit reads .txt/.csv/.tsv/.jsonl text, "
                        ".npz/.npy/.bin token files and .tokens caches")


def read_text(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        wide = b"\0" in "\n".encode(encoding)  # UTF-16/32 text is full of NUL bytes
    except LookupError:
        raise Gpt2kitError(f"unknown encoding {encoding!r}; use e.g. --encoding utf-8 or latin-1") from None
    # checked before decoding: any bytes decode as latin-1, and training on them is never what was meant
    if data.startswith(_BINARY_MAGIC) or (b"\0" in data[:8192] and not wide):
        raise _binary_error(path)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Gpt2kitError(
            f"{path}: byte {e.start} (0x{data[e.start]:02x}, line {line}) is not valid {encoding}; "
            f"pass the file's encoding, e.g. --encoding latin-1 (cp1252 for Windows text)") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _read_table(path: Path, text: str, spec: DataSpec) -> list[str]:
    csv.field_size_limit(2**31 - 1)  # default 128 KiB per cell is too small for long documents
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return []
    column = spec.column
    if column is None and len(header) == 1:
        column = header[0]
    if column not in header:
        what = "has no column " + repr(column) if column else "needs a text column"
        raise Gpt2kitError(f"{path} {what}; its columns are: {', '.join(header)} "
                           "(pick one with --column NAME)")
    i = header.index(column)
    # A row whose field count differs from the header's is damage: an unescaped quote that swallowed the
    # lines after it, or a comma inside an unquoted cell ("1,hello, world"). Taking its column anyway would
    # train on the wrong text, and dropping it quietly loses data; so it is counted, and an error unless
    # skip_bad_rows. Line numbers are the file's own: a record may span lines, so it starts on the line after
    # the one the previous record ended on.
    docs: list[str] = []
    n_rows = n_bad = 0
    first_bad: tuple[int, int] | None = None  # (line, fields)
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:  # a blank line
            continue
        n_rows += 1
        if len(row) != len(header):
            n_bad += 1
            if first_bad is None:
                first_bad = (start, len(row))
            continue
        if row[i].strip():
            docs.append(row[i])
    if first_bad is not None:
        bad = (f"{n_bad:,} of {plural(n_rows, 'row')} in {path} {'has' if n_bad == 1 else 'have'} a different "
               f"number of fields than the header's {len(header)} (the first bad row starts at line {first_bad[0]} "
               f"and has {first_bad[1]}: an unquoted {'tab' if delimiter == chr(9) else 'comma'} or an unclosed quote)")
        if not spec.skip_bad_rows:
            raise Gpt2kitError(f"{bad}; fix the file's quoting, or pass --skip-bad-rows to leave them out")
        log.warning("%s; skipped (--skip-bad-rows), %s kept", bad, plural(n_rows - n_bad, "row"))
    return docs


def jsonl_objects(path: str | Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines text; a line that is not one JSON object
    is an error naming it."""
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Gpt2kitError(f"{path}:{n}: not valid JSON ({e.msg}); "
                               "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise Gpt2kitError(f"{path}:{n}: the line is {_json_kind(obj)}; each line must be one JSON object")
        yield n, obj


def _read_jsonl(path: Path, text: str, spec: DataSpec) -> list[str]:
    field = spec.field or "text"
    docs = []
    for n, obj in jsonl_objects(path, text):
        if field not in obj:
            raise Gpt2kitError(f"{path}:{n}: no field {field!r} (found: {', '.join(obj)}); pick one with --field NAME")
        if not isinstance(obj[field], str):
            raise Gpt2kitError(f"{path}:{n}: field {field!r} is {_json_kind(obj[field])}, not a string")
        if obj[field].strip():
            docs.append(obj[field])
    return docs


def _check_spec_applies(files: list[Path], spec: DataSpec) -> None:
    """--column/--field that no input file uses is a mistake (e.g. --column on .jsonl), not a no-op."""
    kinds = {f.suffix.lower() for f in files}
    has_table, has_jsonl = bool(kinds & {".csv", ".tsv"}), ".jsonl" in kinds
    if has_table or has_jsonl:
        if spec.column is not None and not has_table:
            raise Gpt2kitError("--column applies to .csv/.tsv files; for .jsonl use --field")
        if spec.field is not None and not has_jsonl:
            raise Gpt2kitError("--field applies to .jsonl files; for .csv/.tsv use --column")
    elif spec.column is not None or spec.field is not None:
        raise Gpt2kitError(f"--column/--field apply to .csv/.tsv and .jsonl files, not to text files like {files[0]}")
    if spec.skip_bad_rows and not has_table:
        raise Gpt2kitError(f"--skip-bad-rows applies to .csv/.tsv files, not to files like {files[0]}; drop it")


def read_documents(inputs: str | Path | Sequence[str | Path], spec: DataSpec | None = None) -> list[str]:
    """All documents from `inputs`, in file order. Blank documents are skipped; no documents at all is
    an error. CSV rows and JSONL records stay one document each even with line_by_line (a cell may hold
    several lines)."""
    spec = _spec_arg(spec)
    files = expand_inputs(inputs)
    _check_spec_applies(files, spec)
    return _documents(files, spec)


def _documents(files: list[Path], spec: DataSpec) -> list[str]:
    docs: list[str] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix in (".tokens", *TOKEN_SUFFIXES) or is_token_cache(f):
            raise Gpt2kitError(f"{f} is already tokenized; pass it alone as the training data instead")
        text = read_text(f, spec.encoding)
        if suffix in (".csv", ".tsv"):
            docs += _read_table(f, text, spec)
        elif suffix == ".jsonl":
            docs += _read_jsonl(f, text, spec)
        elif spec.line_by_line:
            docs += [ln for ln in text.split("\n") if ln.strip()]
        elif text.strip():
            docs.append(text)
    if not docs:
        raise _no_documents(files)
    return docs


def _no_documents(files: list[Path]) -> Gpt2kitError:
    names = ", ".join(map(str, files[:3])) + (", ..." if len(files) > 3 else "")
    return Gpt2kitError(f"no documents in {names}: the input is empty or blank")


# ---------------------------------------------------------------------------------------------------
# tokenizing

# Cutting text just before a "\n" that follows a non-space character never changes GPT-2's tokenization:
# only whitespace-only pieces can hold a "\n", and no piece runs from a non-space character into
# whitespace, so the pre-tokenizer ends a piece there either way, and the whitespace run (whose split
# depends on what follows it) stays whole in the next chunk. Chunks then encode independently, in parallel.
_SAFE_CUT = re.compile(r"(?<=\S)\n")
_CHUNK_CHARS = 1 << 16


def _chunks(text: str) -> Iterator[str]:
    """`text` in pieces of ~64K characters cut at such places (fewer, longer pieces where there are none)."""
    pos = 0
    while len(text) - pos > 2 * _CHUNK_CHARS:
        m = _SAFE_CUT.search(text, pos + _CHUNK_CHARS)
        if m is None:
            break
        yield text[pos:m.start()]
        pos = m.start()
    yield text[pos:]


def tokenizer_id(tok: Tokenizer) -> str:
    """Identity of the vocabulary: sha256 over every token's bytes in id order (not over the files, so the
    same vocabulary saved as OpenAI's encoder.json or HF's vocab.json gets the same id)."""
    enc = tok.encoding
    h = hashlib.sha256()
    for i in range(enc.n_vocab):
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:  # a hole in the id space
            b = b""
        h.update(struct.pack("<H", len(b)) + b)
    for name in sorted(enc.special_tokens_set):
        h.update(f"special:{name}={enc.encode_single_token(name)}".encode())
    return f"bpe{enc.n_vocab}-sha256:{h.hexdigest()}"


def encode_documents(docs: Sequence[str], tok: Tokenizer) -> list[list[int]]:
    """Token ids of each document followed by <|endoftext|>. A literal "<|endoftext|>" in the text is
    encoded as the special token (as HF's tokenizer does), so pre-joined corpora keep their separators."""
    pieces, owner = [], []
    for i, d in enumerate(docs):
        for c in _chunks(d):
            pieces.append(c)
            owner.append(i)
    out: list[list[int]] = [[] for _ in docs]
    for i, ids in zip(owner, tok.encode_batch(pieces), strict=True):
        out[i] += ids
    for ids in out:
        ids.append(tok.eot_token)
    return out


# ---------------------------------------------------------------------------------------------------
# the token cache
#
# Layout, little-endian:
#   header, 128 bytes: magic b"GPT2KTOK" | u32 version | u32 bytes per token (2 or 4) | u64 n_tokens |
#                      u64 n_docs | 96 bytes tokenizer id, ASCII, NUL-padded
#   tokens: n_tokens x uint16/uint32, then zero padding to a multiple of 16 bytes
#   doc offsets: (n_docs + 1) x uint64, the start of each document in tokens; the last is n_tokens

MAGIC = b"GPT2KTOK"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ96s")  # 128 bytes
_DTYPES = {2: np.uint16, 4: np.uint32}


def _pad16(n: int) -> int:
    return -n % 16


class TokenCache:
    def __init__(self, path: Path, tokens: np.ndarray, doc_offsets: np.ndarray, tokenizer_id: str):
        self.path = path
        self.tokens = tokens  # (n_tokens,) uint16/uint32 memmap
        self.doc_offsets = doc_offsets  # (n_docs + 1,) int64, in memory
        self.tokenizer_id = tokenizer_id

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, n_tokens={len(self)}, n_docs={self.n_docs})"

    @classmethod
    def write(cls, path: str | Path, docs_tokens: Sequence[Sequence[int]], tokenizer_id: str) -> TokenCache:
        usage = ("docs_tokens must be a list of token id lists, one per document (e.g. [[15496, 50256], [40, 50256]]), "
                 f"not {type(docs_tokens).__name__}")
        if isinstance(docs_tokens, (str, bytes)):  # would otherwise fail on its first character
            raise TypeError(usage)
        try:
            lengths = np.fromiter((len(d) for d in docs_tokens), dtype=np.int64, count=len(docs_tokens))
            flat = np.fromiter((t for d in docs_tokens for t in d), dtype=np.int64, count=int(lengths.sum()))
        except OverflowError:
            raise ValueError("token ids must be in [0, 2**32)") from None
        except (TypeError, ValueError):
            raise TypeError(usage) from None
        return cls.write_arrays(path, flat, np.concatenate([[0], np.cumsum(lengths)]), tokenizer_id)

    @classmethod
    def write_arrays(cls, path: str | Path, tokens: np.ndarray, doc_offsets: np.ndarray,
                     tokenizer_id: str) -> TokenCache:
        """Write from a flat token array and its (n_docs + 1,) offsets; atomic (temporary file + rename)."""
        path = _path_arg("path", path)
        if not isinstance(tokenizer_id, str):
            raise TypeError(f"tokenizer_id must be a str (from tokenizer_id(tok)), not {type(tokenizer_id).__name__}")
        if not tokenizer_id.isascii():
            raise ValueError(f"tokenizer id must be ASCII: {tokenizer_id!r}")
        tid = tokenizer_id.encode("ascii")
        if len(tid) > 96:
            raise ValueError(f"tokenizer id longer than 96 bytes: {tokenizer_id!r}")
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":  # floats would be truncated silently
            raise TypeError(f"tokens must be an integer array, not {tokens.dtype}")
        # out-of-range ids would wrap silently when narrowed to uint16/uint32 (-1 -> 65535)
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << 32):
            raise ValueError(f"token ids must be in [0, 2**32), got {int(tokens.min())} to {int(tokens.max())}")
        width = 2 if len(tokens) == 0 or int(tokens.max()) < 1 << 16 else 4
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            raise ValueError("doc_offsets must rise from 0 to len(tokens)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, width, len(tokens), len(offsets) - 1, tid))
                body = tokens.astype(f"<u{width}", copy=False)
                body.tofile(f)
                f.write(b"\0" * _pad16(body.nbytes))
                offsets.astype("<u8").tofile(f)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise Gpt2kitError(f"cannot write token cache {path}: {e}") from None
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        path = _path_arg("path", path)
        fix = f"re-create it with `gpt2kit encode INPUT... --out {path}`"
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
        except OSError as e:
            raise Gpt2kitError(f"cannot read token cache {path}: {e.strerror}") from None
        if head[:1] == b"{" and path.suffix == ".json":
            return _open_view(path)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise Gpt2kitError(f"{path} is not a gpt2kit token cache (bad header); {fix}")
        _, version, width, n_tokens, n_docs, tid = _HEADER.unpack(head)
        if version != VERSION:
            raise Gpt2kitError(f"{path} is token cache format v{version}, this gpt2kit reads v{VERSION}; "
                               f"upgrade gpt2kit or {fix}")
        if width not in _DTYPES:
            raise Gpt2kitError(f"{path} is corrupt (token width {width}); {fix}")
        tok_bytes = n_tokens * width
        expected = _HEADER.size + tok_bytes + _pad16(tok_bytes) + 8 * (n_docs + 1)
        if size != expected:
            raise Gpt2kitError(f"{path} is truncated or corrupt ({size} bytes, the header says {expected}); "
                               + fix)
        dtype = np.dtype(_DTYPES[width]).newbyteorder("<")
        tokens = (np.memmap(path, dtype=dtype, mode="r", offset=_HEADER.size, shape=(n_tokens,))
                  if n_tokens else np.zeros(0, dtype))  # mmap of zero bytes is an error
        offsets = np.fromfile(path, dtype="<u8", count=n_docs + 1, offset=expected - 8 * (n_docs + 1))
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
            raise Gpt2kitError(f"{path} is corrupt (document offsets); {fix}")
        return cls(path, tokens, offsets, tid.rstrip(b"\0").decode("ascii", "replace"))


# ---------------------------------------------------------------------------------------------------
# views: a validation split without copying the data
#
# Holding out a share of the documents used to write the two halves as new caches into RUN/data, a full
# copy of the data for every run (a 5 GB .tokens input, 5 GB more per run of a sweep). A split is now two
# small JSON files naming the cache they split (by a path relative to themselves when it sits beside them,
# as a raw input's cache in RUN/data does, so a moved run still finds it), a cheap identity of it, and
# which runs of documents (or, for a single document, which token range) each half holds. They open as a
# TokenCache whose `tokens` is the selected ranges read in place: the same token sequence a copy held, so
# the same batches.

VIEW_FORMAT = "gpt2kit-token-view"
VIEW_VERSION = 1


class _Segments:
    """A read-only token sequence made of ranges of a base array: len() and [a:b] slices, which is all a
    TokenCache's readers (Batcher, doc()) take from `tokens`. A slice within one range is a view of the
    memmap, with no copy."""

    def __init__(self, base: np.ndarray, ranges: np.ndarray):
        ranges = ranges[ranges[:, 1] > ranges[:, 0]]  # (R, 2) [start, end) in base, empty ones dropped
        self.base, self.ranges, self.dtype = base, ranges, base.dtype
        self.starts = np.concatenate([[0], np.cumsum(ranges[:, 1] - ranges[:, 0])])  # (R + 1,) in this sequence

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray(view.tokens): the whole sequence
        out = self[:]
        return out.astype(dtype) if dtype is not None else np.array(out)

    def tolist(self) -> list[int]:
        return self[:].tolist()

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a token view takes [start:stop] slices only")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, self.dtype)
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        while a < b:
            s0, s1 = (int(v) for v in self.ranges[i])
            off = a - int(self.starts[i])
            take = min(b - a, s1 - s0 - off)
            parts.append(self.base[s0 + off:s0 + off + take])
            a, i = a + take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def cache_identity(cache: TokenCache) -> dict[str, object]:
    """A cheap identity of a token cache file: its token count and a hash of samples of its content."""
    h = hashlib.sha256()
    hash_file(h, Path(cache.path))
    return {"tokens": len(cache), "sha256": h.hexdigest()}


def _view_cache(path: Path, base: TokenCache, doc_runs: np.ndarray | None,
                token_range: tuple[int, int] | None) -> TokenCache:
    if token_range is not None:  # one document: a range of tokens
        s, e = token_range
        ranges, offsets = np.array([[s, e]], dtype=np.int64), np.array([0, e - s], dtype=np.int64)
    else:  # runs [d0, d1) of whole documents
        lengths = np.diff(base.doc_offsets)
        ranges = np.stack([base.doc_offsets[doc_runs[:, 0]], base.doc_offsets[doc_runs[:, 1]]], axis=1)
        picked = np.concatenate([lengths[d0:d1] for d0, d1 in doc_runs]) if len(doc_runs) else lengths[:0]
        offsets = np.concatenate([[0], np.cumsum(picked)]).astype(np.int64)
    return TokenCache(path, _Segments(base.tokens, ranges), offsets, base.tokenizer_id)  # type: ignore[arg-type]


def write_view(path: str | Path, base: TokenCache, *, docs: np.ndarray | None = None,
               token_range: tuple[int, int] | None = None) -> TokenCache:
    """A view of `base` holding the documents where the (n_docs,) bool mask `docs` is set (in order), or
    the tokens in token_range = (start, end) as one document; written atomically as JSON and opened."""
    path = Path(path)
    if (docs is None) == (token_range is None):
        raise ValueError("give docs or token_range")
    entry: dict[str, object]
    if docs is not None:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], docs.astype(np.int8), [0]])))  # run starts, ends
        entry = {"doc_runs": edges.reshape(-1, 2).tolist()}
    else:
        entry = {"token_range": [int(token_range[0]), int(token_range[1])]}
    base_path = Path(base.path).resolve()
    where = base_path.name if base_path.parent == path.parent.resolve() else str(base_path)
    info = {"format": VIEW_FORMAT, "version": VIEW_VERSION, "base": where, "base_identity": cache_identity(base),
            "tokenizer_id": base.tokenizer_id, **entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Gpt2kitError(f"cannot write {path}: {e}") from None
    return _open_view(path)


def _open_view(path: Path) -> TokenCache:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Gpt2kitError(f"cannot read the data split {path}: {e}") from None
    shape_ok = (isinstance(info, dict) and info.get("format") == VIEW_FORMAT and isinstance(info.get("base"), str)
                and isinstance(info.get("base_identity"), dict)
                and (isinstance(info.get("doc_runs"), list) or isinstance(info.get("token_range"), list)))
    if not shape_ok:
        raise Gpt2kitError(f"{path} is not a gpt2kit data split (or is damaged); delete it and start again")
    if info.get("version") != VIEW_VERSION:
        raise Gpt2kitError(f"{path} is data split format v{info.get('version')}, this gpt2kit reads v{VIEW_VERSION}")
    base_path = Path(info["base"])
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise Gpt2kitError(f"{path} splits the token cache {base_path}, which is gone; put it back where it was "
                           "(a .tokens input is read where it is, not copied)")
    base = TokenCache.open(base_path)
    then, now = info["base_identity"], cache_identity(base)
    if now != then:
        raise Gpt2kitError(f"{path} splits the token cache {base_path}, which has changed since the split was made "
                           f"({then.get('tokens', 0):,} tokens then, {now['tokens']:,} now); put the original "
                           "back, or start a new run")
    try:
        if "token_range" in info:
            s, e = (int(v) for v in info["token_range"])
            if not 0 <= s < e <= len(base):
                raise ValueError
            return _view_cache(path, base, None, (s, e))
        runs_ = np.asarray(info["doc_runs"], dtype=np.int64).reshape(-1, 2)
        if len(runs_) and (runs_.min() < 0 or runs_.max() > base.n_docs or np.any(runs_[:, 1] <= runs_[:, 0])):
            raise ValueError
        return _view_cache(path, base, runs_, None)
    except (TypeError, ValueError):
        raise Gpt2kitError(f"{path} is damaged (its ranges do not fit {base_path}); delete it and start "
                           "again") from None


def is_token_cache(path: str | Path) -> bool:
    """Whether `path` is a file that starts like a token cache (whatever its name)."""
    if not Path(path).is_file():  # (opening a FIFO would wait for a writer)
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def check_encode_output(inputs: str | Path | Sequence[str | Path], out_path: str | Path) -> list[Path]:
    """That `out_path` may be written as encode_files' token cache for `inputs` (a one-line Gpt2kitError
    otherwise): checked by `gpt2kit encode` before the tokenizer, which may mean a download. Returns the
    input files."""
    out = _path_arg("out_path", out_path).expanduser()
    if out.is_dir() or str(out_path).endswith(("/", os.sep)):  # a trailing slash means a folder, even a new one
        raise Gpt2kitError(f"--out {out_path} is a folder; give a file name, e.g. {out / 'data.tokens'}")
    if out.suffix.lower() in (".npz", ".npy"):  # numpy could not load what is written
        raise Gpt2kitError(f"--out {out_path}: gpt2kit writes its own token cache format, not {out.suffix}; name it "
                           f"{out.with_suffix('.tokens')} (finetune --data reads .npz/.npy files directly)")
    files = expand_inputs(inputs)
    if out.exists() and any(out.resolve() == f.resolve() for f in files):
        raise Gpt2kitError(f"--out {out_path} is one of the inputs; give the token cache another name "
                           "(e.g. ending in .tokens)")
    if out.exists() and not is_token_cache(out):
        raise Gpt2kitError(f"--out {out_path} exists and is not a token cache; choose another name (the file "
                           "is left as it is)")
    return files


def encode_files(inputs: str | Path | Sequence[str | Path], out_path: str | Path, tok: Tokenizer,
                 spec: DataSpec | None = None) -> TokenCache:
    """Read, encode and cache: what `gpt2kit encode` does. `out_path` may replace an earlier token
    cache, never an input or any other file."""
    tok, spec = _tok_arg(tok), _spec_arg(spec)  # all three checked before the (possibly long) reading
    files = check_encode_output(inputs, out_path)
    _check_options([files], spec)
    if _token_inputs(files):
        tokens, offsets = _read_token_files(files, tok)
    else:
        tokens, offsets = _encode_to_arrays(_documents(files, spec), tok)
    return TokenCache.write_arrays(out_path, tokens, offsets, tokenizer_id(tok))


_BATCH_CHARS = 1 << 24  # characters encoded at once
_PROGRESS_EVERY = 10.0  # seconds between "encoding: N%" notes on a long encode


def _encode_to_arrays(docs: list[str], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """encode_documents' tokens as one array, and each document's start in it (plus the end). Encoded in
    batches of ~16M characters (a large document a batch of its chunks at a time), each batch's ids kept
    as a compact numpy array at once, so that memory holds ~2 bytes per token of the corpus plus one
    batch's Python ints, however large a single document is (a 67 MB file took 0.96 GB encoded whole)."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    eot = np.array([tok.eot_token], dtype=dtype)
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(docs), dtype=np.int64)
    pending: list[tuple[int, str, bool]] = []  # (document, chunk, whether it is the document's last)
    size = 0
    total, done, n_tokens = sum(map(len, docs)), 0, 0
    last_note = time.monotonic()

    def flush() -> None:
        nonlocal done, n_tokens, last_note
        for (i, c, last), ids in zip(pending, tok.encode_batch([c for _, c, _ in pending]), strict=True):
            parts.append(np.asarray(ids, dtype=dtype))
            lengths[i] += len(ids) + last
            if last:
                parts.append(eot)
            done += len(c)
            n_tokens += len(ids) + last
        pending.clear()
        if time.monotonic() - last_note >= _PROGRESS_EVERY and done < total:  # a long encode says how far it is
            last_note = time.monotonic()
            log.info("encoding: %.0f%% of %s characters, %s tokens so far", 100 * done / total, f"{total:,}",
                     f"{n_tokens:,}")

    for i, d in enumerate(docs):
        chunks = _chunks(d)  # a generator: one chunk of the document at a time besides the batch
        c = next(chunks)
        for following in itertools.chain(chunks, [None]):  # one chunk of look-ahead, to know the last
            pending.append((i, c, following is None))
            size += len(c)
            if size >= _BATCH_CHARS:
                flush()
                size = 0
            c = following
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


# ---------------------------------------------------------------------------------------------------
# pre-encoded token files


class _NumpyUnpickler(pickle.Unpickler):
    """An object .npy is a pickle: only what rebuilds numpy arrays is allowed, so the file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")) or (
                module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would load {module}.{name}, which is not a numpy array")


def _numpy_arrays(path: Path) -> list[np.ndarray]:
    """The arrays of a .npz, or the one array of a .npy."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            if head == b"\x93NUMPY":
                f.seek(0)
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                          else np.lib.format.read_array_header_2_0(f))
                if header[2].hasobject:
                    return [np.asarray(_NumpyUnpickler(f).load())]
            elif not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                raise Gpt2kitError(f"{path} is not a numpy .npz/.npy file (it does not start like one)")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return [loaded[k] for k in loaded.files]
        return [loaded]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise Gpt2kitError(f"cannot read {path} as token ids: {e}") from None


def _token_docs(arr: np.ndarray, path: Path) -> list[np.ndarray]:
    """A 1-D integer array is one document; a 2-D one holds a document per row, an object array one per item."""
    try:
        items = list(arr) if arr.dtype == object or arr.ndim == 2 else [arr]
        docs = [np.asarray(d.tolist() if isinstance(d, np.ndarray) and d.dtype == object else d) for d in items]
    except (TypeError, ValueError):  # a 0-d object array, ragged lists: reported below
        docs = [arr]
    for d in docs:
        if d.dtype.kind not in "iu" or d.ndim != 1:
            raise Gpt2kitError(f"{path} holds a {d.dtype} array of shape {d.shape}, not token ids (1-D integer "
                               "arrays, one per document)")
    return docs


def _token_inputs(files: list[Path]) -> bool:
    """Whether `files` are pre-encoded token files; a mix with text is refused."""
    pre = [f for f in files if f.suffix.lower() in TOKEN_SUFFIXES and not is_token_cache(f)]
    if pre and len(pre) < len(files):
        raise Gpt2kitError(f"{pre[0]} holds token ids; pass token files (.npz/.npy/.bin) on their own, not mixed "
                           "with text inputs (encode those separately)")
    return bool(pre)


def _check_options(input_sets: list, spec: DataSpec) -> None:
    """Text options against every input set together: one --column serves --data and --val-data alike, so
    it must apply to some text input of either (a .txt validation set beside a .csv is fine); with token
    inputs only, any text option is a mistake."""
    text: list[Path] = []
    tokens: list[Path] = []
    for inputs in input_sets:
        cache = _is_cache_input(inputs)
        files = [cache] if cache is not None else expand_inputs(inputs)
        if cache is None and not _token_inputs(files):
            _check_not_blank(files)
        (tokens if cache is not None or _token_inputs(files) else text).extend(files)
    if text:
        _check_spec_applies(text, spec)
    else:
        _check_no_text_options(spec, tokens[0])


def _check_not_blank(files: list[Path], limit: int = 1 << 20) -> None:
    """Text inputs that are empty or only whitespace, found from their sizes (and, under `limit` bytes in all,
    their bytes) before a tokenizer or model is loaded; the same error as reading them would give."""
    sizes = [f.stat().st_size for f in files]
    if sum(sizes) > limit or any(f.read_bytes().strip() for f, n in zip(files, sizes, strict=True) if n):
        return
    raise _no_documents(files)


def _check_no_text_options(spec: DataSpec, path: Path) -> None:
    """--column/--field/--encoding have nothing to act on in tokens: a mistake, not a no-op."""
    try:
        utf8 = codecs.lookup(spec.encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    for opt, given in (("--column", spec.column is not None), ("--field", spec.field is not None),
                       ("--encoding", not utf8), ("--skip-bad-rows", spec.skip_bad_rows)):
        if given:
            raise Gpt2kitError(f"{opt} applies to text inputs, but {path} is already token ids; drop {opt}")


# llm.c's token shards (dev/data/data_common.py write_datafile): a header of 256 little-endian int32s (magic,
# version, token count, the rest zero), then the tokens. Its other .bin files share the header's layout.
LLMC_HEADER_INTS = 256
LLMC_SHARD_MAGIC, LLMC_SHARD_VERSION = 20240520, 1  # GPT-2: uint16 tokens
_LLMC_OTHER = {20240801: "an llm.c Llama 3 token shard (uint32 ids of Llama 3's vocabulary, not GPT-2's)",
               20240522: "an llm.c evaluation file (HellaSwag/MMLU examples), not a token shard",
               20240326: "an llm.c model file, not token ids (pass it as --model, not --data)"}


def _read_bin(f: Path) -> tuple[np.ndarray, bool]:
    """The token ids of a .bin file, memory-mapped, and whether it is an llm.c token shard (checked against
    its header) rather than nanoGPT's raw uint16 ids (no header: checked by size here and ids by the caller)."""
    size = f.stat().st_size
    head = np.fromfile(f, dtype="<i4", count=LLMC_HEADER_INTS) if size >= 4 * LLMC_HEADER_INTS else None
    if head is not None:
        magic, version, count = (int(v) for v in head[:3])
        fix = "re-create it with llm.c's dev/data scripts (or `gpt2kit encode` from the text)"
        if magic in _LLMC_OTHER:
            raise Gpt2kitError(f"{f} is {_LLMC_OTHER[magic]}; --data takes llm.c GPT-2 token shards (magic "
                               f"{LLMC_SHARD_MAGIC})")
        # an llm.c header whose magic is damaged: its reserved ints are zero and its version or count fits
        looks_llmc = not head[3:].any() and (version == LLMC_SHARD_VERSION or 4 * LLMC_HEADER_INTS + 2 * count == size)
        if magic == LLMC_SHARD_MAGIC or looks_llmc:
            if magic != LLMC_SHARD_MAGIC:
                raise Gpt2kitError(f"{f} has an llm.c token shard header with the wrong magic number {magic} "
                                   f"(expected {LLMC_SHARD_MAGIC}); it is damaged or not a GPT-2 shard; {fix}")
            if version != LLMC_SHARD_VERSION:
                raise Gpt2kitError(f"{f} is an llm.c token shard of version {version}; gpt2kit reads version "
                                   f"{LLMC_SHARD_VERSION} (GPT-2, uint16 tokens)")
            expected = 4 * LLMC_HEADER_INTS + 2 * count
            if count < 0 or size != expected:
                raise Gpt2kitError(f"{f} is a truncated or corrupt llm.c token shard: its header says {count:,} "
                                   f"tokens ({expected:,} bytes), the file has {size:,} bytes; {fix}")
            tokens = (np.memmap(f, dtype="<u2", mode="r", offset=4 * LLMC_HEADER_INTS, shape=(count,)) if count
                      else np.zeros(0, "<u2"))
            return tokens, True
    if size % 2:
        raise _binary_error(f, f" (it has no llm.c token shard header, and its size, {size} bytes, is odd for "
                               "nanoGPT's raw uint16 token ids)")
    return (np.memmap(f, dtype="<u2", mode="r") if size else np.zeros(0, "<u2")), False


def _read_token_files(files: list[Path], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token files -> (tokens, doc offsets), ids as stored (no <|endoftext|> is added)."""
    docs: list[np.ndarray] = []
    for f in files:
        shard = False
        if f.suffix.lower() == ".bin":
            tokens, shard = _read_bin(f)
            part = [tokens] if len(tokens) else []
        else:
            part = [d for a in _numpy_arrays(f) for d in _token_docs(a, f)]
        part = [d for d in part if len(d)]
        hi = max((int(d.max()) for d in part), default=0)
        if f.suffix.lower() == ".bin" and not shard and hi >= tok.vocab_size:
            raise _binary_error(f, f" (it has no llm.c token shard header, and as nanoGPT's raw uint16 token ids it "
                                   f"would hold id {hi}, past this tokenizer's {tok.vocab_size} tokens)")
        if hi >= tok.vocab_size or min((int(d.min()) for d in part), default=0) < 0:
            lo = min(int(d.min()) for d in part)
            raise Gpt2kitError(f"{f} holds token id {hi if hi >= tok.vocab_size else lo}, outside this tokenizer's "
                               f"0-{tok.vocab_size - 1}; it was encoded with another vocabulary")
        docs += part
    if not docs:
        raise Gpt2kitError(f"no tokens in {', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}")
    tokens = docs[0] if len(docs) == 1 else np.concatenate(docs)  # (a lone .bin stays memory-mapped)
    return tokens, np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])


# ---------------------------------------------------------------------------------------------------
# preparing train/val caches


def _stamp(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files]


def _is_cache_input(data: str | Path | Sequence[str | Path]) -> Path | None:
    """The token cache `data` names (a path or a glob matching one, by its name or its header), or None
    for raw inputs."""
    items: list[str | Path] = []
    for x in _inputs_arg("data", data):
        matches = sorted(glob.glob(os.path.expanduser(str(x)), recursive=True)) \
            if glob.has_magic(str(x)) and not Path(x).exists() else []
        items += matches or [x]
    for x in items:
        if Path(x).exists() and not (Path(x).is_file() or Path(x).is_dir()):  # (before opening it: a FIFO blocks)
            raise not_regular_error(x)
    caches = [Path(x) for x in items if str(x).endswith(".tokens") or is_token_cache(x)]
    if caches and len(items) > 1:
        raise Gpt2kitError("pass either one .tokens file or raw text inputs, not both or several caches")
    return caches[0] if caches else None


def _open_for(path: Path, tid: str) -> TokenCache:
    """The token cache at `path`, which must have been encoded with the tokenizer whose id is `tid`."""
    cache = TokenCache.open(path)
    if cache.tokenizer_id != tid:
        raise Gpt2kitError(f"{path} was encoded with another tokenizer ({cache.tokenizer_id[:27]}...) "
                           f"than this model's ({tid[:27]}...); re-encode it with "
                           "`gpt2kit encode ... --model MODEL` or pass the raw text files")
    return cache


def check_inputs(inputs: str | Path | Sequence[str | Path], spec: DataSpec | None = None,
                 val_inputs: str | Path | Sequence[str | Path] | None = None) -> None:
    """What can be checked of `inputs` (and `val_inputs`) without reading them: that they exist, are of kinds
    that go together, and that --column/--field apply to them (a one-line Gpt2kitError otherwise)."""
    sets = [_inputs_arg("inputs", inputs)] + ([] if val_inputs is None else [_inputs_arg("val_inputs", val_inputs)])
    _check_options(sets, _spec_arg(spec))


def read_tokens(inputs: str | Path | Sequence[str | Path], tok: Tokenizer, spec: DataSpec | None = None) -> np.ndarray:
    """The token stream of `inputs` as finetune trains on it, read without caching anything: one .tokens
    cache's tokens (encoded with `tok`), token files' ids, or text documents each followed by <|endoftext|>."""
    tokens = read_token_docs(inputs, tok, spec).tokens
    return tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)  # (a memmap stays one)


def read_token_docs(inputs: str | Path | Sequence[str | Path], tok: Tokenizer,
                    spec: DataSpec | None = None) -> TokenCache:
    """`inputs` as finetune reads them, documents and all, without writing anything: a TokenCache held in
    memory (or the .tokens file named, opened), whose `path` names the first input."""
    tok, spec = _tok_arg(tok), _spec_arg(spec)
    inputs = _inputs_arg("inputs", inputs)
    _check_options([inputs], spec)
    tid = tokenizer_id(tok)
    path = _is_cache_input(inputs)
    if path is not None:
        return _open_for(path, tid)
    files = expand_inputs(inputs)
    if _token_inputs(files):
        tokens, offsets = _read_token_files(files, tok)
    else:
        tokens, offsets = _encode_to_arrays(_documents(files, spec), tok)
    return TokenCache(files[0], tokens, np.asarray(offsets, dtype=np.int64), tid)


def _load(data, tok: Tokenizer, spec: DataSpec, cache_dir: Path, tid: str) -> tuple[TokenCache, str]:
    """A cache for `data` plus a key naming its content (for derived files)."""
    path = _is_cache_input(data)
    if path is not None:
        cache = _open_for(path, tid)
        key = hashlib.sha256(json.dumps(_stamp([path])).encode()).hexdigest()[:20]
        return cache, key
    files = expand_inputs(data)
    pre_encoded = _token_inputs(files)
    # (skip_bad_rows is not part of the key: without it, bad rows are an error, so either way a cache holds
    # the same documents; and caches made before it existed stay valid)
    how = {k: v for k, v in asdict(spec).items() if k != "skip_bad_rows"}
    key = hashlib.sha256(json.dumps([_stamp(files), how, tid, VERSION]).encode()).hexdigest()[:20]
    out = cache_dir / f"{key}.tokens"
    if out.is_file():
        try:
            cache = TokenCache.open(out)
            log.info("reusing token cache %s (%s, %s)", out, plural(cache.n_docs, "document"),
                     plural(len(cache), "token"))
            return cache, key
        except Gpt2kitError as e:
            log.warning("re-encoding: %s", e)
            out.unlink(missing_ok=True)
    if pre_encoded:
        log.info("reading the token ids of %s into %s", plural(len(files), "file"), out)
        return TokenCache.write_arrays(out, *_read_token_files(files, tok), tid), key
    docs = _documents(files, spec)  # before the note, so that a bad file is the only line printed
    log.info("encoding %s into %s", plural(len(files), "file"), out)
    return TokenCache.write_arrays(out, *_encode_to_arrays(docs, tok), tid), key


class TooLittleData(Gpt2kitError):
    """The data cannot spare a validation split."""

    def __init__(self, n_tokens: int, fix: str = "pass validation data, or a validation fraction of 0"):
        super().__init__(f"the data has only {n_tokens} tokens, too few to hold out validation data; {fix}")
        self.n_tokens = n_tokens


def _split(cache: TokenCache, fraction: float, seed: int, cache_dir: Path,
           key: str) -> tuple[TokenCache, TokenCache]:
    """(train, validation): views of `cache` (see write_view: nothing is copied), written into `cache_dir`
    and reused from there."""
    tag = f"{key}-val{fraction:g}-seed{seed}"
    train_path, val_path = cache_dir / f"{tag}.train.json", cache_dir / f"{tag}.val.json"
    if train_path.is_file() and val_path.is_file():
        try:
            return TokenCache.open(train_path), TokenCache.open(val_path)
        except Gpt2kitError as e:
            log.warning("re-splitting: %s", e)
    tokens, offsets, n = cache.tokens, cache.doc_offsets, cache.n_docs
    if n == 1:
        # One document (a single .txt file): hold out its tail, nanoGPT style, instead of failing.
        cut = len(tokens) - max(2, round(len(tokens) * fraction))
        if cut < 2:
            raise TooLittleData(len(tokens))
        log.info("one document: holding out its last %s for validation", plural(len(tokens) - cut, "token"))
        return (write_view(train_path, cache, token_range=(0, cut)),
                write_view(val_path, cache, token_range=(cut, len(tokens))))
    n_val = min(n - 1, max(1, round(n * fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng([seed % 2**63, 1]).permutation(n)[:n_val]] = True
    lengths = np.diff(offsets)
    log.info("validation: %d of %d documents held out (seed %d)", n_val, n, seed)
    share = float(lengths[is_val].sum()) / max(1, len(tokens))
    if share > max(2 * fraction, fraction + 0.1):  # whole documents of very different lengths
        log.warning("validation holds %.0f%% of the tokens (%d of %d documents, for a fraction of %g); with so few "
                    "documents, pass the validation text separately (--val-data FILE) instead", 100 * share, n_val,
                    n, fraction)
    # documents keep their original order within each split
    return write_view(train_path, cache, docs=~is_val), write_view(val_path, cache, docs=is_val)


def prepare_data(data: str | Path | Sequence[str | Path], tok: Tokenizer, spec: DataSpec | None = None, *,
                 val_data: str | Path | Sequence[str | Path] | None = None, val_fraction: float = 0.0,
                 seed: int = 0, cache_dir: str | Path) -> tuple[TokenCache, TokenCache | None]:
    """Train (and optional validation) token caches for `data`: a .tokens file is used as is (its
    tokenizer must match `tok`); raw inputs are encoded once into `cache_dir`, keyed by the input paths,
    mtimes and sizes, the spec and the tokenizer, so re-runs reuse them. `val_fraction` holds out whole
    documents, chosen at random by `seed` (at least one; a single document gives up its tail instead)."""
    # everything checked up front: val_data is otherwise first looked at after the training data is encoded
    data = _inputs_arg("data", data)
    if val_data is not None:
        val_data = _inputs_arg("val_data", val_data)
    tok, spec, cache_dir = _tok_arg(tok), _spec_arg(spec), _path_arg("cache_dir", cache_dir)
    seed = _int_arg("seed", seed)
    if not isinstance(val_fraction, numbers.Real) or isinstance(val_fraction, bool):
        raise TypeError(f"val_fraction must be a number in [0, 1), not {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise Gpt2kitError(f"val fraction must be in [0, 1), got {val_fraction}")
    _check_options([data] + ([val_data] if val_data is not None else []), spec)  # (also before reusing a cache)
    tid = tokenizer_id(tok)
    train, key = _load(data, tok, spec, cache_dir, tid)
    if len(train) == 0:
        raise Gpt2kitError(f"{train.path} holds no tokens; check the input files")
    if val_data is not None:
        if val_fraction:
            log.warning("both validation data and a validation fraction given; using the validation data")
        return train, _load(val_data, tok, spec, cache_dir, tid)[0]
    if val_fraction > 0:
        return _split(train, val_fraction, seed, cache_dir, key)
    return train, None


# ---------------------------------------------------------------------------------------------------
# batches


class Batcher:
    """(x, y) batches from a token cache, a pure function of (seed, micro-step, rank) so that resuming
    needs only the step counter.

    Stream mode (nanoGPT): each sample is a random window of block_size + 1 tokens, x = w[:-1], y = w[1:].
    Line-by-line mode: each sample is one document, truncated to block_size + 1 tokens; a batch is padded
    on the right to its longest sample rounded up to a multiple of 8 (at most block_size), x with
    <|endoftext|> and y with -100 (ignored by cross_entropy), so short documents don't pay for a full block.
    Documents are drawn as a fresh permutation each pass over the data.

    Samples form one sequence indexed by the single-process micro-step j; rank r of world_size W takes
    j = step * W + r. So at step s, W ranks with batch B see exactly what one process with batch B sees
    in micro-steps s*W ... s*W + W-1 (e.g. one process with W gradient-accumulation steps)."""

    def __init__(self, cache: TokenCache, block_size: int, batch_size: int, *, seed: int = 0,
                 line_by_line: bool = False, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", eot_token: int = 50256):
        if not isinstance(cache, TokenCache):
            hint = "; open the file with TokenCache.open(path)" if isinstance(cache, (str, os.PathLike)) else ""
            raise TypeError(f"Batcher needs a TokenCache (from prepare_data or TokenCache.open), not "
                            f"{type(cache).__name__}{hint}")
        # checked once here, since next() is on the training hot path and checks nothing
        block_size, batch_size = _int_arg("block_size", block_size, 1), _int_arg("batch_size", batch_size, 1)
        seed, eot_token = _int_arg("seed", seed), _int_arg("eot_token", eot_token, 0)
        rank, world_size = _int_arg("rank", rank, 0), _int_arg("world_size", world_size, 1)
        if rank >= world_size:
            raise Gpt2kitError(f"rank {rank} is outside world size {world_size}")
        n = len(cache)
        if n < 2:
            raise Gpt2kitError(f"{cache.path} holds {plural(n, 'token')}; training needs at least 2")
        self.cache, self.tokens = cache, cache.tokens
        self.batch_size, self.seed, self.line_by_line = batch_size, seed, line_by_line
        self.rank, self.world_size = rank, world_size
        from gpt2kit.devices import pick_device  # lazy: torch, kept off `gpt2kit encode`'s start-up path
        self.device = pick_device(device)  # fails here, not at the first batch, e.g. on cuda without a GPU
        self.eot = eot_token  # x padding; any id works since padded positions only precede ignored targets
        self.step = 0
        if not line_by_line and n < block_size + 1:
            log.warning("the data has only %d tokens, fewer than block size %d + 1; using blocks of %d "
                        "instead (pass --block-size %d or less, or add data, to silence this)",
                        n, block_size, n - 1, n - 1)
            block_size = n - 1
        self.block_size = block_size
        per_step = batch_size * world_size
        self.steps_per_epoch = math.ceil((cache.n_docs if line_by_line else n) /
                                         (per_step if line_by_line else per_step * block_size))
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # the state comes from a checkpoint file: a damaged or foreign one is reported, not a KeyError
        valid = f"a valid state is a dict like {self.state_dict()}, as Batcher.state_dict() returns"
        if not isinstance(state, Mapping):
            raise Gpt2kitError(f"the batcher state is a {type(state).__name__}; {valid}")
        missing = [k for k in ("step", "seed") if k not in state]
        if missing:
            raise Gpt2kitError(f"the batcher state has no {' or '.join(map(repr, missing))} (its keys: "
                               f"{', '.join(map(repr, state)) or 'none'}); {valid}")
        step, seed = state["step"], state["seed"]
        if not (_is_int(step) and step >= 0):
            raise Gpt2kitError(f"the batcher state's 'step' must be an integer >= 0, not {step!r}; {valid}")
        if not _is_int(seed):
            raise Gpt2kitError(f"the batcher state's 'seed' must be an integer, not {seed!r}; {valid}")
        self.step, self.seed = int(step), int(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch for micro-step `step`, without moving the counter."""
        j = step * self.world_size + self.rank  # the single-process micro-step this batch equals
        if self.line_by_line:
            return self._docs_batch(self._doc_ids(j))
        T = self.block_size
        rng = np.random.default_rng([self.seed % 2**63, j])
        starts = rng.integers(0, len(self.tokens) - T, size=self.batch_size)
        w = np.stack([self.tokens[s:s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        return self._to_device(w[:, :-1], w[:, 1:])

    def _doc_ids(self, j: int) -> np.ndarray:
        # Sample k of the sequence is document perm_e[k % n_docs], with perm_e a permutation per pass e.
        n = self.cache.n_docs
        ks = np.arange(j * self.batch_size, (j + 1) * self.batch_size)
        out = np.empty_like(ks)
        for e in np.unique(ks // n):
            if self._perm is None or self._perm[0] != e:
                self._perm = (int(e), np.random.default_rng([self.seed % 2**63, int(e), 2]).permutation(n))
            sel = ks // n == e
            out[sel] = self._perm[1][ks[sel] % n]
        return out

    def _docs_batch(self, doc_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        docs = [self.cache.doc(int(i))[:T + 1] for i in doc_ids]
        width = min(T, -(-max(len(d) - 1 for d in docs) // 8) * 8) or 1  # round up to a multiple of 8
        x = np.full((len(docs), width), self.eot, dtype=np.int64)
        y = np.full((len(docs), width), -100, dtype=np.int64)
        for b, d in enumerate(docs):
            x[b, :len(d) - 1], y[b, :len(d) - 1] = d[:-1], d[1:]
        return self._to_device(x, y)

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # lazy: kept off `gpt2kit encode`'s start-up path (this module reads and writes tokens only)
        t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, y)]
        if self.device.type == "cuda":  # pinned memory makes the host-to-device copy asynchronous
            t = [a.pin_memory().to(self.device, non_blocking=True) for a in t]
        else:
            t = [a.to(self.device) for a in t]
        return t[0], t[1]

    def _eval_windows(self, max_batches: int | None) -> np.ndarray:
        """The windows (line-by-line: documents) eval_batches scores, of every rank together."""
        B, W = self.batch_size, self.world_size
        n_win = self.cache.n_docs if self.line_by_line else math.ceil((len(self.tokens) - 1) / self.block_size)
        wins = np.arange(n_win)
        if max_batches is not None and max_batches * B * W < n_win:
            wins = np.unique(np.linspace(0, n_win - 1, max_batches * B * W).round().astype(np.int64))
        return wins

    def eval_coverage(self, max_batches: int | None = None) -> tuple[int, int, int, int]:
        """What eval_batches(max_batches) scores, of every rank together: (windows or documents scored, of how
        many, target tokens scored, of how many)."""
        T = self.block_size
        if self.line_by_line:
            targets = np.minimum(np.diff(self.cache.doc_offsets), T + 1) - 1  # (n_docs,) a document cut to T + 1
            targets = np.maximum(targets, 0)
        else:
            n = len(self.tokens) - 1  # targets of the stream; window k scores those in [k*T, (k+1)*T)
            starts = np.arange(0, n, T)
            targets = np.minimum(starts + T, n) - starts
        wins = self._eval_windows(max_batches)
        return len(wins), len(targets), int(targets[wins].sum()), int(targets.sum())

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic batches in which every target token counts once (stream mode: consecutive windows,
        the last one aligned to the end with its already-counted targets set to -100; line-by-line: each
        document once). Rank r gets windows r, r + W, ...: summing loss and target counts over ranks
        covers the set. With max_batches, windows are picked evenly spread over the set."""
        T, B, W = self.block_size, self.batch_size, self.world_size
        wins = self._eval_windows(max_batches)[self.rank::W]
        for i in range(0, len(wins), B):
            if self.line_by_line:
                yield self._docs_batch(wins[i:i + B])
                continue
            x = np.empty((len(wins[i:i + B]), T), dtype=np.int64)
            y = np.empty_like(x)
            for b, k in enumerate(wins[i:i + B]):
                s = min(k * T, len(self.tokens) - 1 - T)
                w = self.tokens[s:s + T + 1].astype(np.int64)
                x[b], y[b] = w[:-1], w[1:]
                y[b, :k * T - s] = -100  # targets the previous window already scored
            yield self._to_device(x, y)

