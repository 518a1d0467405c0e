import pytest

from gpt2kit.errors import Gpt2kitError
from gpt2kit.tokenizer import Tokenizer
from tests.conftest import SHAKESPEARE, TF_TINY, VOCAB_DIR

CORPUS = [
    "Hello world",
    "Human reason, in one sphere of its cognition, is called upon to consider questions",
    "a<|endoftext|>b",
    "<|endoftext|>",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand   runs      of spaces",
    "naïve café — ünïcödé; 日本語のテキスト; emoji 🤖🎉👩‍👩‍👧",
    "I'll don't they're we've she'd you'm IT'S",
    "numbers 1234567890 3.14159 -42 1e10",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "\u200b zero width \ufeff bom",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizers():
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    return (GPT2Tokenizer.from_pretrained(TF_TINY / "hf"), GPT2TokenizerFast.from_pretrained(TF_TINY / "hf"))


def test_ids_equal_original_gpt2(tokenizer, hf_tokenizers):
    slow, fast = hf_tokenizers  # slow = the original GPT-2 BPE algorithm in Python
    corpus = CORPUS + [SHAKESPEARE.read_text()[:20000]]
    for text in corpus:
        ids = tokenizer.encode(text)
        assert ids == slow.encode(text), text
        assert ids == fast.encode(text), text
        assert tokenizer.decode(ids) == text


def test_both_file_layouts_give_the_same_ids(tokenizer):
    hf_layout = Tokenizer.from_dir(TF_TINY / "hf")  # vocab.json + merges.txt
    openai_layout = Tokenizer.from_dir(VOCAB_DIR)  # encoder.json + vocab.bpe
    for text in CORPUS:
        assert hf_layout.encode(text) == openai_layout.encode(text)


def test_endoftext_is_one_token_unless_disallowed(tokenizer):
    assert tokenizer.eot_token == 50256
    assert tokenizer.encode("<|endoftext|>") == [50256]
    plain = tokenizer.encode("<|endoftext|>", allow_special=False)
    assert 50256 not in plain and tokenizer.decode(plain) == "<|endoftext|>"


def test_batch_encode_matches_single(tokenizer):
    assert tokenizer.encode_batch(CORPUS) == [tokenizer.encode(t) for t in CORPUS]


def test_missing_or_broken_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(Gpt2kitError, match="no tokenizer files"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(Gpt2kitError, match="cannot read vocabulary"):
        Tokenizer.from_dir(tmp_path)


def _vocab_dir(tmp_path, vocab: str | None = None, merges: str | None = None):
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    src = TF_TINY / "hf"
    (d / "vocab.json").write_text(vocab if vocab is not None else (src / "vocab.json").read_text("utf-8"), "utf-8")
    (d / "merges.txt").write_text(merges if merges is not None else (src / "merges.txt").read_text("utf-8"), "utf-8")
    return d


def _one_line_error(d) -> str:
    with pytest.raises(Gpt2kitError) as e:
        Tokenizer.from_dir(d)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("bad_line", ["Ġtnospace", "Ġ t e", "Ġ ", "a\x01 b"])
def test_malformed_merges_line_is_one_line_naming_file_and_line(tmp_path, bad_line):
    lines = (TF_TINY / "hf" / "merges.txt").read_text("utf-8").split("\n")
    assert lines[0].startswith("#version")
    lines[3] = bad_line
    d = _vocab_dir(tmp_path, merges="\n".join(lines))
    msg = _one_line_error(d)
    assert str(d / "merges.txt") in msg and "line 4 is not a merge" in msg


@pytest.mark.parametrize("vocab, complaint", [
    ("[1, 2]", "is not a JSON object of token -> id"),
    ('{"a": "1"}', "maps 'a' to '1', not a token id"),
    ('{"a": 0, "b": 0}', "gives two tokens the same id"),
    ('{"a\\u0001": 0}', "is not a GPT-2 byte-level vocabulary"),
])
def test_malformed_vocab_json_is_one_line_naming_the_file(tmp_path, vocab, complaint):
    d = _vocab_dir(tmp_path, vocab=vocab)
    msg = _one_line_error(d)
    assert str(d / "vocab.json") in msg and complaint in msg


def test_merges_without_version_header_still_check(tmp_path):
    lines = (TF_TINY / "hf" / "merges.txt").read_text("utf-8").split("\n")
    d = _vocab_dir(tmp_path, merges="\n".join(lines[1:]))
    assert Tokenizer.from_dir(d).encode("Hello world") == [15496, 995]
