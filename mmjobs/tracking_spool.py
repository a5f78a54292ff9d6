"""The on-disk spool that holds MLflow tracking operations while the server is unreachable.

One JSONL file per run, `<spool_dir>/<key>.jsonl`:

- line 1, the header: `{"spool": 1, "key", "run_id" (null if the run was never created),
  "name", "experiment", "tracking_uri", "created_ns"}`;
- then operations in the order they were made, each with a per-run `seq`: `create`, `batch`
  (metrics/params/tags), `artifact`, `table`, `end`;
- and `{"ack": seq}` lines appended as operations are delivered (a `create` ack carries the
  new `run_id`). Acks make a flush resumable: a crash re-sends at most one operation, and the
  server tolerates that (duplicate metrics are ignored, equal params and tags are no-ops).

Artifacts are copied into `<key>.artifacts/<seq>/` when spooled, so deleting the source later
loses nothing. `_index.jsonl` maps the keys of runs created from the spool to their run ids, so
a child spooled before its parent existed can still be linked by a later `flush_spool`.

A process holds an exclusive `flock` on each spool file it writes; `flush_spool` skips locked
files (their job is still running and will deliver them itself).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mmjobs.logs import get_logger

log = get_logger(__name__)
INDEX_NAME = "_index.jsonl"
SPOOL_VERSION = 1


def new_key() -> str:
    """A spool key for a run: readable creation time plus a random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` later can succeed (server down, 5xx, timeouts, locked database).

    Requests the server understood and refused (400 bad value, 404 missing run, 409 conflict)
    and local errors (missing file, bad data) will fail the same way again, so they are dropped.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() not in (400, 404, 409)
    response = getattr(exc, "response", None)  # requests.HTTPError from artifact uploads
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status not in (400, 404, 409, 413)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    # requests' and sqlalchemy's network/lock errors do not derive from the builtins above.
    return type(exc).__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout",
                                  "ChunkedEncodingError", "OperationalError", "RetryError")


class SpoolFile:
    """One run's spooled operations: append ops and acks, lock, copy artifacts, remove."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.artifacts_dir = path.with_suffix(".artifacts")
        self._fh: Any = None

    @property
    def exists(self) -> bool:
        return self._fh is not None

    def open_new(self, header: dict[str, Any]) -> None:
        """Create the file with `header` and take the lock (a previous file is replaced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fh.truncate(0)
        self._write({"spool": SPOOL_VERSION, **header})

    def try_adopt(self) -> bool:
        """Lock an existing file for flushing; False if another live process holds it."""
        try:
            fh = self.path.open("a", encoding="utf-8")
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        if os.fstat(fh.fileno()).st_nlink == 0:  # removed by its writer while we waited
            fh.close()
            return False
        self._fh = fh
        return True

    def append(self, op: dict[str, Any]) -> None:
        """Write `op`; an artifact op's file is first copied (or moved, if ours) into the spool."""
        if op["op"] == "artifact" and not op.get("_in_spool"):
            src = Path(op["path"])
            dest = self.artifacts_dir / str(op["seq"]) / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if op.get("owned"):
                shutil.move(src, dest)
            elif src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dest)
            op["path"] = str(dest.relative_to(self.path.parent))
            op["_in_spool"] = True
        self._write({k: v for k, v in op.items() if not k.startswith("_")})
        op["_spooled"] = True

    def ack(self, op: dict[str, Any], run_id: str | None = None) -> None:
        """Record that `op` was delivered; drop its spooled artifact copy."""
        entry: dict[str, Any] = {"ack": op["seq"]}
        if run_id:
            entry["run_id"] = run_id
        self._write(entry)
        if op["op"] == "artifact":
            shutil.rmtree(self.artifacts_dir / str(op["seq"]), ignore_errors=True)

    def resolve(self, op: dict[str, Any]) -> Path:
        """Local path of an artifact op (inside the spool once spooled)."""
        return self.path.parent / op["path"] if op.get("_in_spool") else Path(op["path"])

    def remove(self) -> None:
        """Delete the file and its artifact copies (everything was delivered), then unlock."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.artifacts_dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Unlock without deleting (what is still pending stays for `flush_spool`)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _write(self, record: dict[str, Any]) -> None:
        # default=str: table cells and params may hold numpy scalars, Paths, dates.
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a spool file: its header (with `run_id` filled from a create ack) and pending ops."""
    header: dict[str, Any] = {}
    ops: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: nothing after it counts
                log.warning("tracking: %s line %d is truncated; ignoring the rest", path, n + 1)
                break
            if n == 0:
                header = record
            elif "ack" in record:
                ops.pop(record["ack"], None)
                if record.get("run_id"):
                    header["run_id"] = record["run_id"]
            else:
                ops[record["seq"]] = {**record, "_spooled": True,
                                      "_in_spool": record["op"] == "artifact"}
    if header.get("spool") != SPOOL_VERSION:
        raise ValueError(f"{path} is not an mmjobs tracking spool file (version 1)")
    return header, [ops[s] for s in sorted(ops)]


def spool_files(path: Path) -> list[Path]:
    """The spool files at `path` (a file, or every run file in a directory)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.jsonl") if p.name != INDEX_NAME)


def read_index(spool_dir: Path) -> dict[str, str]:
    """Spool key → MLflow run id for runs created from the spool."""
    index: dict[str, str] = {}
    path = spool_dir / INDEX_NAME
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                index[entry["key"]] = entry["run_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return index


def add_to_index(spool_dir: Path, key: str, run_id: str) -> None:
    """Remember that the run spooled as `key` now exists as `run_id`."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    with (spool_dir / INDEX_NAME).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"key": key, "run_id": run_id}) + "\n")
