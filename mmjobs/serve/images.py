"""Turn a request's image URLs into RGB images, within limits, without trusting the bytes.

- `data:image/...;base64,...` URLs are decoded after a size check on the base64 text.
- `http(s)://` URLs are fetched only when `Limits.allow_image_urls` is on (SSRF: the fetch
  comes from the server's network), with a total time limit, a byte cap, and redirects only
  to http(s).
- Only PNG, JPEG, GIF, WebP and BMP are opened: PIL's other plugins include formats that
  shell out (EPS runs Ghostscript) or are rarely fuzzed.
- The pixel count is checked from the header, before any pixel is decoded, so a
  decompression bomb costs a header parse, not gigabytes.
- Reading is split from decoding: `read_image_ref` gives the encoded bytes and the header's
  size (so a request's total pixels can be checked before anything is decoded), and
  `decode_image` decodes once and scales down right away to what the model's processor uses
  (`fit`), so a 20-megapixel upload costs its 80 MB only while it is being decoded, not while
  it waits for the model. JPEGs are decoded at a reduced scale directly (PIL's `draft`).
  After a large decode the C allocator is asked to give the freed pages back (glibc's
  `malloc_trim`): otherwise each decoding thread's heap keeps its peak, and the server's RSS
  stays hundreds of MB above what it holds.

Errors are `APIError`s: 400 for data that is not a usable image, 413 for sizes over a limit.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import io
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ALLOWED_FORMATS", "EncodedImage", "Fit", "decode_image", "decode_image_bytes",
           "load_image_ref", "read_image_ref"]

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
_READ_CHUNK = 64 * 1024
_MAX_REDIRECTS = 3
_TRIM_AFTER_PIXELS = 1_000_000  # decodes above this give their freed memory back at once

# (width, height) -> the size to scale down to, or None to keep the image as it is.
Fit = Callable[[int, int], "tuple[int, int] | None"]


@dataclass
class EncodedImage:
    """An image's encoded bytes, checked but not decoded.

    Attributes:
        where: how messages name it ("image 2").
        data: the encoded bytes (within `max_image_bytes`).
        width, height: from the header (within `max_image_pixels`).
    """

    where: str
    data: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_ref(url: str, index: int, limits: Limits) -> EncodedImage:
    """The image at `url` (data: or http(s)): its bytes and header size; nothing is decoded.

    Args:
        url: the `image_url.url` of a content part.
        index: its position among the request's images (0-based), for messages.
        limits: size limits and whether URLs may be fetched.

    Raises:
        APIError: 400 (not an image, bad URL, fetch failed) or 413 (over a size limit).
    """
    where = f"image {index + 1}"
    if url.startswith("data:"):
        data = _data_url_bytes(url, where, limits)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_image_urls:
            raise APIError(400, f"{where}: image URLs are not fetched by this server "
                           "(allow_image_urls is off); send the image inline as a "
                           "data:image/...;base64 URL", code="image_url_not_allowed")
        data = _fetch(url, where, limits)
    else:
        scheme = url.split(":", 1)[0][:20] if ":" in url else "none"
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r}; use a "
                       "data:image/...;base64 URL" + (" or http(s)" if limits.allow_image_urls
                                                      else ""), code="invalid_image_url")
    with _open_checked(data, where, limits) as image:
        width, height = image.size
    return EncodedImage(where, data, width, height)


def load_image_ref(url: str, index: int, limits: Limits, fit: Fit | None = None) -> Image.Image:
    """`read_image_ref` then `decode_image`: the image at `url` as RGB."""
    return decode_image(read_image_ref(url, index, limits), limits, fit)


def _data_url_bytes(url: str, where: str, limits: Limits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise APIError(400, f"{where}: malformed data URL (no comma before the data)",
                       code="invalid_image_url")
    params = header[len("data:"):].split(";")
    media = params[0].strip().lower()
    if media and not media.startswith("image/"):
        raise APIError(400, f"{where}: the data URL's media type is {media[:50]!r}, not an "
                       "image (image/png, image/jpeg, ...)", code="invalid_image")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise APIError(400, f"{where}: data URLs must be base64-encoded "
                       "(data:image/png;base64,...)", code="invalid_image_url")
    payload = "".join(payload.split())  # some clients wrap base64 at 76 columns
    # Checked before decoding: the decoded size is 3/4 of the text, less padding.
    if len(payload) // 4 * 3 - payload.count("=") > limits.max_image_bytes:
        raise _too_large_bytes(where, len(payload) // 4 * 3, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: the data URL's payload is not valid base64 ({e})",
                       code="invalid_image") from None


def _too_large_bytes(where: str, size: int, limits: Limits) -> APIError:
    return APIError(413, f"{where} is {size:,} bytes; the limit is "
                    f"{limits.max_image_bytes:,} bytes (max_image_bytes)",
                    code="image_too_large")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most a few redirects, and only to http(s) (urllib would also follow ftp)."""

    max_redirections = _MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    shown = url if len(url) <= 120 else url[:117] + "..."
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "mmjobs-serve",
                                                   "Accept": "image/*"})
    # The socket timeout bounds each read; the deadline bounds the whole body, so a server
    # dripping one byte per second cannot hold a request for long.
    deadline = time.monotonic() + limits.image_fetch_timeout_s
    try:
        with opener.open(request, timeout=limits.image_fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _too_large_bytes(where, int(declared), limits)
            data = bytearray()
            while chunk := response.read1(_READ_CHUNK):  # what has arrived, not 64 kB
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise _too_large_bytes(where, len(data), limits)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete after {limits.image_fetch_timeout_s}s")
            return bytes(data)
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching {shown} failed with HTTP {e.code}",
                       code="image_fetch_failed") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"{where}: could not fetch {shown}: {reason}",
                       code="image_fetch_failed") from None


def decode_image_bytes(data: bytes, where: str, limits: Limits,
                       fit: Fit | None = None) -> Image.Image:
    """Encoded image bytes -> RGB image, checking bytes and header pixels before decoding.

    Raises:
        APIError: 413 over `max_image_bytes`/`max_image_pixels`; 400 for anything that is not
            a complete PNG/JPEG/GIF/WebP/BMP image.
    """
    with _open_checked(data, where, limits) as image:
        width, height = image.size
    return decode_image(EncodedImage(where, data, width, height), limits, fit)


def decode_image(encoded: EncodedImage, limits: Limits, fit: Fit | None = None) -> Image.Image:
    """Decode `encoded` once to RGB, scaled down to `fit(width, height)` if that is smaller.

    Raises:
        APIError: 400 for a truncated or corrupt image.
    """
    from PIL import Image

    from mmjobs.data.images import ImageModeError, to_rgb

    image = _open_checked(encoded.data, encoded.where, limits)
    target = fit(*image.size) if fit is not None else None
    if target is not None and (target[0] >= image.width or target[1] >= image.height):
        target = None  # never scale up: the processor does what it does to small images
    try:
        if target is not None:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale, but at least twice the target, so
            # the result stays within about 1% of a full decode and resize.
            image.draft("RGB", (2 * target[0], 2 * target[1]))
        image.load()  # LOAD_TRUNCATED_IMAGES stays off, so truncation raises here
        # The same conversion as training (16-bit scaled, transparency over white).
        rgb = image if image.mode == "RGB" else to_rgb(image)
    except ImageModeError as e:
        image.close()
        raise APIError(400, f"{encoded.where}: {e}", code="invalid_image") from None
    except Exception as e:
        image.close()
        raise APIError(400, f"{encoded.where} cannot be decoded; it is truncated or corrupt "
                       f"({type(e).__name__}: {e})", code="invalid_image") from None
    if target is not None and rgb.size != target:
        # reducing_gap: a box reduction first, then the filter; fast on big images and close
        # to a direct resize (the processor resizes again to its exact size anyway).
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if rgb is not image:
        image.close()  # frees the full-size pixels now, not when the collector runs
        if encoded.pixels > _TRIM_AFTER_PIXELS:
            _give_back_freed_memory()
    return rgb


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None on another C library (musl has no libc.so.6)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _give_back_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # microseconds; returns the free pages of every arena to the system


def _open_checked(data: bytes, where: str, limits: Limits) -> Image.Image:
    """PIL's lazy image for `data` (header parsed, no pixels), checked against the limits."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise _too_large_bytes(where, len(data), limits)
    if not data:
        raise APIError(400, f"{where} is empty (0 bytes)", code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # header only
    except UnidentifiedImageError:
        raise APIError(400, f"{where} is not an image: the data is not PNG, JPEG, GIF, WebP or "
                       f"BMP (it starts with {data[:8]!r})", code="invalid_image") from None
    except Image.DecompressionBombError as e:
        raise APIError(413, f"{where}: {e}", code="image_too_large") from None
    except Exception as e:  # PIL raises many types for a corrupt header
        raise APIError(400, f"{where} has a corrupt header ({type(e).__name__}: {e})",
                       code="invalid_image") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        image.close()
        raise APIError(413, f"{where} is {width}x{height} = {width * height:,} pixels; the "
                       f"limit is {limits.max_image_pixels:,} (max_image_pixels)",
                       code="image_too_large")
    return image
