"""MLflow tracking for pipeline stages: a parent run per pipeline run, a child run per stage.

    tracker = Tracker("chart-demo")                  # URI: mmjobs.settings.tracking_uri()
    with tracker.start_run("pipeline", tags=default_tags("chart-demo", None)) as parent:
        tags = default_tags("chart-demo", "train", image=IMAGE, data_fingerprint=FP)
        with tracker.start_run("train", parent=parent, tags=tags) as run:
            run.log_params(cfg)                      # nested configs become dotted keys
            run.log_metrics({"loss": 0.7}, step=10)  # buffered, sent with log_batch
            run.log_figure(fig, "plots/loss.png")

**Outage-tolerant.** A job never dies or stalls because MLflow is down. Operations are
delivered in order; what cannot be delivered is spooled to disk (under
`mmjobs.settings.spool_dir()`, see `mmjobs.tracking_spool`) and retried on later calls, at most
one quick attempt every 2-30 s while the server is down. Runs started during an outage get a
local key (`RunHandle.ref == "spool:<key>"`) and are created, linked to their parent, when the
server is back. `end()` keeps trying for `end_timeout` seconds, then logs one line saying what
was flushed, or what is still pending and where; `flush_spool(path)` delivers it later. No
tracking call raises: failures are logged (one warning per outage) and the job carries on.

Delivery is synchronous, in the calling thread, and bounded: metrics are buffered and sent
every `flush_interval` seconds or `flush_every` metrics (checked on each call, so the tail of a
burst waits for the next call, `flush()` or `end()`), and a call spends at most ~1 s delivering
a backlog after an outage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mmjobs import settings
from mmjobs.logs import get_logger
from mmjobs.tracking_spool import (
    PARENT_TAG,
    URI_TAG,
    Outbox,
    RunQueue,
    SpoolFile,
    count_op,
    describe,
    load,
    new_key,
    spool_files,
)

__all__ = ["PARENT_TAG", "STAGE_TAG", "STEP_TAG", "URI_TAG", "RunHandle", "Tracker",
           "default_tags", "flatten_params", "flush_spool", "git_commit"]

log = get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250
MAX_DIGEST_LENGTH = 36  # MLflow's dataset digest column
FLUSH_HINT = "mmjobs tracking flush '{path}'"  # how a pending summary says to deliver
STAGE_TAG, STEP_TAG = "mmjobs.stage", "mmjobs.step"  # the stage type; the pipeline step
_KEY_BAD_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow accepts only these in param/metric names


def _fail_fast_http() -> None:
    """Make each MLflow HTTP request fail within seconds instead of minutes.

    MLflow retries a failed request 7 times with exponential backoff and waits up to 120 s per
    attempt, so one call against a dead server would block training for minutes. We retry from
    our own spool instead. `setdefault` keeps an operator's explicit choice (e.g. a longer
    timeout for large artifact uploads). MLflow reads both at each request.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _never_raises(fn: F) -> F:
    """Run a RunHandle method under the tracker lock; log and swallow any error."""

    @functools.wraps(fn)
    def wrapper(self: RunHandle, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._tracker._lock:
                return fn(self, *args, **kwargs)
        except Exception as e:  # tracking must never kill the job
            log.warning("tracking: %s for run %s failed and was skipped: %s", fn.__name__,
                        self.ref, e)
            return None

    return wrapper  # type: ignore[return-value]


class RunHandle:
    """One MLflow run. Methods return quickly and never raise. As a context manager it ends
    the run `FINISHED` on success and `FAILED` on an exception (which propagates)."""

    def __init__(self, tracker: Tracker, run: RunQueue, *,
                 ends_shared_parent: bool = False) -> None:
        self._tracker = tracker
        self._run = run
        self._metrics: list[list[Any]] = []  # buffered [key, value, timestamp_ms, step]
        self._last_send = time.monotonic()
        self._params: dict[str, str] = {}
        self._ended = False
        # Under a cluster run's shared parent, ending FAILED or KILLED ends the parent so too.
        self._ends_shared_parent = ends_shared_parent

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the run exists only in the spool."""
        return self._run.run_id

    @property
    def key(self) -> str:
        """The local key naming this run's spool file."""
        return self._run.key

    @property
    def ref(self) -> str:
        """The run id, or `spool:<key>` before the run exists (both work as `parent`)."""
        return self._run.run_id or f"spool:{self._run.key}"

    @property
    def spool_path(self) -> Path | None:
        """This run's spool file while it holds undelivered operations."""
        return self._run.spool.path if self._run.spool.is_open else None

    @_never_raises
    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log params: nested mappings, pydantic models and dataclasses are flattened to
        dotted keys, values stringified and cut to 6000 characters. MLflow params are
        immutable, so a changed value is skipped with a warning."""
        new = {}
        for key, value in flatten_params(params).items():
            if self._params.get(key, value) != value:
                log.warning("tracking: param %r is already %r; not changing it to %r", key,
                            self._params[key], value)
            elif key not in self._params:
                new[key] = self._params[key] = value
        for chunk in chunks(list(new.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self._submit({"op": "batch", "params": dict(chunk)})

    @_never_raises
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified, cut to 8000 characters)."""
        items = [(_clean_key(k), _clip(str(v), MAX_TAG_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._submit({"op": "batch", "tags": dict(chunk)})

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer metrics at `step` (default 0), timestamped now (not at delivery)."""
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            self._metrics.append([_clean_key(key), float(value), now_ms, int(step or 0)])
        tracker = self._tracker
        if (len(self._metrics) >= tracker.flush_every
                or time.monotonic() - self._last_send >= tracker.flush_interval):
            self._move_metrics()
            tracker._outbox.pump()

    @_never_raises
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib figure as the artifact `artifact_file` (e.g. `plots/loss.png`)."""
        path = self._tracker._scratch(artifact_file)
        figure.savefig(path)
        self._submit_owned(path, artifact_file)

    @_never_raises
    def log_text(self, text: str, artifact_file: str) -> None:
        """Save `text` as the artifact `artifact_file` (e.g. `config.yaml`)."""
        path = self._tracker._scratch(artifact_file)
        path.write_text(text, encoding="utf-8")
        self._submit_owned(path, artifact_file)

    @_never_raises
    def log_table(self, data: Any, artifact_file: str) -> None:
        """Log a table (dict of columns, list of row dicts or DataFrame) as an MLflow table
        artifact (`.json`, shown by the UI's artifact view). Cells must be JSON-serializable
        to survive an outage; logging to the same file again appends rows (MLflow's rule)."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        columns = {str(c): frame[c].tolist() for c in frame.columns}
        self._submit({"op": "table", "data": columns, "artifact_file": artifact_file})

    @_never_raises
    def log_dataset(self, *, name: str, uri: str, digest: str, context: str,
                    profile: Mapping[str, Any] | None = None) -> None:
        """Log the dataset at `uri` as an input of this run (the run page's Datasets, the
        runs table's Dataset column): `digest` identifies its contents (a fingerprint),
        `context` its role (`training`, `evaluation`), `profile` a few numbers (row counts)."""
        self._submit({"op": "inputs", "datasets": [{
            "name": name, "digest": digest[:MAX_DIGEST_LENGTH], "uri": uri, "context": context,
            "profile": dict(profile or {})}]})

    @_never_raises
    def log_model(self, *, name: str, uri: str, fingerprint: str, model_type: str,
                  params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, Any] | None = None) -> None:
        """Record the model at `uri` (in the store: nothing is copied) as an MLflow logged
        model made by this run (the run's Models column, the experiment's Models tab), tagged
        with its URI (`mmjobs.uri`) and `fingerprint` (`mmjobs.fingerprint`). A logged model
        with the same URI and fingerprint is linked again instead of duplicated (a re-run
        that reuses a committed output)."""
        self._submit({"op": "model", "name": _model_name(name), "uri": uri,
                      "experiment": self._tracker.experiment,
                      "fingerprint": fingerprint, "model_type": model_type,
                      "params": flatten_params(params or {}),
                      "tags": {_clean_key(k): _clip(str(v), MAX_TAG_LENGTH)
                               for k, v in (tags or {}).items()}})

    @_never_raises
    def log_artifact(self, local_path: str | os.PathLike[str],
                     artifact_path: str | None = None) -> None:
        """Log a file, or a directory as `artifact_path/<dir name>/...`. Copied into the spool
        if it cannot be delivered now, so the source may be deleted once this returns."""
        path = Path(local_path).resolve()
        if not path.exists():
            log.warning("tracking: artifact %s does not exist; skipped", path)
            return
        self._submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> str:
        """End the run (`FINISHED`, `FAILED` or `KILLED`), try to deliver everything pending
        for up to `end_timeout` seconds, log one summary line and return it. Ending again
        only returns the summary."""
        try:
            with self._tracker._lock:
                if not self._ended:
                    self._ended = True
                    op = {"op": "end", "status": status.upper(),
                          "end_time": int(time.time() * 1000)}
                    if op["status"] in ("FAILED", "KILLED") and self._ends_shared_parent:
                        op["end_shared_parent"] = True
                    self._submit(op, pump=False)
                    self._tracker._flush(self._tracker.end_timeout)
                line = self._summary()
        except Exception as e:  # tracking must never kill the job
            line = f"tracking: ending run {self.ref} failed: {e}"
        _log_summary(line)
        return line

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- internals, called under the tracker lock ------------------------------------------
    def _submit(self, op: dict[str, Any], *, pump: bool = True) -> None:
        self._move_metrics()  # metrics logged before this op are delivered before it
        self._run.enqueue(op)
        if pump:
            self._tracker._outbox.pump()

    def _submit_owned(self, path: Path, artifact_file: str) -> None:
        directory = os.path.dirname(artifact_file) or None
        self._submit({"op": "artifact", "path": str(path), "artifact_path": directory,
                      "owned": True})  # ours: moved (not copied) into the spool, then deleted

    def _move_metrics(self) -> None:
        rows, self._metrics = self._metrics, []
        self._last_send = time.monotonic()
        for chunk in chunks(rows, MAX_METRICS_PER_BATCH):
            self._run.enqueue({"op": "batch", "metrics": chunk})

    def _summary(self) -> str:
        return _summary(self._run, self._tracker._outbox, buffered=len(self._metrics))


class Tracker:
    """Starts runs in one MLflow experiment and delivers their operations.

    Args:
        experiment: experiment name; created if missing.
        tracking_uri: default `mmjobs.settings.tracking_uri()`: the embedded sqlite database,
            or `$MLFLOW_TRACKING_URI`.
        flush_interval: send buffered metrics once this many seconds passed since the last send.
        flush_every: ... or as soon as this many metrics are buffered (≤ 1000).
        end_timeout: how long `RunHandle.end()` and `close()` retry an unreachable server.
        spool_dir: default `mmjobs.settings.spool_dir()`.
    """

    def __init__(self, experiment: str, tracking_uri: str | None = None, *,
                 flush_interval: float = 5.0, flush_every: int = 1000, end_timeout: float = 30.0,
                 spool_dir: Path | None = None) -> None:
        _fail_fast_http()
        self.tracking_uri = tracking_uri or settings.tracking_uri()
        self.spool_dir = Path(spool_dir) if spool_dir else settings.spool_dir()
        self.flush_interval = flush_interval
        self.flush_every = min(flush_every, MAX_METRICS_PER_BATCH)
        self.end_timeout = end_timeout
        if self.tracking_uri.startswith("sqlite:///"):  # sqlite needs the directory to exist
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True)
        self._outbox = Outbox(self.tracking_uri, self.spool_dir, experiment)
        self._handles: list[RunHandle] = []
        self._lock = threading.RLock()  # trainers may log from callback threads
        self._scratch_dir: Path | None = None

    @property
    def experiment(self) -> str:
        return self._outbox.experiment

    def start_run(self, name: str, *, parent: RunHandle | str | None = None,
                  tags: Mapping[str, Any] | None = None,
                  shared_parent: Mapping[str, Any] | None = None) -> RunHandle:
        """Start a run named `name`, nested under `parent` (a handle, run id or `ref`), or
        under a cluster run's shared parent (`mmjobs.pipeline_parent`; found or made on
        delivery, also from the spool; a run under it that ends FAILED or KILLED ends it so)."""
        with self._lock:
            key = new_key()
            run = RunQueue(key, name, SpoolFile(self.spool_dir / f"{key}.jsonl"))
            op: dict[str, Any] = {
                "op": "create", "name": name, "experiment": self.experiment,
                "start_time": int(time.time() * 1000),
                "tags": {_clean_key(k): _clip(str(v), MAX_TAG_LENGTH)
                         for k, v in (tags or {}).items()},
            }
            ref = parent.ref if isinstance(parent, RunHandle) else parent
            if shared_parent:
                op["shared_parent"] = dict(shared_parent)
            elif ref:
                is_key = ref.startswith("spool:")
                op["parent_key" if is_key else "parent_run_id"] = ref.removeprefix("spool:")
            run.enqueue(op)
            self._outbox.runs.append(run)
            handle = RunHandle(self, run, ends_shared_parent=bool(shared_parent))
            self._handles.append(handle)
            try:
                self._outbox.pump()
            except Exception as e:  # tracking must never kill the job
                log.warning("tracking: starting run %s: %s", name, e)
            return handle

    def flush(self, timeout: float = 0.0) -> bool:
        """Send buffered metrics and retry pending operations for up to `timeout` seconds.
        Returns True when nothing is pending."""
        with self._lock:
            return self._flush(timeout)

    def close(self, timeout: float | None = None) -> str:
        """Flush (up to `timeout`, default `end_timeout`), release spool files for
        `flush_spool`, log one summary line and return it. Runs are not ended."""
        with self._lock:
            try:
                self._flush(self.end_timeout if timeout is None else timeout)
                lines = [_summary(r, self._outbox) for r in self._outbox.runs
                         if r.recovered or r.rejected or r.queue]
            except Exception as e:  # tracking must never kill the job
                lines = [f"tracking: close failed: {e}"]
            for run in self._outbox.runs:
                run.spool.release()
            if self._scratch_dir:
                shutil.rmtree(self._scratch_dir, ignore_errors=True)
                self._scratch_dir = None
            line = "; ".join(lines) or "tracking: all delivered"
            _log_summary(line)
            return line

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _flush(self, timeout: float) -> bool:
        for handle in self._handles:
            handle._move_metrics()
        return self._outbox.flush(timeout)

    def _scratch(self, artifact_file: str) -> Path:
        """A fresh local path named like `artifact_file`, for rendering figures and text."""
        if self._scratch_dir is None:
            self._scratch_dir = Path(tempfile.mkdtemp(prefix="mmjobs-tracking-"))
        path = self._scratch_dir / uuid.uuid4().hex / os.path.basename(artifact_file)
        path.parent.mkdir(parents=True)
        return path


def _summary(run: RunQueue, outbox: Outbox, buffered: int = 0) -> str:
    """The one line a run's end reports: delivered, flushed after an outage, or pending."""
    pending: Counter[str] = Counter(metric=buffered)
    for op in run.queue:
        pending.update(count_op(op))
    rejected = f" ({describe(run.rejected)} rejected by MLflow)" if run.rejected else ""
    ref = run.run_id or f"spool:{run.key}"
    if +pending:
        why = (f"MLflow at {outbox.tracking_uri} unreachable" if outbox.down_since is not None
               else "its parent run is not created yet")
        where = (f"spool: {run.spool.path}; deliver later with "
                 + FLUSH_HINT.format(path=run.spool.path) if run.spool.is_open
                 else "held in memory only (spool not writable); lost when the job exits")
        return f"tracking: {describe(pending)} still pending for run {ref} ({why}); {where}"
    if run.recovered:
        return f"tracking: flushed {describe(run.recovered)} for run {ref} after outage{rejected}"
    return f"tracking: all delivered for run {ref}{rejected}"


def _log_summary(line: str) -> None:
    bad = any(word in line for word in ("still pending", "failed", "rejected"))
    (log.warning if bad else log.info)("%s", line)


def flush_spool(path: str | os.PathLike[str], tracking_uri: str | None = None, *,
                timeout: float = 30.0) -> str:
    """Deliver spooled operations from a spool file or directory (default place:
    `mmjobs.settings.spool_dir()`); log and return one summary line. Files locked by a
    running job are skipped. `tracking_uri` overrides the URI recorded in each file."""
    path = Path(path)
    adopted, skipped = [], 0
    for file in spool_files(path) if path.exists() else []:
        spool = SpoolFile(file)
        if not spool.try_adopt():
            skipped += 1
            continue
        try:
            header, ops = load(file)
        except (OSError, ValueError, KeyError) as e:
            log.warning("tracking: cannot read %s: %s", file, e)
            spool.release()
            continue
        adopted.append((header.get("created_ns", 0), file.name, spool, header, ops))
    trackers: dict[str, Tracker] = {}
    for *_, spool, header, ops in sorted(adopted, key=lambda a: a[:2]):  # parents first
        uri = tracking_uri or header["tracking_uri"]
        if uri not in trackers:
            trackers[uri] = Tracker(header["experiment"], uri, spool_dir=spool.path.parent,
                                    end_timeout=timeout)
        trackers[uri]._outbox.adopt(spool, header, ops)
    lines = [t.close() for t in trackers.values()]
    if skipped:
        lines.append(f"tracking: skipped {skipped} spool file(s) in use by a running job")
    return "; ".join(lines) or f"tracking: nothing to flush at {path}"


def default_tags(recipe: str | None, stage: str | None, image: str | None = None,
                 data_fingerprint: str | None = None, step: str | None = None) -> dict[str, str]:
    """Standard run tags: `recipe`, `mmjobs.stage` (the stage type), `mmjobs.step` (the
    pipeline step it runs as), `image`, `data_fingerprint` (those given) and the git commit of
    the code as `mlflow.source.git.commit` (when known)."""
    tags = {"recipe": recipe, STAGE_TAG: stage, STEP_TAG: step, "image": image,
            "data_fingerprint": data_fingerprint, "mlflow.source.git.commit": git_commit()}
    return {k: v for k, v in tags.items() if v}


def git_commit() -> str | None:
    """`$MMJOBS_GIT_COMMIT` (images have no .git, so builds set it), else `git rev-parse HEAD`
    next to this package; None if neither works."""
    return os.environ.get("MMJOBS_GIT_COMMIT") or _git_head()


@functools.cache  # one subprocess per process, not one per run
def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings, pydantic models, dataclasses and lists of those into
    `{"a.b.0.c": "value"}`: values stringified (≤ 6000 chars), keys made MLflow-safe."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    elif dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if isinstance(params, Mapping) and (params or not prefix):
        items: Any = params.items()
    elif isinstance(params, list | tuple) and any(
            isinstance(v, Mapping) or hasattr(v, "model_dump") for v in params):
        items = enumerate(params)
    else:
        return {_clean_key(prefix): _clip(str(params), MAX_PARAM_LENGTH)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _model_name(name: str) -> str:
    """A logged model name MLflow accepts (no `/ : . % " '`)."""
    return re.sub(r"[/:.%\"']", "-", name) or "model"


def _clean_key(key: str) -> str:
    return _KEY_BAD_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 14] + "...[truncated]"


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in lists of at most `size` (MLflow's per-request limits)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
