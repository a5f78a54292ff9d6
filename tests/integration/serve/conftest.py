"""Fixtures: the tiny LLaVA loaded once, and servers on free loopback ports (in-process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mmjobs.serve.app import ServeOptions, create_app
from mmjobs.serve.limits import Limits
from mmjobs.serve.server import ServerThread
from tests.integration.serve.client import Client

MODEL_NAME = "tiny-llava"


@pytest.fixture(scope="session")
def tiny_llava_loaded(tiny_llava_dir):
    """The tiny LLaVA for inference, shared by every server in the session (one at a time)."""
    from mmjobs.eval.generate import load_for_inference

    return load_for_inference(str(tiny_llava_dir))


@pytest.fixture
def start_server(tiny_llava_loaded) -> Iterator[Callable[..., ServerThread]]:
    """`start_server(api_key=None, **limits)` -> a ready server; stopped after the test."""
    servers: list[ServerThread] = []

    def start(*, api_key: str | None = None, max_batch_size: int = 8,
              batch_wait_ms: float = 10.0, load: Callable[[], Any] | None = None,
              wait_ready: bool = True, **limits: Any) -> ServerThread:
        limits.setdefault("default_max_new_tokens", 8)
        options = ServeOptions(MODEL_NAME, Limits(**limits), api_key=api_key,
                               max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
        app = create_app(load or (lambda: tiny_llava_loaded), options)
        server = ServerThread(app).start()
        servers.append(server)
        if wait_ready:
            Client(server.url).wait_ready()
        server.app = app  # type: ignore[attr-defined]  # for tests that inspect state
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> ServerThread:
    """A server with default limits and no auth."""
    return start_server()


@pytest.fixture
def client(server) -> Iterator[Client]:
    c = Client(server.url)
    yield c
    c.close()
