"""The HTTP API: an OpenAI-compatible chat-completions server for one model or several named
ones (the settings of a sweep), plus its chat page.

    app = create_app(lambda: load_for_inference(model_dir), ServeOptions(model_name="tiny"))
    app = create_app({"baseline": load_a, "dec-dropout": load_b}, ServeOptions("baseline"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    POST /v1/chat/completions   OpenAI chat completions (images as image_url parts; stream)
    GET  /v1/models, /v1/models/{id}
    GET  /                      the chat page
    GET  /healthz               liveness: the process answers
    GET  /readyz                readiness: 200 once the model is loaded, 503 before
    GET  /metrics               Prometheus text format

The model loads in a background thread after the server starts, so liveness probes pass during
a long load and `/readyz` tells when to send traffic. With several models a request is routed by
its `model` field (an unknown name is a 404 naming the served ones), each model has its own
worker and admission, and `mmjobs.serve.pool` loads them (all at startup, or lazily up to
`max_loaded` in memory). Every error is OpenAI's JSON error object
with a 4xx/5xx status; nothing a client sends stops the server.

A request reaches the single generation worker only after `Admission` has bounded it (prompt
tokens against the model's context, image pixels, decoded and scaled-down images); a client
that leaves stops its generation (streaming or not), and a body that stops arriving is a 408.
`GET /v1/models` reports the limits in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel
from mmjobs.serve.admission import Admission
from mmjobs.serve.auth import check_bearer
from mmjobs.serve.batching import (
    BatchWorker,
    Job,
    QueueFullError,
    StreamChannel,
    WorkerStoppedError,
)
from mmjobs.serve.connection import read_body, wait_disconnected
from mmjobs.serve.engine import GenerationResult, Settings
from mmjobs.serve.limits import ConnectionLimits, Limits
from mmjobs.serve.metrics import CONTENT_TYPE, ServeMetrics
from mmjobs.serve.page import render_page
from mmjobs.serve.pool import Lease, ModelPool, ModelSlot
from mmjobs.serve.protocol import (
    APIError,
    ChatRequest,
    chunk,
    completion,
    error_body,
    load_json,
    new_id,
    parse_chat_request,
    usage,
)

__all__ = ["ServeOptions", "create_app"]

log = get_logger(__name__)
_ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/chat/completions")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection" (in /metrics)


@dataclass(frozen=True)
class ServeOptions:
    """How the app serves (the stage builds this from `ServeConfig`).

    Attributes:
        model_name: the name clients send as `model` (a server of one model; with several,
            their names are the keys of `create_app`'s mapping and this is unused).
        limits: request limits.
        connections: the connection limits the server runs with (uvicorn enforces them;
            here only to show them at `GET /v1/models`).
        api_key: the bearer token clients must send (None: no auth). The value itself, read
            from the environment by the caller; it is never logged or shown.
        max_batch_size, batch_wait_ms, max_queue: see `BatchWorker`.
    """

    model_name: str
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    api_key: str | None = field(default=None, repr=False)
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_loaded: int | None = None  # models in memory at once (None: all); see ModelPool


def create_app(load: Callable[[], LoadedModel] | Mapping[str, Callable[[], LoadedModel]],
               options: ServeOptions, *,
               on_load_failure: Callable[[BaseException], None] | None = None,
               metrics: ServeMetrics | None = None) -> Starlette:
    """The ASGI app.

    Args:
        load: returns the model named `options.model_name`; or a mapping of model names to
            such functions, in the order the chat page lists them (the first is its default).
            The models loaded at startup (all, or the first `options.max_loaded`) load one by
            one in a background thread; the others when first asked for.
        options: names, limits, auth and batching.
        on_load_failure: called (from the loading thread) if a startup model fails to load,
            e.g. to stop the server so the process exits non-zero; `/readyz` reports the
            error either way.
        metrics: where metrics go (default: a fresh set for this app).

    Returns:
        A Starlette app; run it with uvicorn (see `mmjobs.serve.server`).
    """
    metrics = metrics or ServeMetrics()
    limits = options.limits
    loaders = dict(load) if isinstance(load, Mapping) else {options.model_name: load}
    started = int(time.time())
    load_error: list[str] = []  # of a startup model: the server is not ready

    def start_worker(loaded: LoadedModel) -> tuple[BatchWorker, Admission]:
        admission = Admission(loaded, limits)
        return BatchWorker(loaded, max_batch_size=options.max_batch_size,
                           batch_wait_ms=options.batch_wait_ms, max_queue=limits.max_queue,
                           metrics=metrics).start(), admission

    pool = ModelPool(loaders, start=start_worker, max_loaded=options.max_loaded)

    def load_in_background() -> None:
        error = pool.load_initial()
        if error is not None:
            load_error.append(next(s.error for s in pool.initial() if s.error))
            if on_load_failure is not None:
                on_load_failure(error)
            return
        if not pool.closed:
            metrics.model_ready.set(1)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="mmjobs-serve-load",
                         daemon=True).start()
        yield
        metrics.model_ready.set(0)
        await run_in_threadpool(pool.stop)

    def submit(worker: BatchWorker, job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFullError as e:
            raise APIError(503, f"server busy: {e}; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        except WorkerStoppedError as e:
            raise APIError(503, str(e), code="shutting_down") from None

    async def chat_completions(request: Request) -> Response:
        # Cheapest checks first: no body is read for a client without the key.
        check_bearer(request.headers.get("authorization"), options.api_key)
        body = await read_body(request, limits.max_request_bytes, limits.body_timeout_s)
        chat = parse_chat_request(load_json(body), limits)
        del body  # the parsed request holds what is needed
        if load_error:  # a startup model failed: the server is stopping
            raise APIError(503, f"the model failed to load: {load_error[0]}",
                           code="model_load_failed")
        worker, admission, lease = pool.acquire(chat.model)
        try:
            job = await _admitted_job(chat, worker, admission)
            # The lease ends with the job, whichever way it ends (answer, error, cancel).
            job.future.add_done_callback(lease.release)
            if chat.stream:
                job.channel = StreamChannel(asyncio.get_running_loop())
                submit(worker, job)
                return StreamingResponse(_events(job, chat, chat.model, lease),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
            submit(worker, job)
        except BaseException:
            lease.release()
            raise
        try:
            result = await _result_unless_client_leaves(request, job)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except _ClientLeft:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; /metrics counts it
        except WorkerStoppedError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}",
                           code="generation_failed") from e
        finally:
            lease.release()
        return JSONResponse(completion(new_id(), chat.model, result.text,
                                       result.finish_reason, result.prompt_tokens,
                                       result.completion_tokens))

    def model_card(slot: ModelSlot) -> dict[str, Any]:
        card: dict[str, Any] = {"id": slot.name, "object": "model", "created": started,
                                "owned_by": "mmjobs", "loaded": slot.ready}
        admission = slot.admission
        if admission is not None:  # the context length is known once the model is
            card["max_model_len"] = admission.context  # the field vLLM uses
            card["limits"] = {**admission.describe(),
                              **dataclasses.asdict(options.connections)}
        return card

    async def list_models(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), options.api_key)
        return JSONResponse({"object": "list",
                             "data": [model_card(s) for s in pool.slots.values()]})

    async def get_model(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), options.api_key)
        return JSONResponse(model_card(pool.slot(request.path_params["model"])))

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        startup = pool.initial()
        if not load_error and all(s.ready for s in startup):
            body: dict[str, Any] = {"status": "ready", "model": startup[0].name}
            if len(pool.slots) > 1:
                body["models"], body["loaded"] = pool.names, pool.loaded()
            return JSONResponse(body)
        status = "failed" if load_error else "loading"
        return JSONResponse({"status": status, "error": load_error[0] if load_error else None},
                            status_code=503)

    async def metrics_route(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def page(_: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        html = render_page(pool.names, auth_required=options.api_key is not None,
                           max_image_bytes=limits.max_image_bytes, nonce=nonce)
        return HTMLResponse(html, headers=_page_headers(nonce))

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.add_middleware(_HeaderLimit, limit=options.connections.max_header_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    app.state.serve = pool  # for tests and embedding
    return app


async def _admitted_job(chat: ChatRequest, worker: BatchWorker, admission: Admission) -> Job:
    """The job for an admitted request (4xx if the model takes no images or it is too big)."""
    if chat.image_refs and not worker.takes_images:
        raise APIError(400, f"{chat.model!r} takes no images (its processor has no image "
                       "processor); send text only", code="images_not_supported")
    admitted = await admission.admit(chat)
    return Job(admitted.prompt, Settings.make(
        admitted.max_new_tokens, chat.stop, chat.temperature, chat.top_p, chat.seed))


class _ClientLeft(Exception):
    """The client closed its connection before its answer was ready."""


async def _result_unless_client_leaves(request: Request, job: Job) -> GenerationResult:
    """The job's result; if the client leaves first, its generation is cancelled (a queued
    job is skipped, a running row stops at its next token) and `_ClientLeft` is raised."""
    result = asyncio.ensure_future(asyncio.wrap_future(job.future))
    left = asyncio.ensure_future(wait_disconnected(request))
    try:
        await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if not result.done():
        job.cancelled.set()
        result.cancel()
        raise _ClientLeft
    return result.result()


async def _events(job: Job, chat: ChatRequest, model: str, lease: Lease) -> AsyncIterator[str]:
    """Server-sent events for one streamed completion, ending with `data: [DONE]`."""
    assert job.channel is not None  # set by the caller for streaming jobs
    completion_id, created = new_id(), int(time.time())

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield sse(chunk(completion_id, model, created, delta={"role": "assistant",
                                                              "content": ""}))
        while True:
            kind, value = await job.channel.queue.get()
            if kind == "delta":
                yield sse(chunk(completion_id, model, created, delta={"content": value}))
                continue
            if kind == "done":
                result: GenerationResult = value
                yield sse(chunk(completion_id, model, created,
                                finish_reason=result.finish_reason))
                if chat.include_usage:
                    yield sse(chunk(completion_id, model, created, usage_=usage(
                        result.prompt_tokens, result.completion_tokens)))
            else:  # the status line is sent already: the error travels as an event
                code = "shutting_down" if isinstance(value, WorkerStoppedError) else \
                    "generation_failed"
                yield sse(error_body(f"generation failed: {type(value).__name__}: {value}",
                                     type_="server_error", code=code))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops the generation at the next token
        lease.release()


def _page_headers(nonce: str) -> dict[str, str]:
    # The page talks to its own origin only and inlines nothing but its nonce'd script/style.
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)  # registered for APIError only
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    messages = {404: "no such route; the API is under /v1 (POST /v1/chat/completions)",
                405: "method not allowed on this route"}
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(messages.get(exc.status_code, str(exc.detail)), code=code),
                        status_code=exc.status_code, headers=exc.headers)


async def _server_error(_: Request, exc: Exception) -> Response:
    log.error("unhandled error: %s: %s", type(exc).__name__, exc)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}",
                                   type_="server_error", code="internal_error"),
                        status_code=500)


class _HeaderLimit:
    """431 for requests whose headers are over `limit` bytes.

    uvicorn's h11 limit (`h11_max_incomplete_event_size`) only bounds headers that arrive in
    pieces; headers that arrive in one read (up to the socket buffer) pass it, so the size is
    checked again here, where the headers are complete.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + sum(
                len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.limit:
                response = JSONResponse(error_body(
                    f"the request headers are {size:,} bytes; the limit is {self.limit:,} "
                    "(max_header_bytes)", code="headers_too_large"), status_code=431,
                    headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _MetricsMiddleware:
    """Counts requests by route and status and times them to the end of the response body."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        # Known routes only, so a scanner's random paths cannot grow the label set.
        route = path if path in _ROUTES else (
            "/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        start = time.perf_counter()
        status, recorded = 500, False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.metrics.requests.inc(route=route, status=str(status))
                self.metrics.latency.observe(time.perf_counter() - start, route=route)

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                record()

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            record()  # an exception or a client that left before the end
