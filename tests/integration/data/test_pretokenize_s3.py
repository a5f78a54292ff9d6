"""Stage `pretokenize` with dataset, images, model and output in S3 (moto_server over HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from mmjobs import settings, storage
from mmjobs.data import pretokenized as fmt
from mmjobs.data.pretokenize import CRASH_ENV
from mmjobs.stages.pretokenize import PretokenizeConfig, main
from tests.chart_dataset import chart_samples, commit_dataset, write_chart_dataset

pytestmark = pytest.mark.integration


def test_s3_in_s3_out_resumes_after_a_kill_and_matches_local(tmp_path, s3_bucket,
                                                             tiny_llava_dir):
    bucket = f"s3://{s3_bucket}"
    local = write_chart_dataset(tmp_path / "ds", chart_samples(10, long_every=4))
    # Images live outside the dataset directory, under their own committed prefix.
    shutil.move(local / "images", tmp_path / "imgs" / "images")
    storage.put_dir(tmp_path / "imgs", f"{bucket}/images")
    dataset = commit_dataset(local, f"{bucket}/datasets/charts", image_root=f"{bucket}/images")
    storage.put_dir(tiny_llava_dir, f"{bucket}/models/llava")
    cfg = PretokenizeConfig(dataset=dataset, model=f"{bucket}/models/llava", max_length=160,
                            shard_size=3, cache_root=f"{bucket}/cache/pretokenized")

    proc = subprocess.run(
        [sys.executable, "-m", "mmjobs.stages.pretokenize", "--set", f"dataset={cfg.dataset}",
         "--set", f"model={cfg.model}", "--set", "max_length=160", "--set", "shard_size=3",
         "--set", f"cache_root={cfg.cache_root}"],
        env={**os.environ, CRASH_ENV: "2"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 86, proc.stderr[-3000:]

    result = main(cfg)
    assert result.output.startswith(f"{bucket}/cache/pretokenized/") and not result.cached
    assert result.shards == 4 and result.shards_reused == 2
    assert (result.rows_in, result.rows_written, result.rows_rejected) == (10, 8, 2)
    manifest = storage.verify_dir(result.output)
    card = json.loads(storage.read_text(storage.join(result.output, fmt.CARD_FILE)))
    assert card["rejected_by_reason"] == {"too_long": 2}

    shard = tmp_path / "shard-00000.parquet"
    storage.get_file(storage.join(result.output, fmt.shard_name(0)), shard)
    table = pq.read_table(shard)
    assert table.schema.remove_metadata().equals(fmt.SHARD_SCHEMA.remove_metadata())
    assert table.num_rows == 3
    assert all(len(images) == 1 for images in table.column("images").to_pylist()[:2])

    # Only the processor files were fetched from S3, not the weights.
    fetched = list((settings.home() / "cache" / "models").glob("*/*"))
    assert fetched and not [p for p in fetched if p.name.endswith(".safetensors")]

    again = main(cfg)
    assert again.cached and again.output == result.output

    # The same dataset and model from local paths give byte-identical shards.
    local_ds = commit_dataset(tmp_path / "ds", str(tmp_path / "store" / "ds"),
                              image_root=str(tmp_path / "imgs"))
    local_run = main(cfg.model_copy(update={"dataset": local_ds, "model": str(tiny_llava_dir),
                                            "cache_root": str(tmp_path / "cache")}))
    local_manifest = storage.read_manifest(local_run.output)

    def shards(m: storage.Manifest) -> dict[str, str]:
        return {f.path: f.sha256 for f in m.files if f.path.endswith(".parquet")}

    assert shards(manifest) == shards(local_manifest) and len(shards(manifest)) == 4
