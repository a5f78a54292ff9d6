"""Stage `make-tiny-model`: build a tiny vision-language model from configs into the store.

    python -m mmjobs.stages.make_tiny_model --set kind=llava --set image_size=56

The chart-demo's base model, and the model every recipe's scaled-down test trains: random
weights and a tokenizer trained on generated chart text (`mmjobs.models.tiny`), no downloads.
The committed output is an ordinary Hugging Face model directory (safetensors, processor,
chat template). The build is deterministic for a config, so a re-run reuses the committed one.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

from pydantic import Field

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


class MakeTinyModelResult(StageResult):
    """Where the model is."""

    model: str
    num_parameters: int


def main(cfg: MakeTinyModelConfig) -> MakeTinyModelResult:
    """Build (or reuse) the model; see the module docstring."""
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=RUN_FIELDS))

    def build(stage: StageRun) -> dict:
        from mmjobs.models.tiny import build_tiny_chameleon, build_tiny_llava

        make = build_tiny_llava if cfg.kind == "llava" else build_tiny_chameleon
        size = {"image_size": cfg.image_size} if cfg.image_size else {}
        meta = {"stage": NAME, "kind": cfg.kind}
        with stage.commit(meta) as scratch:  # reads `meta` when it commits
            make(scratch, vocab_size=cfg.vocab_size, seed=cfg.seed, **size)
            meta["num_parameters"] = _count(scratch)
        stage.run.log_metrics({"num_parameters": meta["num_parameters"]})
        log.info("%s: tiny %s (%d parameters) -> %s", NAME, cfg.kind, meta["num_parameters"],
                 stage.out)
        return meta

    return run_stage(cfg, NAME, fp, build, result=_result, tags={"kind": cfg.kind})


def _count(model_dir) -> int:
    """Parameters in a saved model, read from the safetensors headers (no model load)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _result(out: str, meta: dict, cached: bool, run_id: str | None) -> MakeTinyModelResult:
    return MakeTinyModelResult(output=out, cached=cached, mlflow_run_id=run_id, model=out,
                               num_parameters=int(meta.get("num_parameters", 0)))


STAGE = Stage(name=NAME, config=MakeTinyModelConfig, result=MakeTinyModelResult, main=main,
              image="data")

if __name__ == "__main__":
    sys.exit(STAGE.cli())
