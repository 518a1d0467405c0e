"""Serving: a continuous-batching engine (no HTTP needed) and an OpenAI-compatible API with a playground.

engine.py     BatchEngine: the model's thread, stepping every active request with gpt2kit.decode
protocol.py   the request schema and OpenAI's error object
serving.py    ServerSettings; a request -> engine submissions -> a response or server-sent events
routes.py     create_app: routes, API key and body-size guard, error handlers
runner.py     BackgroundServer and uvicorn with a graceful shutdown

`BatchEngine` needs only torch; `create_app`, `ServerSettings` and `BackgroundServer` need the server
extra (`pip install 'gpt2kit[server]'`: FastAPI and uvicorn) and are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from gpt2kit.server.engine import BatchEngine, EngineStats, QueueFull, QueueTimeout, Stream

__all__ = ["BackgroundServer", "BatchEngine", "EngineStats", "QueueFull", "QueueTimeout", "ServerSettings",
           "Stream", "create_app"]

_NEEDS_EXTRA = {"BackgroundServer": "runner", "ServerSettings": "serving", "create_app": "routes"}


def __getattr__(name: str) -> Any:
    if name in _NEEDS_EXTRA:  # lazy: FastAPI is an optional extra, loaded only when the HTTP layer is used
        return getattr(importlib.import_module(f"gpt2kit.server.{_NEEDS_EXTRA[name]}"), name)
    raise AttributeError(f"module 'gpt2kit.server' has no attribute {name!r}")
