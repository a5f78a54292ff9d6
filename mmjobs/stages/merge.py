"""Stage `merge`: base model + LoRA adapter → a standalone Hugging Face model directory.

    python -m mmjobs.stages.merge --set base=s3://models/llava --set adapter=s3://runs/x/train

`adapter` is the peft adapter directory or the training output holding it (`final/adapter`).
The LoRA update is merged into the weights and `modules_to_save` (e.g. a fully trained
connector) replace the base's modules. The committed output holds the merged safetensors,
config.json and the base's processor/tokenizer files (byte for byte), so `load_model`,
`AutoProcessor` and serving read it like any model. Before committing, logits of the merged
model are compared with base + adapter on a probe batch (`max_logit_diff`); a difference above
`max_logit_diff` fails the stage.

LaVIN's MMA adapters (`train.finetune: mma`) are not folded (their routers depend on the
input): the output is the LaVIN directory with the trained adapters in place of the initial
ones (adapters float32, the rest in `save_dtype`), and the self-check reloads it and compares
its logits with base + adapters.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pydantic import Field

from mmjobs.config import ModelConfig
from mmjobs.logs import get_logger
from mmjobs.recipe import remote_code_defaults
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Input,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    run_stage,
)

NAME = "merge"
# Bump when merging or the output layout changes: invalidates cached outputs. 2: README.md
# model card; the real image_seq_length in LLaVA configs.
VERSION = 2
log = get_logger(__name__)
_NOT_FINGERPRINTED = RUN_FIELDS | {"base", "adapter"}  # base/adapter enter by content instead


class MergeConfig(StageConfig):
    """Merge a LoRA adapter into its base model and export a standalone model."""

    base: str = Field(description="Base model URI (local dir or s3:// committed dir) the "
                      "adapter was trained on.")
    adapter: str = Field(description="Adapter URI: the peft adapter dir, or a training output "
                         "holding final/adapter.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the base model.")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the merged weights; auto keeps the base checkpoint's. "
        "Merging itself always runs in float32.")
    max_logit_diff: float = Field(
        1e-3, gt=0, description="Fail if merged logits differ from base+adapter logits by more "
        "(float32 merges differ by ~1e-6).")


class MergeResult(StageResult):
    """Where the merged model is, and what the self-check measured."""

    model: str
    adapter: str
    num_parameters: int
    max_logit_diff: float | None
    probe: str


def main(cfg: MergeConfig) -> MergeResult:
    """Run the stage; see the module docstring.

    Raises:
        MergeError: not a LoRA adapter, or it does not fit the base.
        RuntimeError: the self-check difference exceeds `max_logit_diff`.
    """
    from mmjobs.models.model_dirs import dir_fingerprint, locate_adapter

    adapter = locate_adapter(cfg.adapter)
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED),
                     dir_fingerprint(cfg.base), dir_fingerprint(adapter))

    def merge(stage: StageRun) -> dict:
        from mmjobs.models.builder import export_model_dir, fetch_dir, saved_dtype
        from mmjobs.models.lavin.compose import is_lavin_adapter
        from mmjobs.train.merge import merge_lora, merge_mma
        from mmjobs.train.model_card import write_merged_card

        base = ModelConfig(name_or_path=cfg.base, trust_remote_code=cfg.trust_remote_code)
        adapter_dir = fetch_dir(adapter, kind="adapters")
        if is_lavin_adapter(adapter_dir):  # LaVIN: base + trained MMA adapters, standalone
            return _merge_mma(stage, merge_mma(base, adapter_dir), adapter)
        outcome = merge_lora(base, adapter_dir)
        diff = outcome.max_logit_diff
        if diff is not None and diff > cfg.max_logit_diff:
            raise RuntimeError(f"{NAME}: merged logits differ from base+adapter by {diff:.3g} > "
                               f"max_logit_diff {cfg.max_logit_diff:g}; nothing was committed")
        model = outcome.loaded.model
        meta = {"stage": NAME, "base": cfg.base, "adapter": adapter,
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "max_logit_diff": diff, "probe": outcome.probe}
        stage.run.log_metrics({"merged_parameters": meta["num_parameters"],
                               **({"max_logit_diff": diff} if diff is not None else {})})
        with stage.commit(meta) as scratch:
            model.to(saved_dtype(cfg.save_dtype, outcome.loaded.model_dir))
            export_model_dir(model, scratch, source_dir=outcome.loaded.model_dir)
            write_merged_card(scratch, uri=stage.out, base=cfg.base, adapter=adapter,
                              recipe=cfg.recipe, max_logit_diff=diff)
        log.info("%s: merged %s into %s -> %s (max logit diff %s)", NAME, adapter, cfg.base,
                 stage.out, diff)
        return meta

    def _merge_mma(stage: StageRun, outcome: Any, adapter: str) -> dict:
        from mmjobs.models.builder import export_model_dir, saved_dtype
        from mmjobs.models.lavin.compose import is_trainable_name
        from mmjobs.train.merge import standalone_diff
        from mmjobs.train.model_card import write_merged_card

        model = outcome.loaded.model
        meta = {"stage": NAME, "base": cfg.base, "adapter": adapter, "kind": "lavin-mma",
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "probe": outcome.probe}
        with stage.commit(meta) as scratch:
            dtype = saved_dtype(cfg.save_dtype, outcome.loaded.model_dir)
            for name, param in model.named_parameters():  # adapters stay float32, as LaVIN's
                if not is_trainable_name(name):
                    param.data = param.data.to(dtype)
            export_model_dir(model, scratch, source_dir=outcome.loaded.model_dir)
            diff = standalone_diff(outcome, scratch)
            write_merged_card(scratch, uri=stage.out, base=cfg.base, adapter=adapter,
                              recipe=cfg.recipe, max_logit_diff=diff)
            meta["max_logit_diff"] = diff
            if diff is not None and diff > cfg.max_logit_diff:
                raise RuntimeError(f"{NAME}: the standalone LaVIN's logits differ from base + "
                                   f"adapters by {diff:.3g} > max_logit_diff "
                                   f"{cfg.max_logit_diff:g}; nothing was committed")
        stage.run.log_metrics({"merged_parameters": meta["num_parameters"],
                               **({"max_logit_diff": diff} if diff is not None else {})})
        log.info("%s: LaVIN %s + MMA adapters %s -> %s (max logit diff %s)", NAME, cfg.base,
                 adapter, stage.out, diff)
        return meta

    return run_stage(cfg, NAME, fp, merge, result=_result, model_type="merged")


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> MergeResult:
    return MergeResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                       adapter=meta["adapter"], num_parameters=meta["num_parameters"],
                       max_logit_diff=meta["max_logit_diff"], probe=meta["probe"])


STAGE = Stage(name=NAME, config=MergeConfig, result=MergeResult, main=main, image="train",
              gpu=True, inputs=(Input("base"), Input("adapter")), outputs={"model": "Model"},
              recipe_defaults=remote_code_defaults)

if __name__ == "__main__":
    sys.exit(STAGE.cli())
