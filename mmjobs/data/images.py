"""Decoded images to the 8-bit RGB a vision model takes, for every image mode PIL opens.

`to_rgb(image)` is the one place mmjobs turns an image into model input (the training loader,
pre-tokenization's VQ image tokens; generation and serving should call it too), so the model
sees the same pixels in training and at inference. PIL's own `convert("RGB")` gets two kinds of
image wrong:

- **High bit depth.** A 16-bit grayscale PNG or TIFF opens as `I;16`/`I;16B` (or `I`), and
  `convert("RGB")` *clips* sample values to 0-255 instead of scaling them: a full-range
  gradient turns almost entirely white. Here 16-bit samples are scaled by 255/65535 (rounded),
  so the gradient stays a gradient. `I` (32-bit integer) is taken as 16-bit samples (what PIL
  gives for 16-bit PNG/TIFF data); values outside 0-65535 have no defined scale and are
  refused.
- **Transparency.** `convert("RGB")` drops the alpha channel and shows whatever colour the
  transparent pixels hold (often black: black text on a transparent chart becomes a black
  square). Images with alpha (`RGBA`, `LA`, `PA`, `La`, `RGBa`, or a `transparency` entry as in
  `P`, `L` and `RGB` PNGs) are composited over white, as transformers' `convert_to_rgb` does.

32-bit float images (`F`) are refused: floating-point samples have no agreed display range
(0-1 in some tools, 0-255 or HDR in others), and guessing would change what the model sees
without anyone noticing. `check_convertible` says why an image would be refused, so the prepare
stage rejects it (`image_unsupported_mode`) instead of training failing later.

Everything else (`1`, `L`, `P`, `RGB`, `CMYK`, `YCbCr`, `LAB`, `HSV`) goes through PIL's
conversion, which handles those colour spaces properly.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
UNSUPPORTED_MODES = {"F": "32-bit floating-point samples (mode F) have no defined brightness "
                          "range; save the image as 8- or 16-bit PNG"}
_MAX_16 = 65535


class ImageModeError(ValueError):
    """An image whose samples cannot be turned into 8-bit RGB without guessing."""


def check_convertible(image: Image.Image) -> str | None:
    """Why `to_rgb` would refuse `image` (loaded), or None. Reads pixel values only for `I`."""
    if image.mode in UNSUPPORTED_MODES:
        return UNSUPPORTED_MODES[image.mode]
    if image.mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > _MAX_16:
            return (f"32-bit integer samples range {low}..{high}, beyond 16 bits (0..65535): "
                    "no defined scale to 8 bits; save the image as 8- or 16-bit PNG")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image with `image`'s content (see the module docstring for each mode).

    Raises `ImageModeError` for images that cannot be converted without guessing (`F`, `I`
    beyond 16 bits).
    """
    problem = check_convertible(image)
    if problem:
        raise ImageModeError(problem)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        return _scale_to_8bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (a truncated file raises now) and return `to_rgb` of it.

    Raises PIL's `UnidentifiedImageError` / `OSError` for undecodable bytes and
    `ImageModeError` for unsupported modes.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit samples (0..65535) -> `L` (0..255), rounding to nearest: v * 255 / 65535."""
    samples = np.asarray(image).astype(np.uint32)  # I;16B arrives big-endian; astype fixes order
    scaled = (samples * 255 + _MAX_16 // 2) // _MAX_16
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L
