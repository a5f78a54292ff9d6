"""A loopback HTTP server standing in for the Kubernetes API in tests that drive the real
`kubernetes` client (the multi-node launcher, the deploy stage).

Each test module scripts the API itself: `handle(method, path, body, content_type)` returns
`(status code, JSON payload)`; this module only does the HTTP and hands back an `ApiClient`.
`use_kubeconfig` points the client's default configuration at it, for code that builds its
own client as it would outside a pod.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str) -> Path:
    """Make `kubernetes.config.load_kube_config()` find the fake at `host` (and not an
    in-cluster config); the client's default configuration is restored afterwards."""
    from kubernetes import client

    # load_kube_config sets the client's default configuration: restore it afterwards.
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": host}}],
        "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    # KUBECONFIG as the process started with it (the client reads it when imported).
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
                        str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kubeconfig
