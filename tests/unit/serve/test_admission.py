"""Admission on the tiny LLaVA: prompt tokens counted as the worker will, limits named, images
decoded once and scaled down to what the processor uses."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmjobs.eval.generate import PromptInput, load_for_inference
from mmjobs.serve.admission import Admission, context_length, processor_fit
from mmjobs.serve.engine import ServeGenerator
from mmjobs.serve.images import decode_image_bytes
from mmjobs.serve.limits import Limits
from mmjobs.serve.protocol import APIError, parse_chat_request
from tests.unit.serve.test_images import data_url, png_header_claiming


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    return load_for_inference(str(tiny_llava_dir))


def picture(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """Shapes at random places: enough detail that resampling differences show."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        draw.rectangle([x, y, x + size[0] // 5, y + size[1] // 5],
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def chat(text: str, images: list[bytes] = (), **fields):
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content.append({"type": "text", "text": text})
    return parse_chat_request({"model": "m", "messages": [{"role": "user", "content": content}],
                               **fields}, Limits(max_new_tokens_cap=8192))


def admit(admission: Admission, request) -> object:
    return asyncio.run(admission.admit(request))


def refusal(admission: Admission, request) -> APIError:
    with pytest.raises(APIError) as err:
        admit(admission, request)
    return err.value


def test_the_count_is_what_the_worker_encodes(loaded):
    admission = Admission(loaded, Limits())
    assert admission.context == 4096 and admission.max_prompt_tokens == 4096
    request = chat("Which bar is largest?", [picture((640, 480))])
    admitted = admit(admission, request)
    # Scaled down at once: the shorter side to the processor's 56, as it would resize.
    assert admitted.prompt.images[0].size == (74, 56)
    assert request.image_refs == []  # the data URL is not kept while the job waits
    gen = ServeGenerator(loaded, max_new_tokens=2)
    full = PromptInput(request.turns, [Image.open(io.BytesIO(picture((640, 480))))])
    assert admitted.prompt_tokens == gen.run([full])[0].prompt_tokens
    assert admitted.prompt_tokens > 16  # the image's 16 tokens are in it


def test_limits_are_named_with_the_count(loaded):
    admission = Admission(loaded, Limits())
    err = refusal(admission, chat("bar " * 4000, max_tokens=200))
    assert err.status == 400 and err.code == "context_length_exceeded"
    assert "max_tokens=200 leaves 3,896" in err.message and "at most 3,896" in err.message
    assert "the prompt is 4,0" in err.message  # 4001 words + the template's tokens
    err = refusal(admission, chat("q", max_tokens=4096))
    assert "leaves no room for a prompt" in err.message and err.param == "max_tokens"
    # Without max_tokens the default answer is shortened to the room left.
    admitted = admit(admission, chat("bar " * 4085))
    assert admitted.max_new_tokens == 4096 - admitted.prompt_tokens < 256
    lowered = Admission(loaded, Limits(max_prompt_tokens=20))
    err = refusal(lowered, chat("bar " * 30))
    assert "max_prompt_tokens=20" in err.message and "at most 20" in err.message


def test_an_over_long_text_is_refused_before_its_images_are_read(loaded):
    admission = Admission(loaded, Limits())
    # The image is not even valid: the length alone decides, before any image is looked at.
    err = refusal(admission, chat("bar " * 100_000, [b"not an image"]))
    assert err.code == "context_length_exceeded" and "at least" in err.message


def test_total_pixels_are_checked_before_anything_is_decoded(loaded):
    admission = Admission(loaded, Limits(max_image_pixels=1_000_000,
                                         max_request_pixels=1_500_000))
    # Headers only: decoding either would fail, so a 413 shows nothing was decoded.
    err = refusal(admission, chat("q", [png_header_claiming(1000, 800)] * 2))
    assert err.status == 413 and "1,600,000 pixels in all" in err.message
    assert "max_request_pixels" in err.message


def test_a_template_that_refuses_the_conversation_is_a_400(loaded):
    strict = dataclasses.replace(loaded, processor=copy.deepcopy(loaded.processor))
    strict.processor.chat_template = "{{ raise_exception('roles must alternate') }}"
    err = refusal(Admission(strict, Limits()), chat("q"))
    assert err.status == 400 and "roles must alternate" in err.message


@pytest.mark.parametrize(("fmt", "mean_bound"), [("PNG", 0.005), ("JPEG", 0.02)])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (2000, 300)])
def test_scaled_down_images_give_the_processor_nearly_the_same_pixels(loaded, fmt, mean_bound,
                                                                      size):
    data = picture(size, fmt)
    image_processor = loaded.processor.image_processor
    small = decode_image_bytes(data, "image 1", Limits(), processor_fit(loaded.processor))
    assert max(small.size) < max(size)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    a, b = (image_processor(images=[i], return_tensors="pt")["pixel_values"]
            for i in (full, small))
    assert float((a - b).abs().mean()) < mean_bound  # normalised units (std about 0.27)


def test_processor_fit_reads_the_resize_settings():
    def fit(**settings):
        return processor_fit(SimpleNamespace(image_processor=SimpleNamespace(**settings)))

    assert fit(size={"shortest_edge": 336})(1000, 500) == (672, 336)
    assert fit(size={"height": 384, "width": 384})(1000, 500) == (384, 384)
    assert fit(size={"longest_edge": 100})(1000, 500) == (100, 50)
    assert fit(size={}, max_pixels=250_000)(2000, 500) == (1000, 250)
    assert fit(size={"shortest_edge": 336}, do_resize=False) is None
    assert fit(size={"shortest_edge": 3136, "longest_edge": 12845056}) is None  # ambiguous
    assert processor_fit(SimpleNamespace()) is None  # a tokenizer: no images


def test_context_length_from_the_config():
    def model(**fields):
        return SimpleNamespace(config=SimpleNamespace(**fields))

    assert context_length(model(max_position_embeddings=2048)) == 2048
    assert context_length(model(n_positions=1024)) == 1024
    assert context_length(model(hidden_size=8)) is None
