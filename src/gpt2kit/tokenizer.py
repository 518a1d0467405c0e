"""GPT-2 byte-level BPE through tiktoken, built offline from a checkpoint's own vocabulary files.

Accepts OpenAI's names (`encoder.json` + `vocab.bpe`) or HuggingFace's (`vocab.json` + `merges.txt`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from gpt2kit.errors import Gpt2kitError
from gpt2kit.layout import VOCAB_FILE_PAIRS, find_vocab_files  # noqa: F401  (also read from here)

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (OpenAI encoder.py), identical to tiktoken's r50k_base.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2's own vocabulary, shipped with gpt2kit for checkpoints that hold none (nanoGPT's ckpt.pt, llm.c's
# model files): OpenAI's encoder.json + vocab.bpe (MIT), read offline like any other vocabulary
GPT2_VOCAB_DIR = Path(__file__).resolve().parent / "gpt2_vocab"


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2 stores byte strings as printable unicode: bytes 33-126, 161-172, 174-255 map to themselves,
    # the rest to 256+n in order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_FIX = "the vocabulary files are damaged or not GPT-2's; copy them from the base model's directory"


def read_encoder(path: str | Path) -> dict:
    """vocab.json / encoder.json (token -> id), or a one-line error naming the file."""
    try:
        encoder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Gpt2kitError(f"cannot read vocabulary {path} ({e}): {_FIX}") from None
    if not isinstance(encoder, dict):
        raise Gpt2kitError(f"{path} is not a JSON object of token -> id: {_FIX}")
    return encoder


@functools.lru_cache(maxsize=4)
def _load_encoding(encoder_path: str, merges_path: str) -> tiktoken.Encoding:
    encoder = read_encoder(encoder_path)
    fix = _FIX
    dec = _byte_decoder()
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for tok, idx in encoder.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise Gpt2kitError(f"{encoder_path} maps {tok!r} to {idx!r}, not a token id: {fix}")
        if tok == EOT:
            special[tok] = idx
        elif any(ch not in dec for ch in tok):
            raise Gpt2kitError(f"{encoder_path} is not a GPT-2 byte-level vocabulary (token {tok!r}): {fix}")
        else:
            ranks[bytes(dec[ch] for ch in tok)] = idx
    if len(set(ranks.values()) | set(special.values())) != len(ranks) + len(special):
        raise Gpt2kitError(f"{encoder_path} gives two tokens the same id: {fix}")
    # tiktoken merges by rank == token id. GPT-2's ids are exactly its merge order (256 bytes first, then
    # merges.txt line by line), so check that instead of trusting it.
    try:
        lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise Gpt2kitError(f"cannot read merges {merges_path}: {e}") from None
    # (line number, line), the "#version" header and blank lines left out
    merges = [(n, ln) for n, ln in enumerate(lines, start=1) if ln and not ln.startswith("#version")]
    for rank, (n, line) in enumerate(merges[:2000], start=256):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts) or any(c not in dec for c in line.replace(" ", "")):
            raise Gpt2kitError(f"{merges_path} line {n} is not a merge (two byte-level tokens separated by one "
                               f"space): {line[:40]!r}; {fix}")
        tok = bytes(dec[c] for c in parts[0] + parts[1])
        if ranks.get(tok) != rank:
            raise Gpt2kitError(f"{encoder_path} and {merges_path} do not agree (merge {rank}); "
                               "the vocabulary files are mismatched or not GPT-2's")
    try:
        return tiktoken.Encoding(
            name=f"gpt2kit:{encoder_path}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special,
        )
    except ValueError as e:
        raise Gpt2kitError(f"{encoder_path} cannot be used as a vocabulary ({e}): {fix}") from None


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, source_dir: Path | None = None):
        self.encoding = encoding
        self.source_dir = source_dir
        self.eot_token: int = encoding.eot_token if EOT in encoding.special_tokens_set else encoding.n_vocab - 1

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        files = find_vocab_files(directory)
        if files is None:
            raise Gpt2kitError(
                f"no tokenizer files in {directory}: expected vocab.json + merges.txt or encoder.json + vocab.bpe")
        return cls(_load_encoding(str(files[0].resolve()), str(files[1].resolve())), Path(directory))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text to ids. `<|endoftext|>` in the text becomes token 50256 (as HF's GPT-2 tokenizer does)
        unless allow_special=False, in which case it is encoded as ordinary characters."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        if allow_special:
            return self.encoding.encode_ordinary_batch(texts) if not any(EOT in t for t in texts) else \
                self.encoding.encode_batch(list(texts), allowed_special="all")
        return self.encoding.encode_batch(list(texts), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)

    def save(self, directory: str | Path) -> None:
        """Write HF's vocab.json + merges.txt (the same files GPT2Tokenizer.save_pretrained writes)."""
        if self.source_dir is None:
            raise Gpt2kitError("this tokenizer was not built from files and cannot be saved")
        enc, merges = find_vocab_files(self.source_dir)  # type: ignore[misc]
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.json").write_bytes(enc.read_bytes())
        (out / "merges.txt").write_bytes(merges.read_bytes())
