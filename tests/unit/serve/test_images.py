"""Image inputs: data URLs, limits checked before decoding, non-images refused by name."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmjobs.serve.images import decode_image_bytes, load_image_ref
from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError


def png_bytes(size=(40, 30), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but that holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as err:
        fn(*args)
    return err.value


def test_data_url_decodes_to_rgb():
    image = load_image_ref(data_url(png_bytes()), 0, Limits())
    assert image.mode == "RGB" and image.size == (40, 30)
    # Line-wrapped base64 (some clients wrap at 76 columns) is accepted too.
    encoded = base64.encodebytes(png_bytes()).decode()
    assert load_image_ref(f"data:image/png;base64,{encoded}", 0, Limits()).size == (40, 30)


def test_a_16_bit_png_keeps_its_gradient_as_in_training():
    # Serving must see the pixels training saw (mmjobs.data.images.to_rgb), not PIL's clip.
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # uint16 -> mode I;16
    image = load_image_ref(data_url(buf.getvalue()), 0, Limits())
    row = np.asarray(image)[0, :, 0].astype(int)
    assert image.mode == "RGB"
    assert list(row) == [round(int(v) * 255 / 65535) for v in ramp[0]]


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    limits = Limits(max_image_pixels=1_000_000)
    start = time.perf_counter()
    err = error_of(decode_image_bytes, png_header_claiming(5000, 5000), "image 1", limits)
    assert err.status == 413 and "5000x5000" in err.message and "max_image_pixels" in err.message
    # PIL's own bomb guard (beyond 2 x 89M pixels) is answered the same way.
    err = error_of(decode_image_bytes, png_header_claiming(100_000, 100_000), "image 1", Limits())
    assert err.status == 413
    assert time.perf_counter() - start < 2, "nothing may be decoded"


def test_byte_limit_is_checked_on_the_base64_text():
    limits = Limits(max_image_bytes=1000)
    err = error_of(load_image_ref, data_url(b"\0" * 5000), 2, limits)
    assert err.status == 413 and err.message.startswith("image 3 is") and "1,000" in err.message


@pytest.mark.parametrize(("url", "fragment"), [
    (data_url(b"hello, this is text"), "is not an image"),
    (data_url(b"hello", "text/plain"), "media type is 'text/plain'"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64", "no comma"),
    (data_url(b""), "empty"),
    (data_url(png_bytes()[:60]), "truncated or corrupt"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
])
def test_non_images_are_400_with_the_reason(url, fragment):
    err = error_of(load_image_ref, url, 0, Limits())
    assert err.status == 400
    assert fragment in err.message


def test_formats_outside_the_allow_list_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    assert "not PNG, JPEG" in error_of(load_image_ref, data_url(buf.getvalue(), "image/tiff"),
                                       0, Limits()).message


def test_image_urls_are_refused_unless_allowed():
    err = error_of(load_image_ref, "http://169.254.169.254/latest/meta-data", 0, Limits())
    assert err.status == 400 and "allow_image_urls" in err.message


@pytest.fixture
def image_host():
    """A loopback HTTP server: /ok.png, /big.png (over the limit), /slow.png, /redirect."""
    payload = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            body = {"/ok.png": payload, "/big.png": b"\0" * 5000}.get(self.path, payload)
            self.send_response(200 if self.path != "/missing" else 404)
            self.send_header("Content-Type", "image/png")
            if self.path != "/slow.png":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/slow.png":  # drips bytes: only the total deadline stops it
                for byte in body[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_allowed_image_urls_are_fetched_within_limits(image_host):
    limits = Limits(allow_image_urls=True, max_image_bytes=1000, image_fetch_timeout_s=0.5)
    assert load_image_ref(f"{image_host}/ok.png", 0, limits).size == (40, 30)
    assert error_of(load_image_ref, f"{image_host}/big.png", 0, limits).status == 413
    assert "HTTP 404" in error_of(load_image_ref, f"{image_host}/missing", 0, limits).message
    start = time.perf_counter()
    assert "not complete" in error_of(load_image_ref, f"{image_host}/slow.png", 0, limits).message
    assert time.perf_counter() - start < 2
    assert error_of(load_image_ref, f"{image_host}/redirect", 0, limits).status == 400
