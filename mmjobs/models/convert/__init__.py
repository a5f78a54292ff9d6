"""Import official pickled checkpoints safely: `.bin`/`.pth` -> safetensors, original layouts ->
transformers classes, committed to the store with a manifest.

    python -m mmjobs.models.convert llava --llm DIR --vision-tower DIR [--projector FILE] --to URI
    python -m mmjobs.models.convert safetensors DIR --to URI
    (as a pipeline step: the `convert` stage, `mmjobs stage convert --set source=...`)

- `checkpoints`: restricted reading (`torch.load(weights_only=True, mmap=True)`; a pickle that
  needs code is refused, naming the file and the reason) and sharded safetensors writing.
- `llava`: haotian-liu/LLaVA checkpoints (`llava_llama`, or vicuna + CLIP + `mm_projector.bin`)
  -> `LlavaForConditionalGeneration` + `LlavaProcessor` (its docstring records the decisions:
  the -200 image sentinel, padding, the vicuna_v1 format).
- `generic`: `.bin` shards -> safetensors with the same tensor names.
- `generation_config`: repairs generation configs transformers rejects (vicuna's), with one
  warning; also applied when mmjobs loads and exports models.

- `meta_llama`: Meta's original LLaMA (`params.json` + `consolidated.*.pth` +
  `tokenizer.model`, what LaVIN loads) -> `LlamaForCausalLM` (rotary rows permuted; the
  tests compare logits against Meta's forward).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmjobs import storage
from mmjobs.models.convert.checkpoints import (
    ConversionError,
    UnsafeCheckpointError,
    load_checkpoint_dir,
    load_tensors,
    save_sharded,
)
from mmjobs.models.convert.generation_config import (
    GenerationConfigError,
    repair_generation_config,
    repair_generation_config_file,
    repair_model_generation_config,
)
from mmjobs.models.convert.generic import convert_to_safetensors
from mmjobs.models.convert.llava import convert_original_llava, is_original_llava
from mmjobs.models.convert.meta_llama import convert_meta_llama, is_meta_llama

__all__ = ["ConversionError", "GenerationConfigError", "UnsafeCheckpointError", "commit_converted",
           "convert_meta_llama", "convert_original_llava", "convert_to_safetensors", "detect_kind",
           "is_meta_llama", "is_original_llava", "load_checkpoint_dir", "load_tensors",
           "repair_generation_config", "repair_generation_config_file",
           "repair_model_generation_config", "save_sharded"]


def detect_kind(source_dir: str | Path) -> str:
    """"meta_llama" for Meta's layout, "xcomposer2" for an InternLM-XComposer2 checkpoint
    (`model_type: internlmxcomposer2`), "llava" for an original LLaVA checkpoint (`mm_*` config
    keys), else "safetensors"."""
    from mmjobs.models.xcomposer2 import is_xcomposer2  # its converter imports this package

    if is_meta_llama(source_dir):
        return "meta_llama"
    if is_xcomposer2(source_dir):
        return "xcomposer2"
    return "llava" if is_original_llava(source_dir) else "safetensors"


def commit_converted(convert: Callable[[Path], dict[str, Any]], to: str,
                     meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `convert(scratch_dir)` and commit the scratch dir to `to` (local or s3://).

    The manifest (written last) carries `meta` and the converter's summary under `conversion`;
    a failed conversion commits nothing. Returns the summary.
    """
    scratch = Path(tempfile.mkdtemp(prefix="mmjobs-convert-", dir=os.environ.get("MMJOBS_TMP")))
    try:
        summary = convert(scratch)
        storage.put_dir(scratch, to, meta={**(meta or {}), "conversion": summary})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary
