"""The delivery engine behind `mmjobs.tracking`: in-order queues, the on-disk spool, retries.

Every tracking operation of a run goes into that run's queue (`RunQueue`) and `Outbox.pump`
delivers queues in order. What cannot be delivered (server down, or a child whose parent run
does not exist yet) is appended to the run's spool file and retried later; while the server is
down, at most one quick attempt is made every 2-30 s (exponential backoff).

Spool file, one per run, `<spool_dir>/<key>.jsonl`:

- line 1, the header: `{"spool": 1, "key", "run_id" (null if the run was not created yet),
  "name", "experiment", "tracking_uri", "created_ns"}`;
- operations in the order they were made, each with a per-run `seq`: `create`, `batch`
  (metrics/params/tags), `artifact`, `table`, `inputs` (dataset inputs), `model` (a logged
  model entry pointing at a store URI), `end`;
- `{"ack": seq}` lines appended as operations are delivered (a `create` ack carries the new
  `run_id`). Acks make a flush resumable: a crash re-sends at most one operation, which the
  server tolerates (duplicate metrics are ignored, equal params and tags are no-ops).

Artifacts are copied into `<key>.artifacts/<seq>/` when spooled, so deleting the source later
loses nothing. `_index.jsonl` maps the keys of runs created from the spool to their run ids, so
a child spooled before its parent existed can be linked by a later `flush_spool`. A process
holds an exclusive `flock` on each spool file it writes; `flush_spool` skips locked files.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from mmjobs import settings
from mmjobs.logs import get_logger

log = get_logger("mmjobs.tracking")  # users see one logger for tracking
INDEX_NAME = "_index.jsonl"
SPOOL_VERSION = 1
PARENT_TAG = "mlflow.parentRunId"
URI_TAG, FINGERPRINT_TAG = "mmjobs.uri", "mmjobs.fingerprint"  # of a logged model
# MLflow 3's UI opens an experiment without this tag as a GenAI app (traces, judges); with it,
# as model training (runs, charts, models): what these experiments are.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
FIRST_RETRY_S, MAX_RETRY_S = 2.0, 30.0  # backoff between attempts while the server is down
CALL_BUDGET_S = 1.0  # longest a logging call spends delivering a backlog


def new_key() -> str:
    """A spool key for a run: readable creation time plus a random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` later can succeed (server down, 5xx, timeouts, locked database).

    Requests the server understood and refused (400 bad value, 404 missing run, 409 conflict)
    and local errors (missing file, bad data) fail the same way again, so they are dropped.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # A bare 404 (no MLflow error body) means a proxy without its backend, not a bad request.
        return (exc.error_code == "ENDPOINT_NOT_FOUND"
                or exc.get_http_status_code() not in (400, 404, 409))
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError
    if isinstance(status, int):
        return status not in (400, 404, 409, 413)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    # requests' and sqlalchemy's network/lock errors do not derive from the builtins above.
    return type(exc).__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout",
                                  "ChunkedEncodingError", "OperationalError", "RetryError")


def count_op(op: dict[str, Any]) -> Counter[str]:
    """What an op carries, for summaries: `Counter(metric=120, param=3)`, `{"run end": 1}`."""
    if op["op"] == "batch":
        return Counter(metric=len(op.get("metrics", [])), param=len(op.get("params", {})),
                       tag=len(op.get("tags", {})))
    if op["op"] == "inputs":
        return Counter(dataset=len(op.get("datasets", [])))
    nouns = {"create": "run start", "end": "run end", "model": "model"}
    return Counter({nouns.get(op["op"], "artifact"): 1})


def describe(counts: Counter[str]) -> str:
    """`Counter(metric=120, param=3, **{"run end": 1})` → `120 metrics, 3 params, run end`."""
    parts = []
    for noun in ("metric", "param", "tag", "artifact", "dataset", "model", "run start",
                 "run end"):
        n = counts.get(noun, 0)
        if n:
            parts.append(noun if noun.startswith("run ") else f"{n} {noun}{'s' * (n != 1)}")
    return ", ".join(parts)


class SpoolFile:
    """One run's spooled operations: append ops and acks, lock, copy artifacts, remove."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.artifacts_dir = path.with_suffix(".artifacts")
        self._fh: Any = None

    @property
    def is_open(self) -> bool:
        return self._fh is not None

    def open(self, header: dict[str, Any]) -> None:
        """Open for appending and lock; a new file starts with `header`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise
        self._fh = fh
        if fh.tell() == 0:
            self._write({"spool": SPOOL_VERSION, **header})

    def try_adopt(self) -> bool:
        """Lock an existing file for flushing; False if a live process holds it."""
        try:
            fh = self.path.open("a", encoding="utf-8")
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        if os.fstat(fh.fileno()).st_nlink == 0:  # its writer removed it meanwhile
            fh.close()
            return False
        self._fh = fh
        return True

    def append(self, op: dict[str, Any]) -> None:
        """Write `op`; an artifact's file is first copied (or moved, if ours) into the spool."""
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
            op["path"], op["_in_spool"] = str(dest.relative_to(self.path.parent)), True
        self._write({k: v for k, v in op.items() if not k.startswith("_")})
        op["_spooled"] = True

    def ack(self, op: dict[str, Any], run_id: str | None = None) -> None:
        """Record that `op` was delivered (or dropped); delete its artifact copy."""
        self._write({"ack": op["seq"], **({"run_id": run_id} if run_id else {})})
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
        """Unlock without deleting: what is still pending stays for `flush_spool`."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _write(self, record: dict[str, Any]) -> None:
        # default=str: table cells and params may hold numpy scalars, Paths, dates.
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a spool file: its header (`run_id` filled in from a create ack) and pending ops."""
    header: dict[str, Any] = {}
    ops: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: nothing follows it
                log.warning("tracking: %s line %d is truncated; ignoring the rest", path, n + 1)
                break
            if n == 0:
                header = record
            elif "ack" in record:
                ops.pop(record["ack"], None)
                header["run_id"] = record.get("run_id") or header.get("run_id")
            else:
                ops[record["seq"]] = {**record, "_spooled": True,
                                      "_in_spool": record["op"] == "artifact"}
    if header.get("spool") != SPOOL_VERSION:
        raise ValueError(f"{path} is not an mmjobs tracking spool file (version 1)")
    return header, [ops[s] for s in sorted(ops)]


def _dataset_input(spec: dict[str, Any]) -> Any:
    """An MLflow dataset input from an `inputs` op's entry (a store URI and its fingerprint)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "s3" if spec["uri"].startswith("s3://") else "local"
    dataset = Dataset(spec["name"], spec["digest"], source_type, json.dumps({"uri": spec["uri"]}),
                      profile=json.dumps(spec.get("profile") or {}))
    return DatasetInput(dataset, [InputTag("mlflow.data.context", spec["context"])])


def spool_files(path: Path) -> list[Path]:
    """The spool files at `path` (a file, or every run file in a directory)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.jsonl") if p.name != INDEX_NAME)


def read_index(spool_dir: Path) -> dict[str, str]:
    """Spool key → MLflow run id, for runs created from the spool."""
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


@dataclasses.dataclass(eq=False)
class RunQueue:
    """One run's undelivered operations, in order, and what happened to them."""

    key: str
    name: str
    spool: SpoolFile
    run_id: str | None = None  # None until the run exists on the server
    queue: deque[dict[str, Any]] = dataclasses.field(default_factory=deque)
    seq: int = 0
    recovered: Counter[str] = dataclasses.field(default_factory=Counter)  # spooled, delivered
    rejected: Counter[str] = dataclasses.field(default_factory=Counter)  # refused; dropped

    def enqueue(self, op: dict[str, Any]) -> None:
        op["seq"] = self.seq
        self.seq += 1
        self.queue.append(op)


class _Blocked(Exception):
    """A child run cannot be created yet: its parent does not exist on the server yet."""


class Outbox:
    """Delivers the queues of all runs of one tracking URI. Not thread-safe: the caller locks."""

    def __init__(self, tracking_uri: str, spool_dir: Path, experiment: str) -> None:
        self.tracking_uri, self.spool_dir, self.experiment = tracking_uri, spool_dir, experiment
        self.runs: list[RunQueue] = []  # creation order, so parents come before children
        self.down_since: float | None = None
        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._next_try = 0.0
        self._delay = FIRST_RETRY_S
        self._spool_warned = False

    @property
    def client(self) -> Any:
        # Created on first use: a local database is opened (and migrated) right away, and a
        # failure there must be spooled like any other, not raised from Tracker().
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def pending(self) -> bool:
        return any(r.queue for r in self.runs)

    def flush(self, timeout: float) -> bool:
        """Deliver everything, retrying an unreachable server for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.pump(force=True):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.down_since is None:  # out of time, or only blocked
                return False
            time.sleep(min(1.0, remaining))
        return True

    def pump(self, *, force: bool = False) -> bool:
        """Deliver queued ops in order; spool what cannot go now. True if nothing is pending.
        Without `force`, respect the outage backoff and spend at most `CALL_BUDGET_S`."""
        start = time.monotonic()
        if self.down_since is not None and not force and start < self._next_try:
            return self._spill()
        progress = True
        while progress:  # a blocked child can go once a later-listed parent is created
            progress = False
            for run in self.runs:
                while run.queue:
                    if not force and time.monotonic() - start > CALL_BUDGET_S:
                        return self._spill()
                    op, new_id = run.queue[0], None
                    try:
                        new_id = self._deliver(run, op)
                    except _Blocked:
                        break
                    except Exception as e:
                        if is_transient(e):
                            self._outage(e)
                            return self._spill()
                        log.warning("tracking: %s for run %s rejected by MLflow; dropped: %s",
                                    op["op"], run.run_id or run.key, str(e)[:300])
                        run.rejected.update(count_op(op))
                    else:
                        self._back_up()
                        if op.get("_spooled"):
                            run.recovered.update(count_op(op))
                    if op.get("_spooled"):
                        self._ack(run, op, new_id)
                    run.queue.popleft()
                    progress = True
                if not run.queue and run.spool.is_open:
                    run.spool.remove()
        return self._spill()

    def adopt(self, spool: SpoolFile, header: dict[str, Any], ops: list[dict[str, Any]]) -> None:
        """Take over a spool file's pending ops (for `flush_spool`)."""
        run = RunQueue(header["key"], header.get("name") or "", spool, header.get("run_id"),
                       deque(ops), max((op["seq"] for op in ops), default=-1) + 1)
        self.runs.append(run)

    def _deliver(self, run: RunQueue, op: dict[str, Any]) -> str | None:
        """Send one op; returns the new run id for `create`. Raises what MLflow raises."""
        kind, client = op["op"], self.client
        if kind == "create":
            parent = op.get("parent_run_id") or self._resolve(op.get("parent_key"))
            if op.get("shared_parent"):  # a cluster step: the KFP job's parent, found or made
                from mmjobs.pipeline_parent import find_or_create

                parent = find_or_create(client, self._experiment_id(op["experiment"]),
                                        op["shared_parent"], op["start_time"])
            tags = {**op["tags"], **({PARENT_TAG: parent} if parent else {})}
            created = client.create_run(self._experiment_id(op["experiment"]),
                                        start_time=op["start_time"], tags=tags,
                                        run_name=op["name"])
            run.run_id = created.info.run_id
            return run.run_id
        if run.run_id is None:
            raise ValueError("the run was never created")
        if kind == "batch":
            client.log_batch(
                run.run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
                params=[Param(k, v) for k, v in op.get("params", {}).items()],
                tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
        elif kind == "artifact":
            path = run.spool.resolve(op)
            client.log_artifact(run.run_id, str(path), op.get("artifact_path"))
            if op.get("owned") and not op.get("_in_spool"):
                path.unlink(missing_ok=True)
        elif kind == "table":
            client.log_table(run.run_id, data=op["data"], artifact_file=op["artifact_file"])
        elif kind == "inputs":
            client.log_inputs(run.run_id, datasets=[_dataset_input(d) for d in op["datasets"]])
        elif kind == "model":
            self._log_model(run.run_id, op)
        elif kind == "end":
            client.set_terminated(run.run_id, op["status"], op["end_time"])
            if op.get("end_shared_parent"):  # a failed cluster step fails its pipeline run
                from mmjobs.pipeline_parent import end_parent_of

                end_parent_of(client, run.run_id, op["status"], op["end_time"])
        return None

    def _log_model(self, run_id: str, op: dict[str, Any]) -> None:
        """A logged model entry for `op["uri"]`, made by the run (re-linked, not duplicated,
        when the experiment has one for the same URI and fingerprint), as the run's output."""
        from mlflow.entities import LoggedModelOutput

        client, uri, fp = self.client, op["uri"], op["fingerprint"]
        experiment_id = self._experiment_id(op.get("experiment") or self.experiment)
        found = []
        if "'" not in uri + fp:  # filter strings quote values with '
            found = client.search_logged_models(
                [experiment_id], max_results=1,
                filter_string=f"tags.`{URI_TAG}` = '{uri}' AND tags.`{FINGERPRINT_TAG}` = '{fp}'")
        if found:
            model_id = found[0].model_id
        else:
            model = client.create_logged_model(
                experiment_id, name=op["name"], source_run_id=run_id, params=op["params"],
                tags={**op["tags"], URI_TAG: uri, FINGERPRINT_TAG: fp},
                model_type=op["model_type"])
            model_id = model.model_id
            client.finalize_logged_model(model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])

    def _resolve(self, parent_key: str | None) -> str | None:
        if not parent_key:
            return None
        run_id = next((r.run_id for r in self.runs if r.key == parent_key and r.run_id), None)
        run_id = run_id or read_index(self.spool_dir).get(parent_key)
        if run_id is None:
            raise _Blocked(parent_key)
        return run_id

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=self._local_artifact_location(),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except Exception:  # a parallel stage may have created it first
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    log.warning("tracking: experiment %r was deleted; restoring it", name)
                    self.client.restore_experiment(experiment.experiment_id)
                if EXPERIMENT_KIND_TAG not in experiment.tags:  # a user's choice stays
                    self._tag_experiment(experiment.experiment_id)
                self._experiments[name] = experiment.experiment_id
        return self._experiments[name]

    def _tag_experiment(self, experiment_id: str) -> None:
        """Set the experiment-kind tag; parallel steps (pods of one cluster run) may all try
        at once, and the database refuses all inserts but one: the tag is then there."""
        try:
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception:
            if EXPERIMENT_KIND_TAG not in self.client.get_experiment(experiment_id).tags:
                raise

    def _local_artifact_location(self) -> str | None:
        # A database backend without a server would put artifacts in ./mlruns of whatever the
        # cwd is; keep them next to the embedded database instead.
        scheme = self.tracking_uri.split("://", 1)[0] if "://" in self.tracking_uri else "file"
        if scheme in ("http", "https", "databricks"):
            return None  # the server decides (e.g. --artifacts-destination)
        return (settings.home() / "mlartifacts").as_uri()

    def _outage(self, error: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("tracking: MLflow at %s unreachable (%s); spooling to %s and retrying "
                        "every few seconds without blocking", self.tracking_uri,
                        str(error)[:200], self.spool_dir)
        self._next_try = now + self._delay
        self._delay = min(self._delay * 2, MAX_RETRY_S)

    def _back_up(self) -> None:
        if self.down_since is not None:
            log.info("tracking: MLflow at %s reachable again after %.0f s; delivering the spool",
                     self.tracking_uri, time.monotonic() - self.down_since)
            self.down_since, self._delay = None, FIRST_RETRY_S

    def _ack(self, run: RunQueue, op: dict[str, Any], new_id: str | None) -> None:
        try:
            run.spool.ack(op, new_id)
            if new_id:  # other runs' spools may name this run by its key
                with (self.spool_dir / INDEX_NAME).open("a", encoding="utf-8") as index:
                    index.write(json.dumps({"key": run.key, "run_id": new_id}) + "\n")
        except OSError as e:  # worst case a later flush_spool re-sends this op
            log.warning("tracking: cannot update the spool %s: %s", run.spool.path, e)

    def _spill(self) -> bool:
        """Append every undelivered, not yet spooled op to its run's spool file.
        Returns True when nothing is pending (so `pump` can return it)."""
        try:
            for run in self.runs:
                for op in run.queue:
                    if not op.get("_spooled"):
                        if not run.spool.is_open:
                            run.spool.open({
                                "key": run.key, "run_id": run.run_id, "name": run.name,
                                "experiment": self.experiment, "tracking_uri": self.tracking_uri,
                                "created_ns": time.time_ns()})
                        run.spool.append(op)
        except OSError as e:
            if not self._spool_warned:
                self._spool_warned = True
                log.warning("tracking: cannot write the spool in %s (%s); pending tracking data "
                            "is held in memory only", self.spool_dir, e)
        return not self.pending()
