"""LaVIN model directories: built from a LLaMA and a CLIP checkpoint; adapter files; merging.

    build_lavin("weights/7B", "clip-vit-large-patch14", out)   # Meta or transformers LLaMA
    save_adapters(model, out / "adapter")     # LaVIN's trainable tensors (~3.8M for 7B)
    load_adapters(model, adapter_dir)         # into a LaVIN loaded from its base directory

A LaVIN directory is an ordinary transformers model directory (config.json with model_type
`lavin`, safetensors, tokenizer and `LavinProcessor` files) holding the base weights and the
adapters as initialised (seeded: LaVIN's xavier `conv_A`, zero `conv_B`/`conv_D`, so the
model computes exactly what the LLaMA does until it is trained; see `modeling`). Training
writes only the adapter tensors; loading base + adapters, or the "merged" directory (the base
with its adapters replaced), gives the trained model.

**What "merge" means for LaVIN.** A RepAdapter without a router is a linear map of its input
(x + B·A·x) and can be folded into the projections it feeds. LaVIN's routers weigh two up-
projections by a softmax of the modality token (LLM) or of each image's CLS token (CLIP), so
the map changes with the input: in the LLM it is one of two constants per layer (the modality
token attends only to itself, so its hidden state depends on the modality alone), in CLIP it
differs per image. Folding would need two copies of every attention projection for the LLM and
is impossible for CLIP, so mmjobs does not re-parameterise: `merge` writes the standalone
model (base + trained adapters in one directory), checked to give the same logits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmjobs.logs import get_logger
from mmjobs.models.convert.checkpoints import (
    ConversionError,
    load_checkpoint_dir,
    save_sharded,
)
from mmjobs.models.convert.meta_llama import convert_meta_llama, is_meta_llama

log = get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # same name as peft's, so adapter locators find it
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_KIND = "lavin-mma"
TRAINABLE_KEY = "adapter"  # LaVIN trains every parameter whose name contains this


def is_trainable_name(name: str) -> bool:
    """LaVIN's rule: a parameter trains if its name contains "adapter"."""
    return TRAINABLE_KEY in name


def is_lavin_adapter(path: str | Path) -> bool:
    """True for a directory written by `save_adapters`."""
    config = Path(path) / ADAPTER_CONFIG
    try:
        return json.loads(config.read_text()).get("mmjobs_adapter") == ADAPTER_KIND
    except (OSError, ValueError, AttributeError):
        return False


def build_lavin(llm_dir: str | Path, vision_dir: str | Path, out_dir: str | Path, *,
                seed: int = 0, dtype: str | None = None, max_shard_size: int | str = "5GB",
                tokenizer: str | Path | None = None, **settings: Any) -> dict[str, Any]:
    """Write a LaVIN model directory from its parts into `out_dir` (a local folder).

    Args:
        llm_dir: Meta's LLaMA folder (`params.json` + `consolidated.*.pth`, converted with
            `mmjobs.models.convert.meta_llama`) or a transformers Llama directory.
        vision_dir: a CLIP checkpoint (`CLIPModel` or `CLIPVisionModel`).
        seed: seeds the adapters' initialisation.
        dtype: cast the base weights (default: keep each tensor's; adapters stay float32).
        tokenizer: Meta's `tokenizer.model` when it is not in or above `llm_dir`.
        settings: `LavinConfig` fields (adapter_dim, router_temperature, max_seq_len, ...).

    Returns:
        A JSON-able summary (parts, sizes, trainable parameters, files).

    Raises:
        ConversionError: parts that do not fit (the message names the file and the fix).
    """
    llm_dir, vision_dir, out = Path(llm_dir), Path(vision_dir), Path(out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="mmjobs-lavin-"))
    try:
        converted = None
        if is_meta_llama(llm_dir):
            converted = convert_meta_llama(llm_dir, scratch / "llama", tokenizer=tokenizer)
            llm_dir = scratch / "llama"
        return _build(llm_dir, vision_dir, out, seed=seed, dtype=dtype,
                      max_shard_size=max_shard_size, settings=settings, converted=converted)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(llm_dir: Path, vision_dir: Path, out: Path, *, seed: int, dtype: str | None,
           max_shard_size: int | str, settings: dict[str, Any],
           converted: dict[str, Any] | None) -> dict[str, Any]:
    from transformers import AutoTokenizer, GenerationConfig

    from mmjobs.models.lavin.config import LavinConfig
    from mmjobs.models.lavin.processing import (
        LavinProcessor,
        lavin_image_processor,
        lavin_tokenizer,
    )

    text_config = _config(llm_dir, ("llama",), "a LLaMA (Meta's params.json + "
                          "consolidated.*.pth, or a transformers Llama directory)")
    vision_config = _config(vision_dir, ("clip", "clip_vision_model"), "a CLIP checkpoint")
    vision_config = getattr(vision_config, "vision_config", vision_config)
    try:
        tok = lavin_tokenizer(AutoTokenizer.from_pretrained(llm_dir))
    except (OSError, ValueError, ImportError) as e:
        raise ConversionError(f"{llm_dir}: cannot load its tokenizer: {e}") from e
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id < text_config.vocab_size:
        raise ConversionError(f"{llm_dir}: <image> got id {image_id}, inside the model's "
                              f"{text_config.vocab_size}-row vocabulary; LaVIN's image "
                              "positions must be ids the language model cannot produce")
    text_config.pad_token_id = tok.pad_token_id
    config = LavinConfig(text_config=text_config.to_dict(),
                         vision_config=vision_config.to_dict(), image_token_id=image_id,
                         **settings)
    config.architectures = ["LavinForConditionalGeneration"]
    base = {("language_model." + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in load_checkpoint_dir(llm_dir).items() if "rotary_emb" not in k}
    base.update(_vision_tensors(vision_dir))
    if dtype is not None:
        base = {k: v.to(getattr(torch, dtype)) for k, v in base.items()}
    adapters = initial_adapters(config, seed=seed)
    tensors = {**base, **adapters}
    config.dtype = str(base["lm_head.weight"].dtype).removeprefix("torch.")
    _check_layout(tensors, config)
    out.mkdir(parents=True, exist_ok=True)
    files = save_sharded(tensors, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    LavinProcessor(image_processor=lavin_image_processor(vision_config.image_size),
                   tokenizer=tok, num_visual_tokens=config.num_visual_tokens
                   ).save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    trainable = sum(v.numel() for v in adapters.values())
    log.info("built LaVIN from %s + %s -> %s (%d tensors, %d trainable adapter parameters)",
             llm_dir, vision_dir, out, len(tensors), trainable)
    return {"kind": "lavin", "language_model": str(llm_dir), "vision_tower": str(vision_dir),
            "meta_llama": converted, "image_token_id": image_id, "seed": seed,
            "trainable_parameters": trainable, "tensors": len(tensors), "weight_files": files}


def _config(path: Path, model_types: tuple[str, ...], what: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: not {what} (no readable config.json: {e})") from e
    if config.model_type not in model_types:
        raise ConversionError(f"{path}: model_type {config.model_type!r}; expected {what}")
    return config


def _vision_tensors(vision_dir: Path) -> dict[str, torch.Tensor]:
    """CLIP's vision-tower tensors under LaVIN's `vision_tower.` prefix (a `CLIPModel`'s text
    tower, projections and `position_ids` buffers are left out, as LaVIN deletes them)."""
    out = {}
    for name, tensor in load_checkpoint_dir(vision_dir).items():
        if name.endswith("position_ids"):
            continue
        if name.startswith("vision_model."):
            out["vision_tower." + name[len("vision_model."):]] = tensor
        elif name.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
            out["vision_tower." + name] = tensor
    if not out:
        raise ConversionError(f"{vision_dir}: no vision_model.* tensors; not a CLIP checkpoint")
    return out


def initial_adapters(config: Any, *, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial tensors (float32), under the model's parameter names.

    Drawn with `seed` in layer order (LLaMA layers, CLIP layers, `adapter_proj`, the modality
    embedding) with LaVIN's initialisation.
    """
    from mmjobs.models.lavin.adapters import RepAdapterRouter
    from mmjobs.models.lavin.modeling import LavinProjector

    text, vision = config.text_config, config.vision_config
    settings = {"hidden_dim": config.adapter_dim, "groups": config.adapter_groups,
                "scale": config.adapter_scale, "temperature": config.router_temperature}
    modules: dict[str, nn.Module] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in range(text.num_hidden_layers):
            modules[f"language_model.layers.{i}.adapter_attn"] = RepAdapterRouter(
                text.hidden_size, **settings)
        for i in range(vision.num_hidden_layers):
            modules[f"vision_tower.encoder.layers.{i}.adapter_attn"] = RepAdapterRouter(
                vision.hidden_size, **settings)
        modules["adapter_proj"] = LavinProjector(vision.hidden_size, config.projector_hidden,
                                                 text.hidden_size)
        modules["adapter_modality_embedding"] = nn.Embedding(2, text.hidden_size)
    finally:
        torch.random.set_rng_state(generator_state)
    return {f"{prefix}.{name}": tensor.detach().float().contiguous()
            for prefix, module in modules.items()
            for name, tensor in module.state_dict().items()}


def _check_layout(tensors: dict[str, torch.Tensor], config: Any) -> None:
    from mmjobs.models.lavin.modeling import LavinForConditionalGeneration

    with torch.device("meta"):
        model = LavinForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k])
    if missing or extra or wrong:
        raise ConversionError(f"the parts do not fit LaVIN: missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, wrong shapes {wrong[:3]}")


# --------------------------------------------------------------------------- adapters


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LaVIN's trainable tensors of `model`, by parameter name, on the CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if is_trainable_name(name)}


def save_adapters(model: nn.Module, out_dir: str | Path, *,
                  state: dict[str, torch.Tensor] | None = None,
                  meta: dict[str, Any] | None = None) -> Path:
    """Write LaVIN's trained tensors (adapters only, safetensors) and `adapter_config.json`.

    Args:
        model: the trained LaVIN.
        state: the tensors to write (e.g. gathered under ZeRO-3); default `adapter_state`.
        meta: provenance recorded in the config (data, step, dropout schedule, ...).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in (state or adapter_state(model)).items() if is_trainable_name(k)}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "mmjobs_adapter": ADAPTER_KIND, "base_model_type": getattr(config, "model_type", None),
        "parameters": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
        **({"meta": meta} if meta else {})}, indent=1, sort_keys=True) + "\n")
    return out


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> int:
    """Copy the adapter tensors in `adapter_dir` into `model`; returns how many.

    Raises:
        ConversionError: not a LaVIN adapter directory, or names/shapes that differ from the
            model's adapters (another base, or another adapter size).
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not is_lavin_adapter(adapter_dir):
        raise ConversionError(f"{adapter_dir}: no LaVIN {ADAPTER_CONFIG} (mmjobs_adapter "
                              f"{ADAPTER_KIND!r}); give the adapter directory a LaVIN training "
                              "run wrote")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if is_trainable_name(n)}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    wrong = sorted(n for n in params if n in tensors and tensors[n].shape != params[n].shape)
    if missing or extra or wrong:
        raise ConversionError(f"{adapter_dir}: the adapters do not fit this LaVIN (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}, other shapes "
                              f"{wrong[:3]}); was it trained on another base?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    return len(tensors)
