"""`XComposer2Config`: InternLM-XComposer2's config.json keys, plus what its code hard-codes.

The published config (internlm/internlm-xcomposer2-7b, `model_type: internlmxcomposer2`) holds
the InternLM2 decoder's geometry and `img_size`. The remote code fixes the rest in Python:
the vision tower is `openai/clip-vit-large-patch14-336` (CLIP ViT-L/14) read at its last
hidden layer without CLS, position embeddings interpolated to 35x35 for 490 px; the connector
is `mlp2x_gelu`; every decoder linear carries a Partial-LoRA branch of rank 256, alpha 256.
Those become keys here (`vision_config`, `vision_select_layer`, `plora_r`, `plora_alpha`,
`plora_dropout`), so a converted directory describes the whole model.

Two published keys are stored the way transformers 5 wants them: `rope_scaling` +
`rope_theta` become `rope_parameters` (`{"rope_type": "dynamic", "factor": 1.0,
"rope_theta": 1e6}`), and `max_length` (the remote code's input truncation) is not a model
setting here: pretokenize's `max_length` truncates.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, PretrainedConfig

from mmjobs.models.xcomposer2 import IMAGE_TOKEN, MODEL_TYPE

__all__ = ["CLIP_L14_336", "IMAGE_TOKEN", "MODEL_TYPE", "XComposer2Config"]

# openai/clip-vit-large-patch14-336's vision tower, as build_mlp.py loads it (FACTS.md).
CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# Keys of the published config.json that are generation settings or remote-code plumbing.
_DROPPED = ("auto_map", "max_length", "transformers_version", "_name_or_path")


class XComposer2Config(PretrainedConfig):
    """InternLM-XComposer2 (InternLM2-7B + CLIP ViT-L/14 at `img_size` + mlp2x_gelu connector).

    Args (beyond the published InternLM2 keys, whose defaults are the 7B model's):
        img_size: input resolution; 490 in every ChartMoE/XComposer2 training script
            (`--img_size 490`), which gives 35x35 = 1225 image tokens.
        vision_config: the CLIP vision tower (default: ViT-L/14-336's); its `image_size` is
            set to `img_size` (position embeddings are interpolated to that grid).
        vision_select_layer: hidden state the connector reads (-1: the last encoder layer,
            before CLIP's post-layernorm, as the remote code's `select_layer = -1`).
        image_token_id: the id the processor writes for each image position (one past the
            vocabulary: it is never embedded nor predicted).
        plora_r, plora_alpha, plora_dropout: the Partial-LoRA branch on image positions
            (remote code: r 256, alpha 256, dropout 0.05 - the PLoRA default it never overrides).
        rope_scaling: the published `{"type": "dynamic", "factor": 1.0}`, stored as
            `rope_parameters`.
    """

    model_type = MODEL_TYPE
    sub_configs = {"vision_config": CLIPVisionConfig}  # noqa: RUF012 (transformers reads it)

    def __init__(self, vocab_size: int = 92544, hidden_size: int = 4096,
                 intermediate_size: int = 14336, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, num_key_value_heads: int | None = 8,
                 hidden_act: str = "silu", max_position_embeddings: int = 32768,
                 initializer_range: float = 0.02, rms_norm_eps: float = 1e-5,
                 use_cache: bool = True, pad_token_id: int = 2, bos_token_id: int = 1,
                 eos_token_id: int = 2, tie_word_embeddings: bool = False, bias: bool = False,
                 rope_theta: float = 1000000.0, rope_scaling: dict[str, Any] | None = None,
                 rope_parameters: dict[str, Any] | None = None, img_size: int = 490,
                 vision_config: dict[str, Any] | CLIPVisionConfig | None = None,
                 vision_select_layer: int = -1, image_token_id: int | None = None,
                 plora_r: int = 256, plora_alpha: int = 256, plora_dropout: float = 0.05,
                 **kwargs: Any) -> None:
        for key in _DROPPED:
            kwargs.pop(key, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        if rope_parameters is None:
            scaling = dict(rope_scaling or {"type": "dynamic", "factor": 1.0})
            rope_parameters = {"rope_type": scaling.get("rope_type", scaling.get("type")),
                               "factor": float(scaling.get("factor", 1.0)),
                               "rope_theta": float(rope_theta)}
        self.rope_parameters = rope_parameters
        self.img_size = img_size
        if isinstance(vision_config, CLIPVisionConfig):
            vision_config = vision_config.to_dict()
        vision = {**CLIP_L14_336, **(vision_config or {}), "image_size": img_size}
        vision.pop("model_type", None)
        self.vision_config = CLIPVisionConfig(**vision)
        self.vision_select_layer = vision_select_layer
        self.image_token_id = vocab_size if image_token_id is None else image_token_id
        self.plora_r = plora_r
        self.plora_alpha = plora_alpha
        self.plora_dropout = plora_dropout
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
        self.validate_architecture()

    @property
    def head_dim(self) -> int:
        """Channels per attention head (hidden_size / num_attention_heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def image_tokens(self) -> int:
        """Positions one image takes: the patch grid, CLS dropped ((490 / 14)^2 = 1225)."""
        return (self.img_size // self.vision_config.patch_size) ** 2

    def validate_architecture(self) -> None:
        """The decoder's head layout must divide evenly (fused wqkv is built from it)."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads {self.num_key_value_heads}")
        if self.img_size % self.vision_config.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of the patch size "
                            f"{self.vision_config.patch_size}")
        if problems:
            raise ValueError("XComposer2 config: " + "; ".join(problems))
