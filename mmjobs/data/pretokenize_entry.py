"""The cache entry `mmjobs.data.pretokenize` writes: resuming, cleaning up and committing it.

`finished_shards` finds the shards an earlier run of the same fingerprint completed (marker +
shard of the recorded size); `remove_leftovers` deletes what no marker vouches for (a fan-out
part only its own shards' files); `build_card` adds the shards' stats up into the dataset card
(counts that must reconcile); `commit` writes rejects.jsonl, card.json, README.md and then the
manifest, from the markers' recorded checksums. `marker_json` is the one serialization of a
marker, so the manifest's checksums match the markers the shards wrote.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from mmjobs import storage
from mmjobs.data import pretokenized as fmt

if TYPE_CHECKING:
    from mmjobs.data.pretokenize import PretokenizeJob


def finished_shards(job: PretokenizeJob) -> dict[int, dict[str, Any]]:
    """Stats of shards a previous run of the same fingerprint completed (marker + shard)."""
    sizes = {o.relpath: o.size for o in storage.list_objects(job.out)}
    finished = {}
    for rel in sorted(sizes):
        if not (rel.startswith(fmt.MARKER_DIR + "/") and rel.endswith(".json")):
            continue
        try:
            stats = json.loads(storage.read_text(storage.join(job.out, rel)))
        except (ValueError, storage.StoreError):
            continue  # unreadable marker: redo that shard
        if (stats.get("fingerprint") == job.fingerprint
                and sizes.get(stats.get("file")) == stats.get("size")):
            finished[int(stats["shard"])] = stats
    return finished


def remove_leftovers(out: str, finished: dict[int, dict[str, Any]], mine: Any,
                      *, whole: bool = True) -> None:
    """Delete our files that no finished marker vouches for (partial shards, stale markers).

    A fan-out part (`whole` False) deletes only files of its own shards (`mine(index)`):
    another part's shard written before its marker is not a leftover but work in flight."""
    keep = {s["file"] for s in finished.values()} | {fmt.marker_name(i) for i in finished}
    ours = (f"{fmt.DATA_DIR}/", "shard-", ".shard-", f"{fmt.MARKER_DIR}/", fmt.CARD_FILE,
            fmt.REJECTS_FILE, fmt.README_FILE)
    for obj in storage.list_objects(out):
        if obj.relpath in keep or not obj.relpath.startswith(ours):
            continue
        index = _SHARD_INDEX.search(obj.relpath)
        if whole or (index is not None and mine(int(index.group(1)))):
            storage.delete(obj.uri)


_SHARD_INDEX = re.compile(r"shard-(\d+)\.")  # data/shard-00012.parquet, _shards/shard-00012.json


def build_card(job: PretokenizeJob, shards: list[dict[str, Any]],
               processor: dict[str, Any], *, kind: str = "sample") -> dict[str, Any]:
    """The dataset card: counts that reconcile, rejects by reason, lengths, tokens, schema.

    For preference shards `tokens` counts both sides of every pair, `mean_length` is per
    sequence (side), and the length histogram and `max_length` use a pair's `length` (its
    longer side).
    """
    rows_in = sum(s["rows_in"] for s in shards)
    written = sum(s["rows_written"] for s in shards)
    reasons = Counter(r["reason"].split(":", 1)[0] for s in shards for r in s["rejects"])
    rejected = sum(reasons.values())
    if rows_in != written + rejected:
        raise RuntimeError(f"counts do not reconcile: {rows_in} in != {written} written + "
                           f"{rejected} rejected")
    tokens = sum(s["tokens"] for s in shards)
    sides = 2 if kind == "preference" else 1  # sequences per row
    edges = fmt.histogram_edges(job.max_length)
    counts = [sum(c) for c in zip(*(s["histogram"] for s in shards), strict=True)] if shards \
        else [0] * (len(edges) - 1)
    return {
        "format": fmt.FORMAT,
        "kind": kind,
        "dataset": job.dataset,
        "fingerprint": job.fingerprint,
        **job.card_meta,
        "processor": processor,
        # Top level for the loader's collator and the trainer.
        "pad_token_id": processor.get("pad_token_id"),
        "eos_token_id": processor.get("eos_token_id"),
        "image_token_id": processor.get("image_token_id"),
        "image_mode": processor.get("image_mode"),
        "max_length": job.max_length,
        "shard_size": job.shard_size,
        "counts": {"input": rows_in, "written": written, "rejected": rejected},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "tokens": {
            "total": tokens,
            "label": sum(s["label_tokens"] for s in shards),
            "image": sum(s["image_tokens"] for s in shards),
            "mean_length": round(tokens / (written * sides), 3) if written else 0.0,
            "max_length": max((s["max_length"] for s in shards), default=0),
        },
        "images": sum(s["images"] for s in shards),
        "length_histogram": {"edges": edges, "counts": counts},
        "shards": [{"file": s["file"], "rows": s["rows_written"]} for s in shards],
        "columns": fmt.schema_description(kind),
    }


def commit(job: PretokenizeJob, shards: list[dict[str, Any]], card: dict[str, Any]) -> None:
    """Write rejects.jsonl, card.json and README.md, then the manifest (from recorded
    checksums)."""
    entries = [storage.FileEntry(s["file"], s["size"], s["sha256"]) for s in shards]
    # Markers are re-serialized exactly as written, so their checksums need no download.
    files = {fmt.marker_name(s["shard"]): marker_json(s).encode() for s in shards}
    files[fmt.REJECTS_FILE] = b"".join(
        (json.dumps({k: r[k] for k in ("row", "reason", "source")}, ensure_ascii=False)
         + "\n").encode() for s in shards for r in s["rejects"])
    files[fmt.CARD_FILE] = json.dumps(card, indent=1, ensure_ascii=False).encode()
    files[fmt.README_FILE] = fmt.dataset_readme(card).encode()
    for rel, data in files.items():
        if not rel.startswith(fmt.MARKER_DIR):
            storage.write_bytes(storage.join(job.out, rel), data)
        entries.append(storage.FileEntry(rel, len(data), _sha256(data)))
    manifest = storage.Manifest(files=sorted(entries, key=lambda e: e.path),
                                meta={"fingerprint": job.fingerprint, "kind": "pretokenized",
                                      "format": fmt.FORMAT})
    storage.write_text(storage.join(job.out, storage.MANIFEST_NAME), manifest.to_json())


def marker_json(stats: dict[str, Any]) -> str:
    """A shard's marker as written; the commit writes it again byte for byte (its checksum
    goes into the manifest without a download)."""
    return json.dumps(stats, sort_keys=True, ensure_ascii=False)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()

