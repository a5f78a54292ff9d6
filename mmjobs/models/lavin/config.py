"""`LavinConfig`: LLaMA + CLIP ViT-L/14 joined by mixture-of-modality adapters (LaVIN).

The defaults are LaVIN-7B's (luogen1996/LaVIN `scripts/finetuning_sqa_7b.sh`): LLaMA-7B from
Meta's `params.json`, OpenAI CLIP ViT-L/14 at 224 px, adapter dim 8 (groups 2, scale 1),
router temperature 10, six visual tokens (the CLS token after every 4th of CLIP's 24 blocks)
through `adapter_proj` (1024 -> 128 -> 4096, SiLU), adapter dropout 0.1, sequences of at most
512 positions (the modality token included), images resized to 224 px and normalised with
ImageNet's mean and std (not CLIP's).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# OpenAI CLIP ViT-L/14 (224 px), what LaVIN's `clip.load('ViT-L/14')` loads.
CLIP_VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# LLaMA-7B (params.json: dim 4096, 32 heads, 32 layers, norm_eps 1e-6; FFN 11008 derived).
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
            "vocab_size": 32000, "max_position_embeddings": 2048, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": False}
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # timm's IMAGENET_DEFAULT_MEAN / STD
IMAGENET_STD = [0.229, 0.224, 0.225]


@strict
class LavinConfig(PreTrainedConfig):
    """LaVIN's architecture (see the module docstring).

    Attributes:
        text_config / vision_config: the LLaMA and CLIP vision configs.
        image_token_id: the tokenizer's `<image>` id, one per visual token (past the LLaMA
            vocabulary: never embedded, never generated).
        num_visual_tokens: CLS features taken from CLIP (6: after blocks 4, 8, ..., 24).
        adapter_dim, adapter_groups, adapter_scale, router_temperature: the MMA adapters.
        adapter_dropout: the adapters' dropout when built (training may schedule it per layer).
        projector_hidden: `adapter_proj`'s hidden width (`--hidden_proj 128`).
        max_seq_len: LaVIN's `--max_seq_len`, positions including the modality token.
    """

    model_type = "lavin"
    sub_configs_defaults = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model",
                                       init_kwargs=CLIP_VIT_L14),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama",
                                     init_kwargs=LLAMA_7B),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    num_visual_tokens: int = 6
    adapter_dim: int = 8
    adapter_groups: int = 2
    adapter_scale: float = 1.0
    router_temperature: float = 10.0
    adapter_dropout: float = 0.1
    projector_hidden: int = 128
    max_seq_len: int = 512
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.vision_config.num_hidden_layers
        if self.num_visual_tokens < 1 or layers % self.num_visual_tokens:
            raise ValueError(f"num_visual_tokens={self.num_visual_tokens} must divide the vision "
                             f"tower's {layers} layers (LaVIN: 6 of 24, every 4th block)")

    @property
    def vision_tap_every(self) -> int:
        """Take the CLS token after every this many CLIP blocks (LaVIN: 4)."""
        return self.vision_config.num_hidden_layers // self.num_visual_tokens
