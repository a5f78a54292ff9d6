"""Stage `build-moe-connector`: aligned connectors → a model with ChartMoE's MoE-MLP connector.

    python -m mmjobs.stages.build_moe_connector --set base=s3://models/llava \\
        --set experts.table=s3://runs/align-table --set experts.json=s3://runs/align-json \\
        --set experts.code=s3://runs/align-code

Each expert URI is a connector checkpoint (`connector/` from an align run, see
`mmjobs.train.moe`) or a model directory. The experts start as exact copies of those connectors,
after the base model's own connector as expert 0 ("original", ChartMoE's order) unless
`include_original=false`; the router is new and is trained in SFT. The committed output is a
full model directory — the base with the MoE connector installed (`mmjobs_connector` in
config.json), loadable with `load_model` — plus `connector/` holding the MoE connector alone.

Before committing, every expert is checked to reproduce its source connector exactly (router
forced one-hot); the largest difference is logged as `expert_max_abs_diff`.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field, model_validator

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

NAME = "build-moe-connector"
VERSION = 1  # bump when the construction or output layout changes: invalidates cached outputs
log = get_logger(__name__)
_NOT_FINGERPRINTED = RUN_FIELDS | {"base", "experts"}  # base/experts enter by content instead


class BuildMoeConfig(StageConfig):
    """Build a model with an MoE-MLP connector from aligned connectors (ChartMoE)."""

    base: str = Field(description="Model URI (local dir or s3://) whose connector is the "
                      "'original' expert and whose other weights the output keeps.")
    experts: dict[str, str] = Field(
        description="Expert name → aligned connector URI (align output, connector/ dir or model "
        "dir), in expert order, e.g. {table: ..., json: ..., code: ...}.")
    include_original: bool = Field(True, description="Add the base's connector as expert 0 "
                                   "named 'original' (ChartMoE does).")
    top_k: int = Field(2, ge=1, description="Experts per token; ChartMoE uses 2 of 4.")
    router_init: Literal["zeros", "normal", "linear"] = Field(
        "normal", description="zeros: experts equally likely (ties go to low indices); normal: "
        "N(0, 0.02²) logits that break ties per token; linear: nn.Linear's default "
        "(Kaiming-uniform), as ChartMoE's gate.")
    aux_loss_coef: float = Field(0.0, ge=0, description="Load-balancing loss weight stored "
                                 "with the connector (ChartMoE's balanced variant: 0.1).")
    seed: int = Field(0, description="Seed for the router's initialisation.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the base model.")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the saved weights; auto keeps the base checkpoint's.")

    @model_validator(mode="after")
    def _check_experts(self) -> BuildMoeConfig:
        problems = []
        total = len(self.experts) + int(self.include_original)
        if not self.experts:
            problems.append("experts: give at least one name → URI")
        if self.include_original and "original" in self.experts:
            problems.append("experts: 'original' is the base's connector when include_original "
                            "is true; rename that expert or set include_original=false")
        if self.experts and self.top_k > total:
            problems.append(f"top_k={self.top_k} exceeds the {total} experts; lower top_k")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BuildMoeResult(StageResult):
    """Where the model is, and what its connector holds."""

    model: str
    expert_names: list[str]
    connector_parameters: int
    expert_max_abs_diff: float


def main(cfg: BuildMoeConfig) -> BuildMoeResult:
    """Run the stage; see the module docstring.

    Raises:
        ValueError: experts of different kinds/shapes, or not matching the base's dims.
    """
    import torch

    from mmjobs.config import ModelConfig
    from mmjobs.models.builder import (
        connector_module,
        export_model_dir,
        load_model,
        saved_dtype,
        set_connector,
    )
    from mmjobs.models.model_dirs import dir_fingerprint
    from mmjobs.train.moe import (
        CONNECTOR_DIR,
        expert_reproduction_error,
        load_expert,
        locate_expert,
        moe_connector_from,
        save_connector,
    )

    located = {name: locate_expert(uri) for name, uri in cfg.experts.items()}
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED),
                     dir_fingerprint(cfg.base),
                     # a list, not a dict: expert order is expert index
                     [(name, dir_fingerprint(uri)) for name, uri in located.items()])

    def build(stage: StageRun) -> dict:
        # float32 while building: exact copies, and the reproduction check compares like dtypes.
        loaded = load_model(ModelConfig(name_or_path=cfg.base, dtype="float32",
                                        trust_remote_code=cfg.trust_remote_code),
                            for_training=False)
        original = connector_module(loaded.model)
        experts = {name: load_expert(uri) for name, uri in located.items()}
        torch.manual_seed(cfg.seed)
        moe = moe_connector_from(experts, original=original if cfg.include_original else None,
                                 top_k=cfg.top_k, router_init=cfg.router_init,
                                 aux_loss_coef=cfg.aux_loss_coef)
        try:
            set_connector(loaded.model, moe)
        except ValueError as e:
            raise ValueError(f"experts do not fit the base model {cfg.base}: {e}") from None
        sources = ([original] if cfg.include_original else []) + list(experts.values())
        features = torch.randn(2, 7, moe.vision_dim, generator=torch.Generator().manual_seed(0))
        diff = expert_reproduction_error(moe, sources, features)
        if diff != 0.0:
            raise RuntimeError(f"{NAME}: an expert differs from its source connector by {diff}; "
                               "please report (copies must be exact)")
        meta = {
            "stage": NAME, "base": cfg.base, "experts": located,
            "expert_names": moe.expert_names, "expert_max_abs_diff": diff,
            "connector_parameters": sum(p.numel() for p in moe.parameters()),
        }  # fmt: skip
        stage.run.log_metrics({"num_experts": moe.num_experts, "expert_max_abs_diff": diff,
                               "connector_parameters": meta["connector_parameters"],
                               "model_parameters": sum(p.numel()
                                                       for p in loaded.model.parameters())})
        with stage.commit(meta) as scratch:
            model = loaded.model.to(saved_dtype(cfg.save_dtype, loaded.model_dir))
            export_model_dir(model, scratch, source_dir=loaded.model_dir)
            save_connector(moe, scratch / CONNECTOR_DIR, meta={"experts": located})
        log.info("%s: %d experts %s -> %s", NAME, moe.num_experts, moe.expert_names, stage.out)
        return meta

    return run_stage(cfg, NAME, fp, build, result=_result,
                     tags={"experts": ",".join(cfg.experts)})


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> BuildMoeResult:
    return BuildMoeResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                          expert_names=meta["expert_names"],
                          connector_parameters=meta["connector_parameters"],
                          expert_max_abs_diff=meta["expert_max_abs_diff"])


def _wire(inputs: dict) -> dict:
    """The pipeline passes expert names and their upstream outputs as two lists (KFP has no
    maps of task outputs); the config takes them as one name -> URI map, in order."""
    return {"base": inputs["base"],
            "experts": dict(zip(inputs["expert_names"], inputs["experts"], strict=True))}


STAGE = Stage(name=NAME, config=BuildMoeConfig, result=BuildMoeResult, main=main, image="train",
              gpu=True, inputs=(Input("base"), Input("expert_names", path="experts", type=list),
                                Input("experts", type=list)),
              wire=_wire, recipe_defaults=remote_code_defaults, outputs={"connector": "Model"})

if __name__ == "__main__":
    sys.exit(STAGE.cli())
