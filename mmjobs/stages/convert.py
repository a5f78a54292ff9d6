"""Stage `convert`: a pickled or original-layout checkpoint -> a safetensors transformers model.

    mmjobs stage convert --set source=s3://raw/vicuna-7b-v1.5 --set to=s3://models/vicuna
    mmjobs stage convert --set source=s3://raw/llava-v1.5-7b \
        --set vision_tower=s3://raw/clip-vit-large-patch14-336 --set to=s3://models/llava-1.5
    mmjobs stage convert --set source=s3://raw/vicuna-7b-v1.5 --set kind=llava \
        --set vision_tower=s3://raw/clip-vit-large-patch14-336 \
        --set projector=s3://raw/llava-pretrain/mm_projector.bin --set to=s3://models/llava-pt
    mmjobs stage convert --set source=s3://raw/llama-7b --set kind=lavin \
        --set vision_tower=s3://raw/clip-vit-large-patch14 --set to=s3://models/lavin-7b
    mmjobs stage convert --set source=s3://raw/Synatra-7B-v0.3-dpo --set kind=deplot_llava \
        --set vision_tower=s3://raw/pix2struct-base --set to=s3://models/chartwiz-base

Pickles are read only with `torch.load(weights_only=True)`; one that needs code fails the stage
with the file and the reason, and nothing is committed. `kind: auto` converts original LLaVA
checkpoints (config with `mm_*` keys) to `LlavaForConditionalGeneration`, Meta's LLaMA
(`params.json` + `consolidated.*.pth`, or the `<weights>` folder above them with
`tokenizer.model`) to `LlamaForCausalLM`, and anything else to
safetensors under the same tensor names; `kind: llava` with a plain Llama (vicuna) builds the
LLaVA from it, the vision tower and the separately pretrained projector; `kind: lavin` builds
a LaVIN (`mmjobs.models.lavin.compose.build_lavin`: the LLaMA, Meta's layout converted on the
way, and the CLIP joined by freshly initialised MMA adapters); `kind: deplot_llava` builds
ChartWiz's "LLaVA with DePlot" (`mmjobs.models.deplot`: the causal LM in `source`, the
Pix2Struct encoder of `vision_tower`, a fresh `mlp2x_gelu` projector, `max_patches` image tokens
per image; safetensors inputs only). InternLM-XComposer2
(`model_type: internlmxcomposer2`, the hub's remote-code checkpoint) becomes mmjobs' native
XComposer2 (`mmjobs.models.xcomposer2.convert`: safetensors under the official names, the
490 px processor, `vision_tower` the CLIP its ViT was built from when given). The work is in
`mmjobs.models.convert` (its docstrings record the conversion decisions). Inputs are local
folders or committed store directories (`mmjobs import` puts hub repos there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.models.builder import fetch_dir
from mmjobs.models.convert import (
    ConversionError,
    GenerationConfigError,
    convert_meta_llama,
    convert_original_llava,
    convert_to_safetensors,
    detect_kind,
)
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    input_fingerprint,
    output_uri,
    run_stage,
)

NAME = "convert"
VERSION = 1  # bump when a conversion's output changes: invalidates cached outputs
log = get_logger(__name__)
_INPUTS = ("source", "vision_tower", "projector")
_NOT_FINGERPRINTED = RUN_FIELDS | {"to", *_INPUTS}  # inputs enter by content instead


class ConvertConfig(StageConfig):
    """Convert a checkpoint to a safetensors transformers model (restricted unpickling)."""

    source: str = Field(description="Checkpoint folder (local or committed s3://): pickled "
                        "shards, or an original LLaVA / plain Llama checkpoint.")
    kind: Literal["auto", "safetensors", "llava", "meta_llama", "xcomposer2", "lavin",
                  "deplot_llava"] = Field(
        "auto", description="auto: meta_llama for Meta's params.json + consolidated.*.pth, "
        "xcomposer2 for model_type internlmxcomposer2, llava for configs with LLaVA's mm_* "
        "keys, else safetensors; safetensors: same tensor names; llava: to "
        "LlavaForConditionalGeneration; meta_llama: to LlamaForCausalLM; xcomposer2: to "
        "mmjobs' native XComposer2 (+ its processor); lavin: a LaVIN (mmjobs.models.lavin) "
        "from a Meta or transformers LLaMA and the CLIP in vision_tower, adapters initialised "
        "(never chosen by auto); deplot_llava: ChartWiz's Pix2Struct encoder (vision_tower) + "
        "the causal LM in source + a fresh mlp2x_gelu projector (never chosen by auto).")
    vision_tower: str | None = Field(None, description="kind llava: the CLIP checkpoint folder "
                                     "(the config's mm_vision_tower); kind xcomposer2: the CLIP "
                                     "its ViT was built from (default: CLIP ViT-L/14-336's "
                                     "published geometry); kind lavin: the CLIP ViT-L/14 "
                                     "(224 px) checkpoint.")
    img_size: int = Field(490, ge=14, description="kind xcomposer2: input resolution (ChartMoE "
                          "and XComposer2 train at 490 px; the ViT's positions are "
                          "interpolated to it).")
    seed: int = Field(0, description="kind lavin / deplot_llava: seeds the adapters' or the "
                      "projector's initialisation.")
    max_patches: int = Field(512, ge=1, description="kind deplot_llava: Pix2Struct patches, "
                             "and so image tokens, per image (ChartWiz's train.py: 512).")
    projector: str | None = Field(None, description="kind llava with a plain Llama: "
                                  "mm_projector.bin (or its folder) pretrained for it.")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="kind llava / meta_llama / xcomposer2: cast every tensor; default "
        "keeps each tensor's dtype.")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard.")
    to: str | None = Field(None, description="Where to commit the model (same as `output`).")


class ConvertResult(StageResult):
    """Where the converted model is and what was converted."""

    model: str
    kind: str
    tensors: int


def main(cfg: ConvertConfig) -> ConvertResult:
    """Run the stage; see the module docstring.

    Raises:
        ConversionError: unreadable, refused (UnsafeCheckpointError) or unconvertible inputs.
    """
    out = cfg.to or cfg.output or output_uri(cfg, NAME)
    inputs = {k: input_fingerprint(getattr(cfg, k)) for k in _INPUTS if getattr(cfg, k)}
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED), inputs)

    def convert(stage: StageRun) -> dict:
        source = fetch_dir(cfg.source, kind="checkpoints")
        kind = detect_kind(source) if cfg.kind == "auto" else cfg.kind
        meta = {"stage": NAME, **{k: getattr(cfg, k) for k in _INPUTS}}
        with stage.commit(meta) as scratch:
            meta["conversion"] = _convert(cfg, kind, source, scratch)
        stage.run.log_metrics({"tensors": meta["conversion"]["tensors"]})
        log.info("%s: %s (%s) -> %s", NAME, cfg.source, kind, stage.out)
        return meta

    return run_stage(cfg, NAME, fp, convert, result=_result, tags={"kind": cfg.kind}, out=out)


def _convert(cfg: ConvertConfig, kind: str, source: Path, scratch: Path) -> dict:
    if kind == "deplot_llava":
        from mmjobs.models.deplot.compose import save_composed_deplot_llava

        if not cfg.vision_tower or cfg.projector:
            raise ConversionError(f"{cfg.source}: kind deplot_llava needs vision_tower (the "
                                  "Pix2Struct/DePlot checkpoint) and takes no projector (the "
                                  "align step trains it, as ChartWiz's pretrain.sh does)")
        vision = fetch_dir(cfg.vision_tower, kind="checkpoints")
        try:
            summary = save_composed_deplot_llava(scratch, vision, source,
                                                 max_patches=cfg.max_patches, seed=cfg.seed)
        except ValueError as e:  # not a Pix2Struct model, pickled weights, ...
            raise ConversionError(f"{cfg.source} + {cfg.vision_tower}: {e}") from None
        return {**summary, "language_model": cfg.source, "vision_tower": cfg.vision_tower}
    if kind == "lavin":
        from mmjobs.models.lavin.compose import build_lavin

        if not cfg.vision_tower or cfg.projector:
            raise ConversionError(f"{cfg.source}: kind lavin needs vision_tower (the CLIP "
                                  "ViT-L/14 checkpoint) and takes no projector (LaVIN's "
                                  "adapter projection starts untrained)")
        summary = build_lavin(source, fetch_dir(cfg.vision_tower, kind="checkpoints"), scratch,
                              seed=cfg.seed, dtype=cfg.dtype, max_shard_size=cfg.max_shard_size)
        return {**summary, "language_model": cfg.source, "vision_tower": cfg.vision_tower}
    if kind == "xcomposer2":
        from mmjobs.models.xcomposer2 import convert_xcomposer2

        if cfg.projector:
            raise ConversionError(f"{cfg.source}: projector applies to kind llava, not "
                                  "xcomposer2 (its vision_proj is in the checkpoint)")
        vision = fetch_dir(cfg.vision_tower, kind="checkpoints") if cfg.vision_tower else None
        return convert_xcomposer2(source, scratch, vision_dir=vision, img_size=cfg.img_size,
                                  dtype=cfg.dtype, max_shard_size=cfg.max_shard_size)
    if kind in ("safetensors", "meta_llama"):
        if cfg.vision_tower or cfg.projector:
            raise ConversionError(f"{cfg.source}: vision_tower/projector apply to kind llava, "
                                  f"not {kind}")
        if kind == "meta_llama":
            return convert_meta_llama(source, scratch, dtype=cfg.dtype,
                                      max_shard_size=cfg.max_shard_size)
        return convert_to_safetensors(source, scratch, max_shard_size=cfg.max_shard_size)
    if not cfg.vision_tower:
        raise ConversionError(f"{cfg.source}: an original LLaVA needs vision_tower (the CLIP "
                              "checkpoint its mm_vision_tower names)")
    return convert_original_llava(source, fetch_dir(cfg.vision_tower, kind="checkpoints"),
                                  scratch, projector=_local_projector(cfg.projector),
                                  max_shard_size=cfg.max_shard_size, dtype=cfg.dtype)


def _local_projector(uri: str | None) -> Path | None:
    """The projector as a local path; an s3:// file is read from its committed folder."""
    if uri is None or not uri.startswith("s3://"):
        return Path(uri) if uri else None
    if uri.rstrip("/").endswith((".bin", ".pt", ".pth", ".safetensors")):
        folder, _, name = uri.rstrip("/").rpartition("/")
        return fetch_dir(folder, kind="checkpoints") / name
    return fetch_dir(uri, kind="checkpoints")


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> ConvertResult:
    conversion = meta.get("conversion", {})
    return ConvertResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                         kind=conversion.get("kind", "?"), tensors=conversion.get("tensors", 0))


# Checkpoints arrive through `import` (data image, which has torch and sentencepiece); a
# refused or broken checkpoint is one line on stderr and exit status 1, not a traceback.
# Writes to its `to`: a recipe's `conversions:` name the URI its model.name_or_path then reads.
STAGE = Stage(name=NAME, config=ConvertConfig, result=ConvertResult, main=main, image="data",
              errors=(ConversionError, GenerationConfigError, storage.StoreError),
              own_output=False, outputs={"model": "Model"})

if __name__ == "__main__":
    sys.exit(STAGE.cli())
