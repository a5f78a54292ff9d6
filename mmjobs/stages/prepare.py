"""Stage `prepare`: a raw dataset in a published layout -> a validated canonical dataset.

    python -m mmjobs.stages.prepare --set source_format=llava \\
        --set input=s3://raw/llava_v1_5_mix665k.json --set image_root=s3://raw/images

The converter named by `source_format` turns input rows into canonical records;
`mmjobs.data.validate` quarantines bad ones. The committed output holds `samples.jsonl`
(accepted), `rejects.jsonl` (`{row, reason, source}` per rejected row) and `dataset.json` (the
card: kind, counts with `input = accepted + rejected`, the absolute image root URI, source
format, options), and `README.md` (a Hugging Face dataset card pointing
`datasets.load_dataset(dir)` at samples.jsonl). Converters that draw images, and archive
inputs, put their images under `images/` in the output, which is then the image root.

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
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from mmjobs import storage
from mmjobs.data.archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_BYTES
from mmjobs.data.converters import IMAGES_DIR, ConvertContext, get_converter
from mmjobs.data.records import CARD_FILE, REJECTS_FILE, SAMPLES_FILE
from mmjobs.data.validate import DEFAULT_MAX_IMAGE_PIXELS
from mmjobs.logs import get_logger
from mmjobs.recipe import RecipeConfig
from mmjobs.stage_contract import (
    RUN_FIELDS,
    Knob,
    Stage,
    StageConfig,
    StageResult,
    StageRun,
    fingerprint,
    input_fingerprint,
    run_stage,
)

NAME = "prepare"
# Bump when checks or the output format change: invalidates cached outputs. 3: README.md (a
# dataset card that points `datasets.load_dataset(dir)` at samples.jsonl).
VERSION = 3
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
_NOT_FINGERPRINTED = RUN_FIELDS | {"image_workers"}


def main(cfg: PrepareConfig) -> PrepareResult:
    """Run the stage; see the module docstring. Raises `PrepareError` on too many rejects."""
    from mmjobs.data.conversion import resolve_source, write_dataset
    from mmjobs.data.validate import Validator

    try:
        converter = get_converter(cfg.source_format)
    except KeyError as e:
        raise ValueError(f"source_format: {e.args[0]}") from None
    fp = fingerprint(NAME, VERSION, cfg.model_dump(exclude=_NOT_FINGERPRINTED),
                     input_fingerprint(cfg.input) if cfg.input else None)
    options = {**cfg.options, **({"num": cfg.num} if cfg.num is not None else {})}
    in_responses = converter.images_in_responses if cfg.images_in_responses is None else \
        cfg.images_in_responses

    def prepare(stage: StageRun) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="mmjobs-prepare-",
                                         dir=os.environ.get("MMJOBS_TMP")) as work:
            source, root, copy_images = resolve_source(
                cfg.input, Path(work), image_root=cfg.image_root, archive_path=cfg.archive_path,
                max_archive_bytes=cfg.max_archive_bytes,
                max_archive_members=cfg.max_archive_members)
            meta = {"stage": NAME, "kind": converter.kind, "source_format": cfg.source_format}
            with stage.commit(meta) as scratch:
                ctx = ConvertContext(input=source, image_root=root,
                                     output_images=scratch / IMAGES_DIR, options=options,
                                     seed=cfg.seed)
                # Drawn images live in the output; validate them there, where records point.
                validator = Validator(str(scratch) if converter.draws_images else root,
                                      kind=converter.kind, max_image_pixels=cfg.max_image_pixels,
                                      check_images=cfg.check_images, workers=cfg.image_workers,
                                      images_in_responses=in_responses)
                card = write_dataset(
                    converter, ctx, validator, scratch, out=stage.out,
                    copy_from=root if copy_images else None, desc=f"{NAME} {cfg.source_format}",
                    card={"source_format": cfg.source_format, "input": cfg.input,
                          "options": options, "seed": cfg.seed,
                          "created": datetime.now(UTC).isoformat(timespec="seconds")})
                _log_counts(stage.run, card)
                stage.run.log_artifact(scratch / REJECTS_FILE)
                stage.run.log_artifact(scratch / CARD_FILE)
                _check_rejects(cfg, card, scratch, stage.out)
                storage.delete(storage.join(stage.out, FAILED_DIR))  # an earlier failed run's
        return card

    def reused(out: str, manifest: storage.Manifest, run: Any) -> dict[str, Any]:
        card = json.loads(storage.read_text(storage.join(out, CARD_FILE)))
        _log_counts(run, card)
        return card

    # Un-commit any older output first, so a failure never leaves one that looks current
    # (put_dir would do this too, but only on success).
    return run_stage(cfg, NAME, fp, prepare, result=_result, reused=reused,
                     tags={"source_format": cfg.source_format}, uncommit_first=True)


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
        raise PrepareError(f"{NAME}: converter {cfg.source_format!r} produced no rows from "
                           f"{cfg.input}; check input and source_format")
    top = ", ".join(f"{code} {n}" for code, n in list(counts["by_reason"].items())[:5])
    if not counts["accepted"]:
        raise PrepareError(f"{NAME}: all {total} rows rejected; top reasons: {top}; {where}")
    raise PrepareError(f"{NAME}: {rejected} of {total} rows rejected ({fraction:.1%}) > "
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


def _result(out: str, card: dict[str, Any], cached: bool, run_id: str | None) -> PrepareResult:
    counts = card["counts"]
    return PrepareResult(
        output=out, cached=cached, mlflow_run_id=run_id, kind=card["kind"],
        rows_in=counts["input"], accepted=counts["accepted"], rejected=counts["rejected"],
        by_reason=counts["by_reason"], image_root=card["image_root"] or "",
        samples=storage.join(out, SAMPLES_FILE), rejects=storage.join(out, REJECTS_FILE))


def recipe_defaults(recipe: RecipeConfig, step: str) -> dict[str, Any]:
    """The recipe's `data` section (source_format, input) describes the step named `prepare`
    only: recipes with several prepare steps give each its own section."""
    data = recipe.data
    if step != "prepare" or data is None:
        return {}
    values = {"source_format": data.source_format, "input": data.input,
              "max_reject_fraction": data.max_reject_fraction}
    return {k: v for k, v in values.items() if v is not None}


# Bad input is one line on stderr (no traceback), exit 1: a broken file (`MalformedInputError`
# names the row and byte), too many rejects, a bad option; nothing is committed then.
STAGE = Stage(name=NAME, config=PrepareConfig, result=PrepareResult, main=main, image="data",
              recipe_defaults=recipe_defaults, outputs={"dataset": "Dataset"},
              errors=(PrepareError, ValueError, storage.StoreError),
              knobs=(Knob("input", str, unset="", description="Raw data file or folder "
                          "(local or s3://); empty: none (generators)."),))

if __name__ == "__main__":
    sys.exit(STAGE.cli())
