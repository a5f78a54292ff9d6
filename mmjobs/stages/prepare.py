"""Stage `prepare`: a raw dataset in a published layout -> a validated canonical dataset.

    python -m mmjobs.stages.prepare --set source_format=llava \\
        --set input=s3://raw/llava_v1_5_mix665k.json --set image_root=s3://raw/images

The converter named by `source_format` turns input rows into canonical records;
`mmjobs.data.validate` quarantines bad ones. The committed output holds `samples.jsonl`
(accepted), `rejects.jsonl` (`{row, reason, source}` per rejected row) and `dataset.json` (the
card: kind, counts with `input = accepted + rejected`, the absolute image root URI, source
format, options). Converters that draw images, and archive inputs, put their images under
`images/` in the output, which is then the image root.

If more than `max_reject_fraction` of the rows are rejected the stage fails and commits
nothing; the rejects and the card are left, uncommitted, under `{output}/_rejected/`. A bad row
(a NaN, a syntax error inside one row) is a reject and reading goes on; a file whose structure
breaks (truncated, data after the array, unbalanced brackets) fails the stage with the file,
row and byte offset (`mmjobs.data.json_rows`), and commits nothing: the rows after the break
could not be counted.
A re-run with the same config and input (fingerprint) reuses the committed output. Images are
not fingerprinted (a dataset's image folder can hold 100k+ files): set `force=true` after
changing images in place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.data.archives import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    extract_archive,
    is_archive,
)
from mmjobs.data.converters import IMAGES_DIR, ConvertContext, Converter, get_converter
from mmjobs.data.records import CARD_FILE, REJECTS_FILE, SAMPLES_FILE, JsonlWriter, Reject
from mmjobs.data.validate import DEFAULT_MAX_IMAGE_PIXELS, Validator
from mmjobs.logs import get_logger, progress
from mmjobs.stages.common import (
    StageConfig,
    StageResult,
    fingerprint,
    input_fingerprint,
    output_uri,
    reusable_output,
    stage_cli,
    stage_tracking,
    staged_output,
)

STAGE = "prepare"
VERSION = 2  # bump when checks or the output format change: invalidates cached outputs
FAILED_DIR = "_rejected"
log = get_logger(__name__)


class PrepareError(RuntimeError):
    """Too many rows were rejected, or none were produced; the message says where to look."""


class PrepareConfig(StageConfig):
    """Convert a raw dataset to the canonical format, validating and quarantining rows."""

    source_format: str = Field(
        description="Converter name, e.g. llava, scienceqa, dataengine, chartmoe, "
        "synthetic-charts, canonical (`mmjobs prepare --from`)."
    )
    input: str | None = Field(
        None, description="Raw input file or folder (local or s3://), or a .zip/.tar[.gz|.bz2|"
        ".xz] archive, extracted safely first (see archive_path). None for generators."
    )
    archive_path: str | None = Field(
        None, description="For an archive input: the file or folder inside it (as the archive "
        "lists it) to hand to the converter. Default: the extracted folder, or its single top "
        "folder if it has just one."
    )
    image_root: str | None = Field(
        None, description="Where the data's image paths are relative to. Default: the input's "
        "folder (the input itself if a folder). For an archive, a relative path is taken "
        "inside the archive, as it lists it."
    )
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Converter options (see the converter's docs).")
    num: int | None = Field(None, ge=0, description="Rows to generate, for generators "
                            "(synthetic-charts); passed to the converter as options.num.")
    seed: int = Field(0, description="Seed for converters that sample or draw.")
    max_reject_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail if more than this fraction of rows is rejected."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="Reject images whose header claims more "
        "pixels (decompression-bomb guard; checked before decoding)."
    )
    check_images: bool = Field(True, description="Open and fully decode every image once. Off: "
                               "only path safety is checked (trusted data, faster).")
    images_in_responses: bool | None = Field(
        None, description="Accept <image> in assistant turns (images the model generates, "
        "e.g. Chameleon). Default: the converter's own setting (align-anything-ti2ti yes, the "
        "others no); set true to re-read such a dataset with `canonical`."
    )
    image_workers: int = Field(8, ge=1, description="Threads checking images in parallel.")
    max_archive_bytes: int = Field(DEFAULT_MAX_TOTAL_BYTES, gt=0,
                                   description="Refuse archives extracting to more bytes.")
    max_archive_members: int = Field(DEFAULT_MAX_MEMBERS, gt=0,
                                     description="Refuse archives with more members.")


class PrepareResult(StageResult):
    """Where the dataset is and what went in and out."""

    kind: str
    rows_in: int
    accepted: int
    rejected: int
    by_reason: dict[str, int]
    image_root: str
    samples: str
    rejects: str


# Fields that do not change the output (where it goes, how it is tracked, how fast).
_NOT_FINGERPRINTED = {"experiment", "pipeline_run_id", "output", "recipe", "parent_run_id",
                      "force", "image_workers"}


def main(cfg: PrepareConfig) -> PrepareResult:
    """Run the stage; see the module docstring. Raises `PrepareError` on too many rejects."""
    try:
        converter = get_converter(cfg.source_format)
    except KeyError as e:
        raise ValueError(f"source_format: {e.args[0]}") from None
    out = output_uri(cfg, STAGE)
    fp = fingerprint(STAGE, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED),
                     input_fingerprint(cfg.input) if cfg.input else None)
    with stage_tracking(cfg, STAGE, tags={"source_format": cfg.source_format}) as run:
        if reusable_output(out, fp, cfg.force) is not None:
            card = json.loads(storage.read_text(storage.join(out, CARD_FILE)))
            run.set_tags({"cached": "true"})
            _log_counts(run, card)
            return _result(out, card, cached=True, run_id=run.run_id)
        # Un-commit any older output here now, so a failure below never leaves one that looks
        # current (put_dir would do this too, but only on success).
        storage.delete(storage.join(out, storage.MANIFEST_NAME))
        with tempfile.TemporaryDirectory(prefix="mmjobs-prepare-",
                                         dir=os.environ.get("MMJOBS_TMP")) as work:
            source, root, copy_images = _resolve_source(cfg, Path(work))
            meta = {"stage": STAGE, "kind": converter.kind, "source_format": cfg.source_format}
            with staged_output(out, fp, meta=meta) as scratch:
                card = _convert(cfg, converter, source, root, copy_images, scratch, out)
                _log_counts(run, card)
                run.log_artifact(scratch / REJECTS_FILE)
                run.log_artifact(scratch / CARD_FILE)
                _check_rejects(cfg, card, scratch, out)
                storage.delete(storage.join(out, FAILED_DIR))  # from an earlier failed run
        return _result(out, card, cached=False, run_id=run.run_id)


def _resolve_source(cfg: PrepareConfig, work: Path) -> tuple[str | None, str | None, bool]:
    """(converter input, image root, copy images into the output?) for this config.

    Archives are downloaded and extracted under `work`; their images are copied into the
    output because `work` is deleted when the stage ends. Explicit paths into an archive
    (`archive_path`, a relative `image_root`) follow the archive's own layout.
    """
    if cfg.input is None or not is_archive(cfg.input):
        root = cfg.image_root or (_default_root(cfg.input) if cfg.input else None)
        return cfg.input, root, False
    local = work / "download" / os.path.basename(cfg.input.rstrip("/"))
    storage.get_file(cfg.input, local)
    extracted = extract_archive(local, work / "extracted", max_total_bytes=cfg.max_archive_bytes,
                                max_members=cfg.max_archive_members).target
    local.unlink()
    log.info("%s: extracted to %s", cfg.input, extracted)
    if cfg.archive_path:
        source = _inside(extracted, cfg.archive_path, "archive_path", cfg.input)
    else:
        entries = list(extracted.iterdir())
        # `tar czf data.tgz data/` -> read inside data/
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
    root = cfg.image_root
    if root is None:
        root = str(source if source.is_dir() else source.parent)
    elif not storage.is_s3(root) and not os.path.isabs(root):
        root = str(_inside(extracted, root, "image_root", cfg.input))
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


def _convert(cfg: PrepareConfig, converter: Converter, source: str | None, root: str | None,
             copy_images: bool, scratch: Path, out: str) -> dict[str, Any]:
    """Run converter + validator, write samples/rejects/card into `scratch`; return the card."""
    options = {**cfg.options, **({"num": cfg.num} if cfg.num is not None else {})}
    ctx = ConvertContext(input=source, image_root=root, output_images=scratch / IMAGES_DIR,
                         options=options, seed=cfg.seed)
    # Drawn images live in the output; validate them there, where the records point.
    check_root = str(scratch) if converter.draws_images else root
    in_responses = converter.images_in_responses if cfg.images_in_responses is None else \
        cfg.images_in_responses
    validator = Validator(check_root, kind=converter.kind, max_image_pixels=cfg.max_image_pixels,
                          check_images=cfg.check_images, workers=cfg.image_workers,
                          images_in_responses=in_responses)
    rows_in = 0

    def counted():  # counts what the converter yields, independently of the validator
        nonlocal rows_in
        for item in converter.fn(ctx):
            rows_in += 1
            yield item

    with JsonlWriter(scratch / SAMPLES_FILE) as samples, \
            JsonlWriter(scratch / REJECTS_FILE) as rejects:
        for item in progress(validator.run(counted()), desc=f"{STAGE} {cfg.source_format}"):
            if isinstance(item, Reject):
                rejects.write(item)
            else:
                samples.write(_copy_images(item, root, scratch) if copy_images else item)
    stats = validator.stats
    reconciled = rows_in == stats.rows == samples.count + rejects.count
    if not reconciled or stats.accepted != samples.count:
        raise RuntimeError(f"{STAGE}: internal error: counts do not reconcile (converter "
                           f"yielded {rows_in}, validator saw {stats.rows}, wrote "
                           f"{samples.count} samples + {rejects.count} rejects); please report")
    image_root = out if converter.draws_images or copy_images else root
    card = {
        "kind": converter.kind,
        "counts": {"input": rows_in, "accepted": samples.count, "rejected": rejects.count,
                   "by_reason": dict(stats.by_reason.most_common())},
        "image_root": str(storage.parse(image_root)) if image_root else None,
        "source_format": cfg.source_format,
        "input": cfg.input,
        "options": options,
        "seed": cfg.seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (scratch / CARD_FILE).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
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


def _check_rejects(cfg: PrepareConfig, card: dict[str, Any], scratch: Path, out: str) -> None:
    """Fail (before commit) on too many rejects; leave the rejects where the user can see them."""
    counts = card["counts"]
    total, rejected = counts["input"], counts["rejected"]
    fraction = rejected / total if total else 1.0
    if total and counts["accepted"] and fraction <= cfg.max_reject_fraction:
        return
    failed = storage.join(out, FAILED_DIR)
    for name in (REJECTS_FILE, CARD_FILE):
        storage.put_file(scratch / name, storage.join(failed, name))
    where = f"see {storage.join(failed, REJECTS_FILE)}"
    if not total:
        raise PrepareError(f"{STAGE}: converter {cfg.source_format!r} produced no rows from "
                           f"{cfg.input}; check input and source_format")
    top = ", ".join(f"{code} {n}" for code, n in list(counts["by_reason"].items())[:5])
    if not counts["accepted"]:
        raise PrepareError(f"{STAGE}: all {total} rows rejected; top reasons: {top}; {where}")
    raise PrepareError(f"{STAGE}: {rejected} of {total} rows rejected ({fraction:.1%}) > "
                       f"max_reject_fraction {cfg.max_reject_fraction:.1%}; top reasons: {top}; "
                       f"{where} (fix the data, or raise max_reject_fraction if these rows may "
                       "be dropped)")


def _log_counts(run: Any, card: dict[str, Any]) -> None:
    counts = card["counts"]
    run.log_metrics({"rows_in": counts["input"], "rows_accepted": counts["accepted"],
                     "rows_rejected": counts["rejected"],
                     **{f"reject.{code}": n for code, n in counts["by_reason"].items()}})
    if counts["by_reason"]:
        run.log_table({"reason": list(counts["by_reason"]),
                       "rows": list(counts["by_reason"].values())}, "reject_reasons.json")


def _result(out: str, card: dict[str, Any], *, cached: bool, run_id: str | None) -> PrepareResult:
    counts = card["counts"]
    return PrepareResult(
        output=out, cached=cached, mlflow_run_id=run_id, kind=card["kind"],
        rows_in=counts["input"], accepted=counts["accepted"], rejected=counts["rejected"],
        by_reason=counts["by_reason"], image_root=card["image_root"] or "",
        samples=storage.join(out, SAMPLES_FILE), rejects=storage.join(out, REJECTS_FILE))


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.prepare` / `mmjobs stage prepare` (the image entrypoint).

    Exit 1 with one line on stderr (no traceback) when the input cannot be converted: a broken
    file (`MalformedInputError` names the row and byte), too many rejects, a bad option.
    Nothing is committed then.
    """
    try:
        return stage_cli(STAGE, PrepareConfig, main, argv)
    except (PrepareError, ValueError, storage.StoreError) as e:
        log.debug("prepare failed", exc_info=True)
        message = str(e).removeprefix(f"{STAGE}: ")  # PrepareError's own prefix
        print(f"mmjobs {STAGE}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
