"""Stage `apply-connector`: a base model + an aligned connector -> a model to fine-tune next.

    python -m mmjobs.stages.apply_connector --set base=s3://models/llava \\
        --set connector=s3://runs/x/align

The two-stage LLaVA recipe (and ChartWiz): `align` trains only the projector and exports it
(`final/connector/`); fine-tuning then starts from the base model with that projector, as
LLaVA's `--pretrain_mm_mlp_adapter` does. `connector` is an align output, its `connector/`
directory, or a model directory whose projector is taken (see `mmjobs.train.moe.locate_expert`).

When the base's own projector is transformers' native one and the connector is the same
shape (LLaVA-1.5's mlp2x_gelu), its weights are loaded into it and the model stays a plain
Hugging Face checkpoint; otherwise the connector module replaces it (`mmjobs_connector` in
config.json; `load_model` restores it). Before committing, the installed connector is checked
to reproduce the source connector's outputs exactly on random features.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field

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

NAME = "apply-connector"
VERSION = 1  # bump when the output changes for the same inputs
log = get_logger(__name__)
_NOT_FINGERPRINTED = RUN_FIELDS | {"base", "connector"}  # they enter by content instead


class ApplyConnectorConfig(StageConfig):
    """Install an aligned connector into its base model and export the result."""

    base: str = Field(description="Base model URI (local dir, s3:// committed dir or hub id).")
    connector: str = Field(description="Aligned connector: an align output, a connector/ dir, "
                           "or a model dir.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the base model.")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the saved weights; auto keeps the base checkpoint's.")


class ApplyConnectorResult(StageResult):
    """Where the model is and how the connector went in."""

    model: str
    connector_kind: str
    native: bool
    max_abs_diff: float


def main(cfg: ApplyConnectorConfig) -> ApplyConnectorResult:
    """Run the stage; see the module docstring.

    Raises:
        ValueError: the connector does not fit the base model's dims, or the installed one
            does not reproduce it.
    """
    import torch

    from mmjobs.config import ModelConfig
    from mmjobs.models.builder import (
        connector_module,
        dir_fingerprint,
        export_model_dir,
        load_model,
        saved_dtype,
        set_connector,
    )
    from mmjobs.models.compose import connector_spec
    from mmjobs.train.moe import load_expert, locate_expert

    located = locate_expert(cfg.connector)
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED),
                     dir_fingerprint(cfg.base), dir_fingerprint(located))

    def apply(stage: StageRun) -> dict:
        loaded = load_model(ModelConfig(name_or_path=cfg.base, dtype="float32",
                                        trust_remote_code=cfg.trust_remote_code),
                            for_training=False)
        source = load_expert(located).float()
        current = connector_module(loaded.model)
        spec = connector_spec(source) or {}
        native = connector_spec(current) is None and _same_tensors(current, source)
        if native:  # keep a plain HF checkpoint: same module, new weights
            current.load_state_dict(source.state_dict())
        else:
            try:
                set_connector(loaded.model, source)
            except ValueError as e:
                raise ValueError(f"{cfg.connector} does not fit {cfg.base}: {e}") from None
        installed = connector_module(loaded.model)
        dim = next(p for p in source.parameters() if p.dim() == 2).shape[1]
        probe = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((installed(probe) - source(probe)).abs().max())
        if diff != 0.0:
            raise ValueError(f"{NAME}: the installed connector differs from {located} by "
                             f"{diff}; please report")
        meta = {"stage": NAME, "base": cfg.base, "connector": located,
                "connector_kind": spec.get("kind", "native"), "native": native,
                "max_abs_diff": diff}
        stage.run.log_metrics({"max_abs_diff": diff})
        with stage.commit(meta) as scratch:
            model = loaded.model.to(saved_dtype(cfg.save_dtype, loaded.model_dir))
            export_model_dir(model, scratch, source_dir=loaded.model_dir)
        log.info("%s: %s connector from %s installed into %s -> %s", NAME,
                 meta["connector_kind"], located, cfg.base, stage.out)
        return meta

    return run_stage(cfg, NAME, fp, apply, result=_result, model_type="with-connector")


def _same_tensors(a, b) -> bool:
    """Whether two modules have the same state-dict keys and shapes."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> ApplyConnectorResult:
    return ApplyConnectorResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                                connector_kind=meta["connector_kind"], native=meta["native"],
                                max_abs_diff=meta["max_abs_diff"])


STAGE = Stage(name=NAME, config=ApplyConnectorConfig, result=ApplyConnectorResult, main=main,
              image="train", gpu=True, inputs=(Input("base"), Input("connector")),
              outputs={"model": "Model"},
              recipe_defaults=remote_code_defaults)

if __name__ == "__main__":
    sys.exit(STAGE.cli())
