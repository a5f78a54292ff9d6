"""Drive Debian's headless Chromium over the Chrome DevTools Protocol (websocket-client only).

    with Chromium.launch(tmp_path / "profile") as browser:
        browser.navigate("http://127.0.0.1:8000/")
        browser.evaluate("document.title")

No selenium/playwright: the protocol is JSON over one websocket, and the few commands a page
test needs (navigate, evaluate, set a file input, screenshot) are a few lines each.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any

# The flags ENVIRONMENT.md lists: no sandbox (root), no GPU, and nothing that reaches out to
# Google's services (the network is closed; those connections fail noisily).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--disable-dev-shm-usage", "--window-size=1000,1000")


def chromium_path() -> str | None:
    """The Chromium binary (Debian's `chromium` package), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


class CDPError(RuntimeError):
    """A DevTools command failed, or the page threw."""


class Chromium:
    """A headless Chromium process and a DevTools session on its first page."""

    def __init__(self, process: subprocess.Popen, ws: Any, log: Path) -> None:
        self.process, self.ws, self.log = process, ws, log
        self._ids = count(1)

    @classmethod
    def launch(cls, profile: Path, *, timeout: float = 60) -> Chromium:
        """Start Chromium with a fresh profile and attach to its page.

        Raises:
            RuntimeError: no Chromium, or it did not open a DevTools port in time.
        """
        import websocket  # websocket-client

        binary = chromium_path()
        if binary is None:
            raise RuntimeError("chromium is not installed")
        profile.mkdir(parents=True, exist_ok=True)
        log = profile.parent / "chromium.log"
        # Port 0: Chromium picks a free port and writes it to DevToolsActivePort.
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        try:
            while not (port_file.is_file() and port_file.read_text().strip()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start; log:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            # suppress_origin: Chromium refuses DevTools websockets that send an Origin header.
            ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                             suppress_origin=True)
        except BaseException:
            _kill(process)
            raise
        browser = cls(process, ws, log)
        browser.send("Page.enable")
        browser.send("Runtime.enable")
        return browser

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result (events in between are dropped)."""
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.1) -> Any:
        """Poll `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still falsy after {timeout}s")

    def navigate(self, url: str, timeout: float = 30) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && "
                      "document.readyState === 'complete'", timeout)

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an `<input type=file>` as a user would (fires input/change)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            _kill(self.process)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _kill(process: subprocess.Popen) -> None:
    """Stop the Chromium we started and its helper processes (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
