"""The `prepare` stage end to end: local and s3:// (moto over HTTP) inputs and outputs,
committed output with a manifest, reconciled counts, cache hits, the reject-fraction gate,
archives, generators, the CLI, and the counts in the stage's MLflow run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from mmjobs import storage
from mmjobs.data.archives import UnsafeArchiveError
from mmjobs.data.converters import ConvertContext, register
from mmjobs.data.records import Record, Reject, Sample
from mmjobs.stages.prepare import PrepareConfig, PrepareError, main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def png(color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def row(i: int, image: str | None = "charts/c0.png") -> dict:
    images = [image] if image else []
    mark = "<image>\n" if image else ""
    return {"id": f"r{i}", "images": images, "meta": {"source": "test"},
            "conversations": [{"role": "user", "content": f"{mark}Question {i}?"},
                              {"role": "assistant", "content": f"Answer {i}."}]}


def make_raw(root: Path, rows: list[dict], extra_lines: tuple[bytes, ...] = ()) -> Path:
    """A raw canonical dataset: samples.jsonl + charts/c0..c4.png (each shared by many rows)."""
    (root / "charts").mkdir(parents=True, exist_ok=True)
    for i in range(5):
        (root / f"charts/c{i}.png").write_bytes(png((i * 40, 100, 200)))
    lines = [json.dumps(r).encode() for r in rows] + list(extra_lines)
    (root / "samples.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "samples.jsonl"


def upload_tree(local: Path, uri: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.put_file(path, storage.join(uri, path.relative_to(local).as_posix()))


def jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line]


def mlflow_metrics(run_id: str | None) -> dict[str, float]:
    assert run_id, "the stage should report its MLflow run id"
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics


def assert_committed_and_reconciled(out: str, rows_in: int, accepted: int) -> dict:
    manifest = storage.verify_dir(out)
    assert {f.path for f in manifest.files} >= {"samples.jsonl", "rejects.jsonl", "dataset.json"}
    card = json.loads(storage.read_text(storage.join(out, "dataset.json")))
    counts = card["counts"]
    assert counts["input"] == rows_in == counts["accepted"] + counts["rejected"]
    assert counts["accepted"] == accepted == len(jsonl(storage.join(out, "samples.jsonl")))
    assert counts["rejected"] == len(jsonl(storage.join(out, "rejects.jsonl")))
    assert sum(counts["by_reason"].values()) == counts["rejected"]
    return card


# --------------------------------------------------------------------------- local <-> S3


def test_local_input_to_s3_output_then_cache_hit(tmp_path, s3_bucket, monkeypatch):
    rows = [row(i, f"charts/c{i % 5}.png") for i in range(99)] + [row(99, "charts/gone.png")]
    raw = make_raw(tmp_path / "raw", rows)
    out = f"s3://{s3_bucket}/exp/run1/prepare"
    cfg = PrepareConfig(source_format="canonical", input=str(raw), output=out,
                        experiment="prep-test")

    result = main(cfg)

    assert (result.cached, result.rows_in, result.accepted, result.rejected) == \
        (False, 100, 99, 1)
    assert result.by_reason == {"image_missing": 1}
    card = assert_committed_and_reconciled(out, 100, 99)
    assert card["image_root"] == str(tmp_path / "raw") == result.image_root
    assert (card["kind"], card["source_format"]) == ("sample", "canonical")
    assert jsonl(result.rejects) == [{
        "row": "r99", "source": "validate",
        "reason": f"image_missing: charts/gone.png does not exist under {tmp_path / 'raw'}"}]
    metrics = mlflow_metrics(result.mlflow_run_id)
    assert {k: metrics[k] for k in ("rows_in", "rows_accepted", "rows_rejected",
                                    "reject.image_missing")} == \
        {"rows_in": 100, "rows_accepted": 99, "rows_rejected": 1, "reject.image_missing": 1}
    artifacts = {a.path for a in MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
                 .list_artifacts(result.mlflow_run_id)}
    assert {"rejects.jsonl", "dataset.json", "config.yaml"} <= artifacts

    # Re-run: same input and config -> no-op; nothing is uploaded again.
    def no_upload(*args, **kwargs):
        raise AssertionError("a cache hit must not rewrite the output")

    monkeypatch.setattr(storage, "put_dir", no_upload)
    again = main(cfg)
    assert again.cached is True
    assert again.model_dump(exclude={"cached", "mlflow_run_id"}) == \
        result.model_dump(exclude={"cached", "mlflow_run_id"})
    assert mlflow_metrics(again.mlflow_run_id)["rows_accepted"] == 99


def test_s3_input_with_s3_images_to_local_output(tmp_path, s3_bucket):
    rows = [row(i, f"charts/c{i % 5}.png") for i in range(16)]
    rows += [row(16, "charts/missing.png"), row(17, "charts/cut.png"), row(3)]  # r3: duplicate
    raw = make_raw(tmp_path / "raw", rows, extra_lines=(b'{"id": "bad", "x": "caf\xe9"}',))
    cut = png()
    (tmp_path / "raw/charts/cut.png").write_bytes(cut[: len(cut) - 30])
    upload_tree(tmp_path / "raw", f"s3://{s3_bucket}/raw")
    out = tmp_path / "store/prepare"

    result = main(PrepareConfig(source_format="canonical",
                                input=f"s3://{s3_bucket}/raw/{raw.name}", output=str(out),
                                max_reject_fraction=0.25))

    assert (result.rows_in, result.accepted, result.rejected) == (20, 16, 4)
    assert result.image_root == f"s3://{s3_bucket}/raw"
    assert_committed_and_reconciled(str(out), 20, 16)
    reasons = {r["row"]: r["reason"] for r in jsonl(result.rejects)}
    assert reasons["r16"] == f"image_missing: charts/missing.png does not exist under " \
                             f"s3://{s3_bucket}/raw"
    assert reasons["r17"].startswith("image_truncated: charts/cut.png is truncated")
    assert reasons["r3"] == "duplicate_id: first seen at row 4"
    assert reasons["samples.jsonl:20"] == "invalid_utf8: invalid UTF-8 at byte 23"
    assert result.by_reason == {"image_missing": 1, "image_truncated": 1, "duplicate_id": 1,
                                "invalid_utf8": 1}


# --------------------------------------------------------------------------- the reject gate


def test_too_many_rejects_fails_and_commits_nothing(tmp_path):
    rows = [row(i) for i in range(7)] + [row(i, f"charts/nope{i}.png") for i in range(7, 10)]
    raw = make_raw(tmp_path / "raw", rows)
    out = tmp_path / "store/prepare"
    cfg = PrepareConfig(source_format="canonical", input=str(raw), output=str(out))

    with pytest.raises(PrepareError) as e:
        main(cfg)

    rejected = out / "_rejected/rejects.jsonl"
    assert str(e.value) == (
        f"prepare: 3 of 10 rows rejected (30.0%) > max_reject_fraction 1.0%; top reasons: "
        f"image_missing 3; see {rejected} (fix the data, or raise max_reject_fraction if these "
        "rows may be dropped)")
    assert not storage.is_committed(str(out))
    assert [r["row"] for r in jsonl(str(rejected))] == ["r7", "r8", "r9"]
    runs = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs(
        [MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name("default")
         .experiment_id])
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.metrics["reject.image_missing"] == 3

    # Allowing the loss commits the output and clears the failed run's leftovers.
    result = main(cfg.model_copy(update={"max_reject_fraction": 0.3}))
    assert (result.accepted, result.rejected) == (7, 3)
    assert storage.is_committed(str(out)) and not (out / "_rejected").exists()


# --------------------------------------------------------------------------- archives, generators


def test_archive_input_is_extracted_and_images_copied(tmp_path):
    make_raw(tmp_path / "raw/data", [row(i, f"charts/c{i % 5}.png") for i in range(10)])
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "raw").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "raw").as_posix())
    out = tmp_path / "store/prepare"

    result = main(PrepareConfig(source_format="canonical", input=str(archive),
                                archive_path="data/samples.jsonl", output=str(out)))

    # Images are relative to data/ (the input's folder) and move into the output.
    assert (result.accepted, result.image_root) == (10, str(out))
    samples = jsonl(result.samples)
    assert samples[0]["images"] == ["images/charts/c0.png"]
    assert (out / "images/charts/c4.png").read_bytes() == (tmp_path / "raw/data/charts/c4.png") \
        .read_bytes()
    assert_committed_and_reconciled(str(out), 10, 10)

    with pytest.raises(ValueError, match=r"archive_path='samples.jsonl' is not a path inside "
                                         r"the archive .*data.zip \(its top level holds: data\)"):
        main(PrepareConfig(source_format="canonical", input=str(archive),
                           archive_path="samples.jsonl", output=str(tmp_path / "other")))


def test_unsafe_archive_input_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("samples.jsonl", json.dumps(row(0, None)))
        zf.writestr("../../escape.txt", "x")
    out = tmp_path / "store/prepare"
    with pytest.raises(UnsafeArchiveError, match=r"member '../../escape.txt' has '..' in its"):
        main(PrepareConfig(source_format="canonical", input=str(archive),
                           archive_path="samples.jsonl", output=str(out)))
    assert not storage.is_committed(str(out))
    assert not list(tmp_path.rglob("escape.txt"))


@register("test-draw", draws_images=True)
def _draw(ctx: ConvertContext) -> Iterator[Record | Reject]:
    """Draws `num` images; every 10th record points at an image it did not draw."""
    ctx.output_images.mkdir(parents=True, exist_ok=True)
    for i in range(ctx.options["num"]):
        name = f"img{i}.png"
        if i % 10 != 9:
            (ctx.output_images / name).write_bytes(png((i, i, i)))
        yield Sample(id=f"g{i}", images=[f"images/{name}"],
                     conversations=[{"role": "user", "content": "<image>Colour?"},
                                    {"role": "assistant", "content": f"grey {i}"}])


def test_generator_draws_into_the_output(tmp_path):
    out = tmp_path / "store/prepare"
    result = main(PrepareConfig(source_format="test-draw", num=20, output=str(out),
                                max_reject_fraction=0.1))
    assert (result.rows_in, result.accepted, result.rejected) == (20, 18, 2)
    assert result.image_root == str(out)
    assert result.by_reason == {"image_missing": 2}
    assert_committed_and_reconciled(str(out), 20, 18)
    assert (out / "images/img0.png").exists()


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_the_result_line(tmp_path):
    raw = make_raw(tmp_path / "raw", [row(i) for i in range(5)])
    out = tmp_path / "store/prepare"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "mmjobs.stages.prepare", "--set", "source_format=canonical",
         "--set", f"input={raw}", "--set", f"output={out}", "--set", "experiment=cli-test"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["output"], result["cached"], result["accepted"], result["rejected"]) == \
        (str(out), False, 5, 0)
    assert mlflow_metrics(result["mlflow_run_id"])["rows_in"] == 5
    assert storage.is_committed(str(out))

    bad = subprocess.run([sys.executable, "-m", "mmjobs.stages.prepare", "--set", "nope=1"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                         check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr
