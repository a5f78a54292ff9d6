"""Chart converters reading their inputs from a real S3-protocol server (moto_server)."""

from __future__ import annotations

import json

import pytest

from mmjobs import storage
from mmjobs.data.converters import ConvertContext, get_converter
from mmjobs.data.records import Reject, Sample
from tests.unit.data.test_aihub_chart import ACCEPTED, REJECTED, VBAR_DIR
from tests.unit.data.test_chart_align import GOOD

pytestmark = pytest.mark.integration


def test_converts_a_directory_and_a_single_file_on_s3(tmp_path, s3_bucket):
    root = f"s3://{s3_bucket}/aihub/train"
    files = {**ACCEPTED, **{k: v for k, (v, _) in REJECTED.items()}}
    for rel, data in files.items():
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        storage.write_text(storage.join(root, rel), text)
    (tmp_path / "C.jpg").write_bytes(b"jpeg")
    storage.put_file(tmp_path / "C.jpg", storage.join(root, "img_data/C.jpg"))  # not an input

    def run(uri: str) -> tuple[list[Sample], list[Reject]]:
        ctx = ConvertContext(input=uri, image_root=None, output_images=tmp_path / "unused")
        out = list(get_converter("aihub-chart").fn(ctx))
        return [r for r in out if isinstance(r, Sample)], [r for r in out if isinstance(r, Reject)]

    samples, rejects = run(root)
    assert {r.row: r.reason for r in rejects} == {k: why for k, (_, why) in REJECTED.items()}
    assert {r.source for r in rejects} == {f"{root}/{k}" for k in REJECTED}
    assert {s.meta["source"] for s in samples} == set(ACCEPTED)
    vbar = [s for s in samples if s.meta["source"] == f"{VBAR_DIR}/vbar.json"]
    assert vbar[0].images == ["img_data/img_vertical bar_standard/C_vbar.jpg"]
    assert len(vbar) == 5

    samples, rejects = run(f"{root}/{VBAR_DIR}/vbar.json")
    assert not rejects and [s.id for s in samples] == [s.id for s in vbar]
    assert samples[0].images == ["C_vbar.jpg"]  # relative to the file's own directory


def test_chart_align_reads_tables_and_copies_images_from_s3(tmp_path, s3_bucket):
    root = f"s3://{s3_bucket}/align"
    rows = [GOOD, {**GOOD, "id": "c2", "image": "png/c2.png"},
            {**GOOD, "id": "c3", "image": "png/missing.png"}]
    storage.write_text(f"{root}/tables.jsonl", "\n".join(json.dumps(r) for r in rows))
    storage.write_bytes(f"{root}/png/c2.png", b"\x89PNG fake")
    ctx = ConvertContext(input=f"{root}/tables.jsonl", image_root=None,
                         output_images=tmp_path / "images")
    out = list(get_converter("chart-align").fn(ctx))
    rejects = [r for r in out if isinstance(r, Reject)]
    assert [(r.row, r.reason) for r in rejects] == [
        ("c3", f"image not found: {root}/png/missing.png")]
    assert [s.id for s in out if isinstance(s, Sample)] == [
        f"{c}-{t}" for c in ("c1", "c2") for t in ("table", "json", "code")]
    assert (tmp_path / "images/png/c2.png").read_bytes() == b"\x89PNG fake"
    assert (tmp_path / "images/c1.png").is_file()
