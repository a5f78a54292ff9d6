"""Bad requests get the right 4xx with a clear message, and the server keeps serving."""

from __future__ import annotations

import http.client
import io
import json
import os

import pytest
from PIL import Image

from tests.integration.serve.client import Client, chart_png, chat_body, data_url
from tests.integration.serve.conftest import MODEL_NAME
from tests.unit.serve.test_images import png_header_claiming

KEY = "serve-test-key"
LIMITS = {"max_request_bytes": 200_000, "max_image_bytes": 50_000,
          "max_image_pixels": 1_000_000, "max_request_pixels": 1_500_000}


@pytest.fixture(scope="module")
def noise_png() -> bytes:
    """About 67 kB of PNG (noise does not compress): over the image limit, under the body's."""
    return _png(Image.frombytes("RGB", (150, 150), os.urandom(150 * 150 * 3)))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def guarded(start_server):
    return start_server(api_key=KEY, **LIMITS)


def image_body(*urls: str) -> dict:
    body = chat_body(MODEL_NAME)
    body["messages"][0]["content"][:0] = [{"type": "image_url", "image_url": {"url": url}}
                                          for url in urls]
    return body


def assert_still_serving(server) -> None:
    reply = Client(server.url, KEY).chat(chat_body(MODEL_NAME, image=chart_png(), max_tokens=4))
    assert reply.status == 200, reply.body


def cases(noise: bytes) -> list[tuple[str, bytes | dict, dict, int, str, str]]:
    """(name, body, headers, status, error code, message fragment)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    return [
        ("malformed JSON", b'{"model": "tiny-llava", "messages": [', auth, 400, "invalid_json",
         "malformed JSON"),
        ("empty body", b"", auth, 400, "invalid_json", "malformed JSON"),
        ("not UTF-8", b"\xff\xfe\x00{", auth, 400, "invalid_json", "malformed JSON"),
        ("oversized body", image_body("data:image/png;base64," + "A" * 300_000), auth, 413,
         "request_too_large", "over 200,000 bytes"),
        ("oversized image", image_body(data_url(noise)), auth, 413, "image_too_large",
         "the limit is 50,000 bytes"),
        ("too many pixels", image_body(data_url(png_header_claiming(2000, 2000))), auth, 413,
         "image_too_large", "2000x2000 = 4,000,000 pixels"),
        ("too many pixels in all", image_body(*[data_url(png_header_claiming(1000, 800))] * 2),
         auth, 413, "image_too_large", "1,600,000 pixels in all"),
        ("stop string too long", {**chat_body(MODEL_NAME), "stop": "x" * 1000}, auth, 400,
         "stop_too_long", "at most 128"),
        ("seed out of range", {**chat_body(MODEL_NAME), "seed": 2**64}, auth, 400,
         "invalid_request", "seed="),
        ("deeply nested JSON", b"[" * 100_000, auth, 400, "invalid_json", "nested too deeply"),
        ("lone surrogate", b'{"model": "tiny-llava", "messages": [{"role": "user", "content": '
         b'"\\udc00"}]}', auth, 400, "invalid_unicode", "lone UTF-16 surrogate"),
        ("text as an image", image_body(data_url(b"just some text, not a picture")), auth, 400,
         "invalid_image", "image 1 is not an image"),
        ("truncated image", image_body(data_url(chart_png()[:80])), auth, 400, "invalid_image",
         "truncated or corrupt"),
        ("non-image media type", image_body("data:application/pdf;base64,JVBERi0="), auth, 400,
         "invalid_image", "not an image"),
        ("image URL (not allowed)", image_body("http://127.0.0.1:1/x.png"), auth, 400,
         "image_url_not_allowed", "allow_image_urls"),
        ("unknown model", {**chat_body("gpt-4o")}, auth, 404, "model_not_found",
         "does not exist"),
        ("bad field", {**chat_body(MODEL_NAME), "max_tokens": 10**6}, auth, 400,
         "invalid_request", "max_tokens"),
        ("missing auth", chat_body(MODEL_NAME), {}, 401, "missing_api_key", "Bearer"),
        ("wrong auth", chat_body(MODEL_NAME), {"Authorization": "Bearer nope"}, 401,
         "invalid_api_key", "invalid API key"),
    ]


def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(guarded, noise_png):
    assert len(noise_png) > LIMITS["max_image_bytes"]
    for name, body, headers, status, code, fragment in cases(noise_png):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = Client(guarded.url).request("POST", "/v1/chat/completions", raw, headers)
        assert reply.status == status, (name, reply.body)
        error = reply.error
        assert error["code"] == code, (name, error)
        assert fragment in error["message"], (name, error["message"])
        assert error["type"] == "invalid_request_error"
        if status == 401:
            assert reply.headers["www-authenticate"].startswith("Bearer")
        assert_still_serving(guarded)


def test_oversized_chunked_body_is_cut_off(guarded):
    """No Content-Length: the limit applies to the bytes as they arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    pieces = (b"x" * 10_000 for _ in range(40))
    conn.request("POST", "/v1/chat/completions", body=pieces, encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"})
    reply = conn.getresponse()
    assert reply.status == 413
    assert json.loads(reply.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert_still_serving(guarded)


def test_wrong_routes_and_methods_are_json_errors(guarded):
    client = Client(guarded.url, KEY)
    reply = client.request("GET", "/v1/chat/completions")
    assert reply.status == 405 and reply.error["code"] == "method_not_allowed"
    reply = client.request("POST", "/v1/completions", chat_body(MODEL_NAME))
    assert reply.status == 404 and "/v1/chat/completions" in reply.error["message"]
    models = Client(guarded.url).request("GET", "/v1/models")
    assert models.status == 401
    assert_still_serving(guarded)
