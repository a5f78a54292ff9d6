"""Pipeline `chartmoe`: ChartMoE's diversely aligned MoE-MLP connector, then LoRA SFT.

prepare-{table,json,code} (chart → table / JSON / plotting-code alignment data) → pretokenize
each → three align runs (independent, so they run in parallel) → build-moe-connector (the
base's connector as expert 0, then table, json, code) → prepare-sft → pretokenize-sft → sft
(LoRA; the router trains) → merge → ChartQA without and with program of thought
(infer-direct/-pot, evaluate-direct/-pot: relaxed accuracy at 0.05 / 0.1 / 0.2, the @AP table)
→ report.
"""

from __future__ import annotations

from pipelines.builder import Build

NAME = "chartmoe"
EXPERTS = ("table", "json", "code")


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    aligned = []
    for target in EXPERTS:
        data = b.step(f"prepare-{target}", "prepare", key=("prepare-align", f"prepare-{target}"))
        shards = b.step(f"pretokenize-{target}", "pretokenize", key="pretokenize",
                        dataset=data.output, model=base)
        aligned.append(b.step(f"align-{target}", "train", key=("align", f"align-{target}"),
                              fixed={"train": {"mode": "align"}}, data=shards.output,
                              model=base))
    moe = b.step("build-moe", "build-moe-connector", base=base, expert_names=list(EXPERTS),
                 experts=[t.output for t in aligned])
    sft_data = b.step("prepare-sft", "prepare")
    sft_shards = b.step("pretokenize-sft", "pretokenize", key="pretokenize",
                        dataset=sft_data.output, model=moe.output)
    sft = b.step("sft", "train", fixed={"train": {"mode": "sft", "finetune": "lora"}},
                 data=sft_shards.output, model=moe.output)
    merged = b.step("merge", "merge", base=moe.output, adapter=sft.output)
    evaluations = []
    for name, label, pot in (("direct", "w/o PoT", False), ("pot", "w/ PoT", True)):
        predictions = b.step(f"infer-{name}", "infer", key=("infer", f"infer-{name}"),
                             fixed={"benchmark": "chartqa", "benchmark_options": {"pot": pot}},
                             model=merged.output)
        evaluations.append(b.step(f"evaluate-{name}", "evaluate",
                                  key=("evaluate", f"evaluate-{name}"),
                                  fixed={"metric": "chartqa", "pot": {"enabled": pot},
                                         "label": label},
                                  label=label, predictions=predictions.output))
    b.report(evaluations, title="ChartMoE: ChartQA with and without PoT")
