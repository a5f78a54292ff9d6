"""Stage `make-tiny-model`: build a tiny vision-language model from configs into the store.

    python -m mmjobs.stages.make_tiny_model --set kind=llava --set image_size=56
    python -m mmjobs.stages.make_tiny_model --set replica=llava-hf/llava-1.5-7b-hf

The chart-demo's base model, and the model every recipe's scaled-down test trains: random
weights and a tokenizer trained on generated chart text (`mmjobs.models.tiny`), no downloads.
With `replica`, the tiny replica of a real base model instead (`mmjobs.models.replicas`: its
published configs, template, tokens, geometry and weight format). The committed output is an
ordinary Hugging Face model directory (processor, chat template where the model has one). The
build is deterministic for a config, so a re-run reuses the committed one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mmjobs.logs import get_logger
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    run_stage,
)

NAME = "make-tiny-model"
VERSION = 2  # bump when mmjobs.models.tiny builds another model (2: Chameleon VQ decoder)
log = get_logger(__name__)


class MakeTinyModelConfig(StageConfig):
    """Build a tiny LLaVA or Chameleon from configs (no downloads)."""

    kind: Literal["llava", "chameleon"] = Field("llava", description="Architecture.")
    image_size: int | None = Field(None, ge=16, le=1024, description="Input image side in "
                                   "pixels; default the builder's (LLaVA 56 = 16 image tokens, "
                                   "Chameleon 32).")
    vocab_size: int = Field(1000, ge=300, le=32000, description="Tokenizer vocabulary size.")
    seed: int = Field(0, description="Seed for the tokenizer corpus and the weights.")
    replica: str | None = Field(None, description="Build the tiny replica of this real model "
                                "instead (mmjobs.models.replicas, e.g. llava-hf/llava-1.5-7b-hf); "
                                "kind, image_size and vocab_size do not apply.")

    @model_validator(mode="after")
    def _replica_alone(self) -> MakeTinyModelConfig:
        if self.replica is None:
            return self
        from mmjobs.models.replicas import REPLICAS

        if self.replica not in REPLICAS:
            raise ValueError(f"replica={self.replica!r}: no such replica; use one of "
                             f"{', '.join(REPLICAS)}")
        clash = sorted({"kind", "image_size", "vocab_size"} & self.model_fields_set)
        if clash:
            raise ValueError(f"{', '.join(clash)}: a replica keeps its real model's sizes; "
                             "remove them or unset replica")
        return self


class MakeTinyModelResult(StageResult):
    """Where the model is."""

    model: str
    num_parameters: int


def main(cfg: MakeTinyModelConfig) -> MakeTinyModelResult:
    """Build (or reuse) the model; see the module docstring."""
    # `replica` joins the fingerprint only when set, so earlier builds stay cached.
    skip = RUN_FIELDS | ({"replica"} if cfg.replica is None else set())
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=skip))
    kind = cfg.replica or cfg.kind

    def build(stage: StageRun) -> dict:
        meta = {"stage": NAME, "kind": kind}
        with stage.commit(meta) as scratch:  # reads `meta` when it commits
            _build(cfg, scratch)
            meta["num_parameters"] = _count(scratch)
        stage.run.log_metrics({"num_parameters": meta["num_parameters"]})
        log.info("%s: tiny %s (%d parameters) -> %s", NAME, kind, meta["num_parameters"],
                 stage.out)
        return meta

    return run_stage(cfg, NAME, fp, build, result=_result, tags={"kind": kind})


def _build(cfg: MakeTinyModelConfig, scratch: Path) -> None:
    if cfg.replica is not None:
        from mmjobs.models.replicas import build_replica

        build_replica(cfg.replica, scratch, seed=cfg.seed)
        return
    from mmjobs.models.tiny import build_tiny_chameleon, build_tiny_llava

    build = build_tiny_llava if cfg.kind == "llava" else build_tiny_chameleon
    size = {"image_size": cfg.image_size} if cfg.image_size else {}
    build(scratch, vocab_size=cfg.vocab_size, seed=cfg.seed, **size)


def _count(model_dir) -> int:
    """Parameters in a saved model, read from the safetensors headers (no model load)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(f.get_slice(key).get_shape())
    if not total:  # replicas of checkpoints published as .bin pickles (restricted, mmapped)
        from mmjobs.models.convert import load_tensors

        total = sum(t.numel() for p in model_dir.glob("*.bin") for t in load_tensors(p).values())
    return total


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> MakeTinyModelResult:
    return MakeTinyModelResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                               num_parameters=int(meta.get("num_parameters", 0)))


STAGE = Stage(name=NAME, config=MakeTinyModelConfig, result=MakeTinyModelResult, main=main,
              image="data", outputs={"model": "Model"})

if __name__ == "__main__":
    sys.exit(STAGE.cli())
