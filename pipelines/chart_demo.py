"""Pipeline `chart-demo`: the embedded default, a real (tiny) recipe end to end on CPU.

make-model (a tiny LLaVA from configs) → prepare (synthetic charts, train) and prepare-test
(held-out charts, another seed) → pretokenize → align (connector only) → apply-connector →
sft (LoRA) → merge → infer + evaluate (ChartQA relaxed accuracy) for the untrained base and
the trained model → report.
"""

from __future__ import annotations

from pipelines.builder import Build

NAME = "chart-demo"


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    train_set = b.step("prepare", "prepare")
    held_out = b.step("prepare-test", "prepare")
    shards = b.step("pretokenize", "pretokenize", dataset=train_set.output, model=base)
    align = b.step("align", "train", fixed={"train": {"mode": "align"}},
                   data=shards.output, model=base)
    aligned = b.step("apply-connector", "apply-connector", base=base, connector=align.output)
    sft = b.step("sft", "train", fixed={"train": {"mode": "sft", "finetune": "lora"}},
                 data=shards.output, model=aligned.output)
    merged = b.step("merge", "merge", base=aligned.output, adapter=sft.output)
    evaluations = []
    for label, model in (("untrained", base), ("trained", merged.output)):
        predictions = b.step(f"infer-{label}", "infer", key="infer", model=model,
                             dataset=held_out.output)
        evaluations.append(b.step(f"evaluate-{label}", "evaluate", key="evaluate",
                                  fixed={"label": label}, label=label,
                                  predictions=predictions.output))
    b.report(evaluations, title="chart-demo: untrained vs trained tiny LLaVA")
