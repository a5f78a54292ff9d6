"""Resumable training checkpoints, committed through the store, uploaded in the background.

Layout of one checkpoint, `{output}/checkpoints/step-N/`::

    trainable.safetensors        trainable parameters by name (adapters, connector, or all)
    optimizer.pt, scheduler.pt   torch state dicts (rank 0; loaded with weights_only=True)
    deepspeed/...                instead of the three above under DeepSpeed (engine files)
    state.json                   step, config fingerprint, world size, mode, last loss
    ranks/rank-R/rng.pt          python / numpy / torch (+CUDA) RNG states of rank R
    ranks/rank-R/loader.json     rank R's data position (`ShardDataLoader.state_dict()`)
    _MANIFEST.json               written last: a checkpoint without it is ignored

**Saving.** Each rank writes its files into a private local staging directory (this copies
the state out of the training tensors, so training may continue), then a background thread
uploads them to the store. With several ranks each thread also writes a marker
`_ranks/<nonce>-rank-R.json` listing its files; rank 0's thread waits for every marker and
writes the manifest over all of them. Ranks on different nodes never need a shared disk, and
no collective runs in a background thread. At most one upload is in flight per rank: the next
save waits for the previous one, and an upload error surfaces there (or at `wait()`).

**Resuming.** `latest_committed` returns the newest `step-N` that has a manifest; directories
without one (an upload interrupted by a kill) are ignored and later deleted by `prune`.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmjobs import layout, local_cache, signals, storage
from mmjobs.logs import get_logger

CHECKPOINTS_DIR = layout.CHECKPOINTS_DIR
log = get_logger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
DEEPSPEED_DIR = "deepspeed"
MARKERS_DIR = "_ranks"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_RANK_FILE = re.compile(r"(?:^|/)ranks/rank-(\d+)/|zero_pp_rank_(\d+)_")


@dataclass(frozen=True)
class CheckpointInfo:
    """One `step-N` directory under `{output}/checkpoints/`."""

    step: int
    uri: str
    committed: bool


def step_uri(root: str, step: int) -> str:
    """`{root}/step-{step}` (root is `{output}/checkpoints`)."""
    return storage.join(root, f"step-{step}")


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every `step-N` directory under `root`, oldest first, committed or not."""
    if not storage.exists(root):
        return []
    steps: dict[int, bool] = {}
    for obj in storage.list_objects(root):
        head, _, rest = obj.relpath.partition("/")
        match = _STEP_DIR.match(head)
        if match:
            step = int(match.group(1))
            steps[step] = steps.get(step, False) or rest == storage.MANIFEST_NAME
    return [CheckpointInfo(s, step_uri(root, s), steps[s]) for s in sorted(steps)]


def latest_committed(root: str) -> CheckpointInfo | None:
    """The newest committed checkpoint, or None. Uncommitted ones are skipped with a note."""
    found = list_checkpoints(root)
    for info in reversed(found):
        if info.committed:
            return info
        log.warning("checkpoint %s has no %s (its upload was interrupted); ignoring it",
                    info.uri, storage.MANIFEST_NAME)
    return None


def delete_checkpoint(uri: str) -> None:
    """Delete a checkpoint, manifest first, so a half-deleted one never looks committed."""
    storage.delete(storage.join(uri, storage.MANIFEST_NAME))
    storage.delete(uri)


def prune(root: str, keep: int, newest: int) -> list[int]:
    """Keep the `keep` newest committed checkpoints up to step `newest`; delete the older
    ones and any uncommitted leftovers below `newest`. Returns the deleted steps."""
    deleted = []
    infos = [i for i in list_checkpoints(root) if i.step <= newest]
    committed = [i for i in infos if i.committed]
    doomed = committed[:-keep] if keep > 0 else committed
    doomed += [i for i in infos if not i.committed and i.step < newest]
    for info in sorted(doomed, key=lambda i: i.step):
        delete_checkpoint(info.uri)
        deleted.append(info.step)
    return deleted


# --------------------------------------------------------------------------- state files


def save_torch(obj: Any, path: Path) -> None:
    """`torch.save` a state dict made of tensors, numbers, strings, lists, dicts and tuples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """Load a file written by `save_torch`. `weights_only=True`: nothing but tensors and
    plain containers is unpickled, so a tampered checkpoint cannot run code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in a form `load_torch` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng`: the next random numbers equal those after the capture."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_dir(rank: int) -> str:
    """Relative directory of one rank's files inside a checkpoint."""
    return f"ranks/rank-{rank}"


def write_rank_state(local: Path, rank: int, loader_state: Mapping[str, Any]) -> None:
    """Write this rank's RNG states and data position into the staging dir `local`."""
    save_torch(capture_rng(), local / rank_dir(rank) / "rng.pt")
    (local / rank_dir(rank) / "loader.json").write_text(json.dumps(dict(loader_state)))


def read_rank_state(local: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rng state, loader state) of `rank` from a fetched checkpoint."""
    rng = load_torch(local / rank_dir(rank) / "rng.pt")
    loader = json.loads((local / rank_dir(rank) / "loader.json").read_text())
    return rng, loader


def fetch_checkpoint(uri: str, local: Path, rank: int) -> dict[str, Any]:
    """Download the files of a committed checkpoint that `rank` needs (shared files plus its
    own rank's), verifying sizes and sha256 against the manifest. Returns `state.json`."""
    manifest = storage.read_manifest(uri)

    def needed(path: str) -> bool:
        match = _RANK_FILE.search(path)
        return match is None or int(match.group(1) or match.group(2)) == rank

    local_cache.download_verified(uri, [e for e in manifest.files if needed(e.path)], local,
                                  what="the checkpoint manifest")
    return json.loads((local / STATE_FILE).read_text())


# --------------------------------------------------------------------------- uploads


class CheckpointUploader:
    """Commits staged checkpoint directories to the store in a background thread.

    Args:
        root: `{output}/checkpoints`.
        rank, world_size: this process's place; rank 0 writes manifests and prunes.
        nonce: the same string on every rank for this run (markers of an earlier, killed
            attempt at the same step must not count).
        keep: committed checkpoints to keep (`prune`).
        marker_timeout: seconds rank 0 waits for the other ranks' markers.
    """

    def __init__(self, root: str, *, rank: int, world_size: int, nonce: str, keep: int,
                 marker_timeout: float = 1800.0) -> None:
        self.root, self.rank, self.world_size = root, rank, world_size
        self.nonce, self.keep, self.marker_timeout = nonce, keep, marker_timeout
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: str | None = None

    def staging_dir(self) -> Path:
        """A fresh local directory to write one checkpoint into (waits for the last upload)."""
        self.wait()
        return Path(tempfile.mkdtemp(prefix="mmjobs-ckpt-"))

    def commit(self, local: Path, step: int, meta: dict[str, Any], *,
               background: bool = True) -> str:
        """Upload `local` as checkpoint `step` and commit it (in a thread unless told not to).

        Returns the checkpoint URI. `local` is deleted once uploaded.
        """
        uri = step_uri(self.root, step)
        self.wait()

        def run() -> None:
            try:
                self._upload(local, uri, step, meta)
            except BaseException as e:  # surfaced by the next wait()
                self._error = e
            finally:
                shutil.rmtree(local, ignore_errors=True)

        if background:
            self._thread = threading.Thread(target=run, name=f"ckpt-upload-{step}", daemon=True)
            self._thread.start()
        else:
            run()
            self.wait()
        return uri

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {error}") from error

    def _upload(self, local: Path, uri: str, step: int, meta: dict[str, Any]) -> None:
        start = time.monotonic()
        if self.rank == 0:
            storage.delete(storage.join(uri, storage.MANIFEST_NAME))  # a re-save un-commits
        files = sorted(p for p in local.rglob("*") if p.is_file())

        def put(path: Path) -> storage.FileEntry:
            rel = path.relative_to(local).as_posix()
            entry = storage.FileEntry(rel, path.stat().st_size, storage.sha256_file(path))
            storage.put_file(path, storage.join(uri, rel))
            return entry

        with ThreadPoolExecutor(max_workers=4) as pool:
            entries = list(pool.map(put, files))
        if self.world_size > 1:
            marker = storage.join(uri, MARKERS_DIR, f"{self.nonce}-rank-{self.rank}.json")
            storage.write_text(marker, json.dumps([e.__dict__ for e in entries]))
        if self.rank != 0:
            return
        if self.world_size > 1:
            entries = self._gather_markers(uri)
        manifest = storage.Manifest(files=entries, meta={**meta, "step": step})
        storage.write_text(storage.join(uri, storage.MANIFEST_NAME), manifest.to_json())
        self.last_committed = uri
        deleted = prune(self.root, self.keep, step)
        log.info("checkpoint step-%d committed to %s (%.1f MB, %.1fs)%s", step, uri,
                 manifest.total_bytes / 2**20, time.monotonic() - start,
                 f"; deleted older steps {deleted}" if deleted else "")

    def _gather_markers(self, uri: str) -> list[storage.FileEntry]:
        deadline = time.monotonic() + self.marker_timeout
        entries: list[storage.FileEntry] = []
        for rank in range(self.world_size):
            marker = storage.join(uri, MARKERS_DIR, f"{self.nonce}-rank-{rank}.json")
            delay = 0.05
            while not storage.exists(marker):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{marker}: rank {rank} did not finish uploading its "
                                       f"part of the checkpoint in {self.marker_timeout:.0f}s")
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            entries += [storage.FileEntry(**e) for e in json.loads(storage.read_text(marker))]
        return entries


# --------------------------------------------------------------------------- preemption


class PreemptionWatcher:
    """Turns SIGTERM (a Kubernetes pod eviction or a preempted node) into a flag.

    The training loop reads `requested` at every step boundary, saves a checkpoint and
    stops; doing the save inside the signal handler could interrupt a half-done optimizer
    step. Kubernetes gives `terminationGracePeriodSeconds` (30 s by default) before SIGKILL:
    set it longer than one step plus one checkpoint upload.
    """

    def __init__(self) -> None:
        self.requested = False
        self._stack = contextlib.ExitStack()

    def install(self) -> None:
        """Handle SIGTERM from now on (main thread only; elsewhere this is a no-op)."""
        if not self._stack.enter_context(signals.handling(self._handle)):
            log.warning("not in the main thread: SIGTERM will not trigger a final checkpoint")

    def uninstall(self) -> None:
        """Restore the previous SIGTERM handler."""
        self._stack.close()

    def _handle(self, signum: int) -> None:
        self.requested = True  # only set a flag: the loop acts at the next step boundary


# --------------------------------------------------------------------------- training state


def save_training_state(local: Path, *, accelerator: Any, model: Any, optimizer: Any,
                        scheduler: Any, loader_state: dict[str, Any], deepspeed: bool, rank: int,
                        state: dict[str, Any] | None) -> None:
    """Write a training step's resumable state into the staging dir `local` (every rank calls
    it): DeepSpeed's own checkpoint (a collective) or the trainable weights and the optimizer,
    the schedule and `state.json` (rank 0, which passes `state`), and this rank's data
    position and RNG states."""
    from safetensors.torch import save_file

    from mmjobs.train.model_setup import trainable_state

    if deepspeed:  # a collective: every rank writes its own optimizer shards
        model.save_checkpoint(str(local / DEEPSPEED_DIR), tag="ds", save_latest=False,
                              exclude_frozen_parameters=True)
    elif state is not None:
        save_file(trainable_state(accelerator.unwrap_model(model)), str(local / TRAINABLE_FILE))
        save_torch(optimizer.state_dict(), local / OPTIMIZER_FILE)
    if state is not None:
        save_torch(scheduler.state_dict(), local / SCHEDULER_FILE)
        (local / STATE_FILE).write_text(json.dumps(state, indent=1))
    write_rank_state(local, rank, loader_state)


def load_training_state(local: Path, *, accelerator: Any, model: Any, optimizer: Any,
                        scheduler: Any, deepspeed: bool, rank: int
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load what `save_training_state` wrote into the prepared model, optimizer and schedule.

    Returns:
        (this rank's RNG states, to restore last; its data position).
    """
    from safetensors.torch import load_file

    from mmjobs.train.model_setup import load_trainable_state

    if deepspeed:
        model.load_checkpoint(str(local / DEEPSPEED_DIR), tag="ds", load_module_strict=False,
                              load_lr_scheduler_states=False)
    else:
        load_trainable_state(accelerator.unwrap_model(model),
                             load_file(str(local / TRAINABLE_FILE)))
        optimizer.load_state_dict(load_torch(local / OPTIMIZER_FILE))
    scheduler.load_state_dict(load_torch(local / SCHEDULER_FILE))
    return read_rank_state(local, rank)
