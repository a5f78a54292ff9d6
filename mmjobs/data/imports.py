"""Bring a model or dataset from a public source into a committed store directory.

Sources are told apart by `classify_source`: a Hugging Face repo (`hf://org/name`, or plain
`org/name` unless that is an existing local path), an `http(s)://` URL of a file, or a store
path (local or `s3://`). `source_identity` says what defines an import (hub sources: the revision
resolved to its commit sha; store sources: their content fingerprint), `import_source` fetches
and commits it to `out` with that fingerprint in the manifest:

- hub repos: a snapshot of the commit (`include`/`exclude` globs), token from `HF_TOKEN`;
- URLs: downloaded resumably (`mmjobs.data.fetch`; a `.part` under `$MMJOBS_HOME/cache/
  downloads` survives a failed run), checked against `sha256`, extracted if an archive;
- store paths: a committed directory copied with checksum verification, a plain folder copied
  and committed (regular files only), a single file treated like a download.

Archives are extracted by `mmjobs.data.archives` (escapes, links, special files, duplicate
members and a `_MANIFEST.json` member are refused, naming the member); limit errors name the
options that raise them (`BYTES_OPTION`, `MEMBERS_OPTION`). The import stage
(`mmjobs import`) is the command and pipeline step around this.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlparse

from mmjobs import settings, storage
from mmjobs.data import fetch
from mmjobs.data.archives import extract_archive, is_archive
from mmjobs.logs import get_logger
from mmjobs.stage_contract import fingerprint, input_fingerprint, staged_output

log = get_logger(__name__)
# `org/name` as the hub spells repo ids; `hf://name` also allows legacy single-name repos.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LEGACY_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*$")
# How the limits are raised, named in the errors that hit them (config field and CLI flag).
BYTES_OPTION = "max_bytes (mmjobs import --max-bytes N)"
MEMBERS_OPTION = "max_members (mmjobs import --max-members N)"


class ImportSettings(Protocol):
    """What an import is asked to do (the import stage's config has these fields)."""

    repo_type: Literal["model", "dataset"]
    revision: str | None
    include: list[str] | None
    exclude: list[str] | None
    sha256: str | None
    extract: Literal["auto", "always", "never"]
    max_bytes: int
    max_members: int
    retries: int


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


def source_identity(cfg: ImportSettings, source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
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


def _import_hub(cfg: ImportSettings, source: Source, out: str, fp: str,
                meta: dict[str, Any]) -> storage.Manifest:
    with staged_output(out, fp, meta=meta) as scratch:
        fetch.hub_snapshot(source.ref, cfg.repo_type, meta["revision"], scratch,
                           include=cfg.include, exclude=cfg.exclude)
    return storage.read_manifest(out)


def _import_url(cfg: ImportSettings, source: Source, out: str, fp: str,
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


def _import_store_file(cfg: ImportSettings, source: Source, out: str, fp: str,
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


def _import_store_dir(cfg: ImportSettings, source: Source, out: str, fp: str,
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


def import_source(cfg: ImportSettings, source: Source, out: str, fp: str,
                  identity: dict[str, Any], meta: dict[str, Any]) -> storage.Manifest:
    """Fetch `source` and commit it to `out` (fingerprint `fp`, `meta` in the manifest);
    `identity` is what `source_identity` returned for it. Returns the committed manifest.

    Raises:
        fetch.FetchError: a download or hub fetch failed (`ChecksumError` on a sha256 mismatch).
        mmjobs.data.archives.ArchiveError: the archive is unsafe, over a limit or corrupt.
        storage.StoreError: the store source is missing, or a copy failed verification.
    """
    importer = _IMPORTERS[identity.get("store_kind") or source.kind]
    return importer(cfg, source, out, fp, meta)


_IMPORTERS = {"hf": _import_hub, "http": _import_url, "file": _import_store_file,
              "committed": _import_store_dir, "folder": _import_store_dir}


def _commit_file(cfg: ImportSettings, path: Path, name: str, out: str, fp: str,
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
