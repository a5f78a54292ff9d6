"""Run the app with uvicorn: blocking (the stage) or in a background thread (tests, benches).

    with ServerThread(app, port=0) as server:      # port 0: a free loopback port
        urllib.request.urlopen(server.url + "/readyz")

Connections are bounded (`ConnectionLimits`): uvicorn closes idle keep-alive connections
(`timeout_keep_alive`), refuses oversized headers (`h11_max_incomplete_event_size`) and caps
connections (`limit_concurrency`), but it has no deadline for the headers themselves: a
client sending one header byte every few seconds (slowloris) would hold its connection
forever. `_TimedH11Protocol` adds that deadline; the app bounds the body (`body_timeout_s`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from mmjobs.serve.limits import ConnectionLimits

__all__ = ["ServerThread", "uvicorn_config"]


def uvicorn_config(app: ASGIApp, host: str, port: int, *, log_level: str = "info",
                   access_log: bool = True,
                   connections: ConnectionLimits | None = None) -> uvicorn.Config:
    """uvicorn settings for serving `app` (one process: the model lives in it)."""
    limits = connections or ConnectionLimits()
    protocol = type("TimedH11Protocol", (_TimedH11Protocol,),
                    {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          access_log=access_log, lifespan="on", http=protocol,
                          timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes,
                          limit_concurrency=limits.max_connections,
                          # Streams can be long; let a stopping server finish them briefly.
                          timeout_graceful_shutdown=10, server_header=False)


class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers.

    The clock starts when the connection opens and again when a response is complete (the
    next request on a keep-alive connection), and stops once h11 has a request's complete
    headers and the app is answering it. At the deadline a connection with no request being
    answered is closed: one still sending headers, and one still sending a body the app
    answered without reading (uvicorn's keep-alive timer restarts on every byte, so neither
    would ever be closed otherwise).
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and not self._answering():
            self.logger.info("closing a connection that sent no complete request in %g s "
                             "(header_timeout_s)", self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._answering():  # a request's headers are in: the app bounds the rest
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # first: a pipelined request already buffered disarms it in handle_events
        super().on_response_complete()


class ServerThread:
    """uvicorn serving `app` on `host:port` from a daemon thread.

    Args:
        app: the ASGI app.
        host: the address to bind; loopback by default.
        port: 0 picks a free port; `url` tells which after `start`.
        startup_timeout_s: how long `start` waits for the socket to listen.
        connections: connection timeouts and caps (default `ConnectionLimits()`).
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *,
                 startup_timeout_s: float = 30.0, log_level: str = "warning",
                 connections: ConnectionLimits | None = None) -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level,
                                                    access_log=False, connections=connections))
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
