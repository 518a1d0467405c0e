import itertools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2kit import data
from gpt2kit.data import (
    Batcher,
    DataSpec,
    TokenCache,
    encode_documents,
    encode_files,
    prepare_data,
    read_documents,
    tokenizer_id,
)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the project root
JOKES = SHARED / "datasets" / "onelinefun.csv"
SHAKESPEARE = SHARED / "datasets" / "tinyshakespeare.txt"
VOCAB = SHARED / "gpt2-vocab"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(VOCAB)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def stream_cache(tmp_path, n_tokens=1000, name="s.tokens", docs=4):
    # token ids that encode their own position make windows easy to check
    toks = list(range(n_tokens))
    cuts = np.linspace(0, n_tokens, docs + 1).astype(int)
    return TokenCache.write(tmp_path / name, [toks[a:b] for a, b in itertools.pairwise(cuts)], "test")


# --- reading raw inputs


def test_csv_column(tok, tmp_path):
    docs = read_documents(JOKES, DataSpec(column="Joke"))
    assert len(docs) == 2950
    assert docs[0].startswith("I just asked my husband")
    cache = encode_files(JOKES, tmp_path / "j.tokens", tok, DataSpec(column="Joke"))
    assert cache.n_docs == 2950 and cache.tokens.dtype == np.uint16
    assert tok.decode(cache.doc(0)) == docs[0] + "<|endoftext|>"
    assert all(cache.tokens[o - 1] == tok.eot_token for o in cache.doc_offsets[1:])


def test_csv_missing_column_lists_columns(tmp_path):
    for spec in (DataSpec(), DataSpec(column="joke")):
        with pytest.raises(Gpt2kitError, match=r"ID, Joke.*--column"):
            read_documents(JOKES, spec)
    # a single-column csv needs no --column
    assert read_documents(write(tmp_path / "one.csv", "text\na\n\nb\n"), DataSpec()) == ["a", "b"]


# rows 2 (line 4: an unquoted comma), 4 (line 6: an unclosed quote that swallows lines 7-8 until a quote
# closes it mid-field) and 5 (line 9: one field) have the wrong number of fields; line 10 is blank
BAD_CSV = 'id,text\n1,"a cell over\ntwo lines"\n2,hello, world\n3,fine\n4,"an unclosed quote\n5,swallowed\n' \
          '6,"ends here",x\n7\n\n8,last\n'


def test_csv_rows_with_the_wrong_number_of_fields_are_an_error_or_skipped_with_a_warning(tok, tmp_path, caplog):
    f = write(tmp_path / "bad.csv", BAD_CSV)
    said = (r"3 of 6 rows in \S*bad.csv have a different number of fields than the header's 2 \(the first bad row "
            r"starts at line 4 and has 3: an unquoted comma or an unclosed quote\)")
    with pytest.raises(Gpt2kitError, match=rf"^{said}; fix the file's quoting, or pass --skip-bad-rows to leave them "
                                           "out$"):
        read_documents(f, DataSpec(column="text"))
    with pytest.raises(Gpt2kitError, match="pass --skip-bad-rows"):
        prepare_data(f, tok, DataSpec(column="text"), cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        docs = read_documents(f, DataSpec(column="text", skip_bad_rows=True))
    assert docs == ["a cell over\ntwo lines", "fine", "last"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        caplog.records[-1].getMessage()]
    assert re_match(rf"{said}; skipped \(--skip-bad-rows\), 3 rows kept$", caplog.records[-1].getMessage())
    # a tab-separated file names the tab; one bad row is "1 of"
    t = write(tmp_path / "bad.tsv", "id\ttext\n1\thello\tworld\n2\tfine\n")
    with pytest.raises(Gpt2kitError, match=r"^1 of 2 rows in \S*bad.tsv has .*line 2 and has 3: an unquoted tab"):
        read_documents(t, DataSpec(column="text"))
    # the flag applies to tables only, like --column
    with pytest.raises(Gpt2kitError, match=r"^--skip-bad-rows applies to .csv/.tsv files, not to files like"):
        read_documents(SHAKESPEARE, DataSpec(skip_bad_rows=True))
    # encode and finetune take the flag (finetune as TrainConfig.skip_bad_rows)
    from gpt2kit.cli import main
    from gpt2kit.train import TrainConfig
    assert TrainConfig(data=[str(f)], skip_bad_rows=True).data_spec().skip_bad_rows
    out = tmp_path / "o.tokens"
    assert main(["encode", str(f), "--column", "text", "--out", str(out), "--tokenizer", str(VOCAB)]) == 1
    assert not out.exists()
    assert main(["encode", str(f), "--column", "text", "--out", str(out), "--tokenizer", str(VOCAB),
                 "--skip-bad-rows"]) == 0
    assert TokenCache.open(out).n_docs == 3


def re_match(pattern: str, text: str) -> bool:
    import re
    assert re.match(pattern, text), (pattern, text)
    return True


def test_txt_folder_and_glob(tmp_path):
    write(tmp_path / "d" / "b.txt", "bee")
    write(tmp_path / "d" / "a.txt", "ay\n\nstill ay")
    write(tmp_path / "d" / "sub" / "c.txt", "sea")
    write(tmp_path / "d" / "sub" / "rows.jsonl", '{"text": "json"}\n')
    write(tmp_path / "d" / "notes.md", "not picked from a folder")
    write(tmp_path / "d" / ".git" / "x.txt", "hidden")
    write(tmp_path / "d" / "empty.txt", "  \n")
    assert read_documents(tmp_path / "d") == ["ay\n\nstill ay", "bee", "sea", "json"]
    assert read_documents(str(tmp_path / "d" / "*.txt")) == ["ay\n\nstill ay", "bee"]
    assert read_documents(str(tmp_path / "d" / "**" / "c.txt")) == ["sea"]
    picked = read_documents([tmp_path / "d" / "b.txt", tmp_path / "d" / "notes.md"])
    assert picked == ["bee", "not picked from a folder"]
    assert read_documents(tmp_path / "d" / "a.txt", DataSpec(line_by_line=True)) == ["ay", "still ay"]
    with pytest.raises(Gpt2kitError, match="no files match"):
        read_documents(str(tmp_path / "*.nope"))
    with pytest.raises(Gpt2kitError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_jsonl(tmp_path):
    f = write(tmp_path / "x.jsonl", '{"text": "one", "t": "uno"}\n\n{"text": "two\\nlines", "t": "dos"}\n')
    assert read_documents(f) == ["one", "two\nlines"]
    assert read_documents(f, DataSpec(field="t", line_by_line=True)) == ["uno", "dos"]
    with pytest.raises(Gpt2kitError, match=r"x.jsonl:1: no field 'body' \(found: text, t\).*--field"):
        read_documents(f, DataSpec(field="body"))
    with pytest.raises(Gpt2kitError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents(write(tmp_path / "bad.jsonl", '{"text": "a"}\n{oops\n'))
    for line, kind in (('{"text": 1}', "field 'text' is a number,"), ('{"text": {}}', "field 'text' is an object,"),
                       ("[1]", "the line is a list;")):
        with pytest.raises(Gpt2kitError, match=kind):
            read_documents(write(tmp_path / "kind.jsonl", line))


def test_column_and_field_must_apply_to_some_input(tok, tmp_path):
    j = write(tmp_path / "j.jsonl", '{"body": "the joke", "text": "WRONG"}\n')
    t = write(tmp_path / "d" / "a.txt", "plain text")
    c = write(tmp_path / "d" / "b.csv", "Joke\nfrom the csv\n")
    with pytest.raises(Gpt2kitError, match=r"^--column applies to .csv/.tsv files; for .jsonl use --field$"):
        read_documents(j, DataSpec(column="body"))
    with pytest.raises(Gpt2kitError, match=r"^--field applies to .jsonl files; for .csv/.tsv use --column$"):
        read_documents(c, DataSpec(field="Joke"))
    for spec in (DataSpec(column="X"), DataSpec(field="X")):
        with pytest.raises(Gpt2kitError, match=r"^--column/--field apply to .csv/.tsv and .jsonl files, not to text"):
            read_documents(t, spec)
        with pytest.raises(Gpt2kitError, match=r"^--column/--field apply"):  # finetune --data a.txt --column X
            prepare_data(t, tok, spec, cache_dir=tmp_path / "cache")
    # mixed inputs: each option applies to the files of its kind
    assert read_documents(tmp_path / "d", DataSpec(column="Joke")) == ["plain text", "from the csv"]
    assert read_documents([j, t], DataSpec(field="body")) == ["the joke", "plain text"]


def test_bom_and_newlines(tmp_path):
    f = write(tmp_path / "w.txt", b"\xef\xbb\xbfline1\r\nline2\rline3\r\n")
    assert read_documents(f) == ["line1\nline2\nline3\n"]
    assert read_documents(f, DataSpec(line_by_line=True)) == ["line1", "line2", "line3"]
    # Excel's BOM must not become part of the first column's name
    c = write(tmp_path / "x.csv", b'\xef\xbb\xbfID,Joke\r\n1,"two\r\nlines"\r\n')
    assert read_documents(c, DataSpec(column="ID")) == ["1"]
    assert read_documents(c, DataSpec(column="Joke")) == ["two\nlines"]


def test_undecodable_bytes(tmp_path):
    f = write(tmp_path / "latin.txt", b"ok\ncaf\xe9\n")
    with pytest.raises(Gpt2kitError) as e:
        read_documents(f)
    msg = str(e.value)
    assert "latin.txt" in msg and "byte 6" in msg and "line 2" in msg and "--encoding latin-1" in msg
    assert read_documents(f, DataSpec(encoding="latin-1")) == ["ok\ncafé\n"]
    with pytest.raises(Gpt2kitError, match="unknown encoding"):
        read_documents(f, DataSpec(encoding="nope-8"))


def test_empty_input(tmp_path, tok):
    for content in ("", " \n\n"):
        f = write(tmp_path / "e.txt", content)
        with pytest.raises(Gpt2kitError, match="no documents"):
            read_documents(f)
        with pytest.raises(Gpt2kitError, match="no documents"):
            prepare_data(f, tok, cache_dir=tmp_path / "cache")
    with pytest.raises(Gpt2kitError, match="no documents"):
        read_documents(write(tmp_path / "h.csv", "ID,Joke\n"), DataSpec(column="Joke"))


# --- tokenizing and the cache


def test_encode_documents_chunked_matches_whole(tok, monkeypatch):
    text = SHAKESPEARE.read_text()[:20000]
    monkeypatch.setattr(data, "_CHUNK_CHARS", 100)  # many chunk boundaries
    assert len(list(data._chunks(text))) > 50
    ids = encode_documents([text, "a<|endoftext|>b"], tok)
    assert ids[0] == tok.encode(text) + [tok.eot_token]
    assert ids[1] == [64, tok.eot_token, 65, tok.eot_token]


def test_encoding_to_arrays_keeps_a_batch_at_a_time_even_inside_one_large_document(tok, monkeypatch):
    text = SHAKESPEARE.read_text()[:30000]
    docs = [text, "", "short one", text[:5000]]
    monkeypatch.setattr(data, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(data, "_BATCH_CHARS", 3000)
    sizes = []
    encode_batch = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: sizes.append(sum(map(len, texts))) or encode_batch(texts))
    tokens, offsets = data._encode_to_arrays(docs, tok)
    # the 30,000-character document went through in several batches, none much over the batch size
    assert len(sizes) >= 10 and max(sizes) < 3000 + 2 * 400
    whole = encode_documents(docs, tok)
    assert offsets.tolist() == np.cumsum([0] + [len(ids) for ids in whole]).tolist()
    assert tokens.tolist() == [t for ids in whole for t in ids] and tokens.dtype == np.uint16


def test_a_long_encode_says_how_far_it_is(tok, monkeypatch, caplog):
    text = SHAKESPEARE.read_text()[:30000]
    monkeypatch.setattr(data, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(data, "_BATCH_CHARS", 3000)
    monkeypatch.setattr(data, "_PROGRESS_EVERY", 0.0)  # every batch counts as long here
    with caplog.at_level(logging.INFO, logger="gpt2kit"):
        data._encode_to_arrays([text], tok)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoding: ")]
    assert len(notes) >= 5 and notes[0].endswith("tokens so far") and " of 30,000 characters, " in notes[0]
    shares = [int(n.split()[1].rstrip("%")) for n in notes]
    assert shares == sorted(shares) and 0 < shares[0] and shares[-1] < 100  # rising; the end is the summary's
    caplog.clear()
    monkeypatch.setattr(data, "_PROGRESS_EVERY", 10.0)
    with caplog.at_level(logging.INFO, logger="gpt2kit"):
        data._encode_to_arrays([text], tok)  # quick: nothing to say
    assert not any(r.getMessage().startswith("encoding: ") for r in caplog.records)


def test_tokenizer_id_ignores_file_format(tok):
    # the same vocabulary in HF's file names and formatting is the same tokenizer
    hf = Tokenizer.from_dir(SHARED / "tf-gpt2-tiny" / "hf")
    assert tokenizer_id(hf) == tokenizer_id(tok)
    assert tokenizer_id(tok).startswith("bpe50257-sha256:")


def test_cache_round_trip(tmp_path):
    docs = [[1, 2, 3], [50256], [7, 8]]
    c = TokenCache.write(tmp_path / "c.tokens", docs, "tid-1")
    head = (tmp_path / "c.tokens").read_bytes()[:32]
    assert head[:8] == b"GPT2KTOK"
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint16
    c = TokenCache.open(tmp_path / "c.tokens")
    assert len(c) == 6 and c.n_docs == 3 and c.tokenizer_id == "tid-1"
    assert c.tokens.tolist() == [1, 2, 3, 50256, 7, 8]
    assert c.doc_offsets.tolist() == [0, 3, 4, 6]
    assert [c.doc(i).tolist() for i in range(3)] == docs
    big = TokenCache.write(tmp_path / "big.tokens", [[70000, 1]], "tid-2")
    assert big.tokens.dtype == np.uint32 and big.tokens.tolist() == [70000, 1]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_cache_corrupt(tmp_path):
    path = tmp_path / "c.tokens"
    TokenCache.write(path, [[1, 2, 3, 4, 5]], "tid")
    good = path.read_bytes()
    cases = {
        "truncated": good[:-5],
        "bad header": b"NOTMAGIC" + good[8:],
        "format v9": good[:8] + (9).to_bytes(4, "little") + good[12:],
        "truncated or corrupt": good[:24] + (10**6).to_bytes(8, "little") + good[32:],  # n_docs
        "not a gpt2kit": b"",
    }
    for match, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(Gpt2kitError, match=match) as e:
            TokenCache.open(path)
        assert "gpt2kit" in str(e.value)
    with pytest.raises(Gpt2kitError, match="cannot read"):
        TokenCache.open(tmp_path / "missing.tokens")


# --- prepare_data


def test_prepare_data_cache_reuse_and_mismatch(tok, tmp_path, monkeypatch):
    f = write(tmp_path / "a.txt", "hello world\nbye\n")
    train, val = prepare_data(f, tok, DataSpec(line_by_line=True), cache_dir=tmp_path / "cache")
    assert val is None and train.n_docs == 2 and train.tokenizer_id == tokenizer_id(tok)
    monkeypatch.setattr(data, "_encode_to_arrays", lambda *a, **k: pytest.fail("re-encoded"))
    again, _ = prepare_data(f, tok, DataSpec(line_by_line=True), cache_dir=tmp_path / "cache")
    assert again.path == train.path
    monkeypatch.undo()
    # a damaged cache of the run's own (even its header) is encoded again
    train.path.write_bytes(b"garbage")
    again, _ = prepare_data(f, tok, DataSpec(line_by_line=True), cache_dir=tmp_path / "cache")
    assert again.path == train.path and again.n_docs == 2
    # a changed spec is a different cache
    whole, _ = prepare_data(f, tok, DataSpec(), cache_dir=tmp_path / "cache")
    assert whole.path != train.path and whole.n_docs == 1
    # a .tokens file is used as is, but only with its own tokenizer
    as_is, _ = prepare_data(train.path, tok, cache_dir=tmp_path / "cache")
    assert as_is.path == train.path
    other = TokenCache.write(tmp_path / "other.tokens", [[1, 2]], "bpe50257-sha256:0000")
    with pytest.raises(Gpt2kitError, match="another tokenizer.*gpt2kit encode"):
        prepare_data(other.path, tok, cache_dir=tmp_path / "cache")


def test_encode_out_never_replaces_an_input_or_other_file(tok, tmp_path):
    src = write(tmp_path / "a.txt", "hello world\n")
    for out in (src, tmp_path / "notes.txt"):  # an input, or any file that is not a token cache
        if out != src:
            write(out, "mine")
        before = out.read_bytes()
        with pytest.raises(Gpt2kitError, match="(one of the inputs|not a token cache)"):
            encode_files(src, out, tok)
        assert out.read_bytes() == before
    (tmp_path / "d").mkdir()
    with pytest.raises(Gpt2kitError, match=r"is a folder; give a file name"):
        encode_files(src, tmp_path / "d", tok)
    with pytest.raises(Gpt2kitError, match=r"new/ is a folder; give a file name, e.g. .*new/data.tokens"):
        encode_files(src, f"{tmp_path}/new/", tok)  # a trailing slash: a folder, even one not made yet
    assert not (tmp_path / "new").exists()
    first = encode_files(src, tmp_path / "a.tokens", tok)
    write(src, "hello again\n")
    assert encode_files(src, first.path, tok).n_docs == 1  # an earlier cache is replaced


def test_prepare_data_notes(tok, tmp_path, caplog):
    f = write(tmp_path / "a.csv", "Joke\nhello world\n")
    with caplog.at_level(logging.INFO, logger="gpt2kit"), pytest.raises(Gpt2kitError, match="no column 'nope'"):
        prepare_data(f, tok, DataSpec(column="nope"), cache_dir=tmp_path / "cache")
    assert caplog.records == []  # no "encoding ..." note before the error
    with caplog.at_level(logging.INFO, logger="gpt2kit"):
        prepare_data(f, tok, cache_dir=tmp_path / "cache")
        prepare_data(f, tok, cache_dir=tmp_path / "cache")
    assert "encoding 1 file into" in caplog.text and "(1 document, 3 tokens)" in caplog.text


def test_token_cache_found_by_header_and_glob(tok, tmp_path):
    cache = encode_files(write(tmp_path / "a.txt", "hello world\n"), tmp_path / "data.bin", tok)
    for given in (cache.path, str(tmp_path / "*.bin"), [str(tmp_path / "dat*")]):
        train, _ = prepare_data(given, tok, cache_dir=tmp_path / "cache")
        assert train.path == cache.path
    with pytest.raises(Gpt2kitError, match="already tokenized"):
        read_documents([tmp_path / "a.txt", cache.path])
    (tmp_path / "only").mkdir()
    cache.path.rename(tmp_path / "only/c.tokens")
    with pytest.raises(Gpt2kitError, match=r"pass the file itself \(e.g. .*c.tokens\)"):
        prepare_data(tmp_path / "only", tok, cache_dir=tmp_path / "cache")



def token_files(tok, d: Path) -> tuple[list[list[int]], dict[str, Path]]:
    """The same two documents as gpt-2-simple / nshepperd (.npz), numpy (.npy) and nanoGPT (.bin) write them."""
    docs = [tok.encode("hello world"), tok.encode("bye now<|endoftext|>")]
    d.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(d / "out.npz", *[np.array(x, dtype=np.int64) for x in docs])  # nshepperd's encode.py
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.array(x, dtype=np.int32) for x in docs]
    np.save(d / "ragged.npy", ragged, allow_pickle=True)
    np.save(d / "one.npy", np.array(docs[0], dtype=np.uint16))
    np.array(docs[0] + docs[1], dtype="<u2").tofile(d / "train.bin")  # nanoGPT: one stream, no header
    return docs, {p.name: p for p in d.iterdir()}


def test_token_files_are_read_as_token_ids(tok, tmp_path, monkeypatch):
    docs, f = token_files(tok, tmp_path / "in")
    monkeypatch.setattr(data, "_encode_to_arrays", lambda *a, **k: pytest.fail("re-encoded"))
    expected = {"out.npz": docs, "ragged.npy": docs, "one.npy": docs[:1], "train.bin": [docs[0] + docs[1]]}
    for name, want in expected.items():
        train, _ = prepare_data(f[name], tok, DataSpec(line_by_line=True), cache_dir=tmp_path / "cache")
        assert [train.doc(i).tolist() for i in range(train.n_docs)] == want, name
        assert train.tokenizer_id == tokenizer_id(tok)
        out = encode_files(f[name], tmp_path / f"{name}.tokens", tok)
        assert [out.doc(i).tolist() for i in range(out.n_docs)] == want, name
    both = encode_files([f["out.npz"], f["one.npy"]], tmp_path / "both.tokens", tok)
    assert [both.doc(i).tolist() for i in range(both.n_docs)] == docs + docs[:1]
    # a validation split works on them as on text
    train, val = prepare_data(f["out.npz"], tok, val_fraction=0.5, cache_dir=tmp_path / "cache")
    assert train.n_docs == val.n_docs == 1


def test_token_files_refused_when_not_token_ids(tok, tmp_path):
    docs, f = token_files(tok, tmp_path / "in")
    text = write(tmp_path / "a.txt", "some text\n")
    np.savez(tmp_path / "big.npz", np.array([5, tok.vocab_size + 7]))
    np.save(tmp_path / "neg.npy", np.array([5, -3]))
    np.savez(tmp_path / "float.npz", np.array([1.5, 2.0]))
    np.array([1, 60000], dtype="<u2").tofile(tmp_path / "ids.bin")
    write(tmp_path / "odd.bin", b"\x01\x02\x03")
    write(tmp_path / "text.npz", "not a zip\n")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = np.empty(1, dtype=object)
    evil[0] = Evil()
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    binary = r"looks like a binary file, not text.*\.npz/\.npy/\.bin token files and \.tokens caches$"
    cases = {
        "big.npz": rf"big.npz holds token id {tok.vocab_size + 7}, outside this tokenizer's 0-{tok.vocab_size - 1}",
        "neg.npy": r"neg.npy holds token id -3, outside",
        "float.npz": r"float.npz holds a float64 array of shape \(2,\), not token ids",
        "ids.bin": r"ids.bin " + binary.replace("text.*", r"text \(it has no llm.c token shard header, and as "
                                                          r"nanoGPT's raw uint16 token ids it would hold id 60000.*"),
        "odd.bin": r"odd.bin " + binary.replace("text.*", r"text \(it has no llm.c token shard header, and its "
                                                          r"size, 3 bytes, is odd.*"),
        "text.npz": r"text.npz is not a numpy .npz/.npy file",
        "evil.npy": r"^cannot read .*evil.npy as token ids: it would load builtins.print, which is not a numpy array",
    }
    for name, match in cases.items():
        for call in (lambda p: prepare_data(p, tok, cache_dir=tmp_path / "cache"),
                     lambda p: encode_files(p, tmp_path / "x.tokens", tok)):
            with pytest.raises(Gpt2kitError, match=match):
                call(tmp_path / name)
    with pytest.raises(Gpt2kitError, match=r"out.npz holds token ids; pass token files .* not mixed with text"):
        prepare_data([text, f["out.npz"]], tok, cache_dir=tmp_path / "cache")
    with pytest.raises(Gpt2kitError, match="already tokenized"):
        read_documents([text, f["train.bin"]])
    assert not (tmp_path / "x.tokens").exists()


def llmc_shard(path: Path, tokens, magic=20240520, version=1, count=None) -> Path:
    """A token shard in llm.c's documented layout (dev/data/data_common.py): 256 little-endian int32s (magic,
    version, token count, the rest zero), then the tokens as uint16."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_llmc_token_shards_are_read_after_their_checked_header(tok, tmp_path, monkeypatch):
    from gpt2kit.data import read_tokens
    docs = encode_documents(["Hello world.", "A second document, a little longer."], tok)
    stream = [tok.eot_token] + docs[0] + docs[1]  # llm.c puts <|endoftext|> before each document
    shard = llmc_shard(tmp_path / "tiny_val.bin", stream)
    monkeypatch.setattr(data, "_encode_to_arrays", lambda *a, **k: pytest.fail("re-encoded"))
    tokens = read_tokens(shard, tok)
    assert tokens.tolist() == stream and isinstance(tokens, np.memmap) and tokens.offset == 1024
    train, _ = prepare_data(shard, tok, cache_dir=tmp_path / "cache")
    assert train.tokens.tolist() == stream and train.n_docs == 1
    assert encode_files(shard, tmp_path / "s.tokens", tok).tokens.tolist() == stream
    # several shards, as llm.c writes them (fineweb_train_000001.bin, ...), are one document each
    two = llmc_shard(tmp_path / "tiny_train_000002.bin", docs[1])
    train, _ = prepare_data([shard, two], tok, cache_dir=tmp_path / "cache")
    assert [train.doc(i).tolist() for i in range(train.n_docs)] == [stream, docs[1]]
    bad = {
        "truncated.bin": (dict(count=len(stream) + 5), r"truncated.bin is a truncated or corrupt llm.c token shard: "
                          rf"its header says {len(stream) + 5} tokens \({1024 + 2 * (len(stream) + 5):,} bytes\), the "
                          rf"file has {1024 + 2 * len(stream):,} bytes"),
        "magic.bin": (dict(magic=20240519), r"magic.bin has an llm.c token shard header with the wrong magic number "
                      r"20240519 \(expected 20240520\)"),
        "v2.bin": (dict(version=2), r"v2.bin is an llm.c token shard of version 2; gpt2kit reads version 1"),
        "llama.bin": (dict(magic=20240801, version=7), r"llama.bin is an llm.c Llama 3 token shard"),
        "model.bin": (dict(magic=20240326, version=3), r"model.bin is an llm.c model file, not token ids \(pass it "
                      r"as --model"),
    }
    for name, (kw, match) in bad.items():
        path = llmc_shard(tmp_path / name, stream, **kw)
        for call in (lambda p=path: prepare_data(p, tok, cache_dir=tmp_path / "cache"),
                     lambda p=path: encode_files(p, tmp_path / "x.tokens", tok), lambda p=path: read_tokens(p, tok)):
            with pytest.raises(Gpt2kitError, match=match):
                call()
    assert not (tmp_path / "x.tokens").exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04zip bytes\xff", b"\x1f\x8b\x08gzip", b"\x93NUMPY\x01\x00",
                                     b"text\x00with a NUL"])
def test_binary_input_is_refused_not_decoded(tok, tmp_path, content):
    f = write(tmp_path / "data.txt", content)
    for spec in (DataSpec(), DataSpec(encoding="latin-1")):  # latin-1 would decode any bytes
        with pytest.raises(Gpt2kitError, match=r"^\S*data.txt looks like a binary file, not text; gpt2kit reads") as e:
            prepare_data(f, tok, spec, cache_dir=tmp_path / "cache")
        assert "--encoding" not in str(e.value)
    assert read_documents(write(tmp_path / "w.txt", "wide text".encode("utf-16")), DataSpec(encoding="utf-16")) == [
        "wide text"]


def test_text_options_are_an_error_with_pre_encoded_inputs(tok, tmp_path):
    _, f = token_files(tok, tmp_path / "in")
    cache = encode_files(f["out.npz"], tmp_path / "c.tokens", tok)
    for path in (cache.path, f["out.npz"], f["train.bin"]):
        for spec, opt in ((DataSpec(column="Joke"), "--column"), (DataSpec(field="text"), "--field"),
                          (DataSpec(encoding="latin-1"), "--encoding")):
            with pytest.raises(Gpt2kitError, match=rf"^{opt} applies to text inputs, but .* is already token ids"):
                prepare_data(path, tok, spec, cache_dir=tmp_path / "cache")
        # the default encoding however spelled, and line_by_line (document boundaries), are fine
        prepare_data(path, tok, DataSpec(encoding="UTF8", line_by_line=True), cache_dir=tmp_path / "cache")
    with pytest.raises(Gpt2kitError, match=r"^--encoding applies"):
        encode_files(f["out.npz"], tmp_path / "x.tokens", tok, DataSpec(encoding="latin-1"))


def test_encode_out_names_numpy_cannot_load_are_refused(tok, tmp_path, capsys):
    from gpt2kit.cli import main
    src = write(tmp_path / "dset.txt", "hello world\n")
    for name in ("out.npz", "out.NPY"):
        with pytest.raises(Gpt2kitError, match=rf"^--out .*{name}: gpt2kit writes its own token cache format.*"
                                               r"name it .*out.tokens \(finetune --data reads .npz/.npy"):
            encode_files(src, tmp_path / name, tok)
        assert not (tmp_path / name).exists()
    # nshepperd's `encode.py dset.txt out.npz` argument order
    assert main(["encode", str(src), str(tmp_path / "out.npz"), "--tokenizer", str(VOCAB)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the output is named with --out")
    assert f"--out {tmp_path / 'out.tokens'}" in err
    # the corrected command keeps the other options given, so that it can be run as it is
    csv = write(tmp_path / "my jokes.csv", "ID,Joke\n1,hello\n")
    assert main(["encode", str(csv), str(tmp_path / "out.npz"), "--column", "Joke", "--tokenizer", str(VOCAB),
                 "--encoding", "latin-1"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f" --out {tmp_path / 'out.tokens'} --tokenizer {VOCAB} --column Joke --encoding latin-1\n"), err
    assert f"'{csv}'" in err  # (quoted for the shell)
    assert main(["encode", str(src), "--tokenizer", str(VOCAB)]) == 1
    assert capsys.readouterr().err == "error: --out FILE.tokens is required: the token cache to write\n"
    # the output name is checked before the tokenizer: with the default --model gpt2, which this offline
    # machine cannot download, the name is still the error named
    assert main(["encode", str(src), "--out", str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt2kit writes its own token cache format" in err and "download" not in err
    _, f = token_files(tok, tmp_path / "in")
    assert main(["encode", str(f["out.npz"]), "--out", str(tmp_path / "n.tokens"), "--tokenizer", str(VOCAB)]) == 0
    assert capsys.readouterr().out.startswith("encoded 2 documents, 5 tokens")
    # the inputs are checked before the tokenizer is fetched: with the default --model gpt2, which this
    # offline machine cannot download, an empty folder or a missing file is still the error named
    (tmp_path / "empty").mkdir()
    for bad, msg in ((tmp_path / "empty", "has no .txt, .csv"), (tmp_path / "gone.txt", "does not exist")):
        assert main(["encode", str(bad), "--out", str(tmp_path / "e.tokens")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "download" not in err

def test_a_validation_split_is_two_small_views_not_a_copy_of_the_data(tok, tmp_path, caplog):
    spec = DataSpec(column="Joke")
    corpus = encode_files(JOKES, tmp_path / "in" / "corpus.tokens", tok, spec)
    train, val = prepare_data(corpus.path, tok, val_fraction=0.1, seed=3, cache_dir=tmp_path / "run-data")
    written = sorted((tmp_path / "run-data").iterdir())
    assert [p.suffix for p in written] == [".json", ".json"]
    assert sum(p.stat().st_size for p in written) < corpus.path.stat().st_size / 10
    # the tokens a copy would hold: the chosen documents in their order
    is_val = np.zeros(corpus.n_docs, dtype=bool)
    is_val[np.random.default_rng([3, 1]).permutation(corpus.n_docs)[:295]] = True
    for view, sel in ((train, ~is_val), (val, is_val)):
        expect = np.concatenate([corpus.doc(i) for i in np.flatnonzero(sel)])
        assert np.array_equal(np.asarray(view.tokens), expect) and view.n_docs == sel.sum()
        rng = np.random.default_rng(0)
        for a, b in rng.integers(0, len(view) + 1, size=(300, 2)):  # slices across the ranges' edges too
            assert np.array_equal(view.tokens[min(a, b):max(a, b)], expect[min(a, b):max(a, b)])
        copy = TokenCache.write_arrays(tmp_path / f"copy{len(view)}.tokens", expect, view.doc_offsets,
                                       corpus.tokenizer_id)
        for lbl in (False, True):  # the same batches as from a copy, in both modes
            kw = dict(seed=5, line_by_line=lbl)
            b1, b2 = Batcher(view, 32, 4, **kw), Batcher(copy, 32, 4, **kw)
            for j in (0, 1, 17, 400):
                assert all(torch.equal(x, y) for x, y in zip(b1.batch_at(j), b2.batch_at(j)))
            assert all(torch.equal(x, y) for p, q in zip(b1.eval_batches(), b2.eval_batches()) for x, y in zip(p, q))
    # reused as they are; a changed input is noticed: its old views refuse to open, and it gets new ones
    assert prepare_data(corpus.path, tok, val_fraction=0.1, seed=3, cache_dir=tmp_path / "run-data")[1].n_docs == 295
    encode_files(write(tmp_path / "other.txt", "other words\n" * 50), corpus.path, tok)
    with pytest.raises(Gpt2kitError, match=r"splits the token cache .*corpus.tokens, which has changed since the split "
                                           r"was made \(57,414 tokens then, \d+ now\); put the original back"):
        TokenCache.open(val.path)
    tr2, va2 = prepare_data(corpus.path, tok, val_fraction=0.1, seed=3, cache_dir=tmp_path / "run-data")
    assert tr2.path != train.path and len(tr2) + len(va2) == len(TokenCache.open(corpus.path))
    # views that no longer open where they are reused are made again, with a warning
    tr2.path.write_text("{torn")
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        tr3, _ = prepare_data(corpus.path, tok, val_fraction=0.1, seed=3, cache_dir=tmp_path / "run-data")
    assert "re-splitting" in caplog.text and np.array_equal(np.asarray(tr3.tokens), np.asarray(tr2.tokens))
    corpus.path.unlink()
    with pytest.raises(Gpt2kitError, match=r"corpus.tokens, which is gone; put it back where it was"):
        TokenCache.open(tr2.path)


def test_a_split_of_a_cache_beside_it_survives_moving_the_folder(tok, tmp_path):
    # raw inputs: their cache and its split views sit together in RUN/data, which a moved run takes along
    train, val = prepare_data(write(tmp_path / "one.txt", "word " * 100), tok, val_fraction=0.1,
                              cache_dir=tmp_path / "a")
    whole = np.concatenate([np.asarray(train.tokens), np.asarray(val.tokens)])
    (tmp_path / "a").rename(tmp_path / "b")
    moved = [TokenCache.open(tmp_path / "b" / p.name) for p in (train.path, val.path)]
    assert np.array_equal(np.concatenate([np.asarray(m.tokens) for m in moved]), whole)
    (tmp_path / "b" / train.path.name).write_text('{"format": "gpt2kit-token-view", "version": 1}')
    with pytest.raises(Gpt2kitError, match="is not a gpt2kit data split .*delete it and start again"):
        TokenCache.open(tmp_path / "b" / train.path.name)


def test_val_fraction_splits_whole_documents(tok, tmp_path, caplog):
    spec = DataSpec(column="Joke")
    train, val = prepare_data(JOKES, tok, spec, val_fraction=0.1, seed=3, cache_dir=tmp_path)
    assert (train.n_docs, val.n_docs) == (2655, 295)
    full = encode_files(JOKES, tmp_path / "full.tokens", tok, spec)

    def docs(c):
        return [tuple(c.doc(i).tolist()) for i in range(c.n_docs)]

    t, v = docs(train), docs(val)
    assert sorted(t + v) == sorted(docs(full))  # each document lands in exactly one split
    assert docs(prepare_data(JOKES, tok, spec, val_fraction=0.1, seed=3, cache_dir=tmp_path)[1]) == v
    assert docs(prepare_data(JOKES, tok, spec, val_fraction=0.1, seed=4, cache_dir=tmp_path)[1]) != v
    # at least one document; never all of them; when that is far more than the fraction, a warning says so
    two = write(tmp_path / "two.txt", "a\nb\n")
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        tr, va = prepare_data(two, tok, DataSpec(line_by_line=True), val_fraction=0.01, cache_dir=tmp_path)
    assert (tr.n_docs, va.n_docs) == (1, 1)
    assert "validation holds 50% of the tokens (1 of 2 documents, for a fraction of 0.01)" in caplog.text
    # a single document gives up its tail instead
    one = write(tmp_path / "one.txt", "word " * 100)
    n = len(tok.encode("word " * 100)) + 1
    tr, va = prepare_data(one, tok, val_fraction=0.1, cache_dir=tmp_path)
    assert (len(tr), len(va)) == (n - round(n * 0.1), round(n * 0.1))
    assert tr.tokens.tolist() + va.tokens.tolist() == tok.encode("word " * 100) + [tok.eot_token]
    # explicit validation data wins
    tr, va = prepare_data(two, tok, val_data=one, cache_dir=tmp_path)
    assert va.n_docs == 1 and len(va) == n


# --- batches


def test_batcher_deterministic_and_resumable(tmp_path):
    cache = stream_cache(tmp_path)
    a = Batcher(cache, block_size=16, batch_size=4, seed=1)
    b = Batcher(cache, block_size=16, batch_size=4, seed=1)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one (tokens are positions)
    assert torch.equal(b.next()[0], x)
    assert not torch.equal(Batcher(cache, 16, 4, seed=2).next()[0], x)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    assert state == {"step": 6, "seed": 1, "epoch": 6 // a.steps_per_epoch}
    assert a.steps_per_epoch == 16  # ceil(1000 / (16 * 4))
    expect = [a.next() for _ in range(3)]
    resumed = Batcher(cache, block_size=16, batch_size=4, seed=99)
    resumed.load_state_dict(state)
    for ex, got in zip(expect, (resumed.next() for _ in range(3))):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])


@pytest.mark.parametrize("line_by_line", [False, True])
def test_ddp_ranks_equal_single_process_micro_steps(tmp_path, line_by_line):
    cache = stream_cache(tmp_path, docs=37)
    single = Batcher(cache, 16, 3, seed=5, line_by_line=line_by_line)
    ranks = [Batcher(cache, 16, 3, seed=5, line_by_line=line_by_line, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch * 2 in (single.steps_per_epoch, single.steps_per_epoch + 1)
    for _step in range(20):  # crosses epoch boundaries in line-by-line mode (37 docs)
        for r in range(2):
            x, y = ranks[r].next()
            sx, sy = single.next()  # single-process micro-step 2 * step + r
            assert torch.equal(x, sx) and torch.equal(y, sy)


def test_line_by_line_padding(tmp_path):
    cache = TokenCache.write(tmp_path / "l.tokens", [[1, 2, 50256], list(range(100, 140)) + [50256]], "t")
    b = Batcher(cache, block_size=32, batch_size=2, line_by_line=True)
    assert b.steps_per_epoch == 1
    seen = set()
    for _ in range(3):
        x, y = b.next()
        assert x.shape == (2, 32)  # longest sample (40 tokens) truncated to the block
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            if row_x[0] == 1:  # the short document: 2 real positions, then padding
                assert row_x == [1, 2] + [50256] * 30 and row_y == [2, 50256] + [-100] * 30
            else:
                assert row_x == list(range(100, 132)) and row_y == list(range(101, 133))
            seen.add(row_x[0])
    assert seen == {1, 100}
    # a batch of short documents is padded only to a multiple of 8
    shapes = [x.shape for x, _ in Batcher(cache, 32, 1, line_by_line=True).eval_batches()]
    assert shapes == [(1, 8), (1, 32)]


def test_short_data_shrinks_block(tmp_path, caplog):
    cache = TokenCache.write(tmp_path / "tiny.tokens", [[5, 6, 7, 50256]], "t")
    with caplog.at_level(logging.WARNING, logger="gpt2kit.data"):
        b = Batcher(cache, block_size=64, batch_size=2)
    assert b.block_size == 3
    assert len(caplog.records) == 1 and "--block-size 3" in caplog.text
    x, y = b.next()
    assert x.tolist() == [[5, 6, 7]] * 2 and y.tolist() == [[6, 7, 50256]] * 2
    assert len(list(b.eval_batches())) == 1
    with pytest.raises(Gpt2kitError):
        Batcher(TokenCache.write(tmp_path / "one.tokens", [[50256]], "t"), 8, 1)


def test_eval_batches_cover_every_target_once(tmp_path):
    cache = stream_cache(tmp_path, n_tokens=1001)
    targets = []
    for r in range(2):
        b = Batcher(cache, block_size=64, batch_size=3, rank=r, world_size=2)
        for x, y in b.eval_batches():
            assert x.shape[1] == 64
            targets += y[y != -100].tolist()
    assert sorted(targets) == list(range(1, 1001))
    b = Batcher(cache, block_size=64, batch_size=3)
    assert [x.tolist() for x, _ in b.eval_batches()] == [x.tolist() for x, _ in b.eval_batches()]
    limited = list(b.eval_batches(max_batches=2))
    assert len(limited) == 2 and limited[-1][0][-1, -1] == 999  # spread to the end of the set
    lines = TokenCache.write(tmp_path / "l.tokens", [[1, 50256], [2, 3, 50256], [4, 50256]], "t")
    ys = [y for _, y in Batcher(lines, 8, 2, line_by_line=True).eval_batches()]
    assert [t for y in ys for t in y[y != -100].tolist()] == [50256, 3, 50256, 50256]


# --- CLI


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "gpt2kit", "encode", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_encode(tmp_path):
    out = tmp_path / "jokes.tokens"
    # both runs at once: most of each is interpreter and torch start-up
    good = start_cli(JOKES, "--column", "Joke", "--out", out, "--tokenizer", VOCAB, cwd=tmp_path)
    bad = start_cli(JOKES, "--out", tmp_path / "x.tokens", "--tokenizer", VOCAB, cwd=tmp_path)
    (stdout, stderr), (_, bad_stderr) = good.communicate(timeout=60), bad.communicate(timeout=60)
    assert good.returncode == 0, stderr
    assert stdout.startswith("encoded 2,950 documents,") and str(out) in stdout
    assert TokenCache.open(out).n_docs == 2950
    assert bad.returncode == 1 and "Traceback" not in bad_stderr
    assert bad_stderr.strip().count("\n") == 0 and bad_stderr.startswith("error:") and "Joke" in bad_stderr
    assert not (tmp_path / "x.tokens").exists()


# --- misuse of the Python API: one-line errors at the call, naming the argument and the fix


@pytest.mark.parametrize("call, match", [
    (lambda t, c, d: prepare_data(c, t, cache_dir=d), r"^data must be a path.*not TokenCache.*cache\.path"),
    (lambda t, c, d: prepare_data(None, t, cache_dir=d), r"^data must be a path.*not NoneType"),
    (lambda t, c, d: prepare_data(c.path, t, val_data=c, cache_dir=d), r"^val_data must be a path.*cache\.path"),
    (lambda t, c, d: prepare_data(c.path, t, cache_dir=c), r"^cache_dir must be a path.*not TokenCache"),
    (lambda t, c, d: prepare_data(c.path, "gpt2", cache_dir=d), r"^tok must be a gpt2kit Tokenizer.*not str"),
    (lambda t, c, d: prepare_data(c.path, t, {"column": "x"}, cache_dir=d),
     r"^spec must be a DataSpec or None, not dict; pass DataSpec\(\*\*spec\)"),
    (lambda t, c, d: prepare_data(c.path, t, val_fraction="0.1", cache_dir=d),
     r"^val_fraction must be a number in \[0, 1\), not '0.1'"),
    (lambda t, c, d: prepare_data(c.path, t, seed="1", cache_dir=d), r"^seed must be an integer, not '1'"),
    (lambda t, c, d: read_documents([c.path, 5]), r"^inputs must be a path.*not a list holding int"),
    (lambda t, c, d: read_documents(SHAKESPEARE, "utf-8"), r"^spec must be a DataSpec.*DataSpec\(column="),
    (lambda t, c, d: encode_files(SHAKESPEARE, d / "x.tokens", "gpt2"), r"^tok must be a gpt2kit Tokenizer"),
    (lambda t, c, d: encode_files(SHAKESPEARE, c, t), r"^out_path must be a path.*cache\.path"),
    (lambda t, c, d: TokenCache.open(c), r"^path must be a path.*not TokenCache"),
])
def test_wrong_argument_kinds_name_the_argument(tok, tmp_path, call, match):
    cache = stream_cache(tmp_path)
    with pytest.raises(TypeError, match=match):
        call(tok, cache, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_batcher_checks_its_arguments(tmp_path, monkeypatch):
    cache = stream_cache(tmp_path)
    for cache_arg in (str(cache.path), cache.path):
        with pytest.raises(TypeError, match=r"^Batcher needs a TokenCache.*TokenCache\.open\(path\)"):
            Batcher(cache_arg, 16, 4)
    for args, kw, match in [(("16", 4), {}, "^block_size must be an integer, not '16'"),
                            ((16.0, 4), {}, "^block_size must be an integer, not 16.0"),
                            ((16, "4"), {}, "^batch_size must be an integer, not '4'"),
                            ((16, 4), {"seed": 1.5}, "^seed must be an integer, not 1.5"),
                            ((16, 4), {"rank": 0.0}, "^rank must be an integer, not 0.0")]:
        with pytest.raises(TypeError, match=match):
            Batcher(cache, *args, **kw)
    for args, kw, match in [((0, 4), {}, r"^block_size must be >= 1, got 0$"),
                            ((-1, 4), {}, r"^block_size must be >= 1, got -1$"),
                            ((16, 0), {}, r"^batch_size must be >= 1, got 0$"),
                            ((16, 4), {"world_size": 0}, r"^world_size must be >= 1, got 0$"),
                            ((16, 4), {"device": "gpu"}, r"^unknown device 'gpu': use cpu, cuda")]:
        with pytest.raises(Gpt2kitError, match=match):
            Batcher(cache, *args, **kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Gpt2kitError, match=r"^--device cuda asked for, but this torch build sees no CUDA GPU; use "
                                           r"--device cpu$"):
        Batcher(cache, 16, 4, device="cuda")
    b = Batcher(cache, np.int64(16), np.int64(4), seed=np.int64(3))  # numpy integers are fine
    assert b.next()[0].shape == (4, 16) and type(b.block_size) is int


def test_batcher_load_state_dict_reports_a_bad_state(tmp_path):
    b = Batcher(stream_cache(tmp_path), 16, 4)
    valid = r"a valid state is a dict like \{'step': 0, 'seed': 0, 'epoch': 0\}, as Batcher.state_dict\(\) returns$"
    for state, match in [({}, r"^the batcher state has no 'step' or 'seed' \(its keys: none\); "),
                         ({"steps": 3, "seed": 0}, r"^the batcher state has no 'step' \(its keys: 'steps', 'seed'\); "),
                         (None, r"^the batcher state is a NoneType; "),
                         ({"step": "x", "seed": 0}, r"^the batcher state's 'step' must be an integer >= 0, not 'x'; "),
                         ({"step": -3, "seed": 0}, r"^the batcher state's 'step' must be an integer >= 0, not -3; "),
                         ({"step": 2.7, "seed": 0}, r"^the batcher state's 'step' must be an integer >= 0, not 2.7; "),
                         ({"step": 2, "seed": "1"}, r"^the batcher state's 'seed' must be an integer, not '1'; ")]:
        with pytest.raises(Gpt2kitError, match=match + valid):
            b.load_state_dict(state)
    assert b.state_dict()["step"] == 0  # a refused state changes nothing
    b.load_state_dict({"step": np.int64(5), "seed": 7})  # "epoch" is derived from step, so not needed
    assert b.state_dict() == {"step": 5, "seed": 7, "epoch": 5 // b.steps_per_epoch}


def test_dataspec_checks_its_fields():
    for kw, match in [({"encoding": None}, r"^DataSpec.encoding must be a str \(e.g. 'utf-8'\), not None$"),
                      ({"column": 3}, r"^DataSpec.column must be a str or None, not 3$"),
                      ({"field": ["a"]}, r"^DataSpec.field must be a str or None, not \['a'\]$"),
                      ({"line_by_line": "no"}, r"^DataSpec.line_by_line must be True or False, not 'no'$")]:
        with pytest.raises(Gpt2kitError, match=match):
            DataSpec(**kw)


def test_token_cache_write_refuses_what_it_would_store_wrongly(tmp_path, tok):
    path = tmp_path / "w.tokens"
    with pytest.raises(ValueError, match=r"^token ids must be in \[0, 2\*\*32\), got -1 to 2$"):
        TokenCache.write(path, [[-1, 2]], "t")  # was stored as 65535
    with pytest.raises(ValueError, match=r"^token ids must be in \[0, 2\*\*32\)"):
        TokenCache.write(path, [[2**33]], "t")  # was stored as 0
    with pytest.raises(TypeError, match=r"^tokens must be an integer array, not float64$"):
        TokenCache.write_arrays(path, np.array([1.5, 2.0]), np.array([0, 2]), "t")
    for docs in ("hello", [1, 2, 3]):
        with pytest.raises(TypeError, match=r"^docs_tokens must be a list of token id lists, one per document"):
            TokenCache.write(path, docs, "t")
    with pytest.raises(TypeError, match=r"^tokenizer_id must be a str \(from tokenizer_id\(tok\)\), not Tokenizer$"):
        TokenCache.write(path, [[1]], tok)
    with pytest.raises(ValueError, match=r"^tokenizer id must be ASCII"):
        TokenCache.write(path, [[1]], "tök")
    assert not path.exists()


def test_one_set_of_text_options_serves_training_and_validation_data_of_other_kinds(tok, tmp_path):
    tr = write(tmp_path / "tr.csv", "id,text\n1,one joke here\n2,another joke\n")
    val_txt = write(tmp_path / "val.txt", "some held out text\n")
    val_tokens = encode_files(val_txt, tmp_path / "val.tokens", tok)
    spec = DataSpec(column="text")
    for val in (val_txt, val_tokens.path):  # --column applies to the csv; the other set is of another kind
        train, v = prepare_data(tr, tok, spec, val_data=val, cache_dir=tmp_path / f"c-{val.suffix}")
        assert train.n_docs == 2 and tok.decode(v.tokens.tolist()).startswith("some held out text")
    train, v = prepare_data(val_tokens.path, tok, spec, val_data=tr, cache_dir=tmp_path / "c3")
    assert v.n_docs == 2
    with pytest.raises(Gpt2kitError, match=r"^--column applies to text inputs, but .*val.tokens is already token "
                                           r"ids; drop --column$"):
        prepare_data(val_tokens.path, tok, spec, val_data=val_tokens.path, cache_dir=tmp_path / "c4")
    with pytest.raises(Gpt2kitError, match=r"^--column/--field apply to .csv/.tsv and .jsonl files"):
        prepare_data(val_txt, tok, spec, val_data=val_tokens.path, cache_dir=tmp_path / "c5")


def test_empty_or_blank_text_inputs_are_found_before_any_reading(tok, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n  \r\n\t\n")
    (tmp_path / "text.txt").write_text("a document\n")
    for inputs, val in (([tmp_path / "empty.txt"], None), ([tmp_path / "empty.txt", tmp_path / "blank.txt"], None),
                        ([tmp_path / "text.txt"], [tmp_path / "blank.txt"])):
        with pytest.raises(Gpt2kitError, match="^no documents in .*blank.txt|^no documents in .*empty.txt"):
            data.check_inputs(inputs, val_inputs=val)
    data.check_inputs([tmp_path / "empty.txt", tmp_path / "text.txt"])  # one document is enough
    # past the size limit nothing is read here: reading the documents finds a blank file later, the same way
    monkeypatch.setattr(data, "_check_not_blank", lambda files, limit=0: None)
    data.check_inputs([tmp_path / "blank.txt"])
    with pytest.raises(Gpt2kitError, match="^no documents in .*blank.txt: the input is empty or blank$"):
        data.read_tokens([tmp_path / "blank.txt"], tok)


def test_a_fifo_as_data_is_refused_everywhere_not_waited_on(tmp_path, capsys):
    import os
    import signal

    from gpt2kit.cli import main
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    tokens_fifo = tmp_path / "pipe.tokens"
    os.mkfifo(tokens_fifo)

    def hang(*_):
        raise TimeoutError("waited on the FIFO")
    old = signal.signal(signal.SIGALRM, hang)
    try:
        for argv in (["encode", fifo, "--out", tmp_path / "o.tokens", "--tokenizer", VOCAB],
                     ["eval", "--data", fifo, "--tokenizer", VOCAB],
                     ["eval", "--data", tokens_fifo, "--tokenizer", VOCAB],
                     ["eval", "--data", fifo, "--line-by-line", "--tokenizer", VOCAB],
                     ["finetune", "--model", "gpt2", "--data", fifo, "--out", tmp_path / "run"],
                     ["finetune", "--model", "gpt2", "--data", tokens_fifo, "--out", tmp_path / "run"],
                     ["finetune", "--model", "gpt2", "--data", SHAKESPEARE, "--val-data", fifo,
                      "--out", tmp_path / "run"]):
            signal.alarm(20)
            assert main(list(map(str, argv))) == 1, argv
            signal.alarm(0)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is not a regular file or folder; save the data to a file first" in err, err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not (tmp_path / "run").exists()
