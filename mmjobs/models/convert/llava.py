"""Original LLaVA checkpoints (haotian-liu/LLaVA) -> transformers' `LlavaForConditionalGeneration`.

    convert_original_llava("liuhaotian/llava-v1.5-7b", "clip-vit-large-patch14-336", out)
    convert_original_llava("vicuna-7b-v1.5", "clip-vit-large-patch14-336", out,
                           projector="llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")

Inputs, as the original code assembles them at load time:
- the language model directory: a `llava_llama` checkpoint (flat Llama names `model.*`,
  `lm_head.weight`, plus `model.mm_projector.{0,2}.*` and the `mm_*` config keys), or a plain
  Llama such as vicuna-7b-v1.5 (no projector, no `mm_*` keys);
- the vision tower directory (`mm_vision_tower`, openai/clip-vit-large-patch14-336): a
  `CLIPModel` or `CLIPVisionModel` checkpoint and its preprocessor config;
- for a plain Llama, the projector pretrained separately (`mm_projector.bin`, a dict of
  `model.mm_projector.{0,2}.{weight,bias}`; LLaVA's `--pretrain_mm_mlp_adapter`).

Output: a transformers LLaVA directory (config, sharded safetensors under the names
transformers itself writes for LLaVA — `language_model.model.*`, `language_model.lm_head.*`,
`multi_modal_projector.linear_{1,2}.*`, `vision_tower.vision_model.*`, llava-hf's layout —
processor, tokenizer, generation config). Pickles are read only with `weights_only=True`.

Decisions (how the original's conventions map onto transformers):
- **The image placeholder.** LLaVA never adds `<image>` to its vocabulary: `tokenizer_image_token`
  splits the prompt at `<image>` and inserts the sentinel id -200 (IMAGE_TOKEN_INDEX), which
  the model replaces by 576 projected patch features. transformers needs a real token: the
  converted tokenizer gets `<image>` (id 32000) and `<pad>` (32001) as special tokens and the
  embeddings are padded to a multiple of 64 (32064 rows), exactly llava-hf's ids and sizes, and
  the processor expands each `<image>` to (336/14)^2 = 576 copies. New embedding and lm_head
  rows are the mean of the existing rows, so `<image>`/`<pad>` logits equal the mean logit:
  never the greedy choice, and the first 32000 logits are the original model's.
  Token ids next to the image can still differ from LLaVA's: it tokenizes the text after the
  image on its own (SentencePiece then adds a leading "▁"), transformers does not; the
  conversation-format renderer decides how prompts are tokenized, not this converter.
- **Padding.** LLaVA pads with `<unk>` (pad = unk for v1 prompts); here `<pad>` (32001), so a
  pad can never be confused with a real token; the generation config's pad id follows.
- **Conversation format.** vicuna-7b-v1.5 and liuhaotian/llava-v1.5-7b ship no chat template and
  the converted processor has none either: LLaVA formats prompts with its `vicuna_v1` (and
  `plain`) conversation templates, which mmjobs renders by name in the recipe.
- **Config.** `mm_vision_select_layer` -> `vision_feature_layer`; `mm_vision_select_feature`
  `patch` -> strategy `default` (drop CLS), `cls_patch` -> `full`; `mm_projector_type` must be
  `mlp2x_gelu` (transformers' projector: Linear-GELU-Linear); `image_aspect_ratio: pad` ->
  `LlavaImageProcessor(do_pad=True)`, which pads to a square filled with the mean colour before
  resizing, as LLaVA's `expand2square` does. A plain Llama gets LLaVA-1.5's values (layer -2,
  patch, mlp2x_gelu, pad), logged. `mm_use_im_start_end` / `mm_use_im_patch_token`, other
  projectors and `anyres` are refused with the reason.
- **dtype.** Tensors keep their stored dtype by default (fp16 LLM, fp32 CLIP, bf16 projector:
  lossless); `dtype=` casts all. The config records the language model's dtype.
- The `rotary_emb.inv_freq` buffers transformers 4.31 saved are dropped (recomputed), as are
  CLIP's text tower, projections, `logit_scale` and `position_ids` buffers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmjobs.logs import get_logger
from mmjobs.models.convert.checkpoints import (
    ConversionError,
    layout_mismatch,
    load_checkpoint_dir,
    load_tensors,
    save_sharded,
)
from mmjobs.models.convert.generation_config import repair_generation_config

log = get_logger(__name__)

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_MULTIPLE = 64
# transformers' LLaVA module prefixes -> the names transformers writes (and llava-hf publishes).
LLAVA_HF_PREFIXES = (("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."))
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
_PAD_ASPECT = {"pad": True, "square": False, None: False}


@dataclass(frozen=True)
class LlavaSettings:
    """LLaVA's `mm_*` settings; a plain Llama (vicuna) gets LLaVA-1.5's: these defaults."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str | None = "pad"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False


def llava_hf_name(name: str) -> str:
    """transformers' module name of a LLaVA tensor -> the name transformers saves it under."""
    for new, old in LLAVA_HF_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"{name}: not a LLaVA tensor name")


def is_original_llava(model_dir: str | Path) -> bool:
    """True for a `llava_llama` checkpoint (its config has LLaVA's `mm_*` keys)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return "mm_vision_tower" in config or "mm_projector_type" in config


def convert_original_llava(llm_dir: str | Path, vision_dir: str | Path, out_dir: str | Path, *,
                           projector: str | Path | None = None, max_shard_size: int | str = "5GB",
                           dtype: str | None = None) -> dict[str, Any]:
    """Convert (see the module docstring); write the result into `out_dir` (a local folder).

    Args:
        llm_dir: the `llava_llama` or plain Llama checkpoint directory.
        vision_dir: the CLIP checkpoint directory (`mm_vision_tower`).
        projector: `mm_projector.bin` (or a folder holding it), required when `llm_dir` has no
            `model.mm_projector.*` tensors, refused when it has.
        max_shard_size: safetensors shard size (transformers' notation, e.g. "5GB").
        dtype: None keeps every tensor's dtype; "float16", "bfloat16" or "float32" casts all.

    Returns:
        A JSON-able summary (sources, settings used, added tokens, vocabulary size, files).

    Raises:
        ConversionError (UnsafeCheckpointError for a pickle that needs code).
    """
    from transformers import AutoConfig

    llm_dir, vision_dir, out = Path(llm_dir), Path(vision_dir), Path(out_dir)
    raw = _read_json(llm_dir / "config.json")
    settings, defaulted = _settings(raw, llm_dir)
    llm = load_checkpoint_dir(llm_dir)
    proj = _projector_tensors(llm, projector, llm_dir)
    llm = {k: v for k, v in llm.items()
           if "mm_projector" not in k and "rotary_emb.inv_freq" not in k}
    try:
        vision_auto = AutoConfig.from_pretrained(vision_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"{vision_dir}: not a model directory (config.json): {e}") from e
    vision_config = _vision_config(vision_auto, vision_dir)
    vision = {k: v for k, v in load_checkpoint_dir(vision_dir).items()
              if k.startswith("vision_model.") and not k.endswith("position_ids")}

    tokenizer = _tokenizer(llm_dir)
    vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = _llava_config(raw, vision_config, settings, tokenizer, vocab)
    tensors = {f"language_model.{k}": v for k, v in llm.items()}
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key not in tensors:
            raise ConversionError(f"{llm_dir}: no {key.removeprefix('language_model.')} tensor; "
                                  "not a Llama checkpoint")
        tensors[key] = _mean_padded(tensors[key], vocab)
    tensors.update({f"multi_modal_projector.linear_{1 if k.startswith('0.') else 2}.{k[2:]}": v
                    for k, v in proj.items()})
    tensors.update({f"vision_tower.{k}": v for k, v in vision.items()})
    if dtype is not None:
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}
    _check_layout(tensors, config)

    out.mkdir(parents=True, exist_ok=True)
    files = save_sharded(tensors, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    _generation_config(llm_dir, out, config.pad_token_id)
    _processor(vision_dir, tokenizer, config, settings).save_pretrained(out)
    log.info("converted %s + %s%s -> %s (%d tensors, vocabulary %d)", llm_dir, vision_dir,
             f" + {projector}" if projector else "", out, len(tensors), vocab)
    return {"kind": "llava", "language_model": str(llm_dir), "vision_tower": str(vision_dir),
            "projector": str(projector) if projector else None,
            "settings": settings.__dict__, "defaulted_settings": defaulted,
            "added_tokens": {IMAGE_TOKEN: config.image_token_id, PAD_TOKEN: config.pad_token_id},
            "vocab_size": vocab, "tensors": len(tensors), "weight_files": files}


# --------------------------------------------------------------------------- pieces


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: missing; not a model directory") from e
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _settings(raw: dict[str, Any], llm_dir: Path) -> tuple[LlavaSettings, list[str]]:
    defaults = LlavaSettings()
    values, defaulted = {}, []
    for name in defaults.__dataclass_fields__:
        if name in raw:
            values[name] = raw[name]
        else:
            defaulted.append(name)
    if defaulted and len(defaulted) < len(defaults.__dataclass_fields__):
        log.info("%s: %s not in config.json; using LLaVA-1.5's values", llm_dir,
                 ", ".join(defaulted))
    elif defaulted:
        log.info("%s: a plain language model (no mm_* keys); using LLaVA-1.5's settings %s",
                 llm_dir, defaults)
    settings = LlavaSettings(**values)
    problems = []
    if settings.mm_projector_type != "mlp2x_gelu":
        problems.append(f"mm_projector_type={settings.mm_projector_type!r}: only mlp2x_gelu "
                        "(LLaVA-1.5's, transformers' LLaVA projector) converts")
    if settings.mm_vision_select_feature not in _SELECT_FEATURE:
        problems.append(f"mm_vision_select_feature={settings.mm_vision_select_feature!r}: use "
                        "patch or cls_patch")
    if settings.image_aspect_ratio not in _PAD_ASPECT:
        problems.append(f"image_aspect_ratio={settings.image_aspect_ratio!r}: only pad/square "
                        "(anyres is LLaVA-NeXT, a different transformers class)")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if getattr(settings, flag):
            problems.append(f"{flag}=true: transformers' LLaVA has no image start/end or patch "
                            "tokens")
    if problems:
        raise ConversionError(f"{llm_dir / 'config.json'}: cannot convert: " + "; ".join(problems))
    return settings, defaulted


def _projector_tensors(llm: dict[str, torch.Tensor], projector: str | Path | None,
                       llm_dir: Path) -> dict[str, torch.Tensor]:
    """`{0.weight, 0.bias, 2.weight, 2.bias}` from the LLM checkpoint or `projector`, stripped
    up to `mm_projector.` as LLaVA's `--pretrain_mm_mlp_adapter` loader does."""
    inside = {k.split("mm_projector.", 1)[1]: v for k, v in llm.items() if "mm_projector." in k}
    if inside and projector is not None:
        raise ConversionError(f"{llm_dir}: already holds model.mm_projector.* tensors; a "
                              f"separate projector ({projector}) would be ambiguous: drop it")
    if projector is not None:
        path = Path(projector)
        path = path / "mm_projector.bin" if path.is_dir() else path
        inside = {k.split("mm_projector.", 1)[1]: v for k, v in load_tensors(path).items()
                  if "mm_projector." in k}
        where = str(path)
    else:
        where = str(llm_dir)
    expected = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(inside) != expected:
        hint = ("" if projector is not None else "; a plain language model needs the projector "
                "pretrained for it (projector=mm_projector.bin)")
        raise ConversionError(f"{where}: expected mm_projector tensors {sorted(expected)}, found "
                              f"{sorted(inside)}{hint}")
    return inside


def _vision_config(config: Any, vision_dir: Path) -> Any:
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise ConversionError(f"{vision_dir}: model_type {config.model_type!r}; LLaVA-1.5's vision "
                          "tower is a CLIP model (clip or clip_vision_model)")


def _tokenizer(llm_dir: Path) -> Any:
    """The language model's tokenizer with `<image>` then `<pad>` added (llava-hf's ids)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    except (OSError, ValueError, ImportError) as e:
        hint = (" (a tokenizer.model needs the sentencepiece package)"
                if (llm_dir / "tokenizer.model").is_file() else "")
        raise ConversionError(f"{llm_dir}: cannot load its tokenizer{hint}: {e}") from e
    added = [t for t in (IMAGE_TOKEN, PAD_TOKEN) if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def _llava_config(raw: dict[str, Any], vision_config: Any, settings: LlavaSettings,
                  tokenizer: Any, vocab: int) -> Any:
    from transformers import LlamaConfig, LlavaConfig

    known = set(LlamaConfig().to_dict())
    skip = {"architectures", "model_type", "_name_or_path", "transformers_version", "vocab_size",
            "pad_token_id", "torch_dtype", "dtype"}
    text = LlamaConfig(**{k: v for k, v in raw.items() if k in known and k not in skip},
                       vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(
        text_config=text, vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=settings.mm_vision_select_layer,
        vision_feature_select_strategy=_SELECT_FEATURE[settings.mm_vision_select_feature],
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlavaForConditionalGeneration"]
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    if dtype:
        config.dtype = dtype
    return config


def _mean_padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` [V, H] grown to [rows, H]; new rows are the mean of the old ones."""
    if weight.shape[0] > rows:
        raise ConversionError(f"embedding has {weight.shape[0]} rows, more than the tokenizer's "
                              f"{rows}; tokenizer and weights do not belong together")
    if weight.shape[0] == rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def _check_layout(tensors: dict[str, torch.Tensor], config: Any) -> None:
    """The tensors must be exactly the ones transformers' LLaVA has, with its shapes."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {llava_hf_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    problem = layout_mismatch(expected, tensors)
    if problem:
        raise ConversionError("the converted tensors do not fit transformers' LLaVA for this "
                              f"config: {problem}")


def _generation_config(llm_dir: Path, out: Path, pad_token_id: int) -> None:
    from transformers import GenerationConfig

    if (llm_dir / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(llm_dir)
        repair_generation_config(config, str(llm_dir / "generation_config.json"))
    else:
        config = GenerationConfig()
    config.pad_token_id = pad_token_id
    config.save_pretrained(out)


def _processor(vision_dir: Path, tokenizer: Any, config: Any, settings: LlavaSettings) -> Any:
    from transformers import AutoImageProcessor, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    clip = AutoImageProcessor.from_pretrained(vision_dir)
    keys = ("size", "crop_size", "resample", "image_mean", "image_std", "do_resize",
            "do_center_crop", "do_normalize", "do_rescale", "rescale_factor", "do_convert_rgb")
    # Saved as "LlavaImageProcessor": each install picks its fastest backend when loading.
    image_processor = LlavaImageProcessorPil(
        **{k: getattr(clip, k) for k in keys if getattr(clip, k, None) is not None},
        do_pad=_PAD_ASPECT[settings.image_aspect_ratio])
    vision = config.vision_config
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
