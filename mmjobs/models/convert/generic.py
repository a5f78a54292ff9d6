"""Pickled transformers checkpoints (`pytorch_model*.bin`) -> safetensors, same tensor names.

For a model whose layout transformers already knows (e.g. vicuna-7b-v1.5, a `LlamaForCausalLM`
in two `.bin` shards): tensors are read with `weights_only=True` and written as sharded
safetensors under their own names; every other top-level file (config, tokenizer files,
templates) is copied unchanged, except a generation config transformers rejects, which is
repaired (see `generation_config`). Layout changes are not this module's job (see `llava`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mmjobs.logs import get_logger
from mmjobs.models.convert.checkpoints import (
    PICKLE_SUFFIXES,
    ConversionError,
    checkpoint_files,
    load_checkpoint_dir,
    save_sharded,
)
from mmjobs.models.convert.generation_config import repair_generation_config_file

log = get_logger(__name__)

_NOT_COPIED_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".index.json")
_MANIFEST = "_MANIFEST.json"


def convert_to_safetensors(src_dir: str | Path, out_dir: str | Path, *,
                           max_shard_size: int | str = "5GB") -> dict[str, Any]:
    """Write `src_dir`'s pickled weights as safetensors, and its other files, into `out_dir`.

    Returns:
        A JSON-able summary: source, tensor count, weight files, copied files, and the
        generation-config repairs.

    Raises:
        ConversionError: the directory already holds safetensors, or its weights are unreadable
            (UnsafeCheckpointError for a pickle that needs code).
    """
    src, out = Path(src_dir), Path(out_dir)
    sources = checkpoint_files(src)
    if any(p.name.endswith(".safetensors") for p in sources):
        raise ConversionError(f"{src}: already safetensors; nothing to convert (use it as is)")
    tensors = load_checkpoint_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    written = save_sharded(tensors, out, max_shard_size=max_shard_size)
    copied = []
    for path in sorted(src.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name != _MANIFEST
                and not path.name.endswith(_NOT_COPIED_SUFFIXES)):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    repairs = (repair_generation_config_file(out / "generation_config.json",
                                             source=str(src / "generation_config.json"))
               if (out / "generation_config.json").is_file() else [])
    log.info("%s: %d tensors from %d pickle(s) -> %s", src, len(tensors), len(sources), out)
    return {"kind": "safetensors", "source": str(src), "tensors": len(tensors),
            "source_files": [p.name for p in sources], "weight_files": written,
            "copied_files": copied, "generation_config_repairs": repairs}
