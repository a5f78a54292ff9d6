"""Raw dataset -> canonical dataset folder: find the input's rows (archives extracted safely)
and run a converter through the validator into samples.jsonl, rejects.jsonl and dataset.json.

The prepare stage (`mmjobs prepare`) builds the converter, its context and the validator from
its config and commits what `write_dataset` writes; `resolve_source` says where the rows and
the images are for a plain file, a folder or prefix, or an archive (downloaded, extracted with
`mmjobs.data.archives`' checks; its images are copied into the output, since the extraction
is temporary).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmjobs import storage
from mmjobs.data.archives import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    extract_archive,
    is_archive,
)
from mmjobs.data.converters import IMAGES_DIR, ConvertContext, Converter
from mmjobs.data.records import (
    CARD_FILE,
    REJECTS_FILE,
    SAMPLES_FILE,
    JsonlWriter,
    Reject,
    dataset_readme,
)
from mmjobs.data.validate import Validator
from mmjobs.layout import README_FILE
from mmjobs.logs import get_logger, progress

log = get_logger(__name__)


def resolve_source(input_uri: str | None, work: Path, *, image_root: str | None = None,
                   archive_path: str | None = None,
                   max_archive_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                   max_archive_members: int = DEFAULT_MAX_MEMBERS,
                   ) -> tuple[str | None, str | None, bool]:
    """(converter input, image root, copy images into the output?) for a raw input.

    Archives are downloaded and extracted under `work`; their images are copied into the
    output because `work` is deleted when the stage ends. Explicit paths into an archive
    (`archive_path`, a relative `image_root`) follow the archive's own layout.
    """
    if input_uri is None or not is_archive(input_uri):
        root = image_root or (_default_root(input_uri) if input_uri else None)
        return input_uri, root, False
    local = work / "download" / os.path.basename(input_uri.rstrip("/"))
    storage.get_file(input_uri, local)
    extracted = extract_archive(local, work / "extracted", max_total_bytes=max_archive_bytes,
                                max_members=max_archive_members).target
    local.unlink()
    log.info("%s: extracted to %s", input_uri, extracted)
    if archive_path:
        source = _inside(extracted, archive_path, "archive_path", input_uri)
    else:
        entries = list(extracted.iterdir())
        # `tar czf data.tgz data/` -> read inside data/
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
    root = image_root
    if root is None:
        root = str(source if source.is_dir() else source.parent)
    elif not storage.is_s3(root) and not os.path.isabs(root):
        root = str(_inside(extracted, root, "image_root", input_uri))
    inside = not storage.is_s3(root) and Path(root).resolve().is_relative_to(work.resolve())
    return str(source), root, inside


def _inside(extracted: Path, rel: str, field: str, archive: str) -> Path:
    """`extracted / rel`, which must exist and stay inside the extracted folder."""
    path = (extracted / rel).resolve()
    if not path.is_relative_to(extracted.resolve()) or not path.exists():
        listing = ", ".join(sorted(p.name for p in extracted.iterdir())[:10])
        raise ValueError(f"{field}={rel!r} is not a path inside the archive {archive} (its top "
                         f"level holds: {listing})")
    return path


def _default_root(uri: str) -> str:
    """The input itself if it is a folder/prefix, else the folder holding it."""
    loc = storage.parse(uri)
    if loc.scheme == "file":
        path = Path(loc.key)
        return str(path if path.is_dir() else path.parent)
    if next(storage.list_objects(uri), None) is not None:  # objects under uri/: a prefix
        return str(loc)
    return str(loc).rsplit("/", 1)[0]


def write_dataset(converter: Converter, ctx: ConvertContext, validator: Validator,
                  scratch: Path, *, out: str, copy_from: str | None = None,
                  card: dict[str, Any] | None = None, desc: str = "convert") -> dict[str, Any]:
    """Run `converter` through `validator` into `scratch`: samples.jsonl, rejects.jsonl and
    dataset.json (the card, returned: kind, reconciled counts, image root, plus `card`).

    Args:
        out: the URI the folder is committed to (the image root when images go into it).
        copy_from: copy each accepted record's images from this folder into `images/`
            (archive inputs, whose extraction is temporary).

    Raises:
        RuntimeError: the counts of converter, validator and files disagree (a bug).
    """
    rows_in = 0

    def counted():  # counts what the converter yields, independently of the validator
        nonlocal rows_in
        for item in converter.fn(ctx):
            rows_in += 1
            yield item

    with JsonlWriter(scratch / SAMPLES_FILE) as samples, \
            JsonlWriter(scratch / REJECTS_FILE) as rejects:
        for item in progress(validator.run(counted()), desc=desc):
            if isinstance(item, Reject):
                rejects.write(item)
            else:
                samples.write(_copy_images(item, copy_from, scratch) if copy_from else item)
    stats = validator.stats
    reconciled = rows_in == stats.rows == samples.count + rejects.count
    if not reconciled or stats.accepted != samples.count:
        raise RuntimeError(f"{desc}: internal error: counts do not reconcile (converter "
                           f"yielded {rows_in}, validator saw {stats.rows}, wrote "
                           f"{samples.count} samples + {rejects.count} rejects); please report")
    image_root = out if converter.draws_images or copy_from else ctx.image_root
    card = {
        "kind": converter.kind,
        "counts": {"input": rows_in, "accepted": samples.count, "rejected": rejects.count,
                   "by_reason": dict(stats.by_reason.most_common())},
        "image_root": str(storage.parse(image_root)) if image_root else None,
        **(card or {}),
    }
    (scratch / CARD_FILE).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    (scratch / README_FILE).write_text(dataset_readme(card), encoding="utf-8")
    return card


def _copy_images(record: Any, root: str | None, scratch: Path) -> Any:
    """Copy a record's images (validated: safe, local) into the output; repoint its paths."""
    update = {}
    for name in ("images", "chosen_images", "rejected_images"):
        paths = getattr(record, name, None)
        if not paths:
            continue
        for path in paths:
            dest = scratch / IMAGES_DIR / path
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:  # same filesystem as the extraction: a hard link costs no space
                    os.link(Path(root or "", path), dest)
                except OSError:
                    shutil.copyfile(Path(root or "", path), dest)
        update[name] = [f"{IMAGES_DIR}/{p}" for p in paths]
    return record.model_copy(update=update) if update else record
