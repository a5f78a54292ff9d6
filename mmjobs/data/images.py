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
import math

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


def decode_rgb(data: bytes, min_edge: int | None = None) -> Image.Image:
    """Decode encoded image bytes fully (a truncated file raises now) and return `to_rgb` of it.

    With `min_edge`, a JPEG larger than needed is decoded at a reduced scale (PIL's draft mode:
    libjpeg's 1/2, 1/4 or 1/8 DCT scaling, several times cheaper than a full decode) that keeps
    its shorter edge at least `DRAFT_MARGIN * min_edge`; the image processor then resizes from
    there. Other formats, and JPEGs that are not large enough, decode in full. The margin keeps
    the processed pixels close to a full decode's (tests/unit/data/test_images.py measures it).

    Raises PIL's `UnidentifiedImageError` / `OSError` for undecodable bytes and
    `ImageModeError` for unsupported modes.
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_edge is not None and image.format == "JPEG":
            _draft(image, min_edge)
        image.load()
        return to_rgb(image)


# The reduced decode keeps twice the edge the processor resizes to: its box-like downscale then
# stays well below the final resize's own filter width.
DRAFT_MARGIN = 2


def _draft(image: Image.Image, min_edge: int) -> None:
    """Ask libjpeg for the smallest scale whose shorter edge is >= DRAFT_MARGIN * min_edge."""
    width, height = image.size
    scale = DRAFT_MARGIN * min_edge / min(width, height)
    if scale >= 0.5:  # no 1/2 reduction would keep enough pixels
        return
    # draft() picks the largest reduction that keeps both sides >= the requested size; the
    # image's own mode, so it never converts (RGB to L) on the way.
    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit samples (0..65535) -> `L` (0..255), rounding to nearest: v * 255 / 65535."""
    samples = np.asarray(image).astype(np.uint32)  # I;16B arrives big-endian; astype fixes order
    scaled = (samples * 255 + _MAX_16 // 2) // _MAX_16
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def processor_min_edge(image_processor: object) -> int | None:
    """The largest output edge `image_processor` resizes to (from its `size` and `crop_size`:
    `shortest_edge`, `longest_edge`, `height`, `width`), for `decode_rgb(min_edge=...)`; None
    when it declares no size in those terms (patch-budget processors such as Pix2Struct's), so
    such images decode in full."""
    edges = []
    for attr in ("size", "crop_size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, int):
            edges.append(size)
            continue
        get = getattr(size, "get", None)  # dict or transformers' SizeDict
        if get is None:
            continue
        edges += [v for k in ("shortest_edge", "longest_edge", "height", "width")
                  if isinstance(v := get(k), int) and v > 0]
    return max(edges) if edges else None
