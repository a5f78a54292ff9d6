"""Image-token models (Chameleon): which models read images as VQ codes, and the VQ encoder
alone that turns pixels into those codes at pre-tokenization time.

`SampleEncoder` (`mmjobs.data.sample_encoder`) writes `VQImageTokenizer.tokens(...)` over the
`<image>` placeholders; `mmjobs.data.processor_files` keeps the weight files
(`WEIGHT_SUFFIXES`) only for the models `is_image_token_model` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Weight files, which only image-token models need at pre-tokenization time.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json",
                   ".bin.index.json")


def is_image_token_model(config: Any) -> bool:
    """True for models that read images as discrete tokens (Chameleon's VQ codes).

    `config` is a transformers config or the `config.json` dict.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(
        config, "model_type", None)
    return model_type == "chameleon"


class VQImageTokenizer:
    """Chameleon's VQ-VAE encoder alone: pixel values -> image token ids.

    Loads only the `model.vqmodel.*` tensors (a few hundred MB for Chameleon-7B, instead of the
    whole model in every worker) and maps VQ codes to token ids through the config's
    `vocabulary_map`, exactly like `ChameleonModel.get_image_tokens`.
    """

    PREFIX = "model.vqmodel."
    DECODER = "model.vqmodel.decoder."

    def __init__(self, model_dir: Path, config: Any) -> None:
        import torch
        from safetensors import safe_open
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonImageVocabularyMapping,
            ChameleonVQVAE,
        )

        self.model = ChameleonVQVAE(config.vq_config).eval()
        state = {}
        for path in _weight_files(model_dir, self.PREFIX):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    # The image decoder (AA-chameleon ships one) only draws images.
                    if key.startswith(self.PREFIX) and not key.startswith(self.DECODER):
                        state[key[len(self.PREFIX):]] = f.get_tensor(key)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{model_dir}: VQ-VAE weights do not match the config (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.model.to(torch.float32)
        self.mapping = ChameleonImageVocabularyMapping(config.vocabulary_map)

    def tokens(self, pixel_values: Any) -> list[int]:
        """Image token ids for a batch of images, flattened in image order.

        Args:
            pixel_values: `(num_images, 3, H, W)` array or tensor from the image processor.
        """
        import numpy as np
        import torch

        pixels = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
        with torch.inference_mode():
            codes = self.model.encode(pixels, return_dict=True).image_tokens
        return [int(t) for t in self.mapping.convert_img2bpe(codes).view(-1)]


def _weight_files(model_dir: Path, prefix: str) -> list[Path]:
    """The safetensors files holding tensors under `prefix` (via the index when sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json); image-token models "
                            "need their VQ-VAE weights in safetensors format")
