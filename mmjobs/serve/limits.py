"""Request limits: body size, images (bytes, pixels, count), generation length, URL fetching.

One frozen object built from the stage config and handed to the app, so the parsing and image
code never see the rest of the config (or the API key).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_request_bytes: request body cap (a base64 image is 4/3 of its bytes); 413 above.
        max_image_bytes: encoded size cap per image; 413 above.
        max_image_pixels: width x height cap per image, read from the header before decoding
            (decompression bombs: a 50 kB PNG can claim 100k x 100k pixels); 413 above.
        max_images_per_request: image parts per request; 400 above.
        allow_image_urls: fetch http(s) image URLs. Off by default: a fetch is made from the
            server's network, so a client could reach internal services (SSRF).
        image_fetch_timeout_s: connect + read timeout per fetched image.
        default_max_new_tokens: answer length when a request names none.
        max_new_tokens_cap: the largest `max_tokens` a request may ask for; 400 above.
        max_queue: requests waiting for the model; 503 (with Retry-After) above.
    """

    max_request_bytes: int = 16 * MIB
    max_image_bytes: int = 8 * MIB
    max_image_pixels: int = 20_000_000
    max_images_per_request: int = 8
    allow_image_urls: bool = False
    image_fetch_timeout_s: float = 10.0
    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 2048
    max_queue: int = 256
