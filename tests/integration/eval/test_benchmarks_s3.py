"""Benchmark loaders reading official layouts from a real S3 server (moto_server on loopback).

ChartQA's JSON files are streamed with ijson from S3 bodies and its images come back as
`s3://` URIs; MMBench's TSV is decoded as a stream and its base64 images land in the local
cache. Fixtures are the unit tests' tiny layouts, uploaded file by file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmjobs import storage
from mmjobs.eval.benchmarks import MissingBenchmarkFilesError, load_benchmark
from tests.unit.eval.test_benchmarks import make_chartqa, make_mmbench, make_mme, png_bytes

pytestmark = pytest.mark.integration


def upload(local: Path, uri: str) -> str:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.put_file(path, storage.join(uri, path.relative_to(local).as_posix()))
    return uri


def test_chartqa_from_s3(tmp_path, s3_bucket) -> None:
    root = upload(make_chartqa(tmp_path / "ChartQA"), f"s3://{s3_bucket}/bench/ChartQA")
    items = list(load_benchmark("chartqa", root + "/"))
    assert [it.id for it in items] == ["human-0", "human-1", "augmented-0"]
    assert items[0].images == [f"{root}/test/png/41699051005347.png"]
    assert storage.read_bytes(items[2].images[0]) == png_bytes((0, 0, 255))
    assert items[2].fields == {"answers": ["79.6"], "split": "augmented"}

    storage.delete(f"{root}/test/test_augmented.json")
    with pytest.raises(MissingBenchmarkFilesError) as err:
        load_benchmark("chartqa", root)
    assert str(err.value) == (
        f"ChartQA: missing {root}/test/test_augmented.json; expected the official layout: "
        "test/test_human.json, test/test_augmented.json, test/png/")


def test_mmbench_from_s3_decodes_images_to_the_local_cache(tmp_path, s3_bucket) -> None:
    tsv = make_mmbench(tmp_path / "mmbench")
    root = upload(tsv.parent, f"s3://{s3_bucket}/bench/mmbench")
    cache = tmp_path / "cache"
    items = list(load_benchmark("mmbench", root, circular=True, cache_dir=str(cache)))
    assert [it.id for it in items] == ["0", "1000000", "2000000", "3000000", "7", "1000007"]
    assert items[0].images == [str(cache / "0.png")]
    assert Path(items[0].images[0]).read_bytes() == png_bytes()
    assert items[4].prompt.startswith('<image>\nThe image shows a chart.\nWhich is "correct"?')
    # The TSV URI itself works as root too, and the default cache is per TSV URI.
    direct = list(load_benchmark("mmbench", f"{root}/mmbench_dev_20230712.tsv"))
    assert len(direct) == 3 and Path(direct[0].images[0]).is_file()


def test_mme_from_s3(tmp_path, s3_bucket) -> None:
    root = upload(make_mme(tmp_path / "MME"), f"s3://{s3_bucket}/bench/MME")
    items = list(load_benchmark("mme", root, tasks=["artwork", "count"]))
    assert [it.fields["gt"] for it in items] == ["yes", "no", "yes", "no"]
    assert items[0].images == [f"{root}/artwork/images/10002.jpg"]
