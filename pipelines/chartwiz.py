"""Pipeline `chartwiz`: ChartWiz (Korean chart QA, "LLaVA with DePlot") from AI-hub charts.

prepare-align (AI-hub charts -> chart-to-table samples) and prepare (table, description,
summary and QA samples) from the train split, prepare-test (QA of the test split) →
pretokenize both (pretokenize-align reads `stages.pretokenize` refined by
`stages.pretokenize-align`: the recipe sets LLaVA's `plain` format there) → align (projector
only, chart → table: ChartWiz's pretraining) → apply-connector → finetune (full or LoRA,
`stages.finetune.train.finetune`; LoRA adds a merge) → infer (batch inference on the test QA)
→ evaluate (`stages.evaluate.metric`) → report.
"""

from __future__ import annotations

from pipelines.builder import Build

NAME = "chartwiz"


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    align_set = b.step("prepare-align", "prepare")
    train_set = b.step("prepare", "prepare")
    test_set = b.step("prepare-test", "prepare")
    align_shards = b.step("pretokenize-align", "pretokenize",
                          key=("pretokenize", "pretokenize-align"),
                          dataset=align_set.output, model=base)
    shards = b.step("pretokenize", "pretokenize", dataset=train_set.output, model=base)
    align = b.step("align", "train", fixed={"train": {"mode": "align"}},
                   data=align_shards.output, model=base)
    aligned = b.step("apply-connector", "apply-connector", base=base, connector=align.output)
    finetune_cfg = b.config("finetune", "train", fixed={"train": {"mode": "sft"}},
                            wired=("data", "model.name_or_path"))
    finetune = b.step("finetune", "train", config=finetune_cfg, data=shards.output,
                      model=aligned.output)
    model = finetune.output  # a full fine-tune returns its model directory
    if finetune_cfg.get("train", {}).get("finetune", "lora") == "lora":
        model = b.step("merge", "merge", base=aligned.output, adapter=finetune.output).output
    predictions = b.step("infer", "infer", model=model, dataset=test_set.output)
    evaluation = b.step("evaluate", "evaluate", label="chartwiz", predictions=predictions.output)
    b.report([evaluation], title="ChartWiz: Korean chart QA")
