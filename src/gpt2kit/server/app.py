"""The HTTP server's former single module: its parts now live in protocol.py (schemas, error object),
serving.py (settings, request -> engine work -> response), routes.py (create_app) and runner.py (uvicorn)."""

from gpt2kit.server.protocol import APIError, CompletionRequest, StreamOptions  # noqa: F401
from gpt2kit.server.routes import UNAUTHENTICATED, create_app  # noqa: F401
from gpt2kit.server.runner import GRACE_SECONDS, BackgroundServer, bind_socket, uvicorn_server  # noqa: F401
from gpt2kit.server.serving import ServerSettings, check_settings, token_str  # noqa: F401
