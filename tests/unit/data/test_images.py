"""`mmjobs.data.images`: every image mode to the 8-bit RGB the model sees, compared pixel by
pixel, and the training paths (pre-tokenization, the loader) going through it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmjobs.data.images import ImageModeError, check_convertible, decode_rgb, to_rgb
from mmjobs.data.loader import _decode_image
from mmjobs.data.sample_encoder import SampleRejected, _open_image

WIDTH = 512
RAMP16 = np.linspace(0, 65535, WIDTH).round().astype(np.uint16)  # full 16-bit range
EXPECTED8 = ((RAMP16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def gradient16() -> Image.Image:
    """A 16-bit grayscale horizontal gradient, 0 -> 65535."""
    return Image.fromarray(np.tile(RAMP16, (3, 1)))


def test_16bit_png_gradient_stays_a_gradient():
    data = encoded(gradient16())
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # What PIL's own conversion does: every sample over 255 clips to white.
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, :, 0]
    assert (clipped == 255).mean() > 0.99

    rgb = np.asarray(decode_rgb(data))
    assert rgb.shape == (3, WIDTH, 3) and rgb.dtype == np.uint8
    assert (rgb == EXPECTED8[None, :, None]).all()  # every pixel, every channel
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert (np.diff(rgb[0, :, 0].astype(int)) >= 0).all() and len(np.unique(rgb)) == 256


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I"])
def test_other_16bit_layouts_scale_the_same(mode):
    if mode == "I":
        image = Image.fromarray(np.tile(RAMP16.astype(np.int32), (3, 1)))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (WIDTH, 3), np.tile(RAMP16, (3, 1)).astype(dtype).tobytes())
    assert image.mode == mode
    assert (np.asarray(to_rgb(image))[:, :, 1] == EXPECTED8).all()


def test_16bit_tiff_big_endian_file():
    data = encoded(Image.frombytes("I;16B", (WIDTH, 2), np.tile(RAMP16, (2, 1)).astype(">u2")
                                   .tobytes()), "TIFF")
    assert (np.asarray(decode_rgb(data))[1, :, 2] == EXPECTED8).all()


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # black text on a transparent chart
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    assert np.asarray(rgba.convert("RGB")).tolist() == [[[0, 0, 0]] * 3]  # PIL: all black
    assert np.asarray(decode_rgb(encoded(rgba))).tolist() == \
        [[[255, 255, 255], [0, 0, 0], [127, 127, 127]]]

    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    reread = Image.open(io.BytesIO(encoded(palette)))
    assert reread.mode == "P" and "transparency" in reread.info
    assert np.asarray(to_rgb(reread)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


@pytest.mark.parametrize("mode, colour, expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_ordinary_modes_convert_as_pil_does(mode, colour, expected):
    assert to_rgb(Image.new(mode, (2, 2), colour)).getpixel((1, 1)) == expected


def test_float_and_over_16bit_images_are_refused_with_the_reason():
    with pytest.raises(ImageModeError, match="mode F"):
        to_rgb(Image.new("F", (2, 2), 0.5))
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert "range 0..70000, beyond 16 bits" in check_convertible(wide)
    with pytest.raises(ImageModeError):
        to_rgb(wide)


def test_pretokenize_and_loader_decode_through_the_helper():
    data = encoded(gradient16())
    assert (np.asarray(_open_image(data, 0))[2, :, 0] == EXPECTED8).all()
    assert (np.asarray(_decode_image(data, "row-1"))[2, :, 0] == EXPECTED8).all()

    floats = encoded(Image.new("F", (2, 2), 0.5), "TIFF")
    with pytest.raises(SampleRejected) as e:
        _open_image(floats, 1)
    assert e.value.reason.startswith("image_unsupported_mode: image 1: 32-bit floating-point")
    with pytest.raises(ValueError, match="row 'row-2': image cannot be used: 32-bit floating"):
        _decode_image(floats, "row-2")
