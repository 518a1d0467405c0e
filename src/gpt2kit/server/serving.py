"""Serving completions: a request checked against the server's limits and turned into engine submissions
(one row per choice), the engine's deltas accumulated into OpenAI's response (text, logprobs, usage) or
streamed as server-sent events, and engine errors mapped to HTTP statuses."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from gpt2kit.decode import Delta, GenerationConfig, TokenInfo
from gpt2kit.errors import Gpt2kitError
from gpt2kit.server.engine import BatchEngine, EngineClosed, QueueFull, QueueTimeout, Stream
from gpt2kit.server.protocol import (
    APIError,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
)
from gpt2kit.tokenizer import Tokenizer


@dataclass
class ServerSettings:
    model_name: str = "gpt2"  # the id /v1/models reports and responses carry
    model_aliases: list[str] = field(default_factory=list)  # other ids a request may name it by
    api_key: str | None = None  # when set, every endpoint but /health and / needs `Bearer KEY`
    max_batch: int = 8  # cache rows decoded together (used when create_app builds the engine)
    max_queue: int = 64  # completions waiting for a row before requests get 429
    max_len: int | None = None  # cache positions per row; None: the model's context
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 1024  # most tokens one completion may generate
    max_n: int = 16  # most completions per request (prompts x n)
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0  # seconds; then running completions end with finish_reason "length",
    # and a request still waiting for a row gets 503
    max_logprobs: int = 20
    max_stop: int = 16
    cors_origins: list[str] = field(default_factory=list)


def check_settings(s: ServerSettings) -> None:
    """Refuse settings that would quietly weaken the server: an empty API key (no authentication at all),
    a request timeout that is not a positive number of seconds (NaN or infinity never times out)."""
    if s.api_key is not None and not s.api_key.strip():
        raise Gpt2kitError("the API key is empty, which would let anyone in: give a key (for example "
                           "`openssl rand -hex 16`), or none at all to serve without authentication")
    if s.api_key is not None and s.api_key != s.api_key.strip():
        raise Gpt2kitError("the API key begins or ends with whitespace, which no client's header keeps: "
                           "remove it")
    if not (isinstance(s.request_timeout, (int, float)) and math.isfinite(s.request_timeout)
            and s.request_timeout > 0):
        raise Gpt2kitError(f"the request timeout must be a finite number of seconds > 0, got "
                           f"{s.request_timeout} (use a large one, such as 86400, for long requests)")


# words in GenerationConfig.validate()'s messages -> the request field they are about
_PARAM_WORDS = (("presence penalty", "presence_penalty"), ("frequency penalty", "frequency_penalty"),
                ("logit bias", "logit_bias"), ("bad word", "bad_words"), ("no-repeat n-gram", "no_repeat_ngram_size"),
                ("min tokens", "min_tokens"),
                ("temperature", "temperature"), ("top-k", "top_k"), ("top-p", "top_p"), ("min-p", "min_p"),
                ("typical-p", "typical_p"),
                ("repetition penalty", "repetition_penalty"), ("stop string", "stop"),
                ("length", "max_tokens"), ("seed", "seed"), ("logprobs", "logprobs"), ("prompt", "prompt"))


def library_error(e: Gpt2kitError) -> APIError:
    msg = str(e)
    param = next((p for word, p in _PARAM_WORDS if word in msg), None)
    return bad_request(msg, param)


def engine_error(e: Gpt2kitError) -> APIError:
    """An error that ends a request the engine had accepted: 503 for the server's state (shutting down,
    busy past the request's timeout), which a client may retry; 500 for a failure inside the model."""
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), "server_error", code="shutting_down")
    if isinstance(e, QueueTimeout):
        return APIError(503, str(e), "server_error", code="queue_timeout", headers={"Retry-After": "1"})
    return APIError(500, str(e), "server_error")


class CompletionServing:
    """POST /v1/completions over one engine: check the request against the settings' limits, submit its
    choices, and answer with the whole response or a stream of server-sent events."""

    def __init__(self, engine: BatchEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        ctx = engine.model.config.n_positions
        if settings.max_prompt_tokens is not None and settings.max_prompt_tokens > ctx:
            raise Gpt2kitError(f"--max-prompt-tokens {settings.max_prompt_tokens} is longer than the model's context "
                               f"of {ctx} tokens: give at most {ctx}, or leave it out for the whole context")
        self.max_prompt = settings.max_prompt_tokens or ctx

    async def create_completion(self, req: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        engine, s = self.engine, self.settings
        plan = plan_request(req, engine.tokenizer, engine, s, self.max_prompt)
        try:
            stream = engine.submit_many(plan.rows, plan.cfg, timeout=s.request_timeout,
                                        prompt_logprobs=plan.prompt_logprobs)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        except Gpt2kitError as e:
            raise library_error(e) from None
        out = _Output(plan, engine.tokenizer, s.model_name)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(out, stream, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, stream))
        try:
            async for d in stream:
                out.add(d, stream)
        except Gpt2kitError as e:
            raise engine_error(e) from None
        finally:
            watcher.cancel()
            stream.cancel()  # no-op when finished; frees the rows if this task was cancelled
        return out.response()


async def _cancel_on_disconnect(request: Request, stream: Stream) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            stream.cancel()
            return


# ---- /tokenize and /detokenize ----------------------------------------------------------------------

def tokenize(req: TokenizeRequest, tok: Tokenizer, max_model_len: int) -> dict[str, Any]:
    """vLLM's POST /tokenize: the prompt's token ids as /v1/completions would read them (`<|endoftext|>` in
    the text is the special token). The chat form (`messages`) is refused: GPT-2 has no chat template."""
    if req.messages is not None:
        raise bad_request("messages (the chat form of /tokenize) is not supported: GPT-2 has no chat template; "
                          "send the text as \"prompt\"", "messages")
    chat_only = [f for f in ("add_generation_prompt", "continue_final_message", "chat_template")
                 if getattr(req, f) is not None]
    if chat_only:
        raise bad_request(f"{chat_only[0]} belongs to the chat form of /tokenize, which GPT-2 has no template "
                          "for; send only \"prompt\"", chat_only[0])
    if req.prompt is None:
        raise bad_request("/tokenize needs \"prompt\": the text to tokenize", "prompt")
    ids = tok.encode(req.prompt)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}
    if req.return_token_strs:
        out["token_strs"] = [token_str(tok, t) for t in ids]
    return out


def detokenize(req: DetokenizeRequest, tok: Tokenizer, n_vocab: int) -> dict[str, Any]:
    """vLLM's POST /detokenize: token ids -> {"prompt": text}; an id outside the vocabulary is a 400."""
    bad = [t for t in req.tokens if not 0 <= t < n_vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary: ids must be in [0, {n_vocab})", "tokens")
    return {"prompt": tok.decode(req.tokens)}


# ---- request -> engine work ---------------------------------------------------------------------------

@dataclass
class Plan:
    prompts: list[list[int]]  # token ids per prompt
    n: int
    cfg: GenerationConfig
    echo: bool
    logprobs: int | None
    prompt_logprobs: int | None
    best_of: int = 0  # completions generated per prompt (0: n); the n best of them are returned
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")

    @property
    def per_prompt(self) -> int:
        return max(self.best_of, self.n)

    @property
    def rows(self) -> list[tuple[list[int], int]]:
        # choice k = prompt i, sample j with k = i * n + j, seeded (seed, k): Generator.generate's numbering
        # (with best_of, the candidates are numbered so: k = i * best_of + j)
        k = self.per_prompt
        return [(ids, i * k + j) for i, ids in enumerate(self.prompts) for j in range(k)]


def plan_request(req: CompletionRequest, tok: Tokenizer, engine: BatchEngine, s: ServerSettings,
          max_prompt: int) -> Plan:
    # unsupported OpenAI options fail loudly rather than being ignored
    if req.suffix:
        raise bad_request("suffix (insertion) is not supported by GPT-2", "suffix")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise bad_request(f"n must be >= 1, got {n}", "n")
    best_of = check_best_of(req, n)
    echo = bool(req.echo)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise bad_request(f"max_tokens must be >= 1 (0 only with echo, to score the prompt), got {max_tokens}",
                   "max_tokens")
    if max_tokens > s.max_tokens:
        raise bad_request(f"max_tokens {max_tokens} is over this server's limit of {s.max_tokens} (--max-tokens)",
                   "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= s.max_logprobs:
        raise bad_request(f"logprobs must be in [0, {s.max_logprobs}], got {req.logprobs}", "logprobs")
    if max_tokens == 0 and req.logprobs is None:
        raise bad_request("max_tokens 0 (scoring the prompt) needs logprobs", "logprobs")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > s.max_stop:
        raise bad_request(f"at most {s.max_stop} stop sequences, got {len(stop)}", "stop")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise bad_request(f"seed must be in [0, 2**63), got {req.seed}", "seed")

    vocab = engine.n_vocab  # ids past the tokenizer's (a padded vocabulary) have no text
    logit_bias: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        # OpenAI's keys are token ids written as strings
        if not (key.isascii() and key.isdigit() and len(key) < 10) or int(key) >= vocab:
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab}) written as strings, got {key!r}",
                              "logit_bias")
        logit_bias[int(key)] = bias
    if len(req.bad_words or ()) > s.max_stop:
        raise bad_request(f"at most {s.max_stop} bad_words, got {len(req.bad_words or ())}", "bad_words")

    p = req.prompt
    if isinstance(p, str):
        texts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [list(p)]  # one prompt given as token ids
    else:
        texts = list(p)
    if not texts:
        raise bad_request("prompt is an empty list", "prompt")
    if len(texts) * best_of > s.max_n:
        what = f"n={n}" if best_of == n else f"best_of={best_of}"
        raise bad_request(f"{len(texts)} prompt(s) x {what} is {len(texts) * best_of} completions; this server "
                          f"allows at most {s.max_n} per request (--max-n)", "n" if best_of == n else "best_of")
    prompts: list[list[int]] = []
    for t in texts:
        if isinstance(t, str):
            if t == "":
                raise bad_request("empty prompt: give some text, or leave prompt out to start from <|endoftext|>",
                           "prompt")
            ids = tok.encode(t)
        else:
            ids = list(t)
            if not ids:
                raise bad_request("empty prompt: an empty list of token ids", "prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(ids) > max_prompt:
            raise bad_request(f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt} "
                       "(--max-prompt-tokens)", "prompt", "context_length_exceeded")
        prompts.append(ids)

    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0,
        typical_p=1.0 if req.typical_p is None else req.typical_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=stop,
        stop_at_eot=not req.ignore_eos,
        seed=req.seed,
        logprobs=req.logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias,
        bad_words=tuple(req.bad_words or ()),
        no_repeat_ngram_size=req.no_repeat_ngram_size or 0,
        min_tokens=req.min_tokens or 0,
    )
    if best_of > n and cfg.logprobs is None:
        cfg = replace(cfg, logprobs=0)  # best_of ranks by the tokens' logprobs (not reported unless asked)
    try:
        cfg.validate() if max_tokens else (cfg.sampling.validate(), cfg.processing.validate())
    except Gpt2kitError as e:
        raise library_error(e) from None
    return Plan(prompts, n, cfg, echo, req.logprobs, req.logprobs if echo else None, best_of)


def check_best_of(req: CompletionRequest, n: int) -> int:
    """best_of as OpenAI defines it: best_of completions per prompt generated, the n with the highest summed
    log-probability returned; n <= best_of; not with stream (OpenAI refuses that too). -> completions to
    generate per prompt."""
    if req.best_of is None:
        return n
    if req.best_of < 1:
        raise bad_request(f"best_of must be >= 1, got {req.best_of}", "best_of")
    if req.best_of < n:
        raise bad_request(f"best_of must be >= n: best_of={req.best_of} completions cannot give n={n} best ones",
                          "best_of")
    if req.best_of > n and req.stream:
        raise bad_request("best_of cannot be used with stream: the best completions are known only when all "
                          "have finished; leave out best_of (or set it to n) to stream", "best_of")
    return req.best_of


# ---- engine deltas -> OpenAI objects ------------------------------------------------------------------

def token_str(tok: Tokenizer, token: int) -> str:
    """A token as OpenAI's logprobs show it: its text, or `bytes:\\xNN` for part of a UTF-8 character."""
    b = tok.token_bytes(token)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class _Choice:
    def __init__(self) -> None:
        self.text = ""
        self.offset = 0  # text_offset of the next token
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.finish_reason: str | None = None
        self.n_tokens = 0
        self.score = 0.0  # summed log-probability of the generated tokens (best_of ranks by it)


class _Output:
    """Accumulates deltas into choices; builds the response or each stream chunk."""

    def __init__(self, plan: Plan, tok: Tokenizer, model_name: str):
        self.plan, self.tok, self.model_name = plan, tok, model_name
        self.choices = [_Choice() for _ in plan.rows]
        self.started = [False] * len(self.choices)

    def _logprob_entries(self, c: _Choice, tokens: list[int],
                         infos: list[TokenInfo | None]) -> dict[str, list]:
        part: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, info in zip(tokens, infos):
            s = token_str(self.tok, token)
            top = None if info is None else {token_str(self.tok, t): lp for t, lp in info.top}
            for key, val in (("tokens", s), ("token_logprobs", None if info is None else info.logprob),
                             ("top_logprobs", top), ("text_offset", c.offset)):
                part[key].append(val)
                getattr(c, key).append(val)
            if not s.startswith("bytes:") and token != self.tok.eot_token:
                c.offset += len(s)
        return part

    def add(self, d: Delta, stream: Stream) -> dict[str, Any]:
        """Record a delta; returns the stream chunk's choice for it."""
        c = self.choices[d.index]
        text, logprobs = d.text, None
        if not self.started[d.index]:
            self.started[d.index] = True
            if self.plan.echo:
                ids = self.plan.prompts[d.index // self.plan.per_prompt]
                prompt_text = self.tok.decode(ids)
                text = prompt_text + text
                if self.plan.logprobs is not None:
                    infos = stream.prompt_info.get(d.index) or [None] * len(ids)
                    logprobs = self._logprob_entries(c, ids, infos)
                c.offset = len(prompt_text)
        c.text += text
        c.n_tokens += len(d.tokens)
        c.score += sum(i.logprob for i in d.token_info if i.logprob is not None)
        if self.plan.logprobs is not None:
            infos: list[TokenInfo | None] = list(d.token_info) + [None] * (len(d.tokens) - len(d.token_info))
            part = self._logprob_entries(c, d.tokens, infos)
            if logprobs is None:
                logprobs = part
            else:
                for k in logprobs:
                    logprobs[k] += part[k]
        c.finish_reason = d.finish_reason
        return {"text": text, "index": d.index, "logprobs": logprobs, "finish_reason": d.finish_reason}

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.plan.prompts)
        completion = sum(c.n_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        return {"id": self.plan.id, "object": "text_completion", "created": self.plan.created,
                "model": self.model_name, "choices": choices, "usage": usage}

    def best(self) -> list[_Choice]:
        """The choices to return: all, or with best_of the n of each prompt's best_of with the highest summed
        log-probability, best first (vLLM's order)."""
        k, n = self.plan.per_prompt, self.plan.n
        if k == n:
            return self.choices
        out: list[_Choice] = []
        for i in range(len(self.plan.prompts)):
            cands = self.choices[i * k:(i + 1) * k]
            out += sorted(cands, key=lambda c: c.score, reverse=True)[:n]  # stable: ties keep sample order
        return out

    def sse_envelope(self) -> tuple[bytes, bytes]:
        """The bytes before and after one choice's JSON in a stream event (usage null)."""
        mark = "\x00choice\x00"
        head, tail = _JSON.encode(self.envelope([mark])).split(_JSON.encode(mark))
        return b"data: " + head.encode(), tail.encode() + b"\n\n"

    def response(self) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.best()):
            lp = None
            if self.plan.logprobs is not None:
                lp = {"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top_logprobs,
                      "text_offset": c.text_offset}
            choices.append({"text": c.text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason})
        return self.envelope(choices, self.usage())


async def _sse(out: _Output, stream: Stream, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one event per delta, and everything that arrived since the last write goes out as
    one chunk (one write per engine step per request, fewer when the client's task falls behind). The
    envelope around each event's choice is encoded once per response."""
    head, tail = out.sse_envelope()
    dumps = _JSON.encode
    try:
        try:
            while deltas := await stream.next_batch():
                yield b"".join(head + dumps(out.add(d, stream)).encode() + tail for d in deltas)
            if include_usage:
                yield b"data: " + dumps(out.envelope([], out.usage())).encode() + b"\n\n"
        except Gpt2kitError as e:  # headers are sent: report in the stream, as OpenAI does
            yield b"data: " + dumps(engine_error(e).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        stream.cancel()  # client went away (the response task is cancelled) or done: free the rows


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # compact; UTF-8 text as is
