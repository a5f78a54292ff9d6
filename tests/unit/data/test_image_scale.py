"""Decoding at the scale the image processor needs: large JPEGs take libjpeg's reduced decode,
and what the model sees stays within a small tolerance of a full decode (real CLIP-336
preprocessor config); everything else decodes exactly as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmjobs.data.images import DRAFT_MARGIN, decode_rgb, processor_min_edge
from mmjobs.data.loader import _decode_image
from mmjobs.models.replicas._common import published_dir

CLIP_336 = published_dir("openai--clip-vit-large-patch14-336")
pytestmark = pytest.mark.torchvision  # the decode is the same with either backend


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, hard-edged shapes and sensor-like noise: what photos and charts mix."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 220], -1)
    noise = rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise + 20, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        draw.rectangle([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(5, 200))],
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw.text((x0, y0), "Revenue 2023", fill=(0, 0, 0))
    return image


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(CLIP_336, backend="pil")


def test_processor_min_edge_reads_the_size_the_processor_resizes_to(clip_processor):
    assert processor_min_edge(clip_processor) == 336  # shortest_edge 336, crop 336x336

    class Square:
        def __init__(self) -> None:
            self.size = {"height": 448, "width": 448}  # XComposer2, SigLIP

    class Patches:
        size = None  # Pix2Struct: a patch budget, no edge
        max_patches = 512

    assert processor_min_edge(Square()) == 448
    assert processor_min_edge(Patches()) is None
    assert processor_min_edge(object()) is None


def test_large_jpeg_decodes_reduced_and_the_model_input_barely_moves(clip_processor):
    data = jpeg(photo(2880, 2160))
    full, reduced = decode_rgb(data), decode_rgb(data, min_edge=336)
    assert full.size == (2880, 2160)
    # libjpeg's 1/2 .. 1/8 scales: the smallest that keeps the short edge >= 2 x 336.
    assert reduced.size == (1440, 1080)
    assert min(reduced.size) >= DRAFT_MARGIN * 336

    def pixels(image):
        return clip_processor(image, return_tensors="np")["pixel_values"][0]

    diff = np.abs(pixels(full) - pixels(reduced))  # normalised units (std ~0.27 per channel)
    assert diff.mean() < 0.01, diff.mean()
    assert np.percentile(diff, 99.9) < 0.15, np.percentile(diff, 99.9)


@pytest.mark.parametrize("size", [(640, 480), (1280, 720)])
def test_jpeg_not_twice_the_needed_size_decodes_in_full(size):
    data = jpeg(photo(*size))
    assert np.array_equal(np.asarray(decode_rgb(data, min_edge=336)),
                          np.asarray(decode_rgb(data)))


def test_other_formats_decode_in_full():
    buf = io.BytesIO()
    photo(2000, 1500).save(buf, "PNG")
    assert decode_rgb(buf.getvalue(), min_edge=224).size == (2000, 1500)


def test_grayscale_jpeg_stays_grayscale_content_when_reduced():
    data = jpeg(photo(2400, 1800).convert("L"))
    reduced = decode_rgb(data, min_edge=224)
    assert reduced.mode == "RGB" and reduced.size == (600, 450)
    r, g, b = (np.asarray(reduced)[..., c] for c in range(3))
    assert np.array_equal(r, g) and np.array_equal(g, b)


def test_loader_decodes_at_its_processors_scale(clip_processor):
    data = jpeg(photo(2880, 2160))
    assert _decode_image(data, "row-1", processor_min_edge(clip_processor)).size == (1440, 1080)
    assert _decode_image(data, "row-1").size == (2880, 2160)  # no processor: the whole image
