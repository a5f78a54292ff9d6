"""What a client may ask of the server: request limits and connection limits, with their docs.

`Limits` is built from the stage config and handed to the app, so the parsing and image code
never see the rest of the config (or the API key); `ConnectionLimits` goes to uvicorn (see
`mmjobs.serve.server`). `LIMIT_DOCS` describes every setting once: the stage config's field
descriptions, `mmjobs serve --help` (`limits_help`) and the README are all written from it, and
`GET /v1/models` reports the values in force. This module imports nothing heavy: the CLI reads
it to build its help.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass

__all__ = ["LIMIT_DOCS", "ConnectionLimits", "Limits", "limits_help"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each attribute is described in `LIMIT_DOCS`)."""

    max_request_bytes: int = 16 * MIB
    max_image_bytes: int = 8 * MIB
    max_image_pixels: int = 20_000_000
    max_request_pixels: int = 64_000_000
    max_images_per_request: int = 8
    max_prompt_tokens: int | None = None
    max_stop_strings: int = 4
    max_stop_chars: int = 128
    allow_image_urls: bool = False
    image_fetch_timeout_s: float = 10.0
    decode_workers: int = 2
    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 2048
    max_queue: int = 256
    body_timeout_s: float = 30.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How long and how many connections uvicorn keeps (each described in `LIMIT_DOCS`)."""

    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 512


LIMIT_DOCS: dict[str, str] = {
    "max_request_bytes": "Request body limit in bytes (413 above); base64 images count 4/3 of "
                         "their size.",
    "max_image_bytes": "Encoded size limit per image in bytes (413 above).",
    "max_image_pixels": "Width x height limit per image, read from the header before decoding "
                        "(413 above).",
    "max_request_pixels": "Total width x height of a request's images, read from the headers "
                          "before any is decoded (413 above).",
    "max_images_per_request": "Image parts per request (400 above).",
    "max_prompt_tokens": "Prompt tokens per request, text and image tokens together, counted "
                         "before queueing (400 above). Default (unset): the model's context "
                         "length (max_position_embeddings). A request may use at most the "
                         "context minus its max_tokens; without max_tokens its answer is "
                         "shortened to fit.",
    "max_stop_strings": "Stop strings per request (400 above).",
    "max_stop_chars": "Characters per stop string (400 above).",
    "allow_image_urls": "Fetch http(s) image URLs. Off: a fetch runs from the server's "
                        "network, so clients could reach internal services (SSRF); send "
                        "images as data: URLs.",
    "image_fetch_timeout_s": "Total time per fetched image URL.",
    "decode_workers": "Images decoded at the same time. Each is decoded once, on arrival, and "
                      "scaled down to the size the model's processor uses before it waits "
                      "for the model; while decoding it takes up to 4 bytes x "
                      "max_image_pixels.",
    "default_max_new_tokens": "Answer length when a request sets no max_tokens.",
    "max_new_tokens_cap": "Largest max_tokens a request may ask for (400 above).",
    "max_queue": "Requests waiting for the model beyond which new ones get 503 with "
                 "Retry-After.",
    "body_timeout_s": "Time from a request's headers to the end of its body (408 after): a "
                      "client that stops sending mid-body is dropped.",
    "header_timeout_s": "Time a connection has to send a request's complete headers, counted "
                        "from connecting or from the previous response; the connection is "
                        "closed after it (slowloris).",
    "keep_alive_s": "Idle time after which a keep-alive connection is closed.",
    "max_header_bytes": "Request line and headers limit in bytes (400 above).",
    "max_connections": "Open connections and running requests; beyond it new requests get "
                       "503.",
}


def _defaults() -> dict[str, object]:
    return {f.name: f.default for cls in (Limits, ConnectionLimits)
            for f in dataclasses.fields(cls)}


def limits_help(width: int = 79) -> str:
    """Each setting as `name (default): what it limits`, wrapped to `width`, for
    `mmjobs serve --help`."""
    lines = ["request and connection limits (--set NAME=VALUE; GET /v1/models shows them):"]
    for name, default in _defaults().items():
        shown = "unset" if default is None else (
            str(default).lower() if isinstance(default, bool)
            else f"{default:,}" if isinstance(default, int) else f"{default:g}")
        lines += textwrap.wrap(f"{name} ({shown}): {LIMIT_DOCS[name]}", width,
                               initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)
