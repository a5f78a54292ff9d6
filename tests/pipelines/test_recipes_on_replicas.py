"""llava-dataengine, chartwiz and chart-demo run end to end (KFP's local runner), scaled down
onto the replicas of their real base models (`mmjobs.models.replicas`): 336 px CLIP images of
576 tokens, the real tokenizers' special ids, the real chat template or none.

- llava-dataengine starts as the recipe does: its `imports:` copy vicuna-7b-v1.5, CLIP-336 and
  the LLaVA-1.5 pretrain projector (pickles, as published) into the store and
  `conversions.base` composes them into a transformers LLaVA; it trains in vicuna_v1.
- chartwiz imports the llava-hf/llava-1.5-7b-hf replica and trains in its chat template.
- chart-demo's make-model step builds the llava-hf replica (`stages.make-model.replica`).
  `make demo` itself keeps its tiny model: its accuracy story (38/40 chart types after 1000
  CPU steps on 56 px charts) needs a model that small; test_run.py covers that run.

Each recipe runs once per module (a module-scoped fixture per recipe); the tests read what a
user would: committed outputs, shard counts and rejects, decoded labels, MLflow metrics,
results.md and the evaluate summaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs import storage
from tests.pipelines import fixtures
from tests.pipelines.replica_runs import (
    ReplicaRun,
    assert_counts_reconcile,
    assert_steps_committed,
    assert_trained,
    decoded_labels,
    evaluation,
    rows,
    run_recipe,
)

pytestmark = pytest.mark.slow
LLAVA_HF = "llava-hf/llava-1.5-7b-hf"
LLAVA_IMAGE_TOKENS = 576  # (336 / 14) ** 2


def _answers(run: ReplicaRun, dataset_step: str) -> dict[str, str]:
    """Sample id -> its assistant text (every fixture sample has one assistant turn)."""
    out = {}
    for sample in rows(run.run_dir / dataset_step / "samples.jsonl"):
        replies = [t["content"] for t in sample["conversations"] if t["role"] == "assistant"]
        assert len(replies) == 1, sample
        out[sample["id"]] = replies[0]
    return out


def _assert_image_tokens(card: dict) -> None:
    """Every written row of an image dataset carries the real model's 576 image tokens."""
    assert card["tokens"]["image"] == LLAVA_IMAGE_TOKENS * card["images"], card["tokens"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataengine_run(tmp_path_factory, replica_dir, mlflow_db_template) -> ReplicaRun:
    parts = {name: replica_dir(hub_id) for name, hub_id in fixtures.LLAVA_PARTS.items()}
    return run_recipe("llava-dataengine", tmp_path_factory.mktemp("llava-dataengine"),
                      mlflow_db_template, lambda data: fixtures.make_llava_dataengine(data, parts))


@pytest.fixture(scope="module")
def chartwiz_run(tmp_path_factory, replica_dir, mlflow_db_template) -> ReplicaRun:
    replica = replica_dir(LLAVA_HF)

    def overrides(data: Path) -> list[str]:
        imported = data.parent / "store-copy" / "llava-1.5-7b-hf"  # as a hub import would
        return [*fixtures.make_chartwiz(data, replica),
                f"imports={{base: {{source: '{replica}', to: '{imported}'}}}}",
                f"model.name_or_path={imported}"]

    return run_recipe("chartwiz", tmp_path_factory.mktemp("chartwiz"), mlflow_db_template,
                      overrides)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, mlflow_db_template) -> ReplicaRun:
    return run_recipe("chart-demo", tmp_path_factory.mktemp("chart-demo"), mlflow_db_template,
                      lambda data: fixtures.chart_demo_on_replica(LLAVA_HF))


# --------------------------------------------------------------------------- llava-dataengine


DATAENGINE_SCORED = ("seedbench", "mmbench", "scienceqa")  # vqav2 test-dev: EvalAI only
DATAENGINE_ROWS = ("", "-baseline")  # MLLM-DataEngine, None (baseline)


def test_dataengine_composes_its_base_from_the_published_parts(
        dataengine_run: ReplicaRun) -> None:
    run = dataengine_run
    steps = {"prepare-llava", "prepare-dataengine", "mix",
             *(f"{step}{row}" for step in ("sft", "merge") for row in DATAENGINE_ROWS),
             *(f"infer-{b}{row}" for b in (*DATAENGINE_SCORED, "vqav2")
               for row in DATAENGINE_ROWS),
             *(f"evaluate-{b}{row}" for b in DATAENGINE_SCORED for row in DATAENGINE_ROWS)}
    # + 3 imports, the conversion, two pretokenize steps and the report
    assert_steps_committed(run, steps, stage_count=len(steps) + 7)
    hub = run.home.parent / "data" / "models"
    for name in fixtures.LLAVA_PARTS:
        assert storage.is_committed(str(hub / "hub" / name))
    composed = hub / "llava-v1.5-7b-pretrain"
    manifest = storage.read_manifest(str(composed))
    assert manifest.meta["conversion"]["kind"] == "llava"
    config = json.loads((composed / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == 32000
    assert config["vision_config"]["image_size"] == 336
    assert not list(composed.glob("*.bin"))  # safetensors only
    assert list(composed.glob("*.safetensors"))
    _assert_pads_like_expand2square(composed)


def _assert_pads_like_expand2square(model_dir: Path) -> None:
    """image_aspect_ratio pad: a wide image is centred on a square of LLaVA's expand2square
    colour, int(image_mean * 255) = (122, 116, 104), before resize and crop."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = processor(Image.new("RGB", (336, 112), (255, 255, 255)),
                       return_tensors="pt")["pixel_values"][0]
    mean, std = processor.image_mean, processor.image_std
    for channel, expected in enumerate((122, 116, 104)):
        top = float(pixels[channel, 0, 168]) * std[channel] + mean[channel]  # padded band
        middle = float(pixels[channel, 168, 168]) * std[channel] + mean[channel]  # the image
        assert abs(top * 255 - expected) < 0.5, (channel, top * 255)
        assert abs(middle - 1.0) < 1e-3


def test_dataengine_labels_are_vicuna_v1_answers(dataengine_run: ReplicaRun) -> None:
    run = dataengine_run
    card = assert_counts_reconcile(run, "mix")
    # 5 mix665k rows (one text-only, one cut at max_length as LLaVA cuts it) + 3 DataEngine
    # questions: none is dropped.
    assert card["counts"] == {"input": 8, "written": 8, "rejected": 0}
    assert card["processor"]["conversation_format"]["name"] == "vicuna_v1"
    assert card["processor"]["truncate"] is True
    assert card["tokens"]["max_length"] == card["max_length"] == 2048
    _assert_image_tokens(card)
    assert card["images"] == 7
    composed = run.home.parent / "data" / "models" / "llava-v1.5-7b-pretrain"
    labels = decoded_labels(run, "mix", composed)
    answers = _answers(run, "mix")
    assert set(labels) == set(answers)
    long = labels.pop("long").strip()  # the answer's first tokens, and no </s>
    assert fixtures.LONG_ANSWER.startswith(long) and len(long) > 100
    for sample_id, text in labels.items():  # LLaVA's preprocess_v1: the answer and its </s>
        assert text.strip() == answers[sample_id] + "</s>", (sample_id, text)
    assert labels["l1"].strip() == "It is red.</s>"


def test_dataengine_reports_the_seed_table_with_its_baseline_row(
        dataengine_run: ReplicaRun) -> None:
    run = dataengine_run
    assert_trained(run, train_steps=2)  # sft and sft-baseline
    assert set(run.outcome.headlines) == {f"{b}{row}" for b in DATAENGINE_SCORED
                                          for row in DATAENGINE_ROWS}
    assert all(value is not None for _, value in run.outcome.headlines.values())
    for benchmark in DATAENGINE_SCORED:
        for row, name in zip(DATAENGINE_ROWS, ("MLLM-DataEngine", "None (baseline)"),
                             strict=True):
            summary = evaluation(run, f"evaluate-{benchmark}{row}")
            assert summary["metric"] == benchmark and summary["label"] == name
            predictions = rows(run.run_dir / f"infer-{benchmark}{row}" / "predictions.jsonl")
            assert predictions and all("prediction" in p for p in predictions)
    results = storage.read_text(run.outcome.results)
    table = results[results.index("## Main results"):].split("\n\n")[1].splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "Incremental Dataset", "Data Amount", "SEED", "MMBench", "MME", "GQA", "VQAv2",
        "ScienceQA"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    # the seed's two rows; Data Amount = DataEngine samples prepared (3 here, 220k upstream)
    assert [(r[0], r[1]) for r in cells] == [("None (baseline)", "-"), ("MLLM-DataEngine", "3")]
    for row in cells:
        assert row[2] != "-" and row[3] != "-"  # SEED, MMBench
        assert row[4] == row[5] == "-"  # MME and GQA are not run here
        assert row[6] == "-"  # VQAv2 test-dev: EvalAI scores the upload file
        assert len(row[7].split("/")) == 2  # ScienceQA accuracy/IMG accuracy
    assert run.outcome.report and storage.exists(run.outcome.report)
    assert "## Evaluation-server uploads" in results


def test_dataengine_writes_the_servers_upload_files(dataengine_run: ReplicaRun) -> None:
    """Each upload file, read back as its server reads it, for both rows."""
    from openpyxl import load_workbook

    run = dataengine_run
    for row in DATAENGINE_ROWS:
        upload = run.run_dir / f"infer-vqav2{row}" / "submission"
        entries = json.loads((upload / "vqav2_test-dev2015_evalai.json").read_text())
        # every test2015 question, in file order; the one outside test-dev unanswered
        assert [e["question_id"] for e in entries] == [420, 421, 730, 99000]
        assert all(isinstance(e["answer"], str) for e in entries) and entries[-1]["answer"] == ""
        info = json.loads((run.run_dir / f"infer-vqav2{row}" / "infer.json").read_text())
        assert info["submission"]["questions"] == 4 and info["submission"]["unanswered"] == 1
        book = load_workbook(run.run_dir / f"infer-mmbench{row}" / "submission" /
                             "mmbench_mmbench_dev_20230712.xlsx")
        sheet = [list(r) for r in book["Sheet1"].iter_rows(values_only=True)]
        assert sheet[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer",
                            "split"]
        assert [r[0] for r in sheet[1:]] == [0, 7, 1000000]
        assert all(isinstance(r[6], str) for r in sheet[1:])  # every row was asked
        seed = [json.loads(line) for line in (run.run_dir / f"infer-seedbench{row}" /
                                              "submission" / "seedbench_upload.jsonl")
                .read_text().splitlines()]
        assert [s["question_id"] for s in seed] == ["101669", "v1738", "101700"]
        assert seed[1]["prediction"] == ""  # a video question: not asked
        info = json.loads((run.run_dir / f"infer-seedbench{row}" / "infer.json").read_text())
        assert (info["submission"]["answered"], info["submission"]["unanswered"]) == (2, 1)


# --------------------------------------------------------------------------- chartwiz


def test_chartwiz_trains_in_the_llava_hf_template(chartwiz_run: ReplicaRun) -> None:
    run = chartwiz_run
    steps = {"prepare-align", "prepare", "prepare-test", "align", "apply-connector",
             "finetune", "infer", "evaluate"}
    # + the import, two pretokenize steps and the report
    assert_steps_committed(run, steps, stage_count=len(steps) + 4)
    imported = run.home.parent / "store-copy" / "llava-1.5-7b-hf"
    assert storage.is_committed(str(imported))
    assert json.loads((imported / "replica.json").read_text())["replica_of"] == LLAVA_HF
    for dataset in ("prepare-align", "prepare"):
        card = assert_counts_reconcile(run, dataset)
        assert card["counts"]["rejected"] == 0
        assert card["processor"]["conversation_format"]["name"] == "template"
        _assert_image_tokens(card)
        labels = decoded_labels(run, dataset, imported)
        answers = _answers(run, dataset)
        # llava-hf's template labels the answer and writes no EOS after it.
        assert labels and all(text.strip() == answers[i].strip() for i, text in labels.items())
    assert_trained(run, train_steps=2)  # align and finetune
    assert set(run.outcome.headlines) == {"chartwiz"}
    summary = evaluation(run, "evaluate")  # the results row is labelled by the pipeline
    predictions = rows(run.run_dir / "infer" / "predictions.jsonl")
    assert summary["metric"] == "gqa"
    assert summary["count"] == len(predictions) == 4  # 2 test charts x 2 questions
    assert "## Headline per evaluation" in storage.read_text(run.outcome.results)


# --------------------------------------------------------------------------- chart-demo


def test_demo_make_model_builds_the_llava_hf_replica(demo_run: ReplicaRun) -> None:
    run = demo_run
    steps = {"make-model", "prepare", "prepare-test", "align", "apply-connector", "sft",
             "merge", "infer-untrained", "infer-trained", "evaluate-untrained",
             "evaluate-trained"}
    assert_steps_committed(run, steps, stage_count=len(steps) + 2)  # pretokenize, report
    record = json.loads((run.run_dir / "make-model" / "replica.json").read_text())
    assert record["replica_of"] == LLAVA_HF
    card = assert_counts_reconcile(run, "prepare")
    assert card["max_length"] == fixtures.DEMO_REPLICA_MAX_LENGTH
    _assert_image_tokens(card)
    labels = decoded_labels(run, "prepare", run.run_dir / "make-model")
    answers = _answers(run, "prepare")
    assert labels and all(text.strip() == answers[i] for i, text in labels.items())
    assert_trained(run, train_steps=2)  # align and sft
    assert set(run.outcome.headlines) == {"untrained", "trained"}
    for label in ("untrained", "trained"):
        summary = evaluation(run, f"evaluate-{label}")
        assert summary["label"] == label and summary["metric"] == "chartqa"
        assert summary["count"] == len(rows(run.run_dir / f"infer-{label}" /
                                            "predictions.jsonl")) > 0
    assert "## ChartQA relaxed accuracy (@AP)" in storage.read_text(run.outcome.results)
