"""InternLM-XComposer2 (the base model of ChartMoE), implemented natively in mmjobs.

    register()                                   # teach transformers' Auto classes the model
    convert_xcomposer2(hub_snapshot, out_dir)    # official .bin -> safetensors + processor
    load_model(ModelConfig(name_or_path=out_dir))  # then like any other model

**Native, not the hub's remote code — why.** The hub repo ships `modeling_internlm2.py` /
`modeling_internlm_xcomposer2.py` as `trust_remote_code` code written for transformers 4.33:
it takes a `samples` dict instead of `input_ids`/`pixel_values`, tokenizes inside `forward`
(so pretokenized shards, packing and mmjobs' label spans cannot be used), downloads
openai/clip-vit-large-patch14-336 while building the model, and uses the 4.33 cache and mask
APIs, which transformers 5 (what mmjobs runs) removed. Running it would mean pinning an old
transformers for one recipe and executing downloaded code. The architecture itself is small
(InternLM2 + Partial-LoRA + CLIP + an MLP), so mmjobs implements it (`internlm2`, `modeling`),
loads the official tensor names unchanged from the pickle (read with `weights_only`), and
plugs into the same loader, pretokenizer, trainer, merge, generator and server as every other
model. `tests/unit/models/xcomposer2/` checks the architecture against hand-computed facts;
`tests/upstream/xcomposer2/` compares logits with the remote code itself (transformers 4.33 in a
separate venv, random tiny config: identical in float32 with eager attention); the module docs
record where behaviour differs from the remote code (positions under left
padding; the dynamic-RoPE base is recomputed per call).

Pieces: `configuration` (the config keys), `internlm2` (decoder), `modeling` (the VLM),
`processing` (490 px transform, `<ImageHere>` expansion), `tokenizer` (SentencePiece -> fast
tokenizer), `convert` (the official checkpoint -> native directory).
"""

from __future__ import annotations

from typing import Any

__all__ = ["IMAGE_TOKEN", "MODEL_TYPE", "convert_xcomposer2", "is_xcomposer2", "register"]

MODEL_TYPE = "internlmxcomposer2"
IMAGE_TOKEN = "<ImageHere>"  # the remote code's placeholder text; a special token here
_registered = False


def register() -> None:
    """Register the config, model, image processor and processor with transformers' Auto
    classes (idempotent; cheap after the first call). Call before `AutoConfig` /
    `AutoProcessor` / `AutoModel*` read an XComposer2 directory."""
    global _registered
    if _registered:
        return
    import inspect

    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from mmjobs.models.xcomposer2.configuration import XComposer2Config
    from mmjobs.models.xcomposer2.modeling import XComposer2ForCausalLM
    from mmjobs.models.xcomposer2.processing import XComposer2ImageProcessor, XComposer2Processor

    AutoConfig.register(MODEL_TYPE, XComposer2Config, exist_ok=True)
    AutoModelForImageTextToText.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(XComposer2Config, XComposer2ForCausalLM, exist_ok=True)
    if "image_processor_classes" in inspect.signature(AutoImageProcessor.register).parameters:
        AutoImageProcessor.register(XComposer2Config, exist_ok=True,
                                    image_processor_classes={"pil": XComposer2ImageProcessor})
    else:  # transformers before the backend dictionaries
        AutoImageProcessor.register(XComposer2Config, XComposer2ImageProcessor, exist_ok=True)
    AutoProcessor.register(XComposer2Config, XComposer2Processor, exist_ok=True)
    _registered = True


def convert_xcomposer2(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`mmjobs.models.xcomposer2.convert.convert_xcomposer2` (imported on first use)."""
    from mmjobs.models.xcomposer2.convert import convert_xcomposer2 as convert

    register()
    return convert(*args, **kwargs)


def is_xcomposer2(model_dir: Any) -> bool:
    """True for a directory holding an InternLM-XComposer2 config.json."""
    from mmjobs.models.xcomposer2.convert import is_xcomposer2 as check

    return check(model_dir)
