"""The batching engine's former module name: everything lives in gpt2kit.server.engine."""

from gpt2kit.server.engine import (  # noqa: F401
    BatchEngine,
    EngineClosed,
    EngineStats,
    PromptInfo,
    QueueFull,
    QueueTimeout,
    Stream,
)
