"""Stage `pretokenize` on tiny models: labels, rejects, format, cache, resume, parallelism."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmjobs import storage
from mmjobs.data import pretokenized as fmt
from mmjobs.data.pretokenize import CRASH_ENV
from mmjobs.data.records import Sample
from mmjobs.data.sample_encoder import IGNORE_INDEX, SampleEncoder
from mmjobs.stages.pretokenize import PretokenizeConfig, main
from tests.chart_dataset import chart_samples, commit_dataset, write_chart_dataset
from tests.shards import read_shards, shard_files

MAX_LENGTH = 160
LEAKY = ("MMJOBS_STORE", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
         "AWS_SECRET_ACCESS_KEY", CRASH_ENV)


def _llava_dataset_rows() -> list[dict]:
    samples = chart_samples(20, long_every=7)  # chart-6 and chart-13 are too long
    samples.append({"id": "bad-placeholders", "images": ["images/chart-0.png",
                                                         "images/chart-1.png"],
                    "conversations": [{"role": "user", "content": "<image> one marker"},
                                      {"role": "assistant", "content": "two images"}]})
    samples.append({"id": "escapes-root", "images": ["../../etc/passwd"],
                    "conversations": [{"role": "user", "content": "<image> read this"},
                                      {"role": "assistant", "content": "no"}]})
    return samples


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> str:
    # One MLflow database for the module: creating one costs seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def shared_tracking(tracking_db, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, tiny_llava_dir, tracking_db):
    """One uninterrupted run over 23 rows (4 shards of 6); other tests compare against it."""
    tmp = tmp_path_factory.mktemp("pretok")
    samples = _llava_dataset_rows()
    local = write_chart_dataset(tmp / "ds-local", samples, extra_lines=["{not json"],
                                skip_images={"images/chart-4.png", "../../etc/passwd"})
    dataset = commit_dataset(local, str(tmp / "store" / "ds"))
    env = SimpleNamespace(home=tmp / "home", tracking=tracking_db)
    with pytest.MonkeyPatch.context() as mp:
        for name in LEAKY:
            mp.delenv(name, raising=False)
        mp.setenv("MMJOBS_HOME", str(env.home))
        mp.setenv("MLFLOW_TRACKING_URI", env.tracking)
        cfg = _config(dataset, tiny_llava_dir, tmp / "cache-a")
        result = main(cfg)
    return SimpleNamespace(result=result, cfg=cfg, dataset=dataset, local=local, tmp=tmp,
                           samples={s["id"]: s for s in samples}, tracking=env.tracking,
                           out=Path(result.output))


def _config(dataset, model, cache_root, **kw) -> PretokenizeConfig:
    kw = {"max_length": MAX_LENGTH, "shard_size": 6, **kw}
    return PretokenizeConfig(dataset=str(dataset), model=str(model), cache_root=str(cache_root),
                             **kw)


def _rows(out: Path) -> pd.DataFrame:
    return read_shards(out)


def _file_digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): storage.sha256_file(p) for p in out.rglob("*")
            if p.is_file() and p.name != storage.MANIFEST_NAME}


def test_labels_are_exactly_the_assistant_turns(llava_run, tiny_llava_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    rows = _rows(llava_run.out)
    assert len(rows) == 17
    for row in rows.itertuples():
        sample = llava_run.samples[row.id]
        ids, labels = list(row.input_ids), list(row.labels)
        assert len(ids) == len(labels) == row.length <= MAX_LENGTH
        learned = [t for t in labels if t != IGNORE_INDEX]
        expected = "".join(t["content"] + "</s>" for t in sample["conversations"]
                           if t["role"] == "assistant")
        assert tokenizer.decode(learned) == expected
        assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels, strict=True))
        # 16 image tokens per image (56x56 / 14x14 patches), image bytes kept as written.
        assert row.num_image_tokens == 16 * len(sample["images"]) == ids.count(3)
        assert list(row.images) == [(llava_run.local / p).read_bytes() for p in sample["images"]]


def test_rejects_reconcile_and_card(llava_run):
    card = json.loads((llava_run.out / fmt.CARD_FILE).read_text())
    assert card["counts"] == {"input": 23, "written": 17, "rejected": 6}
    assert card["rejected_by_reason"] == {"image_missing": 1, "image_path_unsafe": 1,
                                          "invalid_json": 1, "placeholder_mismatch": 1,
                                          "too_long": 2}
    rejects = [json.loads(line) for line in
               (llava_run.out / fmt.REJECTS_FILE).read_text().splitlines()]
    too_long = {r["row"]: r["reason"] for r in rejects if r["reason"].startswith("too_long")}
    assert set(too_long) == {"chart-6", "chart-13"}
    # The reason says how many tokens are images, and what would fit the text.
    assert all(re.fullmatch(rf"too_long: \d+ tokens \(\d+ of them image tokens for \d images?\) "
                            rf"> max_length {MAX_LENGTH}; truncate=true would cut the text after "
                            "the images, as LLaVA does", r)
               for r in too_long.values()), too_long
    written = set(_rows(llava_run.out)["id"])
    assert written | {r["row"] for r in rejects} == set(llava_run.samples) | {"samples.jsonl:23"}

    rows = _rows(llava_run.out)
    assert card["tokens"]["total"] == rows["length"].sum()
    assert card["tokens"]["label"] == sum(sum(t != -100 for t in lab) for lab in rows["labels"])
    assert sum(card["length_histogram"]["counts"]) == 17
    assert card["pad_token_id"] == 0 and card["image_mode"] == "placeholder"
    assert card["columns"] == fmt.schema_description()
    assert [s["file"] for s in card["shards"]] == [fmt.shard_name(i) for i in range(4)]
    storage.verify_dir(llava_run.out)  # manifest lists every file with its checksum

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=llava_run.tracking)
    run = client.get_run(llava_run.result.mlflow_run_id)
    assert run.data.metrics["rows_written"] == 17 and run.data.metrics["rows_rejected"] == 6
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "length_histogram.png", "card.json", "config.yaml"}


def test_shards_are_readable_by_pyarrow_and_pandas(llava_run):
    files = [str(p) for p in shard_files(llava_run.out)]
    assert len(files) == 4
    for path in files:
        schema = pq.read_schema(path)  # the datasets features ride in the schema metadata
        assert schema.remove_metadata().equals(fmt.SHARD_SCHEMA.remove_metadata())
        assert schema.metadata[fmt.HF_METADATA_KEY] == fmt.SHARD_SCHEMA.metadata[
            fmt.HF_METADATA_KEY]
    table = pq.ParquetDataset(files).read()
    assert table.num_rows == 17 and table.schema.field("input_ids").type == pa.list_(pa.int32())
    frame = pd.read_parquet(files[0])
    assert list(frame.columns) == [f.name for f in fmt.SHARD_SCHEMA]
    assert frame["length"].dtype == "int32"
    assert list(fmt.iter_shard_uris(llava_run.out)) == files
    # data/ holds the shards and nothing else: the sidecars are beside it.
    assert sorted(p.name for p in (llava_run.out / fmt.DATA_DIR).iterdir()) == [
        Path(f).name for f in files]
    assert {fmt.CARD_FILE, fmt.REJECTS_FILE, fmt.README_FILE} <= {
        p.name for p in llava_run.out.iterdir()}


def test_identical_rerun_is_a_cache_hit(llava_run, shared_tracking, tiny_llava_dir):
    manifest = (llava_run.out / storage.MANIFEST_NAME).read_bytes()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("mmjobs.stages.pretokenize")
    logger.addHandler(handler)
    try:
        # workers does not change the output, so it is not part of the fingerprint.
        again = main(_config(llava_run.dataset, tiny_llava_dir, llava_run.out.parent, workers=3))
    finally:
        logger.removeHandler(handler)
    assert again.cached and again.output == llava_run.result.output
    assert again.fingerprint == llava_run.result.fingerprint
    assert (llava_run.out / storage.MANIFEST_NAME).read_bytes() == manifest
    assert any("cache hit" in line for line in lines)

    other = main(_config(llava_run.dataset, tiny_llava_dir, llava_run.out.parent,
                         max_length=MAX_LENGTH + 8))
    assert not other.cached and other.fingerprint != again.fingerprint


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_remaining_shards(llava_run, shared_tracking, tmp_path,
                                                           tiny_llava_dir):
    cfg = _config(llava_run.dataset, tiny_llava_dir, tmp_path / "cache")
    args = [f"{k}={v}" for k, v in cfg.model_dump(exclude_none=True).items()
            if k in {"dataset", "model", "max_length", "shard_size", "cache_root"}]
    proc = subprocess.run(
        [sys.executable, "-m", "mmjobs.stages.pretokenize",
         *[x for a in args for x in ("--set", a)]],
        env={**os.environ, CRASH_ENV: "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 86, proc.stderr[-3000:]  # died abruptly after its first shard
    out = tmp_path / "cache" / llava_run.result.fingerprint
    assert [p.name for p in (out / fmt.MARKER_DIR).iterdir()] == ["shard-00000.json"]
    assert not storage.is_committed(out)

    resumed = main(cfg)
    assert not resumed.cached and resumed.shards_reused == 1 and resumed.shards == 4
    assert _file_digests(out) == _file_digests(llava_run.out)


@pytest.mark.slow
def test_workers_2_equals_workers_1_even_after_a_worker_dies(llava_run, shared_tracking,
                                                             monkeypatch, tmp_path,
                                                             tiny_llava_dir):
    cfg = _config(llava_run.dataset, tiny_llava_dir, tmp_path / "cache", workers=2)
    out = tmp_path / "cache" / llava_run.result.fingerprint
    monkeypatch.setenv(CRASH_ENV, "1")  # each worker dies after its first shard
    with pytest.raises(RuntimeError, match="worker process died"):
        main(cfg)
    done = len(list((out / fmt.MARKER_DIR).iterdir()))
    assert 1 <= done < 4 and not storage.is_committed(out)

    monkeypatch.delenv(CRASH_ENV)
    result = main(cfg)
    assert result.shards_reused == done
    assert _file_digests(out) == _file_digests(llava_run.out)


def test_chameleon_image_tokens_go_into_input_ids_and_labels(tmp_path, shared_tracking,
                                                             tiny_chameleon_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    samples = chart_samples(4, assistant_image_every=2)  # chart-0 and chart-2 draw an image
    local = write_chart_dataset(tmp_path / "ds", samples)
    dataset = commit_dataset(local, str(tmp_path / "store" / "ds"))
    result = main(PretokenizeConfig(dataset=dataset, model=str(tiny_chameleon_dir),
                                    max_length=400, shard_size=3))
    assert result.rows_written == 4

    processor = AutoProcessor.from_pretrained(tiny_chameleon_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_chameleon_dir)
    boi, eoi = processor.image_start_token_id, processor.image_end_token_id

    def vq_tokens(rel: str) -> list[int]:
        pixels = processor.image_processor(images=[Image.open(local / rel)],
                                           return_tensors="pt")["pixel_values"]
        return model.model.get_image_tokens(pixels)[0].tolist()

    rows = {r.id: r for r in _rows(Path(result.output)).itertuples()}
    for sample in samples:
        row = rows[sample["id"]]
        ids, labels = list(row.input_ids), list(row.labels)
        assert list(row.images) == [] and processor.image_token_id not in ids
        assert row.num_image_tokens == 16 * len(sample["images"])
        blocks = [i + 1 for i, t in enumerate(ids) if t == boi]
        assert [ids[b + 16] for b in blocks] == [eoi] * len(sample["images"])
        for start, rel in zip(blocks, sample["images"], strict=True):
            assert ids[start:start + 16] == vq_tokens(rel)
            in_answer = rel.endswith("-gen.png")  # the image the assistant generates
            expected = ids[start - 1:start + 17] if in_answer else [IGNORE_INDEX] * 18
            assert labels[start - 1:start + 17] == expected
    card = json.loads((Path(result.output) / fmt.CARD_FILE).read_text())
    assert card["image_mode"] == "vq_tokens" and card["images"] == 0


def test_uncommitted_dataset_is_refused(tmp_path, tiny_llava_dir):
    local = write_chart_dataset(tmp_path / "ds", chart_samples(2))  # no _MANIFEST.json
    with pytest.raises(storage.IncompleteDirectoryError, match="incomplete"):
        main(_config(local, tiny_llava_dir, tmp_path / "cache"))


def test_prefix_rendering_matches_generation_blocks(tiny_llava_dir):
    """Templates without {% generation %} get the same labels from prefix renderings."""
    sample = Sample.model_validate(chart_samples(3)[2])
    encoder = SampleEncoder(tiny_llava_dir, max_length=1000)
    images = [_png()] * len(sample.images)
    with_blocks = encoder.encode(sample, images)

    def use_template(template: str) -> None:
        encoder.format = dataclasses.replace(encoder.format, chat_template=template)

    use_template(re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", encoder.chat_template))
    assert not encoder.format.has_generation_blocks
    without = encoder.encode(sample, images)
    assert (without.input_ids, without.labels) == (with_blocks.input_ids, with_blocks.labels)

    use_template("{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="generation"):
        encoder.encode(sample, images)


def _png() -> bytes:
    from tests.chart_dataset import bar_chart_png

    return bar_chart_png([3, 1, 2])
