"""A loopback HTTP server standing in for the Kubernetes API in tests that drive the real
`kubernetes` client (the multi-node launcher, the deploy stage).

Each test module scripts the API itself: `handle(method, path, body, content_type)` returns
`(status code, JSON payload)`; this module only does the HTTP and hands back an `ApiClient`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handle = Callable[[str, str, Any, str], tuple[int, Any]]


@contextlib.contextmanager
def fake_kube_api(handle: Handle) -> Iterator[tuple[Any, str]]:
    """Serve `handle` on 127.0.0.1; yields (a kubernetes ApiClient for it, its URL)."""
    from kubernetes import client

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, payload = handle(self.command, self.path, body,
                                   self.headers.get("Content-Type", ""))
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _reply

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    conf = client.Configuration()
    conf.host = host
    api = client.ApiClient(conf)
    try:
        yield api, host
    finally:
        api.close()
        server.shutdown()
        server.server_close()
