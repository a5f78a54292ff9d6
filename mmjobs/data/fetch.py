"""Fetch public sources: HTTP(S) files (resumable, verified) and Hugging Face hub snapshots.

    got = download("https://host/data.tar.gz", work / "data.tar.gz", sha256="9f2c...")
    commit = resolve_hub_revision("org/name", "model", "main")
    hub_snapshot("org/name", "model", commit, scratch, include=["*.json", "*.safetensors"])

**HTTP.** Bytes go to `<dest>.part` first; the file appears under its name only when it is
complete (length as announced) and, when a sha256 is given, matches it. A broken transfer is
resumed with `Range: bytes=<have>-` (guarded by `If-Range` with the server's ETag or
Last-Modified, so a file that changed on the server is fetched again whole instead of being
spliced). Connection errors, timeouts, short bodies, 408/425/429 and 5xx are retried with
backoff; other HTTP errors fail at once. A `.part` left by a failed run is resumed by the next
call for the same URL and destination.

**Hub.** `huggingface_hub.snapshot_download`, pinned to a commit sha that `resolve_hub_revision`
resolves first, so what is recorded is exactly what was downloaded. The token comes from
`HF_TOKEN` in the environment (a Kubernetes Secret on clusters), never from a config. With
`HF_HUB_OFFLINE=1` the snapshot comes from the local hub cache (`HF_HUB_CACHE`, else
`$HF_HOME/hub`) and the network is never touched.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmjobs import __version__, storage
from mmjobs.logs import get_logger

log = get_logger(__name__)
_CHUNK = 1 << 20
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# A transfer that keeps making progress is not a failure to give up on, but a server that
# dribbles one byte per connection must still end: total attempts are capped at this many times
# the attempts allowed without progress.
_PROGRESS_ATTEMPT_FACTOR = 10


class FetchError(RuntimeError):
    """A download or hub fetch failed; the message names the source and what to do."""


class ChecksumError(FetchError):
    """The downloaded bytes do not match the expected sha256 (the file is deleted)."""


class SizeLimitError(FetchError):
    """The download is larger than the allowed `max_bytes`."""


@dataclass(frozen=True)
class Download:
    """A completed download: where it is, its size and sha256, and how it went."""

    path: Path
    size: int
    sha256: str
    attempts: int
    resumed: bool
    validator: str | None  # the server's ETag or Last-Modified, if it sent one


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""


# --------------------------------------------------------------------------- HTTP


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None,
             max_bytes: int | None = None, retries: int = 5, timeout: float = 60.0,
             backoff: float = 0.5, bytes_option: str = "max_bytes") -> Download:
    """Download `url` to `dest`, resuming a partial `.part` file with HTTP Range requests.

    Args:
        url: an http:// or https:// URL.
        dest: the local file to create (its folder is created).
        sha256: expected hex digest; on a mismatch the bytes are deleted and `ChecksumError`
            raised (after one fresh re-download if the mismatching file was pieced together
            from resumed parts).
        max_bytes: refuse a file larger than this (announced or actually received).
        retries: attempts in a row that add no bytes before giving up.
        timeout: seconds a connect or a read may stall.
        backoff: delay before retrying after progress; doubled per attempt without progress
            (capped at 30 s).
        bytes_option: the caller's setting for `max_bytes`, named in the error that hits it.

    Raises:
        FetchError: an HTTP error that retrying will not fix, or retries exhausted (the
            `.part` file is kept, so calling again resumes).
        ChecksumError, SizeLimitError: see above.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    sidecar = dest.with_name(dest.name + ".part.json")
    for fresh in (False, True):
        got = _transfer(url, part, sidecar, _Limit(max_bytes, bytes_option), retries, timeout,
                        backoff)
        digest = storage.sha256_file(part)
        if sha256 is None or digest == sha256.lower():
            os.replace(part, dest)
            sidecar.unlink(missing_ok=True)
            return Download(dest, dest.stat().st_size, digest, got.attempts, got.resumed,
                            got.validator)
        part.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        if not got.resumed or fresh:
            raise ChecksumError(f"{url}: sha256 of the downloaded file is {digest}, expected "
                                f"{sha256.lower()}; the file was deleted. Check the sha256 (and "
                                "that the URL serves the file you mean)")
        # Pieced together from several responses: a server that changed the file without
        # ETag/Last-Modified would make a spliced mix; one clean re-download settles it.
        log.warning("%s: sha256 mismatch after a resumed download; downloading it again whole",
                    url)
    raise AssertionError("unreachable")


@dataclass
class _Progress:
    attempts: int = 0
    resumed: bool = False
    validator: str | None = None


@dataclass(frozen=True)
class _Limit:
    """`max_bytes`, and the option that sets it (named when the limit is hit)."""

    bytes: int | None
    option: str

    def check(self, url: str, size: int, what: str) -> None:
        if self.bytes is not None and size > self.bytes:
            raise SizeLimitError(f"{url}: {what} {size:,} bytes, over the limit of "
                                 f"{self.bytes:,} bytes; raise {self.option} if the file is "
                                 "genuine")


def _transfer(url: str, part: Path, sidecar: Path, limit: _Limit, retries: int,
              timeout: float, backoff: float) -> _Progress:
    """Fill `part` with the whole body of `url`, resuming and retrying; see `download`."""
    state = _Progress(validator=_read_sidecar(sidecar, url))
    if state.validator is None:  # a .part we cannot vouch for is not resumed
        part.unlink(missing_ok=True)
    idle = 0  # attempts in a row that added no bytes
    best = part.stat().st_size if part.exists() else 0
    last_error = "no attempt made"
    while idle < retries and state.attempts < retries * _PROGRESS_ATTEMPT_FACTOR:
        state.attempts += 1
        try:
            _attempt(url, part, sidecar, limit, timeout, state)
            return state
        except _Retry as e:
            last_error = str(e)
        have = part.stat().st_size if part.exists() else 0
        idle = 0 if have > best else idle + 1
        best = max(best, have)
        if idle < retries:
            # Backoff grows only while nothing arrives: after progress, resume at once-ish.
            delay = min(30.0, backoff * 2 ** idle)
            log.info("%s: attempt %d failed (%s); %d bytes so far, retrying in %.1fs", url,
                     state.attempts, last_error, have, delay)
            time.sleep(delay)
    have = part.stat().st_size if part.exists() else 0
    raise FetchError(f"{url}: download failed after {state.attempts} attempts (last: "
                     f"{last_error}); {have} bytes are kept in {part} and the next run resumes "
                     "from there")


def _attempt(url: str, part: Path, sidecar: Path, limit: _Limit, timeout: float,
             state: _Progress) -> None:
    """One request: append to `part` (206) or rewrite it (200). Raises `_Retry` if worth it."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"mmjobs/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if state.validator:
            headers["If-Range"] = state.validator
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            total = _range_total(e.headers.get("Content-Range"))
            if total == have:  # the previous attempt got everything but did not finish up
                return
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for a range from byte {have}; restarting") from e
        if e.code in _RETRY_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        hint = " (a private file? mmjobs sends no credentials)" if e.code in (401, 403) else ""
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {have}; restarting")
            mode, state.resumed = "ab", True
        else:  # 200: the whole body (no Range support, or the file changed: If-Range failed)
            length = resp.headers.get("Content-Length")
            total, have, mode = (int(length) if length else None), 0, "wb"
        state.validator = _validator(resp.headers) or (state.validator if mode == "ab" else None)
        _write_sidecar(sidecar, url, state.validator)
        if total is not None:
            limit.check(url, total, "the file is")
        size = _stream(resp, part, mode, have, url, limit)
    if total is not None and size != total:
        raise _Retry(f"connection closed after {size} of {total} bytes")


def _stream(resp: http.client.HTTPResponse, part: Path, mode: str, have: int, url: str,
            limit: _Limit) -> int:
    """Append the body to `part`; returns the file size reached (also on a broken stream)."""
    size = have
    with open(part, mode) as f:
        try:
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                limit.check(url, size, "received more than")
                f.write(chunk)
        except (OSError, http.client.HTTPException) as e:
            f.flush()  # keep what arrived: the next attempt resumes after it
            raise _Retry(f"{type(e).__name__} after {size} bytes: {e}") from e
    return size


def _validator(headers: http.client.HTTPMessage) -> str | None:
    """A validator usable in If-Range: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _content_range(value: str | None) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise _Retry(f"206 response with unusable Content-Range {value!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _range_total(value: str | None) -> int | None:
    match = re.match(r"bytes\s+\*/(\d+)", value or "")
    return int(match.group(1)) if match else None


def _read_sidecar(sidecar: Path, url: str) -> str | None:
    """The validator saved with a `.part` for this URL ('' if the server sent none)."""
    try:
        saved = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return (saved.get("validator") or "") if saved.get("url") == url else None


def _write_sidecar(sidecar: Path, url: str, validator: str | None) -> None:
    sidecar.write_text(json.dumps({"url": url, "validator": validator or ""}))


# --------------------------------------------------------------------------- Hugging Face hub


def hub_offline() -> bool:
    """True if hub access is disabled (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`).

    Read at call time: huggingface_hub reads it once, at import. (Same rule as
    `mmjobs.models.builder`, which this module does not import: that pulls in torch.)
    """
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cache() -> str | None:
    # huggingface_hub fixes its cache path at import; honour the environment of this call.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def resolve_hub_revision(repo_id: str, repo_type: str, revision: str) -> str:
    """The commit sha that `revision` (branch, tag or sha) of a hub repo points to now.

    Offline, the local hub cache answers (its `refs/<revision>`); online, the hub's API.

    Raises:
        FetchError: no such repo or revision, access denied, or offline and not cached.
    """
    if _COMMIT_SHA.match(revision):
        return revision
    where = f"hf://{repo_id} ({repo_type}, revision {revision})"
    if hub_offline():
        return Path(_cached_snapshot(repo_id, repo_type, revision, where)).name
    from huggingface_hub import HfApi

    with _hub_errors(where):
        sha = HfApi(token=_token()).repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    if not sha:
        raise FetchError(f"{where}: the hub did not report a commit sha")
    return sha


def hub_snapshot(repo_id: str, repo_type: str, commit: str, dest: Path, *,
                 include: list[str] | None = None, exclude: list[str] | None = None) -> int:
    """Put the files of a hub repo at `commit` (a sha) into the empty folder `dest`.

    `include`/`exclude` are glob patterns (`allow_patterns`/`ignore_patterns`). Returns the
    number of files.

    Raises:
        FetchError: the snapshot cannot be fetched, or no file matched the patterns.
    """
    where = f"hf://{repo_id} ({repo_type}, commit {commit})"
    if hub_offline():
        from huggingface_hub.utils import filter_repo_objects

        snapshot = Path(_cached_snapshot(repo_id, repo_type, commit, where))
        names = [p.relative_to(snapshot).as_posix() for p in sorted(snapshot.rglob("*"))
                 if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=include, ignore_patterns=exclude):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / name, dest / name)  # follows the cache's blob symlinks
    else:
        from huggingface_hub import snapshot_download

        log.info("downloading %s from the Hugging Face hub", where)
        with _hub_errors(where):
            snapshot_download(repo_id, repo_type=repo_type, revision=commit, local_dir=dest,
                              allow_patterns=include, ignore_patterns=exclude, token=_token())
        # local_dir downloads keep bookkeeping in .cache/huggingface: not part of the repo.
        shutil.rmtree(dest / ".cache" / "huggingface", ignore_errors=True)
        if (dest / ".cache").is_dir() and not any((dest / ".cache").iterdir()):
            (dest / ".cache").rmdir()
    reserved = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                      if p.name in storage.RESERVED_NAMES)
    if reserved:
        raise FetchError(f"{where}: the repo has a file {reserved[0]!r}, a name the store "
                         "reserves (it marks a committed directory); leave it out with "
                         f"exclude (mmjobs import --exclude {reserved[0]!r})")
    count = sum(1 for p in dest.rglob("*") if p.is_file())
    if not count:
        raise FetchError(f"{where}: no files (include={include}, exclude={exclude}); check the "
                         "patterns against the repo's file list")
    return count


def _cached_snapshot(repo_id: str, repo_type: str, revision: str, where: str) -> str:
    from huggingface_hub import snapshot_download

    with _hub_errors(where):
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                 cache_dir=_hub_cache(), local_files_only=True)


@contextlib.contextmanager
def _hub_errors(where: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into `FetchError`s that say what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError as e:  # before RepositoryNotFoundError: it subclasses it
        raise FetchError(f"{where}: the repo is gated; accept its terms on the hub and set "
                         "HF_TOKEN (from a Kubernetes Secret on clusters)") from e
    except errors.RepositoryNotFoundError as e:
        raise FetchError(f"{where}: no such repo on the hub, or it is private and HF_TOKEN is "
                         "unset or lacks access (for a dataset, set repo_type=dataset)") from e
    except errors.RevisionNotFoundError as e:
        raise FetchError(f"{where}: the repo has no such revision (branch, tag or commit)") from e
    except errors.LocalEntryNotFoundError as e:
        cache = _hub_cache() or "the default hub cache"
        raise FetchError(f"{where}: not in the local hub cache ({cache}) and hub access is "
                         "disabled (HF_HUB_OFFLINE=1) or failed; fill the cache or allow network "
                         "access") from e
    except Exception as e:
        # huggingface_hub lets its HTTP client's errors through (httpx2 in 1.x/2.x, requests
        # before): recognise them by module rather than pin one client library.
        client = type(e).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"}
        if not (client or isinstance(e, errors.HfHubHTTPError | OSError)):
            raise
        raise FetchError(f"{where}: the hub request failed ({type(e).__name__}: {e}); check the "
                         "network and HF_TOKEN, or set HF_HUB_OFFLINE=1 to use the local hub "
                         "cache") from e
