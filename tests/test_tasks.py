"""gpt2kit.tasks and `eval --task`: lm-evaluation-harness's definitions, checked against lm-eval itself
where it is installed (`pip install -e .[lmeval]`; the parity tests skip without it)."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from gpt2kit.checkpoints import load_model
from gpt2kit.cli import main
from gpt2kit.errors import Gpt2kitError
from gpt2kit.tasks import (
    ChoiceItem,
    choice,
    count_words,
    encode_pair,
    lambada,
    lambada_request,
    loglikelihoods,
    rolling,
    rolling_requests,
    stream_counts,
    wikitext_detokenize,
)
from tests.conftest import SHAKESPEARE

# WikiText-style documents (as in EleutherAI/wikitext_document_level's "page"): " @-@ " separators, spaced
# punctuation and brackets, headings as "= = x = =", and non-ASCII text (bytes differ from characters)
WIKI_DOCS = [
    " = Valkyrie Road = \n \n Valkyrie Road ( Japanese : 戦場の道 , lit . Road of the Battlefield ) is a tactical "
    "role @-@ playing game released in 2011 . It sold 1 @,@ 200 @,@ 000 copies and scored 8 @.@ 5 out of 10 . "
    "The game 's story follows the \" Nameless \" squad ; its members ' names are never given . \n \n = = Plot = = "
    "\n \n In 1935 , the squad fights at 40 ° north . Who wins ? Nobody ! [ citation needed ] { note } \n",
    " = Café Müller = \n \n Café Müller is a dance piece by Pina Bausch , first performed on 20 May 1978 in "
    "Wuppertal . The stage is full of chairs , which a man clears away ( sometimes ) . \n",
]
LAMBADA_CONTEXTS = [
    "He opened the door and looked at the",
    "After the long winter the farmers planted",
    "She picked up the phone and called her",
    "The old man sat by the river and watched the",
    "They walked for hours until they reached the",
    "In the morning the children ran to the",
]
CHOICES = [
    {"context": "The sky on a clear day is", "choices": ["blue", "made of cheese", "loud"], "label": 0},
    {"context": "To boil water, you should", "choices": ["heat it on a stove.", "freeze it.",
                                                          "paint it red."], "label": 0},
    {"context": "Question: What do bees make?\nAnswer:", "choices": ["honey", "steel", "café crème"], "label": 0},
    {"context": "A man is sitting on a roof. He ", "choices": ["starts pulling up roofing.", "is ripping tiles",
                                                             "naïvely jumps", "sleeps"], "label": 1},
    {"context": "Paris is the capital of", "choices": ["France", "Germany"], "label": 0},
    {"context": "The opposite of hot is", "choices": ["cold", "warm", "über-hot"], "label": 0},
]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_wikitext_detokenizer():
    s = wikitext_detokenize(WIKI_DOCS[0])
    assert "role-playing" in s and "1,200,000 copies" in s and "8.5 out" in s and "( Japanese" not in s
    assert "(Japanese: 戦場の道, lit. Road of the Battlefield)" in s and "game's story" in s
    # "40°north" (sic): lm-eval joins " ° " on both sides
    assert '"Nameless"' in s and "members' names" in s and "== Plot ==" in s and "40°north" in s
    assert "[citation needed]" in s and "{note}" in s and "Who wins? Nobody!" in s


def test_word_and_byte_counts():
    assert count_words("a b  c") == 3 and count_words(" a b \n") == 4  # lm-eval's re.split(r"\s+")
    from gpt2kit.tokenizer import Tokenizer
    from tests.conftest import VOCAB_DIR
    tok = Tokenizer.from_dir(VOCAB_DIR)
    ids = tok.encode("café au lait") + [tok.eot_token] + tok.encode("two words") + [tok.eot_token]
    assert stream_counts(ids, tok) == (3 + 2, len("café au lait".encode()) + len("two words"))


def test_rolling_requests_predict_every_token_once_with_a_full_last_window():
    for n, L in [(1, 8), (8, 8), (9, 8), (17, 8), (100, 8), (100, 1), (5, 128)]:
        ids = list(range(1000, 1000 + n))
        reqs = rolling_requests(ids, 50256, L)
        assert [t for _, cont in reqs for t in cont] == ids
        assert reqs[0][0] == [50256]
        for ctx, cont in reqs:
            seen = (ctx + cont)[-(L + 1):][:-1]  # what the model reads
            assert len(seen) == min(L, len(ctx) + len(cont) - 1)
        if n > L:  # the last window reads a full L tokens of context
            ctx, cont = reqs[-1]
            assert len(ctx) + len(cont) == L + 1


def test_loglikelihoods_batched_equal_one_at_a_time_and_transformers(tiny_model_dir, tokenizer):
    transformers = pytest.importorskip("transformers")
    model, _ = load_model(tiny_model_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    text = SHAKESPEARE.read_text()[:2000]
    reqs = [encode_pair(tokenizer, text[:k], text[k:k + 40]) for k in (30, 200, 700, 1500)]
    long = tokenizer.encode(text[:900])
    reqs.append((long[:-20], long[-20:]))  # longer than the context: cut on the left
    batched = loglikelihoods(model, reqs, batch_size=3)
    single = [loglikelihoods(model, [r], batch_size=1)[0] for r in reqs]
    for (a, ga), (b, gb), (ctx, cont) in zip(batched, single, reqs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
        x = torch.tensor([(ctx + cont)[-129:][:-1]])
        with torch.inference_mode():
            lp = torch.log_softmax(hf(x).logits[0, -len(cont):], -1)
        assert a == pytest.approx(lp.gather(1, torch.tensor(cont)[:, None]).sum().item(), rel=1e-4)


def test_encode_pair_moves_trailing_space_and_prefixes_eot(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Hello ", "world")
    assert ctx == tokenizer.encode("Hello") and cont == tokenizer.encode(" world")
    ctx, cont = encode_pair(tokenizer, "", " world")
    assert ctx == [tokenizer.eot_token] and cont == tokenizer.encode(" world")
    assert lambada_request("the cat sat on the mat") == ("the cat sat on the", " mat")


def _lambada_texts(model, tokenizer) -> list[str]:
    """LAMBADA-style texts, some ending in the model's own greedy word (so accuracy is neither 0 nor 1)."""
    texts = []
    for ctx in LAMBADA_CONTEXTS:
        ids = tokenizer.encode(ctx)
        with torch.inference_mode():
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        word = tokenizer.decode([nxt])
        good = word.startswith(" ") and word[1:].isalpha() and word[1:].isascii()
        texts.append(ctx + word if good and len(texts) % 2 == 0 else ctx + " sea")
    return texts


def test_cli_tasks_and_their_errors(capsys, tiny_model_dir, tmp_path):
    m = ("eval", "-m", tiny_model_dir)
    docs = tmp_path / "wiki.jsonl"
    docs.write_text("".join(json.dumps({"page": d}) + "\n" for d in WIKI_DOCS))
    code, out, _ = run(capsys, *m, "--task", "rolling", "--data", docs, "--field", "page", "--detokenize",
                       "wikitext", "--format", "jsonl")
    rec = json.loads(out)
    assert code == 0 and {"perplexity", "loss", "tokens", "word_perplexity", "byte_perplexity",
                          "bits_per_byte"} <= set(rec) and rec["documents"] == 2
    assert rec["bits_per_byte"] == pytest.approx(math.log2(rec["byte_perplexity"]))
    code, out, _ = run(capsys, *m, "--task", "rolling", "--data", docs, "--field", "page")
    assert code == 0 and out.startswith("perplexity ") and "word_perplexity" in out
    # a block longer than the context is scored in windows of the context, with a note as the default task gives
    code, out2, err = run(capsys, *m, "--task", "rolling", "--data", docs, "--field", "page", "--block-size", 500)
    assert code == 0 and out2 == out
    assert err.startswith("note: --block-size 500 is longer than the model's context; scoring windows of 128 "
                          "tokens\n")  # (then the progress bar)
    lam = tmp_path / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": c + " sea"}) + "\n" for c in LAMBADA_CONTEXTS))
    code, out, _ = run(capsys, *m, "--task", "lambada", "--data", lam, "--format", "jsonl")
    assert code == 0 and set(json.loads(out)) == {"accuracy", "perplexity", "documents"}
    ch = tmp_path / "choice.jsonl"
    ch.write_text("".join(json.dumps(c) + "\n" for c in CHOICES))
    code, out, _ = run(capsys, *m, "--task", "choice", "--data", ch, "--format", "jsonl")
    assert code == 0 and set(json.loads(out)) == {"accuracy", "accuracy_norm", "accuracy_bytes", "documents"}
    # bad input: one line, before the model loads (the model path does not exist)
    nomodel = ("eval", "-m", tmp_path / "no-model")
    bad = tmp_path / "bad.jsonl"
    for line, msg in [({"context": "x", "choices": ["a"], "label": 0}, "at least 2"),
                      ({"context": "x", "choices": ["a", "b"], "label": 2}, '"label"'),
                      ({"choices": ["a", "b"], "label": 0}, '"context"')]:
        bad.write_text(json.dumps(line) + "\n")
        code, _, err = run(capsys, *nomodel, "--task", "choice", "--data", bad)
        assert code == 1 and msg in err and err.count("\n") == 1, err
    bad.write_text('{"text": "oneword"}\n')
    code, _, err = run(capsys, *nomodel, "--task", "lambada", "--data", bad)
    assert code == 1 and "one word" in err
    for argv, msg in [(("--task", "lambada", "--data", lam, "--stride", 4), "--stride"),
                      (("--task", "choice", "--data", tmp_path / "x.txt"), "one .jsonl"),
                      (("--task", "lambada", "--data", lam, "--detokenize", "wikitext"), "--detokenize"),
                      (("--data", docs, "--detokenize", "wikitext"), "--detokenize")]:
        code, _, err = run(capsys, *nomodel, *argv)
        assert code == 1 and msg in err and err.count("\n") == 1, err


def test_eval_perplexity_reports_word_and_byte_figures(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "wiki.txt"
    data.write_text(WIKI_DOCS[0])
    code, out, _ = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--format", "jsonl")
    rec = json.loads(out)
    nll = rec["loss"] * rec["tokens"]
    assert code == 0 and rec["word_perplexity"] == pytest.approx(math.exp(nll / count_words(WIKI_DOCS[0])))
    assert rec["byte_perplexity"] == pytest.approx(math.exp(nll / len(WIKI_DOCS[0].encode())))
    code, out2, _ = run(capsys, "eval", "-m", tiny_model_dir, "--data", data, "--format", "jsonl",
                        "--detokenize", "wikitext")
    rec2 = json.loads(out2)
    assert rec2["tokens"] < rec["tokens"]  # fewer tokens once detokenized; words and bytes of the text as given
    assert rec2["word_perplexity"] == pytest.approx(math.exp(rec2["loss"] * rec2["tokens"] / count_words(WIKI_DOCS[0])))


# ---------------------------------------------------------------------------------------------------
# parity with lm-evaluation-harness itself: its `hf` model on the same weights, tasks as local YAML + JSONL

def _lm_eval(tmp_path: Path, model_dir: Path, yaml_text: str, task: str, max_length: int | None = None) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (lm_eval[hf])
    from lm_eval.tasks import TaskManager
    (tmp_path / f"{task}.yaml").write_text(yaml_text)
    args = f"pretrained={model_dir},dtype=float32" + (f",max_length={max_length}" if max_length else "")
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task], device="cpu", batch_size=4,
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False,
                                  bootstrap_iters=0)
    return out["results"][task]


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    """lm-eval runs with no network (local model, local JSON data), its datasets cache in a temporary folder."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))


@pytest.mark.parametrize("max_length", [None, 32])
def test_rolling_wikitext_equals_lm_eval(tiny_model_dir, tokenizer, tmp_path, offline, max_length):
    lm_eval = pytest.importorskip("lm_eval")
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in WIKI_DOCS))
    # lm-eval's own wikitext detokenizer and word/byte counts, beside a task reading our file
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py", tmp_path)
    theirs = _lm_eval(tmp_path, tiny_model_dir, f"""
task: gk_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", "gk_wikitext", max_length)
    model, _ = load_model(tiny_model_dir)
    ours = rolling(model, tokenizer, WIKI_DOCS, block_size=max_length, batch_size=3, detokenize="wikitext")
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert getattr(ours, key) == pytest.approx(theirs[f"{key},none"], rel=1e-3), key
    # ... and lm-eval's detokenizer itself
    spec = importlib.util.spec_from_file_location("preprocess_wikitext", tmp_path / "preprocess_wikitext.py")
    theirs_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs_mod)
    assert all(wikitext_detokenize(d) == theirs_mod.wikitext_detokenizer({"page": d}) for d in WIKI_DOCS)


def test_lambada_equals_lm_eval(tiny_model_dir, tokenizer, tmp_path, offline):
    model, _ = load_model(tiny_model_dir)
    texts = _lambada_texts(model, tokenizer)
    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    theirs = _lm_eval(tmp_path, tiny_model_dir, f"""
task: gk_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", "gk_lambada")
    ours = lambada(model, tokenizer, texts, batch_size=4)
    assert 0 < ours.accuracy < 1
    assert ours.accuracy == theirs["acc,none"]
    assert ours.perplexity == pytest.approx(theirs["perplexity,none"], rel=1e-3)


def test_choice_equals_lm_eval(tiny_model_dir, tokenizer, tmp_path, offline):
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHOICES))
    theirs = _lm_eval(tmp_path, tiny_model_dir, f"""
task: gk_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
""", "gk_choice")
    model, _ = load_model(tiny_model_dir)
    ours = choice(model, tokenizer, [ChoiceItem(**c) for c in CHOICES], batch_size=3)
    assert (ours.accuracy, ours.accuracy_norm, ours.accuracy_bytes) == \
        (theirs["acc,none"], theirs["acc_norm,none"], theirs["acc_bytes,none"])


def test_bad_requests_are_clear(tiny_model_dir, tokenizer):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(Gpt2kitError, match="longer than the window"):
        loglikelihoods(model, [([1], list(range(200)))])
    with pytest.raises(Gpt2kitError, match="batch size"):
        loglikelihoods(model, [([1], [2])], batch_size=0)
