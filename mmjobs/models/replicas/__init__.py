"""Tiny replicas of the seed recipes' real base models, built from their published files.

    build_replica("llava-hf/llava-1.5-7b-hf", "out/llava-hf")   # or:
    python -m mmjobs.models.replicas llava-hf/llava-1.5-7b-hf out/llava-hf

A replica has the real model's class, config keys and values, processor and preprocessor
configs, chat template (or none), generation config, special and added token ids, image
geometry (576 tokens per 336 px LLaVA image, 1,024 per 512 px Chameleon image) and weight file
format and names (sharded safetensors under the published index's names, or `.bin` pickles
where the real model ships those). What differs: widths and depths (64-wide, 2-layer text
models, 32-wide 2-layer vision towers), random weights, and a vocabulary trained locally on
generated text with the real special tokens at their real ids. The published files are
vendored, byte-identical, under `published/` (see its PROVENANCE.md); every replica directory
holds a `replica.json` saying which files are published, which were made here, and which config
keys were shrunk. Nothing is downloaded.

The original-LLaVA parts (vicuna, CLIP, the pretrain projector, llava-v1.5-7b) are separate
replicas, as they are separate hub repos; `mmjobs.models.convert` turns them into a
transformers `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.models.replicas._common import PUBLISHED_ROOT, RECORD_NAME, published_dir
from mmjobs.models.replicas.chameleon import build_aa_chameleon, build_chameleon
from mmjobs.models.replicas.chartwiz import build_pix2struct_base, build_synatra
from mmjobs.models.replicas.lavin import build_clip_vit_l14, build_meta_llama
from mmjobs.models.replicas.llava import (
    build_clip,
    build_llava_hf,
    build_llava_original,
    build_pretrain_projector,
    build_vicuna,
)
from mmjobs.models.replicas.xcomposer2 import build_xcomposer2

__all__ = ["PUBLISHED_ROOT", "RECORD_NAME", "REPLICAS", "build_replica", "published_dir"]

log = get_logger(__name__)

# Hub id -> builder. Each builder writes into an empty directory.
REPLICAS: dict[str, Callable[..., None]] = {
    "llava-hf/llava-1.5-7b-hf": build_llava_hf,
    "lmsys/vicuna-7b-v1.5": build_vicuna,
    "openai/clip-vit-large-patch14-336": build_clip,
    "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5": build_pretrain_projector,
    "liuhaotian/llava-v1.5-7b": build_llava_original,
    "facebook/chameleon-7b": build_chameleon,
    "PKU-Alignment/AA-chameleon-7b-base": build_aa_chameleon,
    "internlm/internlm-xcomposer2-7b": build_xcomposer2,
    "meta/llama-7b": build_meta_llama,
    "openai/clip-vit-large-patch14": build_clip_vit_l14,
    "maywell/Synatra-7B-v0.3-dpo": build_synatra,
    "ybelkada/pix2struct-base": build_pix2struct_base,
}


def build_replica(name: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the replica of hub model `name` into `out_dir` (created; must not hold files).

    The directory appears complete or not at all: the build runs in a sibling scratch folder
    that is renamed at the end. Deterministic for (`name`, `seed`).

    Raises:
        KeyError: `name` has no replica (the message lists those that do).
        FileExistsError: `out_dir` exists and is not empty.
    """
    if name not in REPLICAS:
        raise KeyError(f"no replica of {name!r}; replicas exist for: {', '.join(REPLICAS)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; build a replica into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        REPLICAS[name](scratch, seed=seed)
        # mkdtemp's 0700 (and transformers' 0600 weights) would survive the rename.
        storage.private_to_shared(scratch, tree=True)
        if out.exists():
            out.rmdir()
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("built the replica of %s in %s", name, out)
    return out
