"""The request's connection: reading its body within size and time, and noticing a client leave.

    body = await read_body(request, limits.max_request_bytes, limits.body_timeout_s)
    left = await first_of(job_future, disconnected(request))   # in the route

A body that stops arriving mid-way is answered 408 after `body_timeout_s`, so a half-sent
request does not hold its connection and task forever. A client that closes its connection
while its answer is being generated is noticed through ASGI's `http.disconnect` message, and
the route cancels the job so the generation worker is freed (see `mmjobs.serve.app`).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

from mmjobs.serve.protocol import APIError

__all__ = ["read_body", "wait_disconnected"]

# Bytes of an oversized body read (and dropped) before answering 413: a client that sends the
# whole body before reading the answer then sees the 413 instead of a reset connection.
_DRAIN_LIMIT = 64 * 1024 * 1024


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, or an error once it is over `limit` bytes or late.

    Raises:
        APIError: 413 once the body exceeds `limit` bytes (declared or received); 408 when it
            is not complete `timeout_s` after the headers (the connection is then closed).
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_limited(request, limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s "
                       "(body_timeout_s); send it at once", code="request_timeout",
                       headers={"Connection": "close"}) from None


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is over {limit:,} bytes (max_request_bytes); "
                         "send smaller or fewer images", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        await _drain(request, int(declared))
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            await _drain(request, int(declared) if declared.isdigit() else _DRAIN_LIMIT)
            raise too_large
    return bytes(body)


async def _drain(request: Request, declared: int) -> None:
    """Read and drop up to `_DRAIN_LIMIT` bytes of a body we refuse (see `_DRAIN_LIMIT`)."""
    if declared > _DRAIN_LIMIT:
        return  # not worth reading: the client will see the connection close
    dropped = 0
    with contextlib.suppress(Exception):
        async for piece in request.stream():
            dropped += len(piece)
            if dropped > _DRAIN_LIMIT:
                return


async def wait_disconnected(request: Request) -> None:
    """Return once the client has closed its connection (call after the body was read).

    The server answers `receive()` with `http.disconnect` when the connection is lost (or the
    response is complete); until then it waits, so this costs nothing while the client stays.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
