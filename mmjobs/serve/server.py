"""Run the app with uvicorn: blocking (the stage) or in a background thread (tests, benches).

    with ServerThread(app, port=0) as server:      # port 0: a free loopback port
        urllib.request.urlopen(server.url + "/readyz")
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

__all__ = ["ServerThread", "uvicorn_config"]


def uvicorn_config(app: ASGIApp, host: str, port: int, *, log_level: str = "info",
                   access_log: bool = True) -> uvicorn.Config:
    """uvicorn settings for serving `app` (one process: the model lives in it)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          access_log=access_log, lifespan="on",
                          # Streams can be long; let a stopping server finish them briefly.
                          timeout_graceful_shutdown=10, server_header=False)


class ServerThread:
    """uvicorn serving `app` on `host:port` from a daemon thread.

    Args:
        app: the ASGI app.
        host: the address to bind; loopback by default.
        port: 0 picks a free port; `url` tells which after `start`.
        startup_timeout_s: how long `start` waits for the socket to listen.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *,
                 startup_timeout_s: float = 30.0, log_level: str = "warning") -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level,
                                                    access_log=False))
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self._thread = threading.Thread(target=self.server.run, name="mmjobs-serve-http",
                                        daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        """Start serving; returns once the socket listens.

        Raises:
            RuntimeError: the server did not start in time (or exited, e.g. port in use).
        """
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask uvicorn to exit (lifespan shutdown runs) and wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
