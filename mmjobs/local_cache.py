"""Verified local copies of store files, and the local cache under `$MMJOBS_HOME/cache`.

Models, adapters, processor files, VQ decoders, checkpoints and loader shards are all read
from local copies of committed store directories. Two mechanics serve them all:

- `download_verified` fetches manifest entries and checks each file's size and sha256 against
  the manifest, so a corrupt or truncated download is an `IntegrityError`, never a model;
- `cached` fills a cache entry in a scratch directory beside it and renames it into place, so
  an entry appears complete or not at all (a crash leaves only scratch, a concurrent writer's
  complete copy is kept).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmjobs import settings, storage

WORKERS = 8  # parallel downloads: enough to fill a link, few enough for small pods


def cache_root(kind: str) -> Path:
    """`$MMJOBS_HOME/cache/<kind>` (models, adapters, vq-decoders, ...)."""
    return settings.home() / "cache" / kind


def download_verified(uri: str, entries: Iterable[storage.FileEntry], dest: str | os.PathLike,
                      *, what: str = "the manifest", workers: int = WORKERS) -> None:
    """Download `entries` (paths relative to `uri`) into `dest`, checking size and sha256.

    Raises:
        storage.IntegrityError: a downloaded file differs from its entry (names the file and
            `what` it was checked against).
        storage.StoreNotFoundError: a listed file is missing.
    """
    dest = Path(dest)

    def fetch(entry: storage.FileEntry) -> None:
        local = dest / entry.path
        source = storage.join(uri, entry.path)
        storage.get_file(source, local)
        if local.stat().st_size != entry.size or storage.sha256_file(local) != entry.sha256:
            raise storage.IntegrityError(f"{source}: size or sha256 differs from {what} "
                                         "(corrupt download or upload)")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fetch, list(entries)))


def cached(target: Path, fill: Callable[[Path], None], *,
           valid: Callable[[Path], bool] = Path.is_dir) -> Path:
    """The cache entry `target`, filled by `fill(scratch)` unless it is already `valid`.

    `fill` writes into a scratch directory next to `target`, which is then renamed to it; an
    invalid earlier entry is replaced. When another process finished the same entry first, its
    copy is kept.
    """
    if valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        storage.private_to_shared(scratch)  # mkdtemp's 0700 would survive the rename
        fill(scratch)
        shutil.rmtree(target, ignore_errors=True)  # an invalid earlier copy
        try:
            os.replace(scratch, target)  # appears complete or not at all
        except OSError:
            if not valid(target):  # not a concurrent writer's complete copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
