"""`gpt2kit serve`: an OpenAI-compatible completions API with request batching, and a web playground."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
from pathlib import Path

from gpt2kit.cli.common import add_model_args, add_quantize_arg, setup_logging
from gpt2kit.errors import Gpt2kitError

MISSING_EXTRA = "gpt2kit serve needs the server extra: pip install 'gpt2kit[server]'"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a playground page",
        description="Serve a model over HTTP: POST /v1/completions (OpenAI-compatible, streaming), "
                    "GET /v1/models, GET /health, and a playground page at /. Concurrent requests are "
                    "batched into shared forward passes.")
    add_model_args(p)
    add_quantize_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                        "(default: $GPT2KIT_API_KEY); an empty key is refused")
    p.add_argument("--model-name", help="the model id that /v1/models reports (default: the --model name); "
                                        "requests may also name the model as --model gives it")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=8,
                   help="completions decoded together; each holds a KV-cache row (default 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="completions that may wait for a row; beyond that requests get 429 (default 64)")
    g.add_argument("--max-len", type=int,
                   help="KV-cache positions per row (default: the model's context); longer texts slide "
                        "the window")
    g.add_argument("--max-prompt-tokens", type=int,
                   help="longest prompt accepted, in tokens (default: the model's context)")
    g.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    g.add_argument("--max-n", type=int, default=16,
                   help="most completions per request, prompts x n (default 16)")
    g.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1 MiB)")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may run; then it ends with finish_reason 'length', or with 503 if "
                        "it is still waiting for a row (default 300)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser pages from this origin to call the API (repeatable)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_model_name(model: str) -> str:
    """The id served when --model-name is not given: the model directory's name (also for `.` or `runs/x/`),
    else the model name as given (`gpt2`, `org/name`), as other OpenAI-compatible servers report it, so that
    a client sends the id it started the server with."""
    path = Path(model).expanduser()
    if path.is_dir():
        return Path(os.path.abspath(path)).name or model
    return model.rstrip("/") or model


def model_aliases(model: str, served: str) -> list[str]:
    """The other ids a request may name the served model by: --model as given, the id it is served under
    without --model-name, and for a model name its other spellings (124M -> gpt2 -> openai-community/gpt2)."""
    names = [model.rstrip("/") or model, default_model_name(model)]
    if not Path(model).expanduser().is_dir():
        from gpt2kit.checkpoints.hub import repo_id  # lazy: keeps torch off the CLI's start-up path
        from gpt2kit.config import OPENAI_NAMES
        names += [OPENAI_NAMES.get(model, model), repo_id(OPENAI_NAMES.get(model, model))]
    return [n for n in dict.fromkeys(names) if n != served]


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $GPT2KIT_API_KEY; an empty one is refused (it would serve without authentication)."""
    key, where = args.api_key, "--api-key"
    if key is None:
        key, where = os.environ.get("GPT2KIT_API_KEY"), "GPT2KIT_API_KEY"
    if key is not None and not key.strip():
        fix = "or unset GPT2KIT_API_KEY" if where == "GPT2KIT_API_KEY" else "or leave --api-key out"
        raise Gpt2kitError(f"{where} is empty, which would let anyone in: give a key (for example "
                           f"`openssl rand -hex 16`), {fix} to serve without authentication")
    if key is not None and key != key.strip():
        raise Gpt2kitError(f"{where} begins or ends with whitespace, which no client's header keeps: remove it")
    return key


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  # lazy: the optional server extra, checked for a clear message
        import uvicorn  # noqa: F401
    except ImportError:
        raise Gpt2kitError(MISSING_EXTRA) from None
    for name in ("max_batch", "max_queue", "max_tokens", "max_n", "max_body"):
        if getattr(args, name) < 1:
            raise Gpt2kitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_len", "max_prompt_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            raise Gpt2kitError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):  # nan and inf never time out
        raise Gpt2kitError(f"--request-timeout must be a finite number of seconds > 0, got {args.request_timeout} "
                           "(use a large one, such as 86400, for long requests)")
    api_key = _api_key(args)

    setup_logging()
    # lazy: torch and FastAPI off the CLI's start-up path
    from gpt2kit.checkpoints import load_model
    from gpt2kit.server.routes import create_app
    from gpt2kit.server.runner import bind_socket, uvicorn_server
    from gpt2kit.server.serving import ServerSettings

    model_name = args.model_name or default_model_name(args.model)
    settings = ServerSettings(
        model_name=model_name, model_aliases=model_aliases(args.model, model_name),
        api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
        max_len=args.max_len, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
        max_n=args.max_n, max_body_bytes=args.max_body, request_timeout=args.request_timeout,
        cors_origins=args.cors_origin)
    sock = bind_socket(args.host, args.port)  # before loading: a busy port fails fast
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, tokenizer_dir=args.tokenizer)
    if args.quantize:
        from gpt2kit.kernels import prepare_cpu_decoding_  # lazy: torch, as above
        prepare_cpu_decoding_(model, quantize=args.quantize)  # the engine keeps what this installs
    app = create_app(model, tok, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and not settings.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    dtype = str(model.dtype).removeprefix("torch.") + (f", {args.quantize} decoding" if args.quantize else "")
    print(f"gpt2kit serve: {settings.model_name} on http://{shown}:{port} (playground at /, API at /v1, "
          f"max batch {settings.max_batch}, {model.device}, {dtype})", flush=True)
    server = uvicorn_server(app, log_level=args.log_level)
    server.run(sockets=[sock])
    return 0
