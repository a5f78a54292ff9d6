"""The official InternLM-XComposer2 checkpoint -> mmjobs' native XComposer2 directory.

    convert_xcomposer2("internlm-xcomposer2-7b", out, vision_dir="clip-vit-large-patch14-336")

Input: a hub snapshot of internlm/internlm-xcomposer2-7b or Coobiw/InternLM-XComposer2_Enhanced
(config.json with `model_type: internlmxcomposer2`, `tokenizer.model`, the weights in one
`pytorch_model.bin` or shards with an index, and remote-code `*.py` files, which are never
imported or copied). The weights are read with `torch.load(weights_only=True)`
(`mmjobs.models.convert.checkpoints`); a pickle that needs code is refused.

Output: config.json (`XComposer2Config`: the published keys, the vision tower's config, the
Partial-LoRA rank read from the weights, `img_size`), safetensors under the official tensor
names, generation config, a fast tokenizer converted from `tokenizer.model` (checked against
SentencePiece) with `<ImageHere>` added, and the processor (490 px image transform).

Decisions:
- **Vision tower config.** The remote code builds the ViT from openai/clip-vit-large-patch14-336
  at run time (a download); `vision_dir` names a copy of that repo (its config.json), else
  CLIP ViT-L/14-336's published geometry is used. Tensor shapes are checked either way.
- **Position embeddings.** At 490 px the ViT needs (490/14)^2 + 1 = 1226 positions. A
  checkpoint with CLIP's 577 (24x24 + CLS) is interpolated as the remote code's `resize_pos()`
  does (CLS kept, the 24x24 grid bicubically resized, `align_corners=False`), in float32, then
  stored in the checkpoint's dtype; one with 1226 is kept as it is.
- **Dropped:** `position_ids` buffers (recomputed), the published `max_length` (a generation
  setting in transformers 5; pretokenize truncates) and `auto_map` (no remote code runs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmjobs.logs import get_logger
from mmjobs.models.convert.checkpoints import (
    ConversionError,
    layout_mismatch,
    load_checkpoint_dir,
    save_sharded,
)
from mmjobs.models.xcomposer2.configuration import (
    CLIP_L14_336,
    IMAGE_TOKEN,
    MODEL_TYPE,
    XComposer2Config,
)

log = get_logger(__name__)

POSITION_KEY = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"
PLORA_KEY = "model.layers.0.attention.wqkv.Plora_A.weight"
PLORA_ALPHA = 256  # hard-coded in the remote code's InternLM2MLP / InternLM2Attention
ARCHITECTURE = "XComposer2ForCausalLM"
# Texts the converted tokenizer must encode exactly as SentencePiece does.
_TOKENIZER_PROBES = (
    "[UNUSED_TOKEN_146]user\nAnswer the question using a single word or phrase.What is the "
    "value of Japan in 2019?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
    "Please give the program of thought in python code. Use print function to output the "
    "answer in the end.", "```python\nvalues = [12.5, 3, -7]\nprint(max(values))\n```",
    " | year | sales |\n| 2020 | 3,456 |", "  two  spaces,\ttabs and ünïcödé 한국어 😀",
)


def is_xcomposer2(model_dir: str | Path) -> bool:
    """True for a directory whose config.json is an InternLM-XComposer2 one."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except ValueError:
        return False


def convert_xcomposer2(src_dir: str | Path, out_dir: str | Path, *,
                       vision_dir: str | Path | None = None, img_size: int = 490,
                       dtype: str | None = None, max_shard_size: int | str = "5GB"
                       ) -> dict[str, Any]:
    """Convert (see the module docstring); write the result into `out_dir` (a local folder).

    Args:
        vision_dir: openai/clip-vit-large-patch14-336 (or the CLIP the checkpoint was built on).
        img_size: input resolution (ChartMoE and XComposer2 train at 490).
        dtype: None keeps every tensor's dtype; "float16", "bfloat16" or "float32" casts all.

    Returns:
        A JSON-able summary.

    Raises:
        ConversionError (UnsafeCheckpointError for a pickle that needs code).
    """
    src, out = Path(src_dir), Path(out_dir)
    raw = _read_config(src)
    if not (src / "tokenizer.model").is_file():
        raise ConversionError(f"{src}: no tokenizer.model (InternLM2's SentencePiece model); "
                              "copy the whole hub repo")
    tensors = {k: v for k, v in load_checkpoint_dir(src).items()
               if not k.endswith("position_ids") and "rotary_emb" not in k}
    vision = _vision_config(vision_dir)
    if PLORA_KEY not in tensors:
        raise ConversionError(f"{src}: no {PLORA_KEY}; not an InternLM-XComposer2 checkpoint "
                              "with Partial-LoRA")
    # img_size: the published 224 is what the remote code resizes away; training uses 490.
    published = {k: v for k, v in raw.items() if k not in ("model_type", "img_size")}
    config = XComposer2Config(**published,
                              img_size=img_size, vision_config=vision,
                              plora_r=int(tensors[PLORA_KEY].shape[0]), plora_alpha=PLORA_ALPHA)
    config.architectures = [ARCHITECTURE]
    resized = _fit_positions(tensors, config)
    if dtype is not None:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    check_layout(tensors, config)
    out.mkdir(parents=True, exist_ok=True)
    files = save_sharded(tensors, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    _generation_config(src, raw).save_pretrained(out)
    processor = build_processor(src / "tokenizer.model", config)
    processor.save_pretrained(out)
    log.info("converted %s -> %s (%d tensors%s)", src, out, len(tensors),
             ", position embeddings interpolated" if resized else "")
    return {"kind": "xcomposer2", "source": str(src), "vision_tower": str(vision_dir or
                                                                         "CLIP ViT-L/14-336"),
            "img_size": img_size, "image_tokens": config.image_tokens,
            "plora_r": config.plora_r, "positions_interpolated": resized,
            "tensors": len(tensors), "weight_files": files,
            "image_token_id": config.image_token_id}


def build_processor(spm_path: Path, config: XComposer2Config) -> Any:
    """The processor of a converted model: fast tokenizer + 490 px image transform.

    Raises:
        ConversionError: the converted tokenizer differs from SentencePiece, or the turn
            markers are not where XComposer2's label masking expects them.
    """
    from mmjobs.models.xcomposer2.processing import XComposer2ImageProcessor, XComposer2Processor
    from mmjobs.models.xcomposer2.tokenizer import (
        TokenizerConversionError,
        assistant_header_problem,
        check_against_sentencepiece,
        fast_tokenizer,
    )

    try:
        tokenizer = fast_tokenizer(spm_path)
    except TokenizerConversionError as e:
        raise ConversionError(str(e)) from e
    problems = check_against_sentencepiece(tokenizer, spm_path, _TOKENIZER_PROBES)
    header = assistant_header_problem(tokenizer)
    if problems or header:
        raise ConversionError(f"{spm_path}: the converted tokenizer would change token ids: "
                              + "; ".join([*problems, *([header] if header else [])]))
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ConversionError(f"{spm_path}: {IMAGE_TOKEN} got id "
                              f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, the config "
                              f"expects {config.image_token_id} (vocab_size {config.vocab_size} "
                              "and tokenizer.model disagree)")
    size = {"height": config.img_size, "width": config.img_size}
    return XComposer2Processor(image_processor=XComposer2ImageProcessor(size=size),
                               tokenizer=tokenizer, image_seq_length=config.image_tokens)


def check_layout(tensors: dict[str, torch.Tensor], config: XComposer2Config) -> None:
    """The tensors must be exactly the native model's, with its shapes.

    Raises:
        ConversionError: naming missing, unexpected and mis-shaped tensors.
    """
    from mmjobs.models.xcomposer2.modeling import XComposer2ForCausalLM

    with torch.device("meta"):
        model = XComposer2ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("position_ids")}
    problem = layout_mismatch(expected, tensors)
    if problem:
        raise ConversionError("the checkpoint does not fit InternLM-XComposer2 for this config "
                              "(a different CLIP than vision_tower? a newer XComposer "
                              f"version?): {problem}")


def interpolate_positions(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """`[1 + g*g, D]` CLS + grid position embeddings -> `[1 + grid*grid, D]` (bicubic, as the
    remote code's `resize_pos`), computed in float32, returned in `weight`'s dtype."""
    old = math.isqrt(weight.shape[0] - 1)
    cls, patches = weight[:1], weight[1:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(0, 2)
    return torch.cat([cls, patches.to(weight.dtype)], dim=0)


# --------------------------------------------------------------------------- pieces


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: missing; not a model directory") from e
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if raw.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"{path}: model_type {raw.get('model_type')!r}; this converter "
                              f"takes InternLM-XComposer2 checkpoints ({MODEL_TYPE})")
    return raw


def _vision_config(vision_dir: str | Path | None) -> dict[str, Any]:
    if vision_dir is None:
        return dict(CLIP_L14_336)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(vision_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"{vision_dir}: not a model directory (config.json): {e}") from e
    vision = getattr(config, "vision_config", config)
    if getattr(vision, "model_type", None) != "clip_vision_model":
        raise ConversionError(f"{vision_dir}: model_type {config.model_type!r}; XComposer2's "
                              "vision tower is a CLIP model")
    return vision.to_dict()


def _fit_positions(tensors: dict[str, torch.Tensor], config: XComposer2Config) -> bool:
    """Interpolate the ViT's position embeddings to the config's grid when needed."""
    weight = tensors.get(POSITION_KEY)
    if weight is None:
        return False  # check_layout names it
    grid = config.img_size // config.vision_config.patch_size
    if weight.shape[0] == grid * grid + 1:
        return False
    old = math.isqrt(weight.shape[0] - 1)
    if old * old + 1 != weight.shape[0]:
        raise ConversionError(f"{POSITION_KEY}: {weight.shape[0]} positions is not a square "
                              "grid plus CLS")
    tensors[POSITION_KEY] = interpolate_positions(weight, grid)
    return True


def _generation_config(src: Path, raw: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    from mmjobs.models.convert.generation_config import repair_generation_config

    if (src / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(src)
        repair_generation_config(config, str(src / "generation_config.json"))
    else:
        config = GenerationConfig(bos_token_id=raw.get("bos_token_id", 1),
                                  eos_token_id=raw.get("eos_token_id", 2),
                                  pad_token_id=raw.get("pad_token_id", 2))
    return config
