"""Pipeline `llava-dataengine`: MLLM-DataEngine's LLaVA-1.5-7B LoRA fine-tune and benchmarks.

prepare-llava (LLaVA mix665k) and prepare-dataengine (DataEngine GPT-VQA, as LLaVA-1.5
multiple-choice prompts), sharing one image root → mix → pretokenize → sft (LoRA) → merge →
one infer + evaluate per benchmark of `eval.benchmarks` (SEED-Bench, MMBench, MME, GQA,
ScienceQA, VQAv2), independent so they run in parallel → report; the run's results.md holds
the seed's Main Results table (rows = incremental datasets, with their Data Amount).

- `eval.baseline: true` adds the seed's "None (baseline)" row: the same LoRA recipe trained on
  LLaVA's mix665k alone (pretokenize-baseline → sft-baseline → merge-baseline), evaluated on
  the same benchmarks (`infer-<b>-baseline`, `evaluate-<b>-baseline`; `stages.infer-<b>`
  sections apply to both rows, `stages.<step>-baseline` refines the baseline's).
- Server-scored benchmarks: an infer step with `submission: true` writes the server's upload
  file (VQAv2 EvalAI JSON, MMBench xlsx, SEED JSONL; `mmjobs.eval.submission`). VQAv2 on a
  test split has no public answers: it gets no evaluate step, only its submission file.
- `eval.engine`: each row's model is served by one engine (e.g. vLLM) for all its benchmarks'
  infer steps — `engine-up-<row>` before them, `engine-down-<row>` after them, the run's
  `engine-cleanup` however the block ends (pipelines/engines.py).
"""

from __future__ import annotations

from typing import Any

from kfp import dsl

from pipelines.builder import Build
from pipelines.engines import Engines, engines

NAME = "llava-dataengine"
# The seed's row names (MLLM-DataEngine README, "Main Results": Incremental Dataset column).
MODEL_ROW = "MLLM-DataEngine"
BASELINE_ROW = "None (baseline)"
BENCHMARKS = ("seedbench", "mmbench", "mme", "gqa", "scienceqa", "vqav2")


def wire(b: Build) -> None:
    """Create the steps; see the module docstring."""
    base = b.base_model()
    llava = b.step("prepare-llava", "prepare")
    dataengine = b.step("prepare-dataengine", "prepare")
    mixed = b.step("mix", "mix", datasets=[llava.output, dataengine.output])
    merged = _train(b, "", base, mixed.output)
    # Sections of benchmarks (and the baseline) left out stay valid (and unused).
    b.allow(*(f"{kind}-{name}{suffix}" for kind in ("infer", "evaluate") for name in BENCHMARKS
              for suffix in ("", "-baseline")),
            *(f"{step}-baseline" for step in ("pretokenize", "sft", "merge")))
    rows = [(MODEL_ROW, "", merged, _step_output(b, "prepare-dataengine"))]
    if b.recipe.eval.baseline:
        rows.insert(0, (BASELINE_ROW, "-baseline", _train(b, "-baseline", base, llava.output),
                        None))
    with engines(b) as eng:  # eval.engine: one serving engine per row's model
        evaluations = []
        for row, suffix, model, data in rows:
            b.row_data[row] = data
            evaluations += _evaluate(b, eng, row, suffix, model)
        b.report(evaluations, title="MLLM-DataEngine on LLaVA-1.5-7B: Main Results")


def _train(b: Build, suffix: str, base: Any, dataset: Any) -> Any:
    """pretokenize → sft (LoRA) → merge of one row's training data; the merged model."""
    shards = b.step(f"pretokenize{suffix}", "pretokenize",
                    key=("pretokenize", f"pretokenize{suffix}"), dataset=dataset, model=base)
    sft = b.step(f"sft{suffix}", "train", key=("sft", f"sft{suffix}"),
                 fixed={"train": {"mode": "sft", "finetune": "lora"}},
                 data=shards.output, model=base)
    merged = b.step(f"merge{suffix}", "merge", key=("merge", f"merge{suffix}"), base=base,
                    adapter=sft.output)
    return merged.output


def _evaluate(b: Build, eng: Engines, row: str, suffix: str,
              model: Any) -> list[dsl.PipelineTask]:
    """infer (+ evaluate, unless only a server can score it) per benchmark for one row."""
    engine_label = suffix.removeprefix("-") or "dataengine"  # engine-up-dataengine, -baseline
    answers = {benchmark: eng.infer(f"infer-{benchmark}{suffix}", label=engine_label,
                                    key=("infer", f"infer-{benchmark}",
                                         f"infer-{benchmark}{suffix}"),
                                    fixed={"benchmark": benchmark}, model=model)
               for benchmark in b.recipe.eval.benchmarks}
    eng.down(engine_label)  # after every benchmark's infer step of this row
    tasks = []
    for benchmark, predictions in answers.items():
        if _server_only(b, benchmark):
            tasks.append(predictions)
            continue
        # The config label (MLflow tag, report rows) is the row; the runner's is per step.
        tasks.append(b.step(f"evaluate-{benchmark}{suffix}", "evaluate",
                            key=("evaluate", f"evaluate-{benchmark}",
                                 f"evaluate-{benchmark}{suffix}"),
                            fixed={"metric": benchmark, "label": row},
                            label=f"{benchmark}{suffix}", row=row,
                            predictions=predictions.output))
    return tasks


def _server_only(b: Build, benchmark: str) -> bool:
    """VQAv2 test splits carry no answers: only EvalAI scores them (LLaVA reports test-dev)."""
    options = b.recipe.stages.get(f"infer-{benchmark}", {}).get("benchmark_options", {})
    return benchmark == "vqav2" and str(options.get("split", "val2014")).startswith("test")


def _step_output(b: Build, step: str) -> str | None:
    """The committed output URI of an already created step (for the Data Amount column)."""
    return next((s.output for s in b.steps if s.name == step), None)
