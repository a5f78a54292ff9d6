"""Answering prompts through an OpenAI-compatible server (vLLM, SGLang, TGI, `mmjobs serve`).

    generator = EndpointGenerator(EndpointConfig(url="http://vllm:8000/v1"), max_new_tokens=64)
    for out in generator.generate_batches(prompts):   # the in-process `Generator`'s interface
        ...

Each prompt becomes one `POST {url}/chat/completions`: its turns as messages, each `<image>`
marker an `image_url` part holding the image as a PNG data URI (lossless: the server decodes
the pixels the in-process path has), greedy unless sampling is asked for, the stop strings and
the answer length. At most `concurrency` requests are in flight; a refused connection, a
timeout, 429 or 5xx is retried with exponential backoff up to `retries` times, so a server
that restarts (a pod rescheduled, an engine warming up) costs time, not the run. Any other
answer (a 4xx: the prompt is too long, the model name is wrong) fails with the row's id.

`agreement` compares a sample of answers with the in-process path's (`check_agreement`):
serving engines decode differently from HF `generate` on some benchmarks, so a run can check
that the server it uses answers like the model it evaluates.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from mmjobs.config_base import StrictModel
from mmjobs.logs import get_logger

if TYPE_CHECKING:  # the config is read where torch is not imported (pipeline building)
    from PIL import Image

    from mmjobs.eval.generate import BatchOutput, PromptInput

log = get_logger(__name__)
IMAGE_TOKEN = "<image>"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class EndpointClient(StrictModel):
    """How hard to push an OpenAI-compatible server, and whether to check its answers (the
    client settings; `EndpointConfig` adds where the server is). A recipe's `eval.engine.endpoint`
    is one of these: the pipeline fills in the URL and model of the engine it starts."""

    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="Environment variable holding the bearer key "
                                    "(never the key itself).")
    concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight at once.")
    retries: int = Field(5, ge=0, le=50, description="Retries of a refused connection, "
                         "timeout, 429 or 5xx, with exponential backoff.")
    backoff_seconds: float = Field(1.0, gt=0, description="First retry's wait; doubles each "
                                   "retry (with jitter), capped at 60 s.")
    timeout_seconds: float = Field(600.0, gt=0, description="Per request.")
    agreement_sample: int = Field(0, ge=0, description="Also answer the first N prompts "
                                  "in-process and compare (0: no check).")
    agreement_tolerance: float = Field(0.0, ge=0, le=1, description="Fraction of the sample "
                                       "whose answers may differ before the step fails.")


class EndpointConfig(EndpointClient):
    """Where and how to send prompts to an OpenAI-compatible server."""

    url: str = Field(description="The API base, e.g. http://vllm.ns.svc:8000/v1 (requests go "
                     "to {url}/chat/completions).")
    model: str | None = Field(None, description="The served model name (the request's "
                              "`model`); default: the first of GET {url}/models.")
    engine: str | None = Field(None, description="Set by pipelines for the engine they start "
                               "(eval.engine): what identifies it (image, command line, "
                               "settings). It keys the output instead of `url`, which is new "
                               "each run, so a rerun reuses answered rows.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"got {url!r}; give the server's API base with its scheme, e.g. "
                             "http://vllm.ns.svc:8000/v1")
        return url.rstrip("/")


class EndpointError(RuntimeError):
    """The server refused a prompt, or stayed unreachable through every retry."""


class AgreementError(RuntimeError):
    """The server's answers differ from the in-process ones beyond the tolerance."""


class _Transient(Exception):
    """A failed attempt worth retrying; the message says what went wrong."""


class EndpointGenerator:
    """`Generator.generate_batches` over HTTP (see the module docstring).

    Args:
        endpoint: the server and client settings.
        batch_size: prompts per yielded batch (progress and partial-file granularity).
        max_new_tokens, do_sample, temperature, top_p, stop_strings, seed: as the in-process
            generator takes them; sampling sends `seed` plus the prompt's index.
    """

    def __init__(self, endpoint: EndpointConfig, *, batch_size: int = 16,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, stop_strings: Sequence[str] = (), seed: int = 0) -> None:
        self.endpoint = endpoint
        self.batch_size = batch_size
        self.sampling = {"max_tokens": max_new_tokens, "stop": list(stop_strings) or None,
                         **({"temperature": temperature, "top_p": top_p} if do_sample
                            else {"temperature": 0.0})}
        self.seed = seed if do_sample else None
        self._local = threading.local()
        key_env = endpoint.api_key_env
        key = os.environ.get(key_env) if key_env else None
        if key_env and not key:
            raise EndpointError(f"endpoint.api_key_env: the environment variable {key_env} is "
                                "not set (it must hold the server's bearer key)")
        self._headers = {"Content-Type": "application/json",
                         **({"Authorization": f"Bearer {key}"} if key else {})}
        self.requests = 0  # sent, retries included
        self.retried = 0
        self.model = endpoint.model or self._first_model()

    # -- the generator interface

    def generate_batches(self, prompts: Sequence[PromptInput]) -> Iterator[BatchOutput]:
        """Answers for `prompts`, `batch_size` at a time, in order; `concurrency` in flight."""
        from mmjobs.eval.generate import BatchOutput

        with ThreadPoolExecutor(self.endpoint.concurrency, thread_name_prefix="endpoint") as pool:
            for start in range(0, len(prompts), self.batch_size):
                indices = list(range(start, min(start + self.batch_size, len(prompts))))
                answers = list(pool.map(lambda i: self._answer(i, prompts[i]), indices))
                yield BatchOutput(indices, [text for text, _ in answers],
                                  [tokens for _, tokens in answers])

    def generate(self, prompts: Sequence[PromptInput]) -> list[str]:
        """Answers for `prompts`, in order."""
        return [t for out in self.generate_batches(prompts) for t in out.texts]

    # -- one request

    def _answer(self, index: int, prompt: PromptInput) -> tuple[str, int]:
        body = {"model": self.model, "messages": messages(prompt), **self.sampling}
        if self.seed is not None:
            body["seed"] = self.seed + index
        reply = self._post("/chat/completions", body, what=f"prompt {index}")
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"prompt {index}: the server's reply has no "
                                f"choices[0].message.content: {json.dumps(reply)[:300]}") from e
        tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        return text, tokens

    def _first_model(self) -> str:
        listing = self._request("GET", "/models", None, what="the model list")
        try:
            return listing["data"][0]["id"]
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(f"{self.endpoint.url}/models lists no model; set endpoint.model"
                                ) from e

    def _post(self, path: str, body: dict[str, Any], *, what: str) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(body).encode(), what=what)

    def _request(self, method: str, path: str, payload: bytes | None, *,
                 what: str) -> dict[str, Any]:
        """One call with retries of transient failures; the parsed JSON reply.

        Raises:
            EndpointError: a permanent failure, or a transient one on the last attempt.
        """
        endpoint = self.endpoint
        attempt = 0
        while True:  # ends by returning the reply or raising
            try:
                return self._attempt(method, path, payload, what=what)
            except _Transient as e:
                problem = str(e)
            if attempt == endpoint.retries:
                raise EndpointError(f"{what}: {endpoint.url}{path} failed {attempt + 1} times; "
                                    f"last: {problem}")
            wait = min(60.0, endpoint.backoff_seconds * 2 ** attempt) * random.uniform(0.8, 1.2)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, problem, attempt + 1,
                        endpoint.retries, wait)
            self.retried += 1
            time.sleep(wait)
            attempt += 1

    def _attempt(self, method: str, path: str, payload: bytes | None, *,
                 what: str) -> dict[str, Any]:
        """One request: the parsed JSON reply.

        Raises:
            _Transient: worth retrying (connection trouble, `_RETRY_STATUS`).
            EndpointError: not worth retrying (another status, a 200 that is not JSON).
        """
        self.requests += 1
        try:
            status, data = self._send(method, path, payload)
        except (OSError, HTTPException) as e:  # refused, reset, timed out
            self._drop_connection()
            raise _Transient(f"{type(e).__name__}: {e}") from e
        if status == 200:
            try:
                return json.loads(data)
            except ValueError as e:
                raise EndpointError(f"{what}: the server answered 200 with invalid "
                                    f"JSON: {data[:200]!r}") from e
        if status not in _RETRY_STATUS:
            raise EndpointError(f"{what}: {self.endpoint.url}{path} answered {status}: "
                                f"{_error_text(data)}")
        raise _Transient(f"HTTP {status}: {_error_text(data)}")

    def _send(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            parts = urllib.parse.urlsplit(self.endpoint.url)
            cls = HTTPSConnection if parts.scheme == "https" else HTTPConnection
            conn = cls(parts.netloc, timeout=self.endpoint.timeout_seconds)
            self._local.conn, self._local.base = conn, parts.path
        conn.request(method, self._local.base + path, body=payload, headers=self._headers)
        response = conn.getresponse()
        return response.status, response.read()

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def messages(prompt: PromptInput) -> list[dict[str, Any]]:
    """The prompt's turns as OpenAI chat messages; each `<image>` marker (with the newline
    after it, which the server puts back) becomes the next image as a PNG data URI."""
    turns = ([{"role": "user", "content": prompt.prompt}] if isinstance(prompt.prompt, str)
             else [dict(t) if isinstance(t, dict) else t.model_dump() for t in prompt.prompt])
    images = iter(prompt.images)
    out = []
    for turn in turns:
        content = turn["content"]
        if IMAGE_TOKEN not in content:
            out.append({"role": turn["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(content.split(IMAGE_TOKEN)):
            if k:
                parts.append({"type": "image_url", "image_url": {"url": data_uri(next(images))}})
                piece = piece.removeprefix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": turn["role"], "content": parts})
    return out


def data_uri(image: Image.Image) -> str:
    """`image` as a lossless PNG data URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _error_text(data: bytes) -> str:
    try:
        body = json.loads(data)
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return (message or data.decode("utf-8", "replace"))[:300]


def check_agreement(ids: Sequence[str], served: Sequence[str], local: Sequence[str],
                    tolerance: float) -> dict[str, Any]:
    """Compare the server's answers with the in-process ones for the same prompts.

    Returns:
        {"sample": n, "differ": k, "rows": [ids that differ]}.

    Raises:
        AgreementError: more than `tolerance` of the sample differs; names the rows.
    """
    differ = [(i, s, loc) for i, s, loc in zip(ids, served, local, strict=True)
              if s.strip() != loc.strip()]
    report = {"sample": len(ids), "differ": len(differ), "rows": [i for i, _, _ in differ]}
    if ids and len(differ) / len(ids) > tolerance:
        shown = "; ".join(f"{i}: server {s[:60]!r} vs in-process {loc[:60]!r}"
                          for i, s, loc in differ[:5])
        raise AgreementError(
            f"the server's answers differ from the in-process model's on {len(differ)} of "
            f"{len(ids)} sampled rows (tolerance {tolerance:.0%}): {shown}"
            f"{' ...' if len(differ) > 5 else ''}. Check that the server runs the same model, "
            "adapter, chat template and greedy decoding, or raise endpoint.agreement_tolerance")
    return report
