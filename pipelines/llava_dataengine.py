"""Pipeline `llava-dataengine`: MLLM-DataEngine's LLaVA-1.5-7B LoRA fine-tune and benchmarks.

prepare-llava (LLaVA mix665k) and prepare-dataengine (DataEngine GPT-VQA, as LLaVA-1.5
multiple-choice prompts), sharing one image root → mix → pretokenize → sft (LoRA) → merge →
one infer + evaluate per benchmark of `eval.benchmarks` (SEED-Bench, MMBench, MME, GQA,
ScienceQA, VQAv2), independent so they run in parallel → report; the run's results.md holds
the seed's Main Results table.
"""

from __future__ import annotations

from pipelines.builder import Build

NAME = "llava-dataengine"
MODEL_ROW = "LLaVA-1.5-7B + MLLM-DataEngine"
BENCHMARKS = ("seedbench", "mmbench", "mme", "gqa", "scienceqa", "vqav2")


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    llava = b.step("prepare-llava", "prepare")
    dataengine = b.step("prepare-dataengine", "prepare")
    mixed = b.step("mix", "mix", datasets=[llava.output, dataengine.output])
    shards = b.step("pretokenize", "pretokenize", dataset=mixed.output, model=base)
    sft = b.step("sft", "train", fixed={"train": {"mode": "sft", "finetune": "lora"}},
                 data=shards.output, model=base)
    merged = b.step("merge", "merge", base=base, adapter=sft.output)
    # Sections of benchmarks left out of eval.benchmarks stay valid (and unused).
    b.allow(*(f"{kind}-{name}" for kind in ("infer", "evaluate") for name in BENCHMARKS))
    evaluations = []
    for benchmark in b.recipe.eval.benchmarks:
        predictions = b.step(f"infer-{benchmark}", "infer", key=("infer", f"infer-{benchmark}"),
                             fixed={"benchmark": benchmark}, model=merged.output)
        evaluations.append(b.step(f"evaluate-{benchmark}", "evaluate",
                                  key=("evaluate", f"evaluate-{benchmark}"),
                                  fixed={"metric": benchmark, "label": benchmark},
                                  label=benchmark, row=MODEL_ROW,
                                  predictions=predictions.output))
    b.report(evaluations, title="MLLM-DataEngine on LLaVA-1.5-7B: Main Results")
