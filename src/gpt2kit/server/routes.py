"""The HTTP layer: create_app() with its routes, the API-key and body-size guard, and the handlers that
answer every error as OpenAI's error object. Serving logic is in serving.py, schemas in protocol.py.

Endpoints: POST /v1/completions (plain and SSE streaming), POST /tokenize and /detokenize (vLLM's shapes),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /openapi.json, GET / (playground). Every error is an
OpenAI-style object `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON and invalid or unsupported
values (OpenAI's own choice; the openai client raises BadRequestError), 422 for fields of the wrong type,
missing or unknown (UnprocessableEntityError), 401 for a missing or wrong API key, 404 (an unknown path, or
a model id this server does not serve), 413 for a body over the limit, 429 with Retry-After when the queue is
full, 503 when a request timed out waiting for a row or the server is shutting down, 500 only for a failure
inside the model."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from gpt2kit import __version__
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.server.engine import BatchEngine
from gpt2kit.server.protocol import APIError, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad_request
from gpt2kit.server.serving import (
    CompletionServing,
    ServerSettings,
    check_settings,
    detokenize,
    library_error,
    tokenize,
)
from gpt2kit.tokenizer import Tokenizer

log = logging.getLogger("gpt2kit.server")

UNAUTHENTICATED = ("/health", "/")  # a browser can't send a bearer header when it opens the page


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
    serving = CompletionServing(engine, s)
    ctx = engine.model.config.n_positions
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
            return bad_request(f"the request body is not valid JSON: {why}", code="invalid_json").response()
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
        return library_error(e).response()

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
                           "max_prompt_tokens": serving.max_prompt, "max_tokens": s.max_tokens, "max_n": s.max_n,
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

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None and req.model not in served:
            raise model_not_found(req.model)
        return tokenize(req, engine.tokenizer, engine.max_len)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None and req.model not in served:
            raise model_not_found(req.model)
        return detokenize(req, engine.tokenizer, engine.n_vocab)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.model is not None and req.model not in served:
            raise model_not_found(req.model)
        return await serving.create_completion(req, request)

    return app

