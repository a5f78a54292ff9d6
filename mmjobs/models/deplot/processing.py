"""`DeplotLlavaProcessor`: Pix2Struct's variable-resolution patches + the LLM's tokenizer.

- Images: Pix2Struct's own preprocessing (`Pix2StructImageProcessorPil`: per-image
  normalisation, aspect-preserving resize to at most `max_patches` 16x16 patches, each patch
  flattened with its row and column index, zero rows as padding). `DeplotImageProcessor` only
  renames the output: the patches travel as `pixel_values` `[n, max_patches, 2 + 3·16·16]`
  (what mmjobs' loaders and LLaVA's forward pass along), and Pix2Struct's patch mask is left
  out (the model derives the same mask from the zero rows; a second `attention_mask` would
  collide with the text's).
- Text: the LLM's tokenizer with `<image>` added as a special token; each `<image>` becomes
  `max_patches` image tokens (ChartWiz feeds every patch position, padding included, to the
  LLM: 512 per image).

ChartWiz's `model_vqa.py` passes a header text ("Generate underlying data table of the figure
below:") at inference; `ybelkada/pix2struct-base`'s processor is not a VQA processor
(`is_vqa` false), so the header is never rendered, in training or inference; here too.
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature, ProcessorMixin
from transformers.models.pix2struct.image_processing_pil_pix2struct import (
    Pix2StructImageProcessorPil,
)

IMAGE_TOKEN = "<image>"


class DeplotImageProcessor(Pix2StructImageProcessorPil):
    """Pix2Struct's image processor with its patches under `pixel_values` (module docstring)."""

    model_input_names = ["pixel_values"]  # noqa: RUF012 (class attribute in transformers)

    def _preprocess(self, *args: Any, **kwargs: Any) -> BatchFeature:
        out = super()._preprocess(*args, **kwargs)
        return BatchFeature(data={"pixel_values": out["flattened_patches"]},
                            tensor_type=kwargs.get("return_tensors"))


class DeplotLlavaProcessor(ProcessorMixin):
    """The processor of `DeplotLlavaForConditionalGeneration` (see the module docstring).

    Args:
        image_processor: a `DeplotImageProcessor`.
        tokenizer: the LLM's tokenizer with `image_token` in its vocabulary.
        image_token: the placeholder string.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, image_token: str = IMAGE_TOKEN,
                 **kwargs: Any) -> None:
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image: the image processor's `max_patches`."""
        return int(self.image_processor.max_patches)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """What one `<image>` becomes in the text: `max_patches` copies of it."""
        return self.image_token * self.num_image_tokens


def deplot_image_processor(source: Any = None, *, max_patches: int) -> DeplotImageProcessor:
    """A `DeplotImageProcessor` with `source`'s settings (a Pix2Struct image processor, or None
    for Pix2Struct's defaults: 16x16 patches, per-image normalisation) and `max_patches`."""
    settings = {} if source is None else {
        k: v for k, v in source.to_dict().items()
        if k in ("patch_size", "do_normalize", "do_convert_rgb")}
    return DeplotImageProcessor(**settings, max_patches=max_patches, is_vqa=False)
