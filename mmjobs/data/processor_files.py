"""Get a model's processor files locally, and fingerprint them, without fetching what is unused.

Pre-tokenization needs the tokenizer, processor and chat-template files, plus the weights only
for image-token models (Chameleon's VQ encoder). `materialize_model("s3://.../llava-7b")`
therefore downloads a 7B model's few hundred kB of processor files, not its 14 GB of weights,
verifying every file against the committed directory's manifest (size + sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mmjobs import local_cache, storage
from mmjobs.data.vq_images import WEIGHT_SUFFIXES, is_image_token_model
from mmjobs.logs import get_logger

log = get_logger(__name__)


def is_weight_file(path: str) -> bool:
    """True for weight files and their shard indexes (`model-00001-of-00002.safetensors`)."""
    return path.endswith(WEIGHT_SUFFIXES)


def needed_files(paths: list[str], config: dict) -> list[str]:
    """The files pre-tokenization reads: all but weights, plus weights for image-token models."""
    keep_weights = is_image_token_model(config)
    return sorted(p for p in paths if keep_weights or not is_weight_file(p))


def materialize_model(uri: str) -> tuple[Path, str]:
    """A local directory with the model's processor files, and their fingerprint.

    Local directories are used in place. `s3://` models must be committed directories; their
    needed files are downloaded once into `$MMJOBS_HOME/cache/models/<fingerprint>` and
    verified against the manifest.

    Raises:
        storage.IncompleteDirectoryError: an S3 model without `_MANIFEST.json`.
        storage.IntegrityError: a downloaded file's size or sha256 differs from the manifest.
    """
    if not storage.is_s3(uri):
        local = Path(storage.parse(uri).key)
        if not (local / "config.json").is_file():
            raise storage.StoreNotFoundError(
                f"{uri}: not a model directory (no config.json). Models come from the store or "
                "a local directory, never a hub at run time: import hub models first with "
                "`mmjobs import`")
        return local, _local_fingerprint(local)
    manifest = storage.read_manifest(uri)
    config = json.loads(storage.read_text(storage.join(uri, "config.json")))
    wanted = set(needed_files([f.path for f in manifest.files], config))
    entries = [f for f in manifest.files if f.path in wanted]
    fp = _fingerprint((e.path, e.sha256) for e in entries)
    target = local_cache.cache_root("models") / fp
    if target.is_dir():
        return target, fp

    def fill(scratch: Path) -> None:
        local_cache.download_verified(uri, entries, scratch)

    local_cache.cached(target, fill)
    log.info("%s: fetched %d processor files into %s", uri, len(entries), target)
    return target, fp


def _local_fingerprint(local: Path) -> str:
    """Fingerprint a local model dir: from its manifest when committed, else by hashing."""
    config = json.loads((local / "config.json").read_text())
    if storage.is_committed(local):
        manifest = storage.read_manifest(local)
        wanted = set(needed_files([f.path for f in manifest.files], config))
        return _fingerprint((f.path, f.sha256) for f in manifest.files if f.path in wanted)
    paths = [p.relative_to(local).as_posix() for p in local.rglob("*")
             if p.is_file() and not p.name.startswith(".")]
    return _fingerprint((p, storage.sha256_file(local / p)) for p in needed_files(paths, config))


def _fingerprint(pairs) -> str:
    blob = json.dumps(sorted(pairs)).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
