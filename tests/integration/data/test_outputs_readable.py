"""Prepared datasets and pretokenized shards read as datasets by the tools people use
(issue 18, artifacts): on a real `prepare` → `pretokenize` output, `pd.read_parquet`,
`datasets.load_dataset` and DuckDB read the shard folder as it is, images come back as PIL
images, `load_dataset(prepare_dir)` reads the records (not the image folder), and every file
the store wrote is 0644 (folders 0755).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmjobs.config import load_config
from mmjobs.data import pretokenized as fmt
from mmjobs.stages import prepare, pretokenize

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHARTS = 3  # synthetic charts; each gives several records (table, QA, ...)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_llava_dir) -> dict:
    store = tmp_path_factory.mktemp("outputs") / "store"
    prepared = prepare.main(load_config(prepare.PrepareConfig, {
        "source_format": "synthetic-charts", "num": CHARTS, "seed": 0,
        "output": str(store / "prepare")}))
    shards = pretokenize.main(load_config(pretokenize.PretokenizeConfig, {
        "dataset": prepared.output, "model": str(tiny_llava_dir), "max_length": 256,
        "shard_size": 7, "cache_root": str(store / "cache")}))
    assert shards.shards >= 2 and shards.rows_written > 0
    return {"store": store, "prepared": prepared, "shards": shards,
            "out": Path(shards.output)}


def test_the_shard_folder_reads_with_pandas_datasets_and_duckdb(outputs):
    import datasets
    import duckdb
    import pandas as pd
    from PIL import Image

    out, result = outputs["out"], outputs["shards"]
    shard_dir = out / fmt.DATA_DIR
    frame = pd.read_parquet(shard_dir)  # the folder, as it is
    assert len(frame) == result.rows_written
    assert list(frame.columns) == [f.name for f in fmt.SHARD_SCHEMA]

    rows = datasets.load_dataset(str(shard_dir), split="train")
    assert len(rows) == result.rows_written
    assert isinstance(rows.features["images"].feature, datasets.Image)
    first = rows[0]
    assert first["id"] == frame["id"][0] and first["input_ids"] == list(frame["input_ids"][0])
    image = first["images"][0]
    assert isinstance(image, Image.Image) and image.size[0] > 0
    # The whole directory too: its README.md points datasets at data/ (not the JSON sidecars).
    whole = datasets.load_dataset(str(out), split="train")
    assert whole["id"] == rows["id"]

    [(count, tokens)] = duckdb.sql(
        f"SELECT count(*), sum(length) FROM '{shard_dir}/*.parquet'").fetchall()
    assert (count, tokens) == (result.rows_written, result.tokens)

    card = json.loads((out / fmt.CARD_FILE).read_text())
    readme = (out / fmt.README_FILE).read_text()
    assert f"path: {fmt.DATA_DIR}/*.parquet" in readme and card["fingerprint"] in readme
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        Path(s["file"]).name for s in card["shards"]]


def test_load_dataset_on_a_prepared_dataset_reads_its_records(outputs):
    import datasets

    prepared = outputs["prepared"]
    rows = datasets.load_dataset(prepared.output, split="train")
    # Not an image folder: the records, with their conversations and image paths.
    assert len(rows) == prepared.accepted
    assert {"id", "images", "conversations", "meta"} <= set(rows.column_names)
    assert all(p.startswith("images/") for p in rows[0]["images"])
    assert (Path(prepared.output) / rows[0]["images"][0]).is_file()


def test_every_stored_file_is_readable_by_others(outputs, tiny_llava_dir):
    store = outputs["store"]
    files = {oct(p.stat().st_mode & 0o777) for p in store.rglob("*") if p.is_file()}
    folders = {oct(p.stat().st_mode & 0o777) for p in store.rglob("*") if p.is_dir()}
    assert files == {"0o644"} and folders == {"0o755"}, (files, folders)
    # The tiny model's own files too (transformers saves weights with mkstemp's 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in Path(tiny_llava_dir).iterdir()
            if p.is_file()} == {"0o644"}
