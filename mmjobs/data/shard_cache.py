"""Pretokenized shards as memory-mappable Arrow IPC files: the training loader's local cache.

Parquet has no cheap random row access (a row group is the smallest readable
unit, and writers default to ~1M rows per group), so the shards are converted once into
uncompressed Arrow IPC files under `$MMJOBS_HOME/cache/loader/<content key>/`, which are
memory-mapped: a row read touches only that row's pages, 100k-row datasets with images cost
page cache rather than RAM, and DataLoader workers share the pages. S3 shards are downloaded
with `storage.get_dir` (sha256-verified); local shards are checked with `storage.verify_dir`.
Either way a directory without `_MANIFEST.json` raises `IncompleteDirectoryError`. The key
hashes the manifest's file checksums, so re-running a job reuses the cache, and changed shards
get a new one. A file lock lets ranks on one node share the conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmjobs import local_cache, settings, storage
from mmjobs.data import pretokenized as fmt
from mmjobs.layout import SHARDS_CARD as CARD_NAME
from mmjobs.logs import get_logger

log = get_logger(__name__)

SHARD_PATTERN = "data/shard-*.parquet"
REQUIRED_COLUMNS = ("id", "input_ids", "labels", "images", "num_image_tokens", "length")
PREFERENCE_COLUMNS = ("id", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                      "rejected_labels", "images", "chosen_images", "rejected_images",
                      "chosen_num_image_tokens", "rejected_num_image_tokens", "chosen_length",
                      "rejected_length", "length")
# Sequences of a row and their (ids, labels, length) columns, per shard layout.
_SEQUENCES = {"sample": (("input_ids", "labels", "length"),),
              "preference": (("chosen_input_ids", "chosen_labels", "chosen_length"),
                             ("rejected_input_ids", "rejected_labels", "rejected_length"))}
_READY = "READY.json"
_CACHE_FORMAT = 1  # bump when the cached layout changes, so stale caches are rebuilt
_BATCH_ROWS = 1024  # rows per IPC record batch: small enough that the row index stays cheap


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted shards live: `cache_dir`, or `$MMJOBS_HOME/cache/loader`."""
    return Path(cache_dir) if cache_dir is not None else settings.home() / "cache" / "loader"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so ranks on one node convert a dataset only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize_shards(shards_uri: str | os.PathLike,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """Make a committed shard directory available locally as memory-mappable Arrow files.

    Returns:
        A local directory with `shard-*.arrow` (same rows, same order) and `card.json`.

    Raises:
        storage.IncompleteDirectoryError: `shards_uri` has no manifest (writer not finished).
        storage.IntegrityError: a file is missing or its size or sha256 differs.
        ValueError: no `shard-*.parquet` files, or a shard lacks required columns.
    """
    manifest = storage.read_manifest(shards_uri)
    shards = sorted((f for f in manifest.files if fmt.is_shard_path(f.path)),
                    key=lambda f: f.path)
    if not shards:
        raise ValueError(f"{shards_uri}: committed directory has no {SHARD_PATTERN} files; "
                         "point the loader at the pretokenize stage's output")
    digest = hashlib.sha256(f"format={_CACHE_FORMAT}\n".encode())
    for f in shards:
        digest.update(f"{f.path} {f.size} {f.sha256}\n".encode())
    root = cache_root(cache_dir)
    target = root / digest.hexdigest()[:24]
    if (target / _READY).is_file():
        return target

    def fill(staged: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=root) as tmp:
            if storage.is_s3(shards_uri):
                log.info("downloading %s (%d files) to the loader cache", shards_uri,
                         len(manifest.files))
                source = Path(tmp) / "download"
                storage.get_dir(shards_uri, source)
            else:
                storage.verify_dir(shards_uri)
                source = Path(storage.parse(shards_uri).key)
            rows = sum(_parquet_to_ipc(source / f.path, staged / Path(f.path).with_suffix(
                ".arrow").name) for f in shards)
            if (source / CARD_NAME).is_file():
                shutil.copyfile(source / CARD_NAME, staged / CARD_NAME)
            (staged / _READY).write_text(json.dumps({"source": str(shards_uri), "rows": rows,
                                                     "shards": len(shards)}))
            log.info("cached %d rows from %s at %s", rows, shards_uri, target)

    # Ranks of one job share the entry: one converts, the others wait and reuse it.
    with _file_lock(root / f"{target.name}.lock"):
        local_cache.cached(target, fill, valid=lambda entry: (entry / _READY).is_file())
    return target


def shard_kind(names: Sequence[str]) -> str:
    """`preference` for pair shards (they have `chosen_input_ids`), else `sample`."""
    return "preference" if "chosen_input_ids" in names else "sample"


def _parquet_to_ipc(src: Path, dst: Path) -> int:
    """Rewrite one Parquet shard as an uncompressed Arrow IPC file, batch by batch."""
    pf = pq.ParquetFile(src)
    kind = shard_kind(pf.schema_arrow.names)
    required = PREFERENCE_COLUMNS if kind == "preference" else REQUIRED_COLUMNS
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{src.name}: missing columns {missing}; pretokenized {kind} shards "
                         f"need {list(required)}")
    rows = 0
    schema = _ipc_schema(pf.schema_arrow)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            batch = _image_bytes(batch, schema)
            # The sampler plans batches and bins from `length` alone, so it must be true.
            bad = _length_mismatch(batch, kind)
            if pc.any(bad.fill_null(True)).as_py():
                first = pc.index(bad.fill_null(True), True).as_py()
                raise ValueError(f"{src.name}: row {batch.column('id')[first].as_py()!r} has "
                                 "length, len(input_ids) and len(labels) that disagree; "
                                 "re-run pretokenize")
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _ipc_schema(parquet: pa.Schema) -> pa.Schema:
    """The cached files' schema: the shard's, with image columns as plain `list<binary>` (the
    encoded bytes the collators decode; the Image feature's null `path` is dropped)."""
    fields = [pa.field(f.name, pa.list_(pa.binary()), f.nullable)
              if f.name in fmt.IMAGE_COLUMNS else f for f in parquet]
    return pa.schema(fields)


def _image_bytes(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with `list<struct<bytes, path>>` image columns as `list<binary>` (v1 shards
    already store them so)."""
    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if name in fmt.IMAGE_COLUMNS and pa.types.is_struct(column.type.value_type):
            # `values` is the whole child array; `offsets` follow the batch's slice.
            column = pa.ListArray.from_arrays(column.offsets, column.values.field("bytes"),
                                              mask=column.is_null() if column.null_count
                                              else None)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _length_mismatch(batch: pa.RecordBatch, kind: str) -> pa.Array:
    """Per row: do ids, labels and the length columns disagree? (A pair's `length` must be
    its longer side.)"""
    bad, longest = None, None
    for ids, labels, length in _SEQUENCES[kind]:
        n_ids = pc.list_value_length(batch.column(ids)).fill_null(0)
        wrong = pc.or_(pc.not_equal(n_ids, pc.list_value_length(batch.column(labels))
                                    .fill_null(0)),
                       pc.not_equal(n_ids, pc.cast(batch.column(length), pa.int32())))
        bad = wrong if bad is None else pc.or_(bad, wrong)
        longest = n_ids if longest is None else pc.max_element_wise(longest, n_ids)
    if kind == "preference":
        bad = pc.or_(bad, pc.not_equal(longest, pc.cast(batch.column("length"), pa.int32())))
    return bad
