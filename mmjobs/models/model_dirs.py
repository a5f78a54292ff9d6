"""Where model, adapter and connector directories are, and verified local copies of them.

`resolve_model_dir` turns a model name into a local directory: a local path as is, an `s3://`
committed directory (or a folder inside one, like `{train_output}/final/adapter`) as a
verified copy under `$MMJOBS_HOME/cache/models/<fingerprint>` (`fetch_dir`), a hub id from
the hub cache. `dir_fingerprint` gives the content identity stage fingerprints use (the same
for a local directory and its copy in S3), `locate_adapter` finds the adapter inside a
training output. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from mmjobs import local_cache, storage
from mmjobs.logs import get_logger

log = get_logger(__name__)

CACHE_RECORD = ".mmjobs-cache.json"  # hidden: never copied into exported models
ADAPTER_CONFIG = "adapter_config.json"
# Where an adapter URI may keep the adapter, relative to the URI, in the order tried.
ADAPTER_LAYOUTS = ("", "final/adapter", "adapter")
# How many folders above a URI to look for the committed directory holding it: a training
# output commits once at its root, and adapters/connectors sit 1-3 levels below
# (`final/adapter`, `checkpoints/step-100/connector`).
_MAX_COMMIT_DEPTH = 4
# `org/name`, `name` or `org/name@revision`; never a path-looking string.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
# Only these hub files are fetched: safetensors weights and the small files around them, never
# pickled `.bin` weights (refused anyway) that would double the download.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken",
                 "*.py", "*.md"]


class ModelNotFoundError(FileNotFoundError):
    """The model is not a local directory, not in the store, and the hub cannot be asked."""


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding the model `name_or_path`.

    - a local directory (plain path or `file://`): returned as is;
    - `s3://bucket/prefix`: a committed directory (or a folder inside one) downloaded into
      `$MMJOBS_HOME/cache/models/<fingerprint>`, every file checked against the manifest's
      sha256; a verified earlier download is reused;
    - anything else that looks like a hub id (`org/name`, `org/name@revision`): the Hugging Face
      hub cache, filled by `huggingface_hub.snapshot_download` unless hub access is disabled.

    Raises:
        ModelNotFoundError: a missing local path, or a hub id while `HF_HUB_OFFLINE` is set and
            the model is not in the local hub cache.
        storage.IncompleteDirectoryError: an `s3://` prefix no committed directory covers.
        storage.IntegrityError: a downloaded file differs from the manifest.
    """
    text = os.fspath(name_or_path)
    if storage.is_s3(text):
        return fetch_dir(text, kind="models")
    path = Path(storage.parse(text).key) if "://" in text else Path(text).expanduser()
    if path.is_dir():
        return path
    if "://" in text or not _HUB_ID.match(text):
        raise ModelNotFoundError(f"model {text!r}: no such directory")
    return _hub_snapshot(text)


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = hub_id.partition("@")
    try:  # the local hub cache first: no network at all
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {hub_id!r} not found locally and hub access is disabled (HF_HUB_OFFLINE=1): "
            "use a local directory or an s3:// model in the store (import hub models with "
            "`mmjobs import`), or unset HF_HUB_OFFLINE on a machine that can reach the hub")
    log.info("downloading %s from the Hugging Face hub (safetensors and small files only)",
             hub_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=_HUB_PATTERNS))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"model {hub_id!r}: not a local directory, and the hub has no "
                                 f"such model or revision ({type(e).__name__})") from e


def committed_root(uri: str) -> tuple[str, str, storage.Manifest]:
    """(committed dir, path of `uri` inside it, its manifest) for `uri` or its nearest ancestor.

    Raises:
        storage.IncompleteDirectoryError: neither `uri` nor its 4 parents are committed.
    """
    current, rel = str(storage.parse(uri)), ""
    for _ in range(_MAX_COMMIT_DEPTH + 1):
        if storage.is_committed(current):
            return current, rel, storage.read_manifest(current)
        up = _parent(current)
        if up is None:
            break
        current, name = up
        rel = f"{name}/{rel}" if rel else name
    raise storage.IncompleteDirectoryError(
        f"{uri}: no {storage.MANIFEST_NAME} here or in the folders above it, so it is not a "
        "complete (committed) directory; re-run the stage that writes it, or commit an upload "
        "with `mmjobs store cp`")


def _parent(uri: str) -> tuple[str, str] | None:
    """(parent URI, last path part) of a normalised URI; None at a bucket or filesystem root."""
    loc = storage.parse(uri)
    if loc.scheme == "s3":
        if not loc.key:
            return None
        parent, _, name = loc.key.rpartition("/")
        return (f"s3://{loc.bucket}/{parent}" if parent else f"s3://{loc.bucket}"), name
    path = Path(loc.key)
    return (str(path.parent), path.name) if path.parent != path else None


def _entries_under(manifest: storage.Manifest, rel: str) -> list[storage.FileEntry]:
    """Manifest entries below `rel`, with paths relative to it."""
    if not rel:
        return list(manifest.files)
    prefix = rel.rstrip("/") + "/"
    return [storage.FileEntry(f.path[len(prefix):], f.size, f.sha256)
            for f in manifest.files if f.path.startswith(prefix)]


def _fp_entries(entries: Iterable[storage.FileEntry]) -> str:
    """Short hash of (relative path, sha256) pairs: equal for equal contents anywhere."""
    blob = json.dumps(["dir", sorted((e.path, e.sha256) for e in entries)]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def fetch_dir(uri: str, *, kind: str = "models") -> Path:
    """A local directory with the contents of `uri`.

    Local directories are used in place. An `s3://` URI must be a committed directory or a
    folder inside one (`{train_output}/final/adapter`); its files are downloaded once into
    `$MMJOBS_HOME/cache/<kind>/<fingerprint>` and checked against the manifest (size + sha256).
    A cached copy is reused after checking sizes, and re-hashing files whose mtime changed.

    Raises:
        storage.StoreNotFoundError: nothing at `uri`.
        storage.IncompleteDirectoryError / storage.IntegrityError: see `committed_root`,
            `storage.get_dir`.
    """
    if not storage.is_s3(uri):
        path = Path(storage.parse(uri).key)
        if not path.is_dir():
            raise storage.StoreNotFoundError(f"{uri}: no such directory")
        return path
    root, rel, manifest = committed_root(uri)
    entries = _entries_under(manifest, rel)
    if not entries:
        raise storage.StoreNotFoundError(f"{uri}: the manifest of {root} lists no files under "
                                         f"{rel!r}")
    target = local_cache.cache_root(kind) / _fp_entries(entries)
    if _cache_is_valid(target):
        return target

    def fill(scratch: Path) -> None:
        if rel:
            local_cache.download_verified(uri, entries, scratch)
        else:
            storage.get_dir(uri, scratch)  # verifies size + sha256 of every file
        _write_cache_record(scratch, uri, entries)

    local_cache.cached(target, fill, valid=_cache_is_valid)
    log.info("%s: fetched %d files into %s", uri, len(entries), target)
    return target


def _write_cache_record(local: Path, source: str, entries: list[storage.FileEntry]) -> None:
    files = [{"path": e.path, "size": e.size, "sha256": e.sha256,
              "mtime_ns": (local / e.path).stat().st_mtime_ns} for e in entries]
    (local / CACHE_RECORD).write_text(json.dumps({"source": source, "files": files}, indent=1))


def _cache_is_valid(local: Path) -> bool:
    """Every recorded file is present with its size; files touched since are re-hashed."""
    record_path = local / CACHE_RECORD
    if not record_path.is_file():
        return False
    try:
        files = json.loads(record_path.read_text())["files"]
        for f in files:
            stat = (local / f["path"]).stat()
            if stat.st_size != f["size"]:
                return False
            if stat.st_mtime_ns != f["mtime_ns"] and \
                    storage.sha256_file(local / f["path"]) != f["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def dir_fingerprint(uri: str) -> str:
    """Content fingerprint of a model/adapter/connector directory (for stage fingerprints).

    From the manifest when the directory (or a folder above it) is committed — the same value
    for a local dir and its copy in S3 — else by hashing every file (local dirs only).
    """
    try:
        _, rel, manifest = committed_root(uri)
        entries = _entries_under(manifest, rel)
        if storage.is_s3(uri) or _matches_local(Path(storage.parse(uri).key), entries):
            return _fp_entries(entries)
    except storage.IncompleteDirectoryError:
        if storage.is_s3(uri):
            raise
    local = Path(storage.parse(uri).key)
    if not local.is_dir():
        raise storage.StoreNotFoundError(f"{uri}: no such directory")
    return _fp_entries(
        storage.FileEntry(p.relative_to(local).as_posix(), p.stat().st_size,
                          storage.sha256_file(p))
        for p in sorted(local.rglob("*"))
        if p.is_file() and p.name not in {storage.MANIFEST_NAME, CACHE_RECORD})


def _matches_local(local: Path, entries: list[storage.FileEntry]) -> bool:
    """True if the manifest entries describe exactly the files now in `local` (by size)."""
    present = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*")
               if p.is_file() and p.name not in {storage.MANIFEST_NAME, CACHE_RECORD}}
    return bool(entries) and present == {e.path: e.size for e in entries}


def model_fingerprint(model: str) -> str:
    """`dir_fingerprint` of a local or s3 model dir; a hub id stands for itself (pin it with
    @revision)."""
    try:
        return dir_fingerprint(model)
    except storage.StoreNotFoundError:
        if storage.is_s3(model):
            raise
        return model


def locate_adapter(uri: str) -> str:
    """The adapter directory `uri` points at: itself, or `final/adapter` / `adapter` under it.

    Raises:
        storage.StoreNotFoundError: no `adapter_config.json` in any of those places.
    """
    for rel in ADAPTER_LAYOUTS:
        candidate = storage.join(uri, rel) if rel else uri
        if storage.exists(storage.join(candidate, ADAPTER_CONFIG)):
            return candidate
    raise storage.StoreNotFoundError(
        f"{uri}: no {ADAPTER_CONFIG} here or under final/adapter/ or adapter/; give the peft "
        "adapter directory or the training output that holds it")
