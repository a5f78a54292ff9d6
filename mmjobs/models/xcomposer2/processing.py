"""XComposer2's processor: its image transform, and `<ImageHere>` expanded to the image tokens.

- `XComposer2ImageProcessor` reproduces the remote code's `vis_processor` (and ChartMoE's
  `ImageProcessor`): `Resize((S, S), BICUBIC)` on the PIL image (no crop, no padding: the
  aspect ratio is not kept), `ToTensor` (/255), `Normalize(CLIP mean, CLIP std)`, S = 490.
  PIL does the resize, as torchvision's `Resize` does for PIL images; a tensor resize
  (antialiased or not) would give other pixels.
- `XComposer2Processor` writes `image_seq_length` (1225 at 490 px) copies of the image token
  for every `<ImageHere>` in the text and tokenizes with the model's tokenizer (BOS added, no
  EOS, as InternLM2's tokenizer). The model puts each image's features over those positions.
  `<ImageHere>` is the remote code's placeholder text; here it is also a special token of the
  tokenizer, one id past the vocabulary (never embedded, never predicted).
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from mmjobs.models.xcomposer2.configuration import IMAGE_TOKEN


class XComposer2ImageProcessor(PilBackend):
    """Resize to 490x490 (bicubic, PIL), rescale to [0, 1], CLIP-normalise; no crop."""

    model_input_names = ["pixel_values"]  # noqa: RUF012
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 490, "width": 490}  # noqa: RUF012
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True


class XComposer2Processor(ProcessorMixin):
    """Image processor + tokenizer; each `<ImageHere>` becomes `image_seq_length` image tokens.

    Args:
        image_processor: `XComposer2ImageProcessor`.
        tokenizer: the converted InternLM2 tokenizer (with `<ImageHere>` as a special token).
        image_token: the placeholder text (`<ImageHere>`).
        image_seq_length: positions per image ((img_size / 14)^2, CLS dropped).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 image_token: str = IMAGE_TOKEN, image_seq_length: int = 1225,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """The text one image placeholder expands to."""
        return self.image_token * self.image_seq_length
