"""Load any Hugging Face vision-language model from a local dir, the store, or (on clusters) a hub.

    loaded = load_model(ModelConfig(name_or_path="s3://models/llava-1.5-7b"))
    loaded.model      # LlavaForConditionalGeneration
    loaded.processor  # LlavaProcessor
    loaded.kind       # "llava"

Safety rules, all enforced here rather than left to each caller:
- weights load from safetensors only (`use_safetensors=True`); a checkpoint with only `.bin`/`.pt`
  pickles is refused, never unpickled;
- code shipped with a checkpoint (`auto_map` in config.json) runs only when the spec sets
  `trust_remote_code`; otherwise the checkpoint is refused with a message naming the switch;
- `s3://` models must be committed directories (or folders inside one); files are verified
  against the manifest's sha256 on download;
- hub ids are contacted only when hub access is enabled (`HF_HUB_OFFLINE` unset);
- a generation config transformers rejects (vicuna-7b-v1.5's sampling flags without
  `do_sample`) is repaired on load and before export, with one warning
  (`mmjobs.models.convert.generation_config`), instead of failing the final save.

LLaVA models whose connector is one of mmjobs' own (`linear`, `moe`; see
`mmjobs.models.compose`) record it as `mmjobs_connector` in config.json; `load_model` rebuilds it
before the weights load. Plain `from_pretrained` does not know that entry and would give such a
model a randomly initialised MLP projector (transformers reports the keys as MISSING).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.image_backend import processor_kwargs
from mmjobs.logs import get_logger
from mmjobs.models import register_native_models
from mmjobs.models.compose import (
    COMPONENTS,
    component_of,
    connector_from_spec,
    connector_module,
    set_connector,
)
from mmjobs.models.convert.generation_config import repair_model_generation_config
from mmjobs.models.model_dirs import (
    ModelNotFoundError,
    committed_root,
    dir_fingerprint,
    fetch_dir,
    resolve_model_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "COMPONENTS",
    "LoadedModel",
    "ModelLoadError",
    "ModelNotFoundError",
    "committed_root",
    "connector_module",
    "dir_fingerprint",
    "export_model_dir",
    "fetch_dir",
    "freeze",
    "load_model",
    "resolve_model_dir",
    "saved_dtype",
    "select_attn_implementation",
    "select_dtype",
    "set_connector",
    "trainable_parameter_summary",
]

log = get_logger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl")
# Auto classes tried, in order, for checkpoints with custom code (`auto_map`).
_REMOTE_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq",
                        "AutoModelForCausalLM", "AutoModel")


class ModelLoadError(ValueError):
    """The checkpoint exists but mmjobs refuses or cannot load it; the message says what to do."""


@dataclass
class LoadedModel:
    """A loaded model with everything callers need next to it.

    Attributes:
        model: the `PreTrainedModel` (e.g. `LlavaForConditionalGeneration`).
        processor: its `ProcessorMixin` (or a tokenizer for text-only processors; None if the
            directory has neither).
        model_dir: the local directory it was loaded from (a verified cache copy for s3://).
        kind: "llava", "chameleon", "image-text-to-text" (other AutoModelForImageTextToText
            models) or "causal-lm" (custom-code models registered only as causal LMs).
        info: source, model_type, architecture, dtype, attn_implementation, connector,
            num_parameters, fingerprint — JSON-able, for logging.
    """

    model: PreTrainedModel
    processor: Any
    model_dir: Path
    kind: str
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- checks & choices


def check_weights_are_safetensors(model_dir: Path) -> None:
    """Refuse checkpoints whose weights are only pickles (`.bin`, `.pt`): loading runs code."""
    names = [p.name for p in model_dir.iterdir() if p.is_file()]
    if any(n.endswith(SAFETENSORS_SUFFIXES) for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: weights are only in pickle files ({', '.join(pickles[:3])}); mmjobs "
            "loads safetensors only, because unpickling can run arbitrary code. Convert them "
            "once with the convert stage, which reads pickles with torch.load(weights_only=True) "
            "and refuses any that need code (`mmjobs stage convert --set source=DIR --set "
            "to=URI`; original LLaVA checkpoints also need --set vision_tower=CLIP_DIR), and "
            "use its output")
    raise ModelLoadError(f"{model_dir}: no weights (*.safetensors) found")


def check_remote_code(config: dict[str, Any], spec: ModelConfig, model_dir: Path) -> None:
    """Refuse a checkpoint that ships its own model code unless the spec trusts it."""
    auto_map = config.get("auto_map")
    if auto_map and not spec.trust_remote_code:
        raise ModelLoadError(
            f"{spec.name_or_path}: config.json declares custom model code (auto_map: "
            f"{', '.join(sorted(auto_map))}) that would run on load; mmjobs does not run it "
            "unless model.trust_remote_code=true. Set that only for checkpoints you trust "
            f"(review the *.py files in {model_dir})")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_dtype(requested: str, device: torch.device | str) -> torch.dtype:
    """The weight dtype for `requested` ("auto", "float32", "bfloat16", "float16").

    `auto` is float32 on CPU (bf16 matmuls are slow there and fp16 ones unsupported), bfloat16
    on a GPU that supports it, else float32 (fp16 weights without a master copy diverge).
    """
    if requested != "auto":
        return getattr(torch, requested)
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def select_attn_implementation(requested: str, model_cls: type | None = None, *,
                               cuda_available: bool | None = None,
                               flash_attn_available: bool | None = None) -> str:
    """The attention kernel for `requested` ("auto", "sdpa", "eager", "flash_attention_2").

    `auto` picks `flash_attention_2` when the `flash_attn` package is importable and CUDA is
    available, else `sdpa`; either falls back to `eager` when `model_cls` declares no support
    (`_supports_flash_attn` / `_supports_sdpa`). Explicit choices are returned unchanged, so
    transformers reports an unsupported one itself.
    """
    if requested != "auto":
        return requested
    cuda = _cuda_available() if cuda_available is None else cuda_available
    flash = _flash_attn_available() if flash_attn_available is None else flash_attn_available
    if cuda and flash and getattr(model_cls, "_supports_flash_attn", True):
        return "flash_attention_2"
    if getattr(model_cls, "_supports_sdpa", True):
        return "sdpa"
    return "eager"


def saved_dtype(requested: str, model_dir: str | os.PathLike) -> torch.dtype:
    """Dtype to save a derived model in: `requested`, or for "auto" the dtype recorded in
    `model_dir/config.json` (`dtype` / `torch_dtype`), float32 if none."""
    if requested != "auto":
        return getattr(torch, requested)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# --------------------------------------------------------------------------- loading


def load_model(spec: ModelConfig, *, for_training: bool = True,
               device: str | torch.device | None = None) -> LoadedModel:
    """Load the model and processor named by `spec`.

    Args:
        spec: `name_or_path` (local dir, s3:// committed dir, or hub id), `trust_remote_code`,
            `dtype` (see `select_dtype`), `attn_implementation` (see
            `select_attn_implementation`).
        for_training: True leaves the model in train mode with the KV cache off (it only costs
            memory in training); False puts it in eval mode with gradients off.
        device: where to put the model; None leaves it on the CPU (trainers and DeepSpeed place
            it themselves). `dtype: auto` is chosen for `device`, or for CUDA when None and a
            GPU is present.

    Raises:
        ModelNotFoundError, ModelLoadError, storage errors (see `resolve_model_dir`).
    """
    from transformers import AutoConfig

    register_native_models()
    model_dir = resolve_model_dir(spec.name_or_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{spec.name_or_path}: not a model directory (no config.json in "
                             f"{model_dir})")
    raw_config = json.loads(config_path.read_text())
    check_remote_code(raw_config, spec, model_dir)
    check_weights_are_safetensors(model_dir)
    target = torch.device(device) if device is not None else torch.device(
        "cuda" if _cuda_available() else "cpu")
    trust = {"trust_remote_code": True} if spec.trust_remote_code else {}
    config = AutoConfig.from_pretrained(model_dir, **trust)
    model_cls, kind = _model_class(config, raw_config, spec)
    attn = select_attn_implementation(spec.attn_implementation,
                                      None if isinstance(model_cls, str) else model_cls)
    kwargs = dict(config=config, dtype=select_dtype(spec.dtype, target), attn_implementation=attn,
                  use_safetensors=True, **trust)
    if isinstance(model_cls, str):  # a custom-code model: its Auto class resolves the code
        import transformers

        model = getattr(transformers, model_cls).from_pretrained(model_dir, **kwargs)
    else:
        model = _with_connector_class(model_cls).from_pretrained(model_dir, **kwargs)
        # Back to the library class: the subclass only had to exist while weights loaded.
        model.__class__ = model_cls
    if for_training:
        model.train()
        if kind == "chameleon":  # learn image tokens in the labels (upstream masks them)
            from mmjobs.models.image_tokens import enable_image_generation

            enable_image_generation(model)
        text_config = model.config.get_text_config()  # where composite models keep use_cache
        if hasattr(text_config, "use_cache"):
            text_config.use_cache = False
    else:
        model.eval().requires_grad_(False)
    # vicuna-style generation configs would make every later save_pretrained fail.
    repair_model_generation_config(model, model_dir)
    if device is not None:
        model.to(target)
    processor = _load_processor(model_dir, trust)
    spec_entry = getattr(model.config, "mmjobs_connector", None)
    info = {
        "source": spec.name_or_path, "model_dir": str(model_dir),
        "model_type": getattr(model.config, "model_type", None),
        "architecture": type(model).__name__, "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", attn),
        "connector": (spec_entry or {}).get("kind", "native") if kind == "llava" else None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    log.info("loaded %s (%s, %s, %s, %d parameters) from %s", info["architecture"], kind,
             info["dtype"], info["attn_implementation"], info["num_parameters"], model_dir)
    return LoadedModel(model=model, processor=processor, model_dir=model_dir, kind=kind,
                       info=info)


def _model_class(config: Any, raw: dict[str, Any], spec: ModelConfig) -> tuple[type | str, str]:
    """(model class, or the name of the Auto class for custom code; kind) for `config`."""
    from transformers import AutoModelForImageTextToText

    auto_map = raw.get("auto_map") or {}
    if auto_map and spec.trust_remote_code:
        for name in _REMOTE_AUTO_CLASSES:
            if name in auto_map:
                kind = "causal-lm" if name == "AutoModelForCausalLM" else "image-text-to-text"
                return name, kind
        raise ModelLoadError(f"{spec.name_or_path}: auto_map names none of "
                             f"{', '.join(_REMOTE_AUTO_CLASSES)}")
    mapping = AutoModelForImageTextToText._model_mapping
    try:
        model_cls = mapping[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"{spec.name_or_path}: model_type {config.model_type!r} is not an image-text-to-text "
            "model in this transformers version (AutoModelForImageTextToText does not know "
            "it); mmjobs trains vision-language models only") from None
    kind = {"llava": "llava", "chameleon": "chameleon"}.get(config.model_type,
                                                            "image-text-to-text")
    return model_cls, kind


@functools.cache
def _with_connector_class(model_cls: type) -> type:
    """A subclass of `model_cls` (same name and module) that installs the connector named by
    `config.mmjobs_connector` in `__init__`, so `from_pretrained` loads the connector's weights
    like any others (dtype, device map and missing-key checks included)."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        model_cls.__init__(self, config, *args, **kwargs)
        spec = getattr(config, "mmjobs_connector", None)
        if spec:
            set_connector(self, connector_from_spec(spec))

    # Same __module__: transformers inspects the class's module source for attention support.
    return type(model_cls.__name__, (model_cls,), {
        "__init__": __init__, "__module__": model_cls.__module__,
        "__qualname__": model_cls.__qualname__})


def _load_processor(model_dir: Path, trust: dict[str, bool]) -> Any:
    """The directory's processor, else its tokenizer, else None (with a warning)."""
    from transformers import AutoProcessor, AutoTokenizer

    for loader, backend in ((AutoProcessor, processor_kwargs()), (AutoTokenizer, {})):
        try:
            return loader.from_pretrained(model_dir, **trust, **backend)
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.debug("%s: %s failed: %s", model_dir, loader.__name__, e)
    log.warning("%s: no processor or tokenizer files; LoadedModel.processor is None", model_dir)
    return None


# --------------------------------------------------------------------------- freezing


def freeze(model: nn.Module, *, vision_tower: bool, connector: bool,
           language_model: bool) -> dict[str, dict[str, int]]:
    """Freeze (True) or unfreeze (False) each component's parameters; returns the new summary.

    Components are told apart by parameter names (see `mmjobs.models.compose.component_of`):
    the vision tower (`vision_tower`, `vqmodel`, `vit`, ...), the connector
    (`multi_modal_projector`, `mm_projector`, `vision_proj`, ...), and everything else — the
    language model including embeddings and `lm_head`. Call it before wrapping the model with
    peft: unfreezing after would also unfreeze the weights LoRA is meant to leave alone.
    """
    frozen = {"vision_tower": vision_tower, "connector": connector,
              "language_model": language_model}
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen[component_of(name)])
    return trainable_parameter_summary(model)


def trainable_parameter_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts per component: `{component: {"trainable": n, "total": n}}`.

    Components: "vision_tower", "connector", "language_model", and "all" (the sums). Shared
    (tied) parameters count once.
    """
    summary = {name: {"trainable": 0, "total": 0} for name in (*COMPONENTS, "all")}
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        for key in (component_of(name), "all"):
            summary[key]["total"] += param.numel()
            if param.requires_grad:
                summary[key]["trainable"] += param.numel()
    return summary


# --------------------------------------------------------------------------- exporting


def set_image_seq_length(config: Any) -> int | None:
    """Write the image tokens a LLaVA model really uses into `config.image_seq_length`.

    `LlavaConfig` defaults it to 576 (LLaVA-1.5's 336 px / 14 px patches) whatever the vision
    tower, and tools that size prompts from the config (vLLM, TGI) would then reserve the
    wrong count. A LLaVA turns an image into (image_size / patch_size)^2 patch embeddings,
    plus the CLS one when `vision_feature_select_strategy` is "full". Other model types are
    left alone. Returns the value written, or None.
    """
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if getattr(config, "model_type", None) != "llava" or not size or not patch:
        return None
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    config.image_seq_length = (size // patch) ** 2 + (1 if full else 0)
    return config.image_seq_length


def export_model_dir(model: PreTrainedModel, out_dir: str | os.PathLike,
                     source_dir: str | os.PathLike | None = None) -> Path:
    """Save `model` (safetensors + config) and copy the processor/tokenizer files of `source_dir`.

    Copied: every top-level file of `source_dir` that is not weights, not a config
    `save_pretrained` just wrote, not a manifest and not hidden (tokenizer.json,
    processor_config.json, chat_template.jinja, custom *.py, ...), byte for byte.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repair_model_generation_config(model, source_dir)  # transformers refuses to save some
    set_image_seq_length(model.config)
    model.save_pretrained(out)  # safetensors: the only format transformers 5 writes
    if source_dir is not None:
        for src in sorted(Path(source_dir).iterdir()):
            skip = (not src.is_file() or src.name.startswith(".")
                    or src.name == storage.MANIFEST_NAME
                    or src.name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
                    or (out / src.name).exists())
            if not skip:
                shutil.copyfile(src, out / src.name)
    return out
