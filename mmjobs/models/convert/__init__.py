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

Not covered yet: Meta's `consolidated.*.pth` layout (LLaMA-7B for LaVIN).
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

__all__ = ["ConversionError", "GenerationConfigError", "UnsafeCheckpointError", "commit_converted",
           "convert_original_llava", "convert_to_safetensors", "detect_kind",
           "is_original_llava", "load_checkpoint_dir", "load_tensors",
           "repair_generation_config", "repair_generation_config_file",
           "repair_model_generation_config", "save_sharded"]


def detect_kind(source_dir: str | Path) -> str:
    """"llava" for an original LLaVA checkpoint (`mm_*` config keys), else "safetensors"."""
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
