"""What every stage shares: base config fields, output layout, fingerprints, commit, CLI.

The stage contract (ARCHITECTURE.md): `mmjobs/stages/<stage>.py` exposes
`main(cfg) -> Result` and a `python -m mmjobs.stages.<stage> --config FILE --set k=v` CLI.
Outputs go to `{store_root}/{experiment}/{pipeline_run_id}/{stage}/`, are staged locally and
committed with a manifest last; the manifest's `meta.fingerprint` records the inputs, so a
re-run whose committed output has the same fingerprint is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from mmjobs import settings, storage
from mmjobs.config import ConfigError, StrictModel, load_config
from mmjobs.logs import get_logger

log = get_logger(__name__)
C = TypeVar("C", bound=BaseModel)


class StageConfig(StrictModel):
    """Fields every stage config has (each stage's config subclasses this)."""

    experiment: str = Field("default", description="MLflow experiment and store folder.")
    pipeline_run_id: str = Field(
        "local", description="Pipeline run this stage belongs to; a folder in the output path."
    )
    output: str | None = Field(
        None, description="Output URI; default {store}/{experiment}/{pipeline_run_id}/{stage}."
    )
    recipe: str | None = Field(None, description="Recipe name, for tags.")
    parent_run_id: str | None = Field(
        None, description="MLflow parent (pipeline) run id; default $MMJOBS_PARENT_RUN_ID."
    )
    force: bool = Field(False, description="Run even if a committed output matches the inputs.")


class StageResult(BaseModel):
    """Base of every stage result: where the output is and whether this run was a no-op."""

    output: str
    cached: bool = False
    mlflow_run_id: str | None = None


def output_uri(cfg: StageConfig, stage: str) -> str:
    """The stage's output location (explicit `output`, else the standard layout)."""
    if cfg.output:
        return cfg.output
    return storage.join(settings.store_root(), cfg.experiment, cfg.pipeline_run_id, stage)


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts (configs, manifests, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def input_fingerprint(uri: str) -> str:
    """Fingerprint of an input: its manifest's file list when committed, else size + bytes hash.

    Raises `IncompleteDirectoryError` for a directory without a manifest: it is never an input.
    """
    if storage.is_committed(uri):
        manifest = storage.read_manifest(uri)
        return fingerprint([(f.path, f.sha256) for f in manifest.files])
    loc = storage.parse(uri)
    if loc.scheme == "file" and Path(loc.key).is_file():
        return fingerprint(storage.sha256_file(loc.key))
    if loc.scheme == "file" and Path(loc.key).is_dir():
        # Raw source folders (annotation dumps) are fingerprinted by names and sizes.
        return fingerprint([(o.relpath, o.size) for o in storage.list_objects(uri)])
    if loc.scheme == "s3":
        # A single object: its size and ETag (a prefix lists as `uri/`, so it would never
        # change the fingerprint and a changed input file would silently reuse old outputs).
        head = storage.stat_object(uri)
        if head is not None:
            return fingerprint(head)
    if storage.exists(uri):
        objs = list(storage.list_objects(uri))
        return fingerprint([(o.relpath, o.size) for o in objs])
    raise storage.StoreNotFoundError(f"{uri}: input not found")


def reusable_output(uri: str, fp: str, force: bool = False) -> storage.Manifest | None:
    """The committed output at `uri` if it was made from the same inputs (`fp`), else None."""
    if force or not storage.is_committed(uri):
        return None
    manifest = storage.read_manifest(uri)
    if manifest.meta.get("fingerprint") == fp:
        log.info("%s: output already committed for these inputs (fingerprint %s); reusing it",
                 uri, fp)
        return manifest
    return None


@contextlib.contextmanager
def staged_output(uri: str, fp: str, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local scratch directory that is committed to `uri` when the block exits cleanly.

    On an exception nothing is committed, so a failed stage never looks complete.
    """
    scratch = Path(tempfile.mkdtemp(prefix="mmjobs-stage-", dir=os.environ.get("MMJOBS_TMP")))
    try:
        yield scratch
        storage.put_dir(scratch, uri, meta={**(meta or {}), "fingerprint": fp})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def stage_tracking(cfg: StageConfig, stage: str, *, tags: dict[str, str] | None = None):
    """An MLflow child run for this stage under the pipeline's parent run.

    Logs the resolved config as params (flattened) and as `config.yaml`. Yields the run handle
    (`log_metrics`, `log_figure`, `log_table`, `log_artifact`, ...); the run ends FINISHED, or
    FAILED if the block raises. Tracking never fails the stage (see `mmjobs.tracking`).
    """
    from mmjobs.config import dump_recipe, flatten
    from mmjobs.tracking import Tracker, default_tags

    tracker = Tracker(cfg.experiment)
    parent = cfg.parent_run_id or os.environ.get("MMJOBS_PARENT_RUN_ID") or None
    all_tags = {**default_tags(recipe=cfg.recipe, stage=stage,
                               image=os.environ.get("MMJOBS_IMAGE")), **(tags or {})}
    with tracker.start_run(stage, parent=parent, tags=all_tags) as run:
        run.log_params(flatten(cfg))
        run.log_text(dump_recipe(cfg), "config.yaml")
        yield run


def stage_cli(stage: str, config_cls: type[C], main: Callable[[C], BaseModel],
              argv: Sequence[str] | None = None) -> int:
    """The `python -m mmjobs.stages.<stage>` entrypoint: load config, run, print the result.

    The result is printed as one JSON line on stdout (the pipeline component reads it).
    """
    parser = argparse.ArgumentParser(prog=f"mmjobs stage {stage}",
                                     description=(config_cls.__doc__ or "").strip())
    parser.add_argument("--config", help="stage config YAML (optional; fields can all be --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_cls, args.config or {}, args.overrides,
                          source=args.config or f"{stage} config")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    result = main(cfg)
    print(result.model_dump_json())
    return 0
