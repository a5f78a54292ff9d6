"""Stage `infer` on the tiny LLaVA: rows and fields, resume after a crash, S3, base + adapter."""

from __future__ import annotations

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.eval import generate
from mmjobs.stages import infer
from mmjobs.stages.infer import InferConfig, main
from tests.chart_dataset import chart_samples, commit_dataset, write_chart_dataset

N = 7  # samples; ids chart-0..6, every third has a second turn with a second chart


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_dataset(tmp_path: Path, uri: str | None = None) -> str:
    samples = chart_samples(N)
    for i, s in enumerate(samples):
        s["meta"].update(split="test" if i % 2 == 0 else "train", question_type="max")
    samples[1]["meta"]["answers"] = ["50", "fifty"]
    local = write_chart_dataset(tmp_path / "dataset-src", samples)
    return commit_dataset(local, uri or str(tmp_path / "dataset"))


def config(model: Path | str, dataset: str, out: Path | str, **kw) -> InferConfig:
    kw = {"batch_size": 2, "max_new_tokens": 6, **kw}
    return InferConfig(model=str(model), dataset=dataset, output=str(out), **kw)


def read_rows(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


class CountingGenerator:
    """Wraps `Generator.generate_batches`: counts prompts, optionally fails after N batches."""

    def __init__(self, monkeypatch, fail_after: int | None = None, fail=None) -> None:
        self.prompts = 0
        self.batches = 0
        original = generate.Generator.generate_batches
        counter = self

        def crash():
            raise RuntimeError("simulated crash")

        def wrapped(gen, prompts):
            counter.prompts += len(prompts)
            for out in original(gen, prompts):
                if fail_after is not None and counter.batches == fail_after:
                    (fail or crash)()
                counter.batches += 1
                yield out

        monkeypatch.setattr(generate.Generator, "generate_batches", wrapped)


def test_predictions_have_one_row_per_prompt(tiny_llava_dir, tmp_path, monkeypatch, capsys):
    dataset = make_dataset(tmp_path)
    result = main(config(tiny_llava_dir, dataset, tmp_path / "out"))
    assert (result.rows, result.answered, result.resumed, result.cached) == (N, N, 0, False)
    assert storage.is_committed(result.output)
    assert sorted(f.path for f in storage.read_manifest(result.output).files) == [
        "infer.json", "predictions.jsonl"]
    rows = read_rows(result.predictions)
    assert [r["id"] for r in rows] == [f"chart-{i}" for i in range(N)]  # source order
    first, second, two_turns = rows[0], rows[1], rows[2]
    assert first["prompt"] == "<image>\nWhat is the largest value? (#0)"
    assert isinstance(first["prediction"], str)
    assert first["gt"].startswith("The largest bar is") and first["answers"] == [first["gt"]]
    assert (first["split"], first["question_type"], first["source"]) == ("test", "max", "test")
    assert second["answers"] == ["50", "fifty"]  # meta.answers wins over the last turn
    assert two_turns["prompt"] == "막대 그래프를 표로 바꾸세요. <image>"
    assert two_turns["gt"].startswith("| 값 |")
    summary = json.loads(storage.read_text(storage.join(result.output, "infer.json")))
    assert summary["rows"] == N and summary["new_tokens"] > 0 and summary["tokens_per_second"]
    assert not (tmp_path / "out" / "predictions.partial.jsonl").exists()
    # Same inputs again: a no-op through the CLI, which prints the result as JSON.
    counter = CountingGenerator(monkeypatch)
    assert infer.STAGE.cli(["--set", f"model={tiny_llava_dir}", "--set", f"dataset={dataset}",
                            "--set", f"output={tmp_path / 'out'}", "--set", "batch_size=2",
                            "--set", "max_new_tokens=6"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["cached"] is True and printed["rows"] == N and counter.prompts == 0


def test_split_limit_and_suffix(tiny_llava_dir, tmp_path):
    dataset = make_dataset(tmp_path)
    result = main(config(tiny_llava_dir, dataset, tmp_path / "out", split="test", limit=3,
                         prompt_suffix=" Answer briefly."))
    rows = read_rows(result.predictions)
    assert [r["id"] for r in rows] == ["chart-0", "chart-2", "chart-4"]
    assert all(r["prompt"].endswith(" Answer briefly.") and r["split"] == "test" for r in rows)


def test_crash_then_resume_answers_only_the_rest(tiny_llava_dir, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path)
    out = tmp_path / "out"
    reference = read_rows(main(config(tiny_llava_dir, dataset, tmp_path / "ref")).predictions)

    with monkeypatch.context() as m:
        crashed = CountingGenerator(m, fail_after=1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(config(tiny_llava_dir, dataset, out))
    assert crashed.batches == 1
    assert not storage.is_committed(str(out))
    partial = out / "predictions.partial.jsonl"
    done = [json.loads(line)["id"] for line in partial.read_text().splitlines()]
    assert len(done) == 2  # one batch
    with open(partial, "a") as f:  # a row cut off by a kill mid-write is dropped
        f.write('{"id": "chart-9", "predic')

    # A bigger batch size does not change rows: the partial rows are kept.
    with monkeypatch.context() as m:
        resumed = CountingGenerator(m)
        result = main(config(tiny_llava_dir, dataset, out, batch_size=4))
    assert resumed.prompts == N - 2
    assert (result.rows, result.answered, result.resumed) == (N, N - 2, 2)
    rows = read_rows(result.predictions)
    assert sorted(r["id"] for r in rows) == sorted(f"chart-{i}" for i in range(N))
    assert rows == reference  # greedy answers do not depend on batching
    assert not partial.exists() and not (out / "predictions.partial.json").exists()


def test_partial_rows_of_other_settings_are_discarded(tiny_llava_dir, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        CountingGenerator(m, fail_after=1)
        with pytest.raises(RuntimeError):
            main(config(tiny_llava_dir, dataset, out))
    counter = CountingGenerator(monkeypatch)
    result = main(config(tiny_llava_dir, dataset, out, max_new_tokens=3))
    assert counter.prompts == N and result.resumed == 0


def test_duplicate_ids_and_config_errors(tiny_llava_dir, tmp_path):
    samples = chart_samples(2)
    samples[1]["id"] = samples[0]["id"]
    local = write_chart_dataset(tmp_path / "dup", samples)
    dataset = commit_dataset(local, str(tmp_path / "dup-committed"))
    with pytest.raises(ValueError, match="occurs twice"):
        main(config(tiny_llava_dir, dataset, tmp_path / "out"))
    with pytest.raises(ValueError, match="exactly one of `dataset`"):
        InferConfig(model="m", dataset="d", benchmark="chartqa", benchmark_root="r")
    with pytest.raises(ValueError, match="needs `benchmark_root`"):
        InferConfig(model="m", benchmark="chartqa")


def test_benchmark_items(tiny_llava_dir, tmp_path, monkeypatch):
    from tests.chart_dataset import bar_chart_png

    image = tmp_path / "bench" / "png" / "a.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(bar_chart_png([3, 1, 2]))
    seen = {}

    def load_benchmark(name, root, **options):
        seen.update(name=name, root=root, options=options)
        for i in range(3):
            yield types.SimpleNamespace(id=f"q{i}", prompt=f"<image>\nQuestion {i}?",
                                        images=[str(image)],
                                        fields={"answers": [str(i)], "split": "human"})

    fake = types.ModuleType("mmjobs.eval.benchmarks")
    fake.load_benchmark = load_benchmark
    monkeypatch.setitem(sys.modules, "mmjobs.eval.benchmarks", fake)
    result = main(InferConfig(model=str(tiny_llava_dir), benchmark="chartqa",
                              benchmark_root=str(tmp_path / "bench"),
                              benchmark_options={"split": "test"}, prompt_suffix=" PoT",
                              output=str(tmp_path / "out"), batch_size=2, max_new_tokens=4))
    assert seen == {"name": "chartqa", "root": str(tmp_path / "bench"),
                    "options": {"split": "test"}}
    rows = read_rows(result.predictions)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert rows[1]["answers"] == ["1"] and rows[1]["split"] == "human"
    assert rows[1]["prompt"] == "<image>\nQuestion 1? PoT"


def test_base_plus_adapter_equals_merged_model(tiny_llava_dir, tmp_path):
    from tests.unit.eval.test_generate import make_lora

    make_lora(tiny_llava_dir, tmp_path / "train" / "final" / "adapter", tmp_path / "merged")
    dataset = make_dataset(tmp_path)
    with_adapter = main(config(tiny_llava_dir, dataset, tmp_path / "a",
                               adapter=str(tmp_path / "train")))  # a training output
    merged = main(config(tmp_path / "merged", dataset, tmp_path / "m"))
    base = main(config(tiny_llava_dir, dataset, tmp_path / "b"))
    predictions = [[r["prediction"] for r in read_rows(x.predictions)]
                   for x in (with_adapter, merged, base)]
    assert predictions[0] == predictions[1]
    assert predictions[0] != predictions[2]


@pytest.mark.integration
@pytest.mark.parametrize("upload_every", [0, 3600])
def test_s3_output_resumes_from_the_uploaded_partial(tiny_llava_dir, tmp_path, monkeypatch,
                                                     s3_bucket, upload_every):
    """Killed by SIGTERM (pod eviction) after 2 batches: with upload_every=0 the rows are in S3
    already (periodic upload); with 3600 they get there through the SIGTERM handler."""
    dataset = make_dataset(tmp_path, f"s3://{s3_bucket}/datasets/charts")  # images in S3 too
    out = f"s3://{s3_bucket}/runs/r1/infer"
    partial_uri = f"{out}/predictions.partial.jsonl"
    cfg = config(tiny_llava_dir, dataset, out, upload_every_seconds=upload_every)
    uploaded_before_kill = []

    def sigterm():
        uploaded_before_kill.append(len(read_rows(partial_uri)) if storage.exists(partial_uri)
                                    else 0)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        CountingGenerator(m, fail_after=2, fail=sigterm)
        with pytest.raises(SystemExit):
            main(cfg)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert uploaded_before_kill == [4 if upload_every == 0 else 0]
    partial = read_rows(partial_uri)
    assert len(partial) == 4 and not storage.is_committed(out)

    counter = CountingGenerator(monkeypatch)
    result = main(cfg)
    assert counter.prompts == N - 4 and result.resumed == 4
    assert result.predictions == f"{out}/predictions.jsonl"
    rows = read_rows(result.predictions)
    assert [r["id"] for r in rows] == [f"chart-{i}" for i in range(N)]
    assert {r["id"]: r for r in partial}.items() <= {r["id"]: r for r in rows}.items()
    storage.verify_dir(out)
    names = {o.relpath for o in storage.list_objects(out)}
    assert names == {"predictions.jsonl", "infer.json", storage.MANIFEST_NAME}


def test_submission_writes_the_upload_file_into_the_commit(tiny_llava_dir, tmp_path):
    """submission=true: VQAv2 test-dev answered, the EvalAI file over all of test2015 committed
    with the predictions, its counts in infer.json; the same config reuses the output."""
    from tests.unit.eval.test_benchmarks import make_vqav2_test

    root = make_vqav2_test(tmp_path / "vqav2")
    cfg = dict(model=str(tiny_llava_dir), benchmark="vqav2", benchmark_root=str(root),
               benchmark_options={"split": "test-dev2015"}, output=str(tmp_path / "out"),
               batch_size=2, max_new_tokens=3)
    result = main(InferConfig(**cfg, submission=True))
    info = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert info["submission"]["file"] == "submission/vqav2_test-dev2015_evalai.json"
    assert (info["submission"]["questions"], info["submission"]["answered"]) == (4, 3)
    upload = json.loads((tmp_path / "out" / info["submission"]["file"]).read_text())
    assert [e["question_id"] for e in upload] == [420, 421, 730, 99000]
    assert upload[-1]["answer"] == "" and len(read_rows(result.predictions)) == 3
    manifest = storage.read_manifest(str(tmp_path / "out"))
    assert "submission/vqav2_test-dev2015_evalai.json" in {f.path for f in manifest.files}
    assert main(InferConfig(**cfg, submission=True)).cached  # the same output, reused
    with pytest.raises(ValueError, match="submission applies to the benchmarks"):
        InferConfig(**{**cfg, "benchmark": "gqa"}, submission=True)
