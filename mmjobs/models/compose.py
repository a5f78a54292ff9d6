"""LLaVA-style composition (vision tower + connector + causal LM) and connector bookkeeping.

    model = compose_llava("models/clip-vit-l-336", "models/vicuna-7b", connector="mlp2x_gelu")
    save_composed_llava("out/llava", "models/clip-vit-l-336", "models/vicuna-7b")

The result is transformers' own `LlavaForConditionalGeneration`: LlavaConfig built from the two
sub-configs, weights copied from the two models. The connector maps onto
`model.model.multi_modal_projector`:
- `mlp2x_gelu` is transformers' native projector (`projector_hidden_act="gelu"`), so the saved
  model is an ordinary LLaVA that any transformers/vLLM install loads;
- `linear` and `moe` install mmjobs' connectors (`mmjobs.models.connectors`) and record them as
  `mmjobs_connector` in config.json (kind + constructor arguments); their weights are saved
  under `multi_modal_projector.*` in the model's safetensors like any module's. Load such
  models with `mmjobs.models.builder.load_model`, which rebuilds the connector first.

Components (for freezing and parameter counts) are told apart by parameter names: see
`component_of`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmjobs.models.connectors import (
    LinearConnector,
    MLP2xGeluConnector,
    MoEConnector,
    build_connector,
)

if TYPE_CHECKING:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PretrainedConfig

COMPONENTS = ("vision_tower", "connector", "language_model")
# Module names that mark a parameter's component, across HF VLMs and remote-code models
# (LLaVA, Idefics3, InternVL, InternLM-XComposer2, Qwen2-VL, Chameleon's VQ-VAE).
VISION_NAMES = frozenset({"vision_tower", "vision_model", "visual", "vqmodel", "vit",
                          "vision_encoder", "image_encoder"})
CONNECTOR_NAMES = frozenset({"multi_modal_projector", "mm_projector", "vision_proj",
                             "connector", "mlp1"})
CONNECTOR_CONFIG_KEY = "mmjobs_connector"
_SPEC_VERSION = 1
_MOE_OPTIONS = frozenset({"num_experts", "top_k", "expert_type", "aux_loss_coef", "router_init",
                          "expert_names"})


# --------------------------------------------------------------------------- components


def component_of(parameter_name: str) -> str:
    """"vision_tower", "connector" or "language_model" for a parameter (or module) name.

    The first path part naming a vision or connector module decides, so peft's wrappers
    (`base_model.model.`, `.modules_to_save.default.`) do not matter; everything else
    (embeddings, decoder layers, `lm_head`) is the language model.
    """
    for part in parameter_name.split("."):
        if part in VISION_NAMES:
            return "vision_tower"
        if part in CONNECTOR_NAMES:
            return "connector"
    return "language_model"


def _find_connector(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, connector) — the outermost connector-named module."""
    for name, module in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        if attr in CONNECTOR_NAMES:
            return model.get_submodule(parent_name), attr, module
    raise ValueError(f"{type(model).__name__} has no connector module (looked for "
                     f"{', '.join(sorted(CONNECTOR_NAMES))})")


def connector_module(model: nn.Module) -> nn.Module:
    """The model's vision→text connector (`model.model.multi_modal_projector` for LLaVA).

    Under peft with the connector in `modules_to_save` this is peft's wrapper around it.
    """
    return _find_connector(model)[2]


def set_connector(model: nn.Module, module: nn.Module) -> None:
    """Install `module` as the model's connector and record it in `model.config`.

    For mmjobs' connectors the config gets `mmjobs_connector` (kind + constructor arguments),
    so `save_pretrained` + `load_model` restore it; for others (transformers' own projector)
    the entry is cleared.

    Raises:
        ValueError: the model has no connector, or `module`'s dims differ from the one it
            replaces.
    """
    parent, attr, old = _find_connector(model)
    old_dims, new_dims = _dims(old), _dims(module)
    if old_dims and new_dims and old_dims != new_dims:
        raise ValueError(f"connector maps {new_dims[0]} -> {new_dims[1]} features but this model "
                         f"needs {old_dims[0]} -> {old_dims[1]} (vision features -> text hidden "
                         "size)")
    setattr(parent, attr, module)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONNECTOR_CONFIG_KEY, connector_spec(module))


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) feature dims of a connector, when they can be read off it."""
    if isinstance(module, MoEConnector):
        return module.vision_dim, module.text_dim
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if isinstance(module, LinearConnector | MLP2xGeluConnector) or (
            hasattr(module, "linear_1") and hasattr(module, "linear_2")):
        return linears[0].in_features, linears[-1].out_features
    return None


def connector_spec(module: nn.Module) -> dict[str, Any] | None:
    """The JSON-able description `load_model` rebuilds `module` from; None for other modules."""
    if isinstance(module, MoEConnector):
        return {"kind": "moe", "version": _SPEC_VERSION, **module.config_dict()}
    for kind, cls in (("linear", LinearConnector), ("mlp2x_gelu", MLP2xGeluConnector)):
        if isinstance(module, cls):
            first = module.linear if kind == "linear" else module.linear_1
            last = module.linear if kind == "linear" else module.linear_2
            return {"kind": kind, "version": _SPEC_VERSION, "vision_dim": first.in_features,
                    "text_dim": last.out_features, "bias": first.bias is not None}
    return None


def connector_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised connector from a `connector_spec` dict.

    Raises:
        ValueError: unknown kind or version (written by a newer mmjobs?).
    """
    args = dict(spec)
    kind, version = args.pop("kind", None), args.pop("version", None)
    if version != _SPEC_VERSION or kind not in {"linear", "mlp2x_gelu", "moe"}:
        raise ValueError(f"{CONNECTOR_CONFIG_KEY}: kind={kind!r}, version={version!r}; this "
                         f"mmjobs reads kinds linear, mlp2x_gelu, moe at version {_SPEC_VERSION}")
    if kind == "moe":
        return MoEConnector(**args)
    return build_connector(kind, args["vision_dim"], args["text_dim"], bias=args["bias"])


# --------------------------------------------------------------------------- composition


def compose_llava(
    vision: str | os.PathLike | PretrainedConfig,
    language: str | os.PathLike | PretrainedConfig,
    *,
    connector: str = "mlp2x_gelu",
    connector_options: Mapping[str, Any] | None = None,
    projector_bias: bool = True,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str | None = None,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    seed: int | None = None,
) -> LlavaForConditionalGeneration:
    """Build a LLaVA from a vision model and a causal LM (weights copied from both).

    Args:
        vision: a CLIP or SigLIP vision model (or full CLIP/SigLIP model) directory / s3:// /
            hub id, or a vision config (random weights).
        language: a causal LM directory / s3:// / hub id (its tokenizer is used for the image
            token), or a text config (random weights; then `image_token_id` is required).
        connector: "mlp2x_gelu" (LLaVA-1.5), "linear" (LLaVA-1.0) or "moe" (ChartMoE).
        connector_options: for "moe": `num_experts` (4), `top_k` (2), `expert_type`
            ("mlp2x_gelu"), `aux_loss_coef` (0.0), `router_init` ("normal"), `expert_names`.
        projector_bias: biases in the connector's linear layers.
        vision_feature_layer: hidden layer(s) the connector reads (LLaVA-1.5: -2).
        vision_feature_select_strategy: "default" drops the CLS position, "full" keeps all;
            None picks "full" for SigLIP (no CLS) and "default" otherwise.
        image_token: the placeholder token; added to the tokenizer (and the embeddings
            resized) if missing.
        image_token_id: its id when `language` is a config.
        seed: seeds the random initialisation of the connector (and of config-only parts).

    Returns:
        `LlavaForConditionalGeneration`; image features `[B, N, Dv·layers]` → connector →
        `[B, N, Dt]`, with N = (image_size / patch_size)² per image.

    Raises:
        ValueError: unknown connector, bad options, or missing image token id.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if connector not in {"mlp2x_gelu", "linear", "moe"}:
        raise ValueError(f"connector: got {connector!r}; use mlp2x_gelu, linear or moe")
    options = dict(connector_options or {})
    if options and connector != "moe":
        raise ValueError(f"connector_options {sorted(options)} apply only to connector='moe'")
    unknown = sorted(set(options) - _MOE_OPTIONS)
    if unknown:
        raise ValueError(f"connector_options: unknown {unknown}; use {sorted(_MOE_OPTIONS)}")
    vision_cfg, vision_dir = _vision_config(vision)
    text_cfg, language_dir = _text_config(language)
    tokenizer = _tokenizer_with_image_token(language_dir, image_token) if language_dir else None
    if tokenizer is not None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    elif image_token_id is None:
        raise ValueError("image_token_id is required when `language` is a config (no tokenizer)")
    strategy = vision_feature_select_strategy or _default_strategy(vision_cfg)
    config = LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_token_id,
        projector_hidden_act="gelu", multimodal_projector_bias=projector_bias,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
        image_seq_length=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    vision_dim = vision_cfg.hidden_size * (
        1 if isinstance(vision_feature_layer, int) else len(vision_feature_layer))
    if connector == "linear":
        set_connector(model, LinearConnector(vision_dim, text_cfg.hidden_size,
                                             bias=projector_bias))
    elif connector == "moe":
        set_connector(model, MoEConnector(vision_dim, text_cfg.hidden_size,
                                          options.pop("num_experts", 4), bias=projector_bias,
                                          **options))
    if vision_dir is not None:
        _copy_vision_weights(model, vision_dir, vision_cfg)
    if language_dir is not None:
        _copy_language_weights(model, language_dir)
    if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))  # the image token was added
    return model


def compose_llava_processor(vision: str | os.PathLike, language: str | os.PathLike,
                            config: LlavaConfig, *, image_token: str = "<image>",
                            chat_template: str | None = None) -> Any:
    """A `LlavaProcessor` whose `<image>` expansion matches `config` exactly.

    The image processor comes from the vision directory when it has one
    (`preprocessor_config.json`), else a PIL CLIP/SigLIP processor for the config's image size;
    the tokenizer (and chat template, unless given) from the language directory.
    """
    from transformers import AutoImageProcessor, LlavaProcessor

    vision_dir = _resolve(vision)
    vision_cfg = config.vision_config
    if (vision_dir / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    else:
        image_processor = _pil_image_processor(vision_cfg)
    tokenizer = _tokenizer_with_image_token(_resolve(language), image_token)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP prepends a CLS embedding the "default" strategy drops again; SigLIP has none.
        num_additional_image_tokens=0 if _is_siglip(vision_cfg) else 1,
        chat_template=chat_template or tokenizer.chat_template, image_token=image_token,
    )


def save_composed_llava(out_dir: str | os.PathLike, vision: str | os.PathLike,
                        language: str | os.PathLike, *, chat_template: str | None = None,
                        **compose_kwargs: Any) -> Path:
    """`compose_llava` + `compose_llava_processor`, saved to `out_dir` (safetensors)."""
    model = compose_llava(vision, language, **compose_kwargs)
    processor = compose_llava_processor(
        vision, language, model.config, image_token=compose_kwargs.get("image_token", "<image>"),
        chat_template=chat_template)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _resolve(name_or_path: str | os.PathLike) -> Path:
    from mmjobs.models.builder import resolve_model_dir  # builder imports this module

    return resolve_model_dir(name_or_path)


def _checked_dir(name_or_path: str | os.PathLike) -> Path:
    """Resolve a source model dir and apply the loader's safety checks to it."""
    import json

    from mmjobs.config import ModelConfig
    from mmjobs.models.builder import check_remote_code, check_weights_are_safetensors

    path = _resolve(name_or_path)
    raw = json.loads((path / "config.json").read_text())
    check_remote_code(raw, ModelConfig(name_or_path=os.fspath(name_or_path)), path)
    check_weights_are_safetensors(path)
    return path


def _vision_config(vision: Any) -> tuple[PretrainedConfig, Path | None]:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(vision, PretrainedConfig):
        cfg, path = vision, None
    else:
        path = _checked_dir(vision)
        cfg = AutoConfig.from_pretrained(path)
    # A full CLIP/SigLIP model (text + vision towers): keep the vision half.
    cfg = getattr(cfg, "vision_config", None) or cfg
    for name in ("hidden_size", "image_size", "patch_size"):
        if not hasattr(cfg, name):
            raise ValueError(f"vision model {vision}: config {cfg.model_type!r} has no {name}; "
                             "use a CLIP or SigLIP vision model")
    return cfg, path


def _text_config(language: Any) -> tuple[PretrainedConfig, Path | None]:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(language, PretrainedConfig):
        return language, None
    path = _checked_dir(language)
    return AutoConfig.from_pretrained(path), path


def _is_siglip(vision_cfg: PretrainedConfig) -> bool:
    return vision_cfg.model_type.startswith("siglip")


def _default_strategy(vision_cfg: PretrainedConfig) -> str:
    return "full" if _is_siglip(vision_cfg) else "default"


def _tokenizer_with_image_token(language_dir: Path, image_token: str) -> Any:
    """The language model's tokenizer, with `image_token` added as a special token if absent."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_dir)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)],
                             special_tokens=True)
    return tokenizer


def _pil_image_processor(vision_cfg: PretrainedConfig) -> Any:
    """A PIL-backed image processor (the torchvision ones need torchvision)."""
    size = vision_cfg.image_size
    if _is_siglip(vision_cfg):
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil,
        )

        return SiglipImageProcessorPil(size={"height": size, "width": size})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size})


def _copy_vision_weights(model: nn.Module, vision_dir: Path,
                         vision_cfg: PretrainedConfig) -> None:
    tower = model.model.vision_tower
    source = type(tower).from_pretrained(vision_dir, config=vision_cfg, use_safetensors=True)
    tower.load_state_dict(source.state_dict(), strict=True)


def _copy_language_weights(model: nn.Module, language_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(language_dir, use_safetensors=True)
    model.model.language_model.load_state_dict(source.base_model.state_dict(), strict=True)
    model.lm_head.load_state_dict(source.get_output_embeddings().state_dict(), strict=True)
