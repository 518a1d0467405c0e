"""The OpenAI-compatible HTTP API over a BatchEngine, plus the playground page.

Endpoints: POST /v1/completions (plain and SSE streaming), GET /v1/models, GET /v1/models/{id},
GET /health, GET /openapi.json, GET / (playground). Every error is an OpenAI-style object
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON and invalid or unsupported
values (OpenAI's own choice; the openai client raises BadRequestError), 422 for fields of the wrong type,
missing or unknown (UnprocessableEntityError), 401 for a missing or wrong API key, 404 (an unknown path, or
a model id this server does not serve), 413 for a body over the limit, 429 with Retry-After when the queue is
full, 503 when a request timed out waiting for a row or the server is shutting down, 500 only for a failure
inside the model."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gpt2kit import __version__
from gpt2kit.errors import Gpt2kitError
from gpt2kit.generate import Delta, GenerationConfig, TokenInfo
from gpt2kit.model import GPT
from gpt2kit.server.batching import BatchEngine, EngineClosed, QueueFull, QueueTimeout, Stream
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger("gpt2kit.server")

UNAUTHENTICATED = ("/health", "/")  # a browser can't send a bearer header when it opens the page
GRACE_SECONDS = 5.0  # on shutdown, requests in flight get this long to finish


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


# ---- request schema (OpenAI's Completions API, plus GPT-2 sampling controls) -------------------------

# strict: a string for a number ("max_tokens": "3"), a number or string for a flag ("stream": "yes") or a flag
# for a number ("logprobs": true) is a wrong type (422), as OpenAI refuses it, not coerced; allow_inf_nan=False:
# JSON's 1e400 parses as an infinite temperature, which is no temperature
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    max_tokens: int | None = Field(16, description="tokens per completion (0 with echo: score the prompt)")
    temperature: float | None = Field(1.0, description="0 is greedy")
    top_p: float | None = 1.0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, description="also return the top-N alternatives per token")
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0  # accepted only at 0: GPT-2 uses repetition_penalty instead
    frequency_penalty: float | None = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # GPT-2 controls beyond OpenAI's API (the openai client sends them via extra_body)
    top_k: int | None = Field(0, description="0 disables")
    min_p: float | None = Field(0.0, description="0 disables")
    repetition_penalty: float | None = Field(1.0, description="1 disables")


class APIError(HTTPException):
    """An error answered as OpenAI's error object. (An HTTPException, so FastAPI lets it through when it
    is raised while the body is being read.)"""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


# words in GenerationConfig.validate()'s messages -> the request field they are about
_PARAM_WORDS = (("temperature", "temperature"), ("top-k", "top_k"), ("top-p", "top_p"), ("min-p", "min_p"),
                ("repetition penalty", "repetition_penalty"), ("stop string", "stop"),
                ("length", "max_tokens"), ("seed", "seed"), ("logprobs", "logprobs"), ("prompt", "prompt"))


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _library_error(e: Gpt2kitError) -> APIError:
    msg = str(e)
    param = next((p for word, p in _PARAM_WORDS if word in msg), None)
    return _bad(msg, param)


def _engine_error(e: Gpt2kitError) -> APIError:
    """An error that ends a request the engine had accepted: 503 for the server's state (shutting down,
    busy past the request's timeout), which a client may retry; 500 for a failure inside the model."""
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), "server_error", code="shutting_down")
    if isinstance(e, QueueTimeout):
        return APIError(503, str(e), "server_error", code="queue_timeout", headers={"Retry-After": "1"})
    return APIError(500, str(e), "server_error")


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


# ---- middleware: API key and body size, before any route reads the request ---------------------------

class _Guard:
    def __init__(self, app: Any, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if s.api_key and scope["path"] not in UNAUTHENTICATED and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return await _send(scope, send, APIError(
                    401, "missing API key: send the header 'Authorization: Bearer KEY' (the key given to "
                         "gpt2kit serve --api-key)", code="invalid_api_key"))
            if not hmac.compare_digest(auth[7:].strip().encode(), s.api_key.encode()):
                return await _send(scope, send, APIError(401, "incorrect API key", code="invalid_api_key"))
        limit = s.max_body_bytes
        too_big = APIError(413, f"request body is over this server's limit of {limit} bytes (--max-body)",
                           code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send(scope, send, too_big)
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise too_big  # FastAPI re-raises HTTPExceptions from body reading: answered as 413
            return msg

        return await self.app(scope, counted_receive, send)


async def _send(scope: dict, send: Any, err: APIError) -> None:
    resp = err.response()
    if err.status_code == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    await resp(scope, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


# ---- the app ---------------------------------------------------------------------------------------

def create_app(engine_or_model: BatchEngine | GPT, tokenizer: Tokenizer | None = None,
               settings: ServerSettings | None = None) -> FastAPI:
    """An ASGI app serving `engine_or_model`. Given a model, the app builds a BatchEngine from `settings`
    and starts and closes it with the app; given an engine, it starts it if needed and leaves closing it
    to the caller."""
    s = settings or ServerSettings()
    check_settings(s)
    served = {s.model_name, *s.model_aliases}
    if isinstance(engine_or_model, BatchEngine):
        engine, own_engine = engine_or_model, False
    else:
        if tokenizer is None:
            raise Gpt2kitError("create_app needs the tokenizer along with the model")
        engine = BatchEngine(engine_or_model, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                             max_len=s.max_len)
        own_engine = True
    tok = engine.tokenizer
    ctx = engine.model.config.n_positions
    max_prompt = min(s.max_prompt_tokens or ctx, ctx)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        if own_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="gpt2kit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions for GPT-2 models, with request batching.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # docs pages fetch from a CDN: off
    app.state.engine = engine
    app.state.settings = s
    app.add_middleware(_Guard, settings=s)
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=s.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    # -- errors --
    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        if isinstance(e, APIError):
            return e.response()
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind,
                        headers=getattr(e, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", first.get("msg"))
            return _bad(f"the request body is not valid JSON: {why}", code="invalid_json").response()
        param = loc[0] if loc else None
        # a union field (prompt, stop) reports one error per alternative type: name them all at once
        alts = [str(x["loc"][2]) for x in errs if len(x.get("loc", ())) > 2 and x["loc"][1] == param
                and isinstance(x["loc"][2], str)]
        if first.get("type") == "extra_forbidden":
            msg = f"unrecognized request argument: {'.'.join(loc)}"
        elif first.get("type") == "missing" and not loc:
            msg = "the request needs a JSON body"
        elif first.get("type") == "model_attributes_type" and not loc:
            msg = "the request body must be a JSON object"
            ctype = request.headers.get("content-type", "")
            if ctype and "json" not in ctype.lower():
                msg += f" sent with 'Content-Type: application/json' (this one came as {ctype.split(';')[0]!r})"
        elif len(alts) > 1:
            msg = f"{param} must be one of: {', '.join(dict.fromkeys(alts))}; got {first.get('input')!r}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errs) > 1:
                msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return APIError(422, msg, param=param, code="invalid_type").response()

    @app.exception_handler(Gpt2kitError)
    async def on_library_error(request: Request, e: Gpt2kitError) -> JSONResponse:
        return _library_error(e).response()

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    # -- routes --
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("gpt2kit.server").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        st = engine.stats
        return {"status": "ok" if engine.running else "stopped", "model": s.model_name,
                "active": st.active, "queued": st.queued, "completed": st.completed, "tokens": st.tokens,
                "steps": st.steps,
                "limits": {"max_batch": engine.max_batch, "max_queue": engine.max_queue,
                           "max_prompt_tokens": max_prompt, "max_tokens": s.max_tokens, "max_n": s.max_n,
                           "max_logprobs": s.max_logprobs, "max_body_bytes": s.max_body_bytes,
                           "request_timeout": s.request_timeout, "context": ctx},
                "auth": bool(s.api_key)}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    def model_card() -> dict[str, Any]:
        return {"id": s.model_name, "object": "model", "created": created, "owned_by": "gpt2kit"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    def model_not_found(model_id: str) -> APIError:
        # OpenAI's answer for a model it does not have (404, code model_not_found)
        return APIError(404, f"The model `{model_id}` does not exist on this server; it serves "
                             f"`{s.model_name}`: send that as \"model\" (or leave \"model\" out)",
                        "invalid_request_error", param="model", code="model_not_found")

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in served:
            raise model_not_found(model_id)
        return model_card()

    @app.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions() -> None:
        raise APIError(404, "this server has no chat endpoint: GPT-2 is a plain language model, not a chat "
                            "model; send a prompt to POST /v1/completions (client.completions.create)",
                       "not_found_error", code="unsupported_endpoint")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.model is not None and req.model not in served:
            raise model_not_found(req.model)
        plan = _plan(req, tok, engine, s, max_prompt)
        try:
            stream = engine.submit_many(plan.rows, plan.cfg, timeout=s.request_timeout,
                                        prompt_logprobs=plan.prompt_logprobs)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        except Gpt2kitError as e:
            raise _library_error(e) from None
        out = _Output(plan, tok, s.model_name)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(out, stream, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, stream))
        try:
            async for d in stream:
                out.add(d, stream)
        except Gpt2kitError as e:
            raise _engine_error(e) from None
        finally:
            watcher.cancel()
            stream.cancel()  # no-op when finished; frees the rows if this task was cancelled
        return out.response()

    return app


async def _cancel_on_disconnect(request: Request, stream: Stream) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            stream.cancel()
            return


# ---- request -> engine work ---------------------------------------------------------------------------

@dataclass
class _Plan:
    prompts: list[list[int]]  # token ids per prompt
    n: int
    cfg: GenerationConfig
    echo: bool
    logprobs: int | None
    prompt_logprobs: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")

    @property
    def rows(self) -> list[tuple[list[int], int]]:
        # choice k = prompt i, sample j with k = i * n + j, seeded (seed, k): Generator.generate's numbering
        return [(ids, i * self.n + j) for i, ids in enumerate(self.prompts) for j in range(self.n)]


def _plan(req: CompletionRequest, tok: Tokenizer, engine: BatchEngine, s: ServerSettings,
          max_prompt: int) -> _Plan:
    # unsupported OpenAI options fail loudly rather than being ignored
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise _bad(f"{name} is not supported; use repetition_penalty (1 disables it)", name)
    if req.logit_bias:
        raise _bad("logit_bias is not supported", "logit_bias")
    if req.suffix:
        raise _bad("suffix (insertion) is not supported by GPT-2", "suffix")
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise _bad("best_of is not supported (other than best_of == n)", "best_of")
    if n < 1:
        raise _bad(f"n must be >= 1, got {n}", "n")
    echo = bool(req.echo)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise _bad(f"max_tokens must be >= 1 (0 only with echo, to score the prompt), got {max_tokens}",
                   "max_tokens")
    if max_tokens > s.max_tokens:
        raise _bad(f"max_tokens {max_tokens} is over this server's limit of {s.max_tokens} (--max-tokens)",
                   "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= s.max_logprobs:
        raise _bad(f"logprobs must be in [0, {s.max_logprobs}], got {req.logprobs}", "logprobs")
    if max_tokens == 0 and req.logprobs is None:
        raise _bad("max_tokens 0 (scoring the prompt) needs logprobs", "logprobs")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > s.max_stop:
        raise _bad(f"at most {s.max_stop} stop sequences, got {len(stop)}", "stop")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise _bad(f"seed must be in [0, 2**63), got {req.seed}", "seed")

    p = req.prompt
    if isinstance(p, str):
        texts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [list(p)]  # one prompt given as token ids
    else:
        texts = list(p)
    if not texts:
        raise _bad("prompt is an empty list", "prompt")
    if len(texts) * n > s.max_n:
        raise _bad(f"{len(texts)} prompt(s) x n={n} is {len(texts) * n} completions; this server allows "
                   f"at most {s.max_n} per request (--max-n)", "n")
    vocab = engine.n_vocab  # ids past the tokenizer's (a padded vocabulary) have no text
    prompts: list[list[int]] = []
    for t in texts:
        if isinstance(t, str):
            if t == "":
                raise _bad("empty prompt: give some text, or leave prompt out to start from <|endoftext|>",
                           "prompt")
            ids = tok.encode(t)
        else:
            ids = list(t)
            if not ids:
                raise _bad("empty prompt: an empty list of token ids", "prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise _bad(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(ids) > max_prompt:
            raise _bad(f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt} "
                       "(--max-prompt-tokens)", "prompt", "context_length_exceeded")
        prompts.append(ids)

    cfg = GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=stop,
        seed=req.seed,
        logprobs=req.logprobs,
    )
    try:
        cfg.validate() if max_tokens else cfg.sampling.validate()
    except Gpt2kitError as e:
        raise _library_error(e) from None
    return _Plan(prompts, n, cfg, echo, req.logprobs, req.logprobs if echo else None)


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


class _Output:
    """Accumulates deltas into choices; builds the response or each stream chunk."""

    def __init__(self, plan: _Plan, tok: Tokenizer, model_name: str):
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
                ids = self.plan.prompts[d.index // self.plan.n]
                prompt_text = self.tok.decode(ids)
                text = prompt_text + text
                if self.plan.logprobs is not None:
                    infos = stream.prompt_info.get(d.index) or [None] * len(ids)
                    logprobs = self._logprob_entries(c, ids, infos)
                c.offset = len(prompt_text)
        c.text += text
        c.n_tokens += len(d.tokens)
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

    def response(self) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(self.choices):
            lp = None
            if self.plan.logprobs is not None:
                lp = {"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top_logprobs,
                      "text_offset": c.text_offset}
            choices.append({"text": c.text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason})
        return self.envelope(choices, self.usage())


async def _sse(out: _Output, stream: Stream, include_usage: bool) -> AsyncIterator[str]:
    try:
        try:
            async for d in stream:
                yield "data: " + json.dumps(out.envelope([out.add(d, stream)])) + "\n\n"
            if include_usage:
                yield "data: " + json.dumps(out.envelope([], out.usage())) + "\n\n"
        except Gpt2kitError as e:  # headers are sent: report in the stream, as OpenAI does
            yield "data: " + json.dumps(_engine_error(e).body()) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # client went away (the response task is cancelled) or done: free the rows


# ---- running it ---------------------------------------------------------------------------------------

class BackgroundServer:
    """Serve an app with uvicorn in a thread on host:port (port 0 picks a free one); for tests, benchmarks
    and notebooks. `with BackgroundServer(app) as url: ...`"""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 grace: float = GRACE_SECONDS):
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level=log_level, grace=grace)
        # not the main thread: leave signals alone
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise Gpt2kitError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uvicorn_server(app: FastAPI, log_level: str = "info", grace: float = GRACE_SECONDS) -> Any:
    """A uvicorn.Server for `app` whose shutdown lets requests in flight finish for `grace` seconds, then
    ends what is left through the engine, so that those clients get an answer (503 `shutting_down`, or an
    error event and [DONE] in a stream) instead of a cut connection, before uvicorn cancels their tasks."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            engine = getattr(app.state, "engine", None)
            handle = None
            if engine is not None:
                handle = asyncio.get_running_loop().call_later(max(grace - 1.0, 0.0), engine.abort,
                                                               "the server is shutting down")
            try:
                await super().shutdown(sockets)
            finally:
                if handle is not None:
                    handle.cancel()

    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (so that port 0 can be resolved to the real port before serving)."""
    if not 0 <= port <= 65535:
        raise Gpt2kitError(f"--port {port} is out of range; use 1-65535 (0 picks a free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Gpt2kitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

