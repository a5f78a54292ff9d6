"""Image-code tokens of Chameleon-style models (images as VQ codes in the token vocabulary).

Upstream `ChameleonForConditionalGeneration.forward` masks the logits of every image-code
token, so they can be neither generated nor learned. `enable_image_generation` lifts that
while keeping the token <-> code tables; the trainer applies it when it loads a Chameleon for
training (image tokens in the labels), interleaved inference when it may emit images.
"""

from __future__ import annotations

from functools import cached_property

from torch import nn

__all__ = ["enable_image_generation", "image_code_tokens", "vocabulary_owner"]



def vocabulary_owner(model: nn.Module) -> nn.Module:
    """The `ChameleonModel` inside `model` (peft / DeepSpeed wrappers included)."""
    for module in model.modules():
        if hasattr(module, "vocabulary_mapping") and hasattr(module, "vqmodel"):
            return module
    raise ValueError(f"{type(model).__name__} is not an image-token model: no module with a "
                     "Chameleon vocabulary_mapping and vqmodel inside it")


def enable_image_generation(model: nn.Module) -> nn.Module:
    """Let a Chameleon model score its image-code tokens (idempotent; returns `model`).

    Upstream `ChameleonForConditionalGeneration.forward` masks the logits of
    `vocabulary_mapping.image_tokens` to the dtype's minimum, so those tokens can be neither
    generated nor learned (a labelled image token costs an infinite loss and passes no
    gradient). The mapping is replaced by one whose `image_tokens` is empty while the code <->
    token tables stay complete, so images still encode to tokens and tokens decode to codes.

    Raises:
        ValueError: `model` is not a Chameleon-style image-token model.
    """
    owner = vocabulary_owner(model)
    if not isinstance(owner.vocabulary_mapping, _GeneratingVocabularyMapping):
        owner.vocabulary_mapping = _GeneratingVocabularyMapping(
            owner.vocabulary_mapping.vocab_map)
    return model


def image_code_tokens(model: nn.Module) -> list[int]:
    """Token ids of the image codes, sorted (their position is the VQ code index order)."""
    mapping = vocabulary_owner(model).vocabulary_mapping
    return sorted(mapping.bpe2img)


def _mapping_base() -> type:
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    return ChameleonImageVocabularyMapping


class _GeneratingVocabularyMapping(_mapping_base()):  # type: ignore[misc]
    """Chameleon's token <-> VQ code mapping, with nothing left for the forward to mask."""

    @cached_property
    def code_tokens(self) -> list[int]:
        return sorted(v for name, v in self.vocab_map.items() if name.startswith("IMGIMG"))

    @property
    def image_tokens(self) -> list[int]:  # what the forward masks: nothing
        return []

    @cached_property
    def bpe2img(self) -> dict[int, int]:
        digits = {chr(ord("A") + i): str(i) for i in range(10)}
        return {tok: int("".join(digits.get(c, c) for c in self.val2name[tok][len("IMGIMG"):-1]))
                for tok in self.code_tokens}
