"""`make demo`: the embedded default run, on CPU with a tiny model and generated charts.

Runs the stages that exist so far, in pipeline order, on the embedded defaults
(`$MMJOBS_HOME/store`, `$MMJOBS_HOME/mlflow.db`), and prints where everything went. The full
`chart-demo` recipe (align → LoRA SFT → merge → chart QA evaluation → report, through KFP's
local runner) replaces this with `mmjobs run pipelines/recipes/chart-demo.yaml` (issue #6).
"""

from __future__ import annotations

import sys
import time

from mmjobs import settings, storage
from mmjobs.logs import get_logger

log = get_logger("mmjobs.demo")
EXPERIMENT = "chart-demo"


def main() -> int:
    """Run prepare → pretokenize on synthetic charts with a tiny LLaVA; print the results."""
    from mmjobs.models.tiny import build_tiny_llava
    from mmjobs.stages import prepare, pretokenize

    started = time.monotonic()
    common = {"experiment": EXPERIMENT, "pipeline_run_id": "demo", "recipe": EXPERIMENT}

    log.info("1/3 prepare: drawing synthetic charts with tables and QA pairs")
    prepared = prepare.main(prepare.PrepareConfig(
        source_format="synthetic-charts", num=200, seed=0, **common))
    log.info("prepare: %d rows in, %d accepted, %d rejected -> %s", prepared.rows_in,
             prepared.accepted, prepared.rejected, prepared.output)

    model_dir = settings.home() / "models" / "tiny-llava"
    if not (model_dir / "config.json").exists():
        log.info("2/3 model: building a tiny LLaVA from configs (no downloads)")
        build_tiny_llava(model_dir)
    else:
        log.info("2/3 model: reusing %s", model_dir)

    log.info("3/3 pretokenize: chat template, image tokens, assistant-only labels -> Parquet")
    shards = pretokenize.main(pretokenize.PretokenizeConfig(
        dataset=prepared.output, model=str(model_dir), max_length=512, **common))
    card = storage.read_manifest(shards.output).meta

    print()
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    print(f"  canonical dataset  {prepared.output}  ({prepared.accepted} samples)")
    print(f"  pretokenized       {shards.output}  (fingerprint {card.get('fingerprint')})")
    print(f"  MLflow             {settings.tracking_uri()}  (browse: mmjobs ui)")
    print("  next: training, merge and chart-QA evaluation join this demo with the training, "
          "evaluation and pipelines issues (#4-#6).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
