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

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import Field, field_validator, model_validator

from mmjobs import settings, storage
from mmjobs.data import fetch
from mmjobs.data.archives import (
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    extract_archive,
    is_archive,
)
from mmjobs.logs import get_logger
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

STAGE = "import"
VERSION = 1  # bump when the output layout or meta change: invalidates cached imports
log = get_logger(__name__)
# `org/name` as the hub spells repo ids; `hf://name` also allows legacy single-name repos.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LEGACY_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
# How the limits are raised, named in the errors that hit them (config field and CLI flag).
BYTES_OPTION = "max_bytes (mmjobs import --max-bytes N)"
MEMBERS_OPTION = "max_members (mmjobs import --max-members N)"


@dataclass(frozen=True)
class Source:
    """A classified `source`: `kind` is hf, http or store; `ref` the repo id, URL or URI."""

    kind: Literal["hf", "http", "store"]
    ref: str

    def __str__(self) -> str:
        return f"hf://{self.ref}" if self.kind == "hf" else self.ref


def classify_source(text: str) -> Source:
    """Tell a hub repo, a URL and a store path apart (see the module docstring).

    Raises:
        ValueError: the source is none of them (the message shows the accepted forms).
    """
    text = text.strip()
    if text.startswith(("http://", "https://")):
        return Source("http", text)
    if text.startswith("hf://"):
        repo_id = text[5:].strip("/")
        if _HUB_ID.match(repo_id) or _LEGACY_HUB_ID.match(repo_id):
            return Source("hf", repo_id)
        raise ValueError(f"source={text!r}: expected hf://org/name (for a dataset repo add "
                         "repo_type=dataset, not hf://datasets/...)")
    if "://" in text and not text.startswith(("s3://", "file://")):
        raise ValueError(f"source={text!r}: unsupported scheme; use hf://org/name, http(s)://, "
                         "s3://bucket/prefix or a local path")
    # A bare `org/name` is a hub id unless such a local path exists: local data wins.
    if _HUB_ID.match(text) and not Path(text).exists():
        return Source("hf", text)
    return Source("store", str(storage.parse(text)))


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
    out = cfg.to or output_uri(cfg, STAGE)
    if source.kind == "store" and str(storage.parse(out)) == source.ref:
        raise ValueError(f"source and to are both {source.ref}; import into another place")
    with stage_tracking(cfg, STAGE, tags={"source_kind": source.kind}) as run:
        identity, extra = _identity(cfg, source)
        fp = fingerprint(STAGE, VERSION, identity)
        manifest = reusable_output(out, fp, cfg.force)
        if manifest is not None and cfg.sha256 and manifest.meta.get("sha256") != cfg.sha256:
            log.info("%s: committed copy has sha256 %s, not the requested one; importing again",
                     out, manifest.meta.get("sha256"))
            manifest = None
        cached = manifest is not None
        if manifest is None:
            # Un-commit an older import now: if this one fails, nothing stale looks current.
            storage.delete(storage.join(out, storage.MANIFEST_NAME))
            meta = {"stage": STAGE, **identity, **extra}
            manifest = _IMPORTERS[identity.get("store_kind") or source.kind](
                cfg, source, out, fp, meta)
        run.set_tags({"cached": str(cached).lower()})
        run.log_metrics({"files": len(manifest.files), "bytes": manifest.total_bytes})
        log.info("%s -> %s: %d files, %d bytes%s", source, out, len(manifest.files),
                 manifest.total_bytes, " (already imported)" if cached else "")
        return ImportResult(output=out, cached=cached, mlflow_run_id=run.run_id,
                            source=str(source), source_kind=source.kind,
                            revision=manifest.meta.get("revision"),
                            sha256=manifest.meta.get("sha256"), files=len(manifest.files),
                            bytes=manifest.total_bytes)


def _identity(cfg: ImportConfig, source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what defines the import, fingerprinted; extra meta recorded beside it).

    Limits and retries are left out: they decide whether an import succeeds, not what it holds.
    """
    identity: dict[str, Any] = {"source": str(source), "source_kind": source.kind}
    if source.kind == "hf":
        requested = cfg.revision or "main"
        commit = fetch.resolve_hub_revision(source.ref, cfg.repo_type, requested)
        identity.update(repo_type=cfg.repo_type, revision=commit, include=cfg.include,
                        exclude=cfg.exclude)
        return identity, {"requested_revision": requested}
    if source.kind == "http":
        identity["extract"] = cfg.extract
        return identity, {}
    store_kind = _store_kind(source.ref)
    identity.update(store_kind=store_kind, source_fingerprint=input_fingerprint(source.ref))
    if store_kind == "file":
        identity["extract"] = cfg.extract
    return identity, {}


def _store_kind(uri: str) -> Literal["committed", "folder", "file"]:
    if storage.is_committed(uri):
        return "committed"
    loc = storage.parse(uri)
    if loc.scheme == "file":
        if Path(loc.key).is_file():
            return "file"
        if Path(loc.key).is_dir():
            return "folder"
    elif storage.exists(uri):
        # exists() is true for an object or a prefix; only a prefix lists objects under `uri/`.
        return "folder" if next(storage.list_objects(uri), None) is not None else "file"
    raise storage.StoreNotFoundError(f"{uri}: import source not found")


# --------------------------------------------------------------------------- importers


def _import_hub(cfg: ImportConfig, source: Source, out: str, fp: str,
                meta: dict[str, Any]) -> storage.Manifest:
    with staged_output(out, fp, meta=meta) as scratch:
        fetch.hub_snapshot(source.ref, cfg.repo_type, meta["revision"], scratch,
                           include=cfg.include, exclude=cfg.exclude)
    return storage.read_manifest(out)


def _import_url(cfg: ImportConfig, source: Source, out: str, fp: str,
                meta: dict[str, Any]) -> storage.Manifest:
    # Under MMJOBS_HOME, not a temporary folder: a `.part` left by a failed run is resumed.
    work = settings.home() / "cache" / "downloads" / fingerprint(source.ref)
    name = _file_name(urlparse(source.ref).path)
    try:
        got = fetch.download(source.ref, work / name, sha256=cfg.sha256, max_bytes=cfg.max_bytes,
                             retries=cfg.retries, bytes_option=BYTES_OPTION)
        meta = {**meta, "sha256": got.sha256, "http_validator": got.validator}
        return _commit_file(cfg, got.path, name, out, fp, meta)
    finally:
        (work / name).unlink(missing_ok=True)  # the complete file; a `.part` stays to resume
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()


def _import_store_file(cfg: ImportConfig, source: Source, out: str, fp: str,
                       meta: dict[str, Any]) -> storage.Manifest:
    name = _file_name(storage.parse(source.ref).key)
    with tempfile.TemporaryDirectory(prefix="mmjobs-import-",
                                     dir=os.environ.get("MMJOBS_TMP")) as tmp:
        work = Path(tmp)
        storage.get_file(source.ref, work / name)
        digest = storage.sha256_file(work / name)
        if cfg.sha256 and digest != cfg.sha256:
            raise fetch.ChecksumError(f"{source.ref}: sha256 is {digest}, expected {cfg.sha256}")
        return _commit_file(cfg, work / name, name, out, fp, {**meta, "sha256": digest})


def _import_store_dir(cfg: ImportConfig, source: Source, out: str, fp: str,
                      meta: dict[str, Any]) -> storage.Manifest:
    if meta["store_kind"] == "committed":
        log.info("%s: copying the committed directory (every file's sha256 is verified)",
                 source.ref)
        storage.copy(source.ref, out)
    else:
        log.info("%s: copying a plain folder (no manifest vouches for it) and committing it",
                 source.ref)
        storage.copy_uncommitted(source.ref, out)
    # The copy is committed with the source's meta (or none); record this import's instead.
    # Until then its fingerprint does not match, so an interruption here is never a cache hit.
    copied = storage.read_manifest(out)
    upstream = {k: v for k, v in copied.meta.items() if k != "fingerprint"}
    manifest = storage.Manifest(files=copied.files, meta={
        **meta, **({"upstream": upstream} if upstream else {}), "fingerprint": fp})
    storage.write_text(storage.join(out, storage.MANIFEST_NAME), manifest.to_json())
    return manifest


_IMPORTERS = {"hf": _import_hub, "http": _import_url, "file": _import_store_file,
              "committed": _import_store_dir, "folder": _import_store_dir}


def _commit_file(cfg: ImportConfig, path: Path, name: str, out: str, fp: str,
                 meta: dict[str, Any]) -> storage.Manifest:
    """Commit one local file to `out`: extracted if it is an archive (per `extract`), else as is."""
    unpack = cfg.extract == "always" or (cfg.extract == "auto" and is_archive(name))
    with staged_output(out, fp, meta={**meta, "extracted": unpack}) as scratch:
        if unpack:
            # extract_archive refuses escapes, links, special files, oversize archives,
            # duplicate members and the store's reserved names.
            extract_archive(path, scratch, max_total_bytes=cfg.max_bytes,
                            max_members=cfg.max_members, bytes_option=BYTES_OPTION,
                            members_option=MEMBERS_OPTION,
                            reserved_names=storage.RESERVED_NAMES)
        else:
            shutil.move(path, scratch / name)
    return storage.read_manifest(out)


def _file_name(path: str) -> str:
    """A safe file name from a URL path or key (`download` if it has none)."""
    name = PurePosixPath(unquote(path)).name
    if not name or name in {".", ".."} or "\\" in name or "\x00" in name \
            or name == storage.MANIFEST_NAME:
        return "download"
    return name


def cli(argv: list[str] | None = None) -> int:
    """`python -m mmjobs.stages.import_` / `mmjobs stage import` (the image entrypoint)."""
    return stage_cli(STAGE, ImportConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
