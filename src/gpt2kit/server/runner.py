"""Running an app with uvicorn: in a background thread (tests, benchmarks, notebooks) or as `gpt2kit serve`
does, with a graceful shutdown that answers the requests still in flight."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI

from gpt2kit.errors import Gpt2kitError

GRACE_SECONDS = 5.0  # on shutdown, requests in flight get this long to finish


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
    import uvicorn  # lazy: needed to run an app, not to build one (tests drive create_app over ASGI)

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

