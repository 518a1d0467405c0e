"""Serving: a continuous-batching engine (no HTTP needed) and an OpenAI-compatible API with a playground.

`BatchEngine` needs only torch; `create_app`, `ServerSettings` and `BackgroundServer` need the server
extra (`pip install 'gpt2kit[server]'`: FastAPI and uvicorn) and are imported on first use."""

from __future__ import annotations

from typing import Any

from gpt2kit.server.batching import BatchEngine, EngineStats, QueueFull, QueueTimeout, Stream

__all__ = ["BackgroundServer", "BatchEngine", "EngineStats", "QueueFull", "QueueTimeout", "ServerSettings",
           "Stream", "create_app"]

_FROM_APP = ("BackgroundServer", "ServerSettings", "create_app")


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from gpt2kit.server import app
        return getattr(app, name)
    raise AttributeError(f"module 'gpt2kit.server' has no attribute {name!r}")
