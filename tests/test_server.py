"""The HTTP API on 127.0.0.1, driven by the official openai client (and httpx for raw requests): plain and
streaming completions equal to Generator's, n > 1, stops, logprobs, echo, keys, malformed and oversize
input, the queue limit, disconnects, and many concurrent requests."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gpt2kit.checkpoints import load_model  # noqa: E402
from gpt2kit.generate import GenerationConfig, Generator  # noqa: E402
from gpt2kit.server import BackgroundServer, ServerSettings, create_app  # noqa: E402

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"  # ../shared/data from the root
KEY = "test-key"


@pytest.fixture(scope="module")
def reference(tiny_dir) -> Generator:
    return Generator(*load_model(tiny_dir))  # its own copy: the server's thread owns the other


def start(tiny_dir, **settings) -> BackgroundServer:
    model, tok = load_model(tiny_dir)
    srv = BackgroundServer(create_app(model, tok, ServerSettings(model_name="tiny", **settings)))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = start(tiny_dir, api_key=KEY, max_batch=4, max_n=8, max_tokens=200, max_body_bytes=64 * 1024,
                max_prompt_tokens=100)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ref_text(gen: Generator, prompt, nsamples: int = 1, **kw) -> list[str]:
    return [c.text for c in gen.generate(prompt, GenerationConfig(**kw), nsamples=nsamples)]


def post(server, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not isinstance(body, dict):  # raw bytes, text or an iterator of chunks
        return httpx.post(server.url + "/v1/completions", content=body,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60, **kw)
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60, **kw)


def post_to(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"]
    return err


# ---- completions ------------------------------------------------------------------------------------

def test_plain_completion_equals_generate(client, reference):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=20, temperature=0.8,
                                  seed=42, extra_body={"top_k": 40})
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-") and r.created > 0
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    want = ref_text(reference, "Hello there", max_new_tokens=20, temperature=0.8, seed=42, top_k=40)
    assert c.text == want[0]
    prompt_tokens = len(reference.tokenizer.encode("Hello there"))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 20


def test_streaming_equals_plain(client, server):
    args = {"model": "tiny", "prompt": "Streaming test", "max_tokens": 30, "temperature": 1.0, "seed": 7,
                "extra_body": {"min_p": 0.01, "repetition_penalty": 1.2}}
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2  # text arrived in pieces
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the raw stream is server-sent events ending with [DONE]
    body = {"model": "tiny", "prompt": "Streaming test", "max_tokens": 30, "temperature": 1.0, "seed": 7,
            "min_p": 0.01, "repetition_penalty": 1.2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == text
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_streamed_choices_of_one_request_arrive_whole_and_in_order(server, client):
    # several rows share a stream: the events of one engine step go out in one write, each a whole event
    args = {"model": "tiny", "prompt": ["One", "Two words"], "n": 3, "max_tokens": 25, "temperature": 1.0,
            "seed": 5}
    plain = client.completions.create(**args)
    body = {**args, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        raw = b"".join(r.iter_bytes())
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    texts, finishes = [""] * 6, [[] for _ in range(6)]
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["text"]
        finishes[ch["index"]].append(ch["finish_reason"])
    assert texts == [c.text for c in plain.choices]
    assert all(f[-1] is not None and set(f[:-1]) <= {None} for f in finishes)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.usage.model_dump(exclude_none=True)


def test_n_and_prompt_lists_follow_generate_numbering(client, reference):
    r = client.completions.create(model="tiny", prompt=["First prompt", "Second"], n=3, max_tokens=12,
                                  temperature=1.0, seed=9)
    assert [c.index for c in r.choices] == list(range(6))
    # choice i * n + j is sample j of prompt i, seeded like Generator.generate(prompts, nsamples=n)
    ref = ref_text(reference, ["First prompt", "Second"], nsamples=3, max_new_tokens=12, temperature=1.0,
                   seed=9)
    assert [c.text for c in r.choices] == ref
    assert len(set(ref)) == 6


def test_token_id_prompts(client, reference):
    ids = reference.tokenizer.encode("Token ids work")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref_text(reference, "Token ids work", max_new_tokens=8, temperature=0)[0]


def test_token_id_prompt_forms_echo_and_usage(client, reference):
    tok = reference.tokenizer
    texts = ["Token ids work", "and lists of them"]
    ids = [tok.encode(t) for t in texts]
    want = ref_text(reference, texts, max_new_tokens=6, temperature=0)
    # a list of lists of ids: one prompt each, as a list of strings would be
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, echo=True, logprobs=0)
    assert [c.text for c in r.choices] == [t + w for t, w in zip(texts, want)]
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    assert r.usage.completion_tokens == sum(len(tok.encode(w)) for w in want)  # every greedy token kept
    assert r.choices[1].logprobs.tokens[:len(ids[1])] == [tok.decode([t]) for t in ids[1]]
    # streamed, and a single prompt of ids (with the special token as an id) echoes its text
    chunks = list(client.completions.create(model="tiny", prompt=[tok.eot_token] + ids[0], max_tokens=6,
                                            temperature=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks).startswith("<|endoftext|>" + texts[0])


def test_tokenize_and_detokenize(server, reference):
    tok = reference.tokenizer
    text = "Hello world<|endoftext|> again"
    r = post_to(server, "/tokenize", {"model": "tiny", "prompt": text, "add_special_tokens": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got == {"count": len(tok.encode(text)), "max_model_len": 128, "tokens": tok.encode(text),
                   "token_strs": None}
    assert tok.eot_token in got["tokens"]  # as /v1/completions reads a prompt
    r = post_to(server, "/tokenize", {"prompt": "Hi there", "return_token_strs": True})
    assert r.json()["token_strs"] == ["Hi", " there"]
    r = post_to(server, "/detokenize", {"model": "tiny", "tokens": got["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    assert post_to(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    # errors: OpenAI's object
    for bad in (50257, -1):
        err = assert_error(post_to(server, "/detokenize", {"tokens": [1, bad]}), 400, "outside the vocabulary",
                           "[0, 50257)")
        assert err["param"] == "tokens"
    assert_error(post_to(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}), 400,
                 "no chat template")
    assert_error(post_to(server, "/tokenize", {}), 400, "needs \"prompt\"")
    assert_error(post_to(server, "/tokenize", {"prompt": 3}), 422, "prompt")
    assert_error(post_to(server, "/detokenize", {"tokens": "1 2"}), 422, "tokens")
    assert_error(post_to(server, "/tokenize", {"model": "gpt-4", "prompt": "x"}), 404, "gpt-4")
    assert_error(post_to(server, "/tokenize", {"prompt": "x"}, key=None), 401)


def test_best_of_returns_the_n_most_likely(client, reference):
    prompt = "Best of several"
    cands = reference.generate(prompt, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=3, logprobs=0),
                               nsamples=4)
    scores = [sum(i.logprob for i in c.token_info) for c in cands]
    ranked = [c.text for _, c in sorted(zip(scores, cands), key=lambda x: -x[0])]
    assert len(set(ranked)) == 4
    # two prompts: candidates k = i * best_of + j are Generator's samples (prompts, nsamples=best_of)
    both = reference.generate([prompt, "Second"], GenerationConfig(max_new_tokens=10, temperature=1.0, seed=3,
                                                                   logprobs=0), nsamples=4)
    want = []
    for i in range(2):
        group = both[4 * i:4 * i + 4]
        want += [c.text for c in sorted(group, key=lambda c: -sum(t.logprob for t in c.token_info))[:2]]
    assert want[:2] == ranked[:2]
    r = client.completions.create(model="tiny", prompt=[prompt, "Second"], n=2, best_of=4, max_tokens=10,
                                  temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == want  # each prompt's two best, best first
    assert all(c.logprobs is None for c in r.choices)  # ranked by logprobs, reported only when asked
    assert r.usage.completion_tokens == sum(len(c.tokens) for c in both)  # every candidate is generated
    r = client.completions.create(model="tiny", prompt=prompt, best_of=4, max_tokens=10, temperature=1.0, seed=3,
                                  logprobs=1)
    assert r.choices[0].text == ranked[0]
    assert sum(r.choices[0].logprobs.token_logprobs) == pytest.approx(max(scores), abs=1e-4)
    r = client.completions.create(model="tiny", prompt=[prompt, "Second"], n=2, best_of=4, max_tokens=10,
                                  temperature=1.0, seed=3, echo=True)
    assert [c.text for c in r.choices] == [prompt + want[0], prompt + want[1], "Second" + want[2],
                                           "Second" + want[3]]
    # best_of == n streams as before
    chunks = list(client.completions.create(model="tiny", prompt=prompt, best_of=1, max_tokens=10,
                                            temperature=1.0, seed=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cands[0].text


def test_stop_sequences(client, reference):
    full = ref_text(reference, "Stop here", max_new_tokens=40, temperature=0)[0]
    stop = full[10:13]
    r = client.completions.create(model="tiny", prompt="Stop here", max_tokens=40, temperature=0,
                                  stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    # streamed: the held-back text never leaks the stop string
    chunks = client.completions.create(model="tiny", prompt="Stop here", max_tokens=40, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Log probs", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and p <= 0
        assert max(top.values()) == pytest.approx(p)  # greedy took the most likely token
        assert top[tok] == pytest.approx(p)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_echo_and_prompt_scoring(client, reference):
    prompt = "Score this sentence please"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    n = len(reference.tokenizer.encode(prompt))
    assert len(c.logprobs.tokens) == n and c.logprobs.token_logprobs[0] is None
    assert all(p < 0 for p in c.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, temperature=0)
    assert r.choices[0].text == prompt + ref_text(reference, prompt, max_new_tokens=5, temperature=0)[0]


def test_models_health_and_schema(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny" and h["limits"]["max_batch"] == 4
    r = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    schema = r.json()
    assert "/v1/completions" in schema["paths"] and "/v1/models" in schema["paths"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "top_k", "repetition_penalty", "stream"} <= set(props)


# ---- errors -----------------------------------------------------------------------------------------

def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_error(post(server, {"prompt": "x"}, key=None), 401, "missing API key")
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def test_malformed_json(server):
    err = assert_error(post(server, b'{"prompt": "x", '), 400, "not valid JSON")
    assert err["code"] == "invalid_json"


def test_schema_errors_are_422(server, client):
    err = assert_error(post(server, {"prompt": "x", "max_tokens": "lots"}), 422, "max_tokens")
    assert err["param"] == "max_tokens"
    err = assert_error(post(server, {"prompt": 3}), 422, "prompt must be one of")
    assert_error(post(server, {"prompt": "x", "top_kk": 3}), 422, "unrecognized request argument: top_kk")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="x", extra_body={"temperature": "hot"})
    # wrong types are refused, not coerced: numbers in strings, strings and numbers for flags, flags for numbers
    for field, value in (("max_tokens", "3"), ("stream", "yes"), ("echo", 1), ("logprobs", True), ("n", 2.0),
                         ("temperature", "0.5")):
        err = assert_error(post(server, {"prompt": "x", field: value}), 422, field)
        assert err["param"] == field
    # JSON's 1e400 is an infinite float: no temperature
    err = assert_error(post(server, b'{"prompt": "x", "temperature": 1e400}'), 422, "temperature", "finite")
    r = post(server, {"prompt": "x", "max_tokens": 2, "temperature": 1, "top_p": 1})  # ints serve as floats
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, words", [
    ({"temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
    ({"top_p": 0}, "top_p", "top-p"),
    ({"top_k": -2}, "top_k", "top-k"),
    ({"typical_p": 0}, "typical_p", "typical-p"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition penalty"),
    ({"stop": [""]}, "stop", "stop string"),
    ({"seed": -5}, "seed", "seed"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
    ({"max_tokens": 201}, "max_tokens", "limit of 200"),
    ({"n": 9}, "n", "at most 8"),
    ({"n": 0}, "n", "n must be >= 1"),
    ({"logprobs": 21}, "logprobs", "logprobs must be in"),
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": [50257]}, "prompt", "token ids"),
    ({"prompt": "word " * 150}, "prompt", "at most 100"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency penalty must be in [-2, 2]"),
    ({"logit_bias": {"50257": 1}}, "logit_bias", "token ids in [0, 50257)"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"bad_words": [" "]}, "bad_words", "bad word"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", "no-repeat n-gram size"),
    ({"min_tokens": -1}, "min_tokens", "min tokens"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens", "must not exceed"),
    ({"best_of": 1, "n": 2}, "best_of", "best_of must be >= n"),
    ({"best_of": 0}, "best_of", "best_of must be >= 1"),
    ({"best_of": 2, "stream": True}, "best_of", "cannot be used with stream"),
    ({"best_of": 9}, "best_of", "at most 8"),
    ({"prompt": ["a", "b", "c"], "n": 2, "best_of": 3}, "best_of", "at most 8"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty prompt"),
    ({"prompt": [[1, 2], [3, -1]]}, "prompt", "token ids"),
    ({"prompt": [[50257]]}, "prompt", "token ids"),
])
def test_invalid_values_are_400(server, body, param, words):
    err = assert_error(post(server, {"prompt": "x", **body}), 400, words)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_logits_controls_are_accepted_and_act_as_in_generate(client, reference):
    # OpenAI's fields as the openai client sends them, and gpt2kit's extras via extra_body; each choice equals
    # Generator's text with the same controls
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0, seed=1,
                                  presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"13": -100},
                                  extra_body={"no_repeat_ngram_size": 2, "bad_words": ["the"], "min_tokens": 12})
    cfg = dict(max_new_tokens=12, temperature=0, seed=1, presence_penalty=1.5, frequency_penalty=0.5,
               logit_bias={13: -100}, no_repeat_ngram_size=2, bad_words=("the",), min_tokens=12)
    assert [c.text for c in r.choices] == ref_text(reference, "Hello there", **cfg)
    assert r.choices[0].text != ref_text(reference, "Hello there", max_new_tokens=12, temperature=0)[0]
    # logit_bias 100 forces a token
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=1, seed=2,
                                  logit_bias={"50": 100})
    assert r.choices[0].text == "SSS"


def test_ignore_eos_runs_past_endoftext_to_max_tokens(server, client):
    # logit_bias makes <|endoftext|> the likeliest token: it ends a completion at once, unless ignore_eos
    body = dict(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logit_bias={"50256": 100})
    c = client.completions.create(**body).choices[0]
    assert c.text == "" and c.finish_reason == "stop"
    r = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "<|endoftext|>" * 4 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    err = assert_error(post(server, {"prompt": "x", "ignore_eos": "yes"}), 422)
    assert "ignore_eos" in err["message"]


def test_oversize_inputs(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 150, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    # a body over --max-body: refused from its Content-Length before it is read
    err = assert_error(post(server, json.dumps({"prompt": "x" * 70_000})), 413, "limit of 65536 bytes")
    assert err["code"] == "request_too_large"
    # ... and when it comes chunked, without a Content-Length
    body = json.dumps({"prompt": "x" * 70_000}).encode()
    r = post(server, iter([body[i:i + 8192] for i in range(0, len(body), 8192)]))
    assert_error(r, 413, "limit")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt=["y" * 30_000] * 3, max_tokens=1)
    assert e.value.status_code == 413
    assert client.completions.create(model="tiny", prompt="still fine", max_tokens=2).choices  # server is up


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_chat_endpoint_says_to_use_completions(server, client):
    # the openai client's chat.completions: GPT-2 has no chat format, and the error says what to use instead
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.body["message"] and e.value.body["code"] == "unsupported_endpoint"


def test_body_that_is_not_a_json_object(server):
    # curl -d without -H 'Content-Type: application/json' sends a form: the error names the missing header
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert_error(r, 422, "JSON object", "Content-Type: application/json")
    err = assert_error(post(server, "[1, 2]"), 422, "the request body must be a JSON object")
    assert "Content-Type" not in err["message"]


# ---- load -------------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_and_exact(client, server, reference):
    prompts = [f"Request number {i} says" for i in range(16)]
    go = threading.Barrier(16)  # all at once

    def one(i: int) -> str:
        go.wait()
        if i % 2:  # greedy
            r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=60, temperature=0)
            return r.choices[0].text
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=60, temperature=1.0,
                                      seed=i, stream=True)
        return "".join(c.choices[0].text for c in r)

    before = httpx.get(server.url + "/health").json()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    want = [ref_text(reference, p, max_new_tokens=60, temperature=0)[0] if i % 2 else
            ref_text(reference, p, max_new_tokens=60, temperature=1.0, seed=i)[0]
            for i, p in enumerate(prompts)]
    assert got == want  # batched text == unbatched text, greedy and seeded
    after = httpx.get(server.url + "/health").json()
    assert after["completed"] - before["completed"] == 16
    assert after["active"] == 0 and after["queued"] == 0
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert steps < tokens / 2  # forward passes were shared (max batch 4)


@pytest.fixture(scope="module")
def one_row_server(tiny_dir):
    srv = start(tiny_dir, max_batch=1, max_queue=1)
    yield srv
    srv.stop()


def wait_idle(srv, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(srv.url + "/health").json()
        if h["active"] + h["queued"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return h


def test_full_queue_answers_429(one_row_server):
    srv = one_row_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    long = {"model": "tiny", "prompt": "long", "max_tokens": 1000, "stream": True, "extra_body": {"min_tokens": 1000}}
    first = client.completions.create(**long)  # takes the only row
    next(iter(first))
    second = client.completions.create(**long)  # waits in the queue
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").json()["queued"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.code == "queue_full"
    first.close()
    second.close()
    h = wait_idle(srv)  # both slots come back
    assert h["active"] == 0 and h["queued"] == 0
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_disconnect_mid_stream_frees_the_slot(one_row_server):
    srv = one_row_server
    before = httpx.get(srv.url + "/health").json()["tokens"]
    with httpx.stream("POST", srv.url + "/v1/completions",
                      json={"prompt": "go on", "max_tokens": 1000, "min_tokens": 1000, "stream": True}) as r:
        lines = r.iter_lines()  # keep it: a dropped iterator closes the connection
        next(ln for ln in lines if ln.startswith("data: "))
        assert httpx.get(srv.url + "/health").json()["active"] == 1
    # the connection is closed here, mid-stream
    h = wait_idle(srv)
    assert h["active"] == 0 and h["tokens"] - before < 1000


def test_client_giving_up_frees_the_slot(tiny_dir):
    # a completion far longer than the tiny model makes in 0.5 s on any machine (~2,000 tokens a second alone
    # on two quiet cores, so the default --max-tokens of 1,024 could finish before the client gives up)
    srv = start(tiny_dir, max_batch=1, max_queue=1, max_tokens=100_000)
    try:
        before = httpx.get(srv.url + "/health").json()["tokens"]
        with pytest.raises(httpx.TimeoutException):  # a non-streaming request whose client leaves
            # min_tokens: a random model draws <|endoftext|> about once in 50,257 tokens, often enough to end
            # the completion before 0.5 s in about one run in fifty
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"prompt": "wait", "max_tokens": 100_000, "min_tokens": 100_000})
        h = wait_idle(srv)
        assert h["active"] == 0 and h["tokens"] - before < 100_000
    finally:
        srv.stop()


def test_request_timeout_ends_with_length(tiny_dir):
    srv = start(tiny_dir, request_timeout=0.3, max_tokens=100_000)  # (more than 0.3 s of tokens anywhere)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt="x", max_tokens=100_000,
                                       extra_body={"min_tokens": 100_000})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens < 100_000
    finally:
        srv.stop()


def test_a_request_that_times_out_in_the_queue_is_503(tiny_dir):
    model, tok = load_model(tiny_dir)
    app = create_app(model, tok, ServerSettings(model_name="tiny", max_batch=1, request_timeout=0.3))
    srv = BackgroundServer(app)
    srv.start()
    long = GenerationConfig(max_new_tokens=100_000, stop_at_eot=False)
    hog = app.state.engine.submit(tok.encode("x"), long)  # the only row
    try:
        next(hog)
        # waits in the queue for its whole timeout: an error, not an empty 200 "length" completion
        r = post(srv, {"prompt": "y", "max_tokens": 5}, key=None)
        err = assert_error(r, 503, "waited its whole timeout of 0.3 s (--request-timeout)", "--max-batch")
        assert err["code"] == "queue_timeout" and err["type"] == "server_error"
        assert r.headers["retry-after"] == "1"
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": "z", "max_tokens": 5, "n": 2, "stream": True}) as resp:
            lines = [ln for ln in resp.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and len(lines) == 2  # no empty "length" choices before the error
        assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == "queue_timeout"
        assert httpx.get(srv.url + "/health").json()["queued"] == 0
    finally:
        hog.cancel()
        srv.stop()


def test_a_model_the_server_does_not_serve_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    assert "`gpt-4` does not exist" in e.value.body["message"] and "`tiny`" in e.value.body["message"]
    err = assert_error(httpx.get(server.url + "/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert err["code"] == "model_not_found"
    # the served id, and no "model" at all (the playground and curl examples leave it out), are served
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).model == "tiny"
    assert post(server, {"prompt": "x", "max_tokens": 1}).json()["model"] == "tiny"


def test_aliases_of_the_served_model_are_accepted(tiny_dir):
    srv = start(tiny_dir, model_aliases=["runs/tiny", "org/tiny"])
    try:
        for name in ("tiny", "runs/tiny", "org/tiny"):
            r = post(srv, {"model": name, "prompt": "x", "max_tokens": 1}, key=None)
            assert r.status_code == 200 and r.json()["model"] == "tiny"
            assert httpx.get(f"{srv.url}/v1/models/{name}").json()["id"] == "tiny"
        assert_error(post(srv, {"model": "runs/other", "prompt": "x", "max_tokens": 1}, key=None), 404)
    finally:
        srv.stop()


@pytest.mark.parametrize("settings, words", [
    (dict(api_key=""), "the API key is empty"),
    (dict(request_timeout=float("nan")), "the request timeout must be a finite number of seconds > 0, got nan"),
    (dict(request_timeout=float("inf")), "got inf"),
])
def test_settings_that_would_weaken_the_server_are_refused(tiny_dir, settings, words):
    from gpt2kit.errors import Gpt2kitError

    model, tok = load_model(tiny_dir)
    with pytest.raises(Gpt2kitError, match=words):
        create_app(model, tok, ServerSettings(**settings))


def test_shutdown_answers_the_requests_in_flight(tiny_dir):
    """Stopping the server while a stream runs and a request waits: once the grace period is nearly over,
    both get an answer (503 shutting_down; an error event then [DONE]), not a cut connection."""
    model, tok = load_model(tiny_dir)
    forward = model.forward

    def paced(*args, **kwargs):  # 1000 tokens take far longer than the grace period
        time.sleep(0.01)
        return forward(*args, **kwargs)

    model.forward = paced
    srv = BackgroundServer(create_app(model, tok, ServerSettings(model_name="tiny", max_batch=1)), grace=1.5)
    url = srv.start()
    got: dict = {}

    def streamed():
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "a", "max_tokens": 1000, "min_tokens": 1000, "stream": True}) as r:
            got["stream"] = [ln for ln in r.iter_lines() if ln]

    def plain():
        got["plain"] = httpx.post(url + "/v1/completions", timeout=30,
                                  json={"prompt": "b", "max_tokens": 1000, "min_tokens": 1000})

    threads = [threading.Thread(target=streamed), threading.Thread(target=plain)]
    for t, key in zip(threads, ("active", "queued")):
        t.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()[key] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop()
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 10
    err = assert_error(got["plain"], 503, "shutting down")
    assert err["code"] == "shutting_down"
    lines = got["stream"]
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
