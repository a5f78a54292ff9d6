"""Stage `import`: a model or dataset from a public source -> a committed directory in the store.

    mmjobs import hf://llava-hf/llava-1.5-7b-hf --to s3://models/llava-1.5-7b --revision main
    mmjobs import https://host/charts.tar.gz --to s3://raw/charts --sha256 9f2c...
    mmjobs import s3://other-bucket/datasets/x --to s3://raw/x
    python -m mmjobs.stages.import_ --set source=org/name --set to=./store/name

(The module is `import_` because `import` is a Python keyword; the stage is named `import`.)

Sources (`source`):
- a Hugging Face repo, `hf://org/name` or plain `org/name` (unless that is an existing local
  path), with `repo_type` model|dataset. `revision` (default `main`) is resolved to its commit
  sha, which is downloaded and recorded. The token comes from `HF_TOKEN` in the environment (a
  Kubernetes Secret on clusters), never from the config. `include`/`exclude` filter files.
- an `http://` or `https://` URL of a file: downloaded resumably (see `mmjobs.data.fetch`),
  checked against `sha256` when given, and extracted safely if it is an archive
  (`extract=auto`: by its name; `always`; `never` stores it as is). Other files are stored as is.
- a store path (local or `s3://`): a committed directory is copied with checksum verification,
  a plain folder is copied and committed (regular files only: a symbolic link or special file
  is refused, never followed out of the folder), a single file is treated like a downloaded one.

Archives are extracted by `mmjobs.data.archives` (escapes, links, special files, duplicate
members and a `_MANIFEST.json` member are refused, naming the member); limit errors name the
options that raise them (`max_bytes` / `--max-bytes`, `max_members` / `--max-members`).

The committed output's manifest meta records `source`, `source_kind`, `revision` (hub commit
sha) and `sha256` (of the downloaded file). A re-run with the same source and revision finds
that copy and does nothing (`cached=True`); a branch that moved on is imported again. A failed
import commits nothing, and an older import at the same place is un-committed first, so a
pipeline never reads stale data from it.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mmjobs import storage
from mmjobs.data.archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_BYTES
from mmjobs.data.imports import classify_source, import_source, source_identity
from mmjobs.logs import get_logger
from mmjobs.stage_contract import (
    Stage,
    StageConfig,
    StageResult,
    fingerprint,
    output_uri,
    reusable_output,
    stage_tracking,
    uncommit,
)

NAME = "import"
VERSION = 1  # bump when the output layout or meta change: invalidates cached imports
log = get_logger(__name__)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class ImportConfig(StageConfig):
    """Copy a model or dataset from the Hugging Face hub, a URL or another store into the store."""

    source: str = Field(description="hf://org/name (or org/name), an http(s):// URL of a file "
                        "or archive, or a store path (local or s3://).")
    to: str | None = Field(None, description="Where to put the committed copy (same as "
                           "`output`); default {store}/{experiment}/{pipeline_run_id}/import.")
    repo_type: Literal["model", "dataset"] = Field("model", description="Hub sources: the "
                                                   "kind of repo.")
    revision: str | None = Field(None, description="Hub sources: branch, tag or commit sha; "
                                 "default main. Recorded as the commit sha.")
    include: list[str] | None = Field(None, description="Hub sources: only files matching "
                                      "these globs (allow_patterns), e.g. ['*.json', "
                                      "'*.safetensors'].")
    exclude: list[str] | None = Field(None, description="Hub sources: skip files matching "
                                      "these globs (ignore_patterns).")
    sha256: str | None = Field(None, description="URL or single-file sources: expected sha256 "
                               "of the file; a mismatch fails and commits nothing.")
    extract: Literal["auto", "always", "never"] = Field(
        "auto", description="URL or single-file sources: extract archives (auto: when the name "
        "ends in .zip/.tar/.tar.gz/...; always; never: store the file as is).")
    max_bytes: int = Field(DEFAULT_MAX_TOTAL_BYTES, gt=0, description="Refuse a download, or "
                           "an archive extracting to, more bytes than this.")
    max_members: int = Field(DEFAULT_MAX_MEMBERS, gt=0, description="Refuse archives with "
                             "more members.")
    retries: int = Field(5, ge=1, description="URL sources: attempts in a row without new "
                         "bytes before the download gives up (a partial file is resumed).")

    @field_validator("revision", mode="before")
    @classmethod
    def _tag_as_text(cls, value: Any) -> Any:
        # `--set revision=2024` arrives as a YAML int; tags like that are names, not numbers.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError(f"expected 64 hex digits, got {value!r}")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _check(self) -> ImportConfig:
        problems = []
        try:
            kind = classify_source(self.source).kind
        except ValueError as e:
            problems.append(str(e))
            kind = None
        if kind is not None and kind != "hf":
            hub_only = [n for n in ("revision", "include", "exclude") if getattr(self, n)]
            if hub_only:
                problems.append(f"{', '.join(hub_only)} apply to hub sources only, and "
                                f"{self.source!r} is a {kind} source; remove them")
        if kind == "hf" and self.sha256:
            problems.append("sha256 applies to URL and file sources; a hub import is pinned by "
                            "its revision (commit sha) instead")
        if kind == "hf" and self.extract != "auto":
            problems.append("extract applies to URL and file sources, not hub repos")
        if self.to and self.output and self.to != self.output:
            problems.append(f"to={self.to!r} and output={self.output!r} disagree; set one")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ImportResult(StageResult):
    """Where the copy is, what it came from, and how big it is."""

    source: str
    source_kind: str
    revision: str | None = None
    sha256: str | None = None
    files: int
    bytes: int


def main(cfg: ImportConfig) -> ImportResult:
    """Run the stage; see the module docstring.

    Raises:
        fetch.FetchError: a download or hub fetch failed (`ChecksumError` on a sha256 mismatch).
        mmjobs.data.archives.ArchiveError: the archive is unsafe, over a limit or corrupt.
        storage.StoreError: the store source is missing, or a copy failed verification.
        ValueError: the source and the destination are the same place.
    """
    source = classify_source(cfg.source)
    out = cfg.to or output_uri(cfg, NAME)
    if source.kind == "store" and str(storage.parse(out)) == source.ref:
        raise ValueError(f"source and to are both {source.ref}; import into another place")
    with stage_tracking(cfg, NAME, tags={"source_kind": source.kind}) as run:
        identity, extra = source_identity(cfg, source)
        fp = fingerprint(NAME, VERSION, identity)
        manifest = reusable_output(out, fp, cfg.force)
        if manifest is not None and cfg.sha256 and manifest.meta.get("sha256") != cfg.sha256:
            log.info("%s: committed copy has sha256 %s, not the requested one; importing again",
                     out, manifest.meta.get("sha256"))
            manifest = None
        cached = manifest is not None
        if manifest is None:
            uncommit(out)  # if this import fails, nothing stale looks current
            meta = {"stage": NAME, **identity, **extra}
            manifest = import_source(cfg, source, out, fp, identity, meta)
        run.set_tags({"cached": str(cached).lower()})
        run.log_metrics({"files": len(manifest.files), "bytes": manifest.total_bytes})
        log.info("%s -> %s: %d files, %d bytes%s", source, out, len(manifest.files),
                 manifest.total_bytes, " (already imported)" if cached else "")
        return ImportResult(output=out, cached=cached, mlflow_run_id=run.run_id,
                            source=str(source), source_kind=source.kind,
                            revision=manifest.meta.get("revision"),
                            sha256=manifest.meta.get("sha256"), files=len(manifest.files),
                            bytes=manifest.total_bytes)


# Writes to its `to` (default {store}/{experiment}/{run}/import): recipes name the place.
STAGE = Stage(name=NAME, config=ImportConfig, result=ImportResult, main=main, image="data",
              own_output=False)

if __name__ == "__main__":
    sys.exit(STAGE.cli())
