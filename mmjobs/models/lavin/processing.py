"""`LavinProcessor`: LaVIN's tokenizer (LLaMA's SentencePiece + `<image>`) and image transform.

- Images: LaVIN's `transforms.Resize((224, 224), BICUBIC) -> ToTensor -> Normalize(ImageNet
  mean/std)` (util/datasets.py): a square resize without keeping the aspect ratio, no crop,
  ImageNet statistics rather than CLIP's. Here a `CLIPImageProcessor` configured that way
  (PIL's bicubic resize in the PIL backend, as torchvision's `Resize` on a PIL image does).
- Text: LLaMA's tokenizer with `<image>` added as a special token after the 32,000 pieces
  (the model never embeds it; `LavinForConditionalGeneration` puts visual features there) and
  `<unk>` (id 0) as padding, which is what LaVIN pads with.
- Each `<image>` in a text becomes `num_visual_tokens` (6) `<image>` tokens.

The text LaVIN builds around the image ("Image: " + visual tokens, "Image: N/A" without one)
is the `lavin` conversation format's job (`mmjobs.data.conversation`), not the processor's.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin

from mmjobs.models.lavin.config import IMAGENET_MEAN, IMAGENET_STD

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<unk>"  # LaVIN pads with id 0


class LavinProcessor(ProcessorMixin):
    """LaVIN's processor (see the module docstring).

    Args:
        image_processor: the image transform (`lavin_image_processor`).
        tokenizer: LLaMA's tokenizer with `<image>` added (`lavin_tokenizer`).
        image_token: the placeholder string.
        num_visual_tokens: tokens each image becomes (the model config's value).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, image_token: str = IMAGE_TOKEN,
                 num_visual_tokens: int = 6, **kwargs: Any) -> None:
        self.image_token = image_token
        self.num_visual_tokens = num_visual_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """What one `<image>` becomes in the text: `num_visual_tokens` copies of it."""
        return self.image_token * self.num_visual_tokens


def lavin_image_processor(image_size: int = 224) -> Any:
    """LaVIN's image transform as a (PIL-backend) `CLIPImageProcessor`."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True, size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)


def lavin_tokenizer(tokenizer: Any) -> Any:
    """LLaMA's tokenizer made LaVIN's: `<image>` added (special), `<unk>` as padding, right
    padding for training (generation switches to left padding itself)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "right"
    return tokenizer
