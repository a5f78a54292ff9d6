"""The models one server answers for, by name: each loaded into its own worker, lazily if asked.

    pool = ModelPool({"baseline": load_a, "dec-dropout": load_b}, start=start_worker,
                     max_loaded=1)
    pool.load_initial()                   # background thread at startup: the first models
    worker, admission, lease = pool.acquire("dec-dropout")   # 404 / 503 as `APIError`s

A server of one model is a pool of one. With several (the settings of a sweep), every model
loads at startup unless `max_loaded` caps how many are in memory at once: then the first
`max_loaded` load at startup, and a request for another answers 503 `model_loading` (with
Retry-After) while it loads in the background in place of the least recently used model that
has no request in flight. Loads run one at a time, and the evicted model's worker stops before
the next model loads, so memory holds at most `max_loaded` models (plus the one being loaded
if nothing could be evicted: then the request is refused with 503 instead of loading).

A lease counts a request in flight on its model until the request's job ends (any of the
release paths may call it; it counts once), so a model answering someone is never evicted.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel
from mmjobs.serve.admission import Admission
from mmjobs.serve.batching import BatchWorker
from mmjobs.serve.protocol import APIError

__all__ = ["Lease", "ModelPool", "ModelSlot"]

log = get_logger(__name__)
Starter = Callable[[LoadedModel], tuple[BatchWorker, Admission]]


@dataclass
class ModelSlot:
    """One named model: how to load it and, once loaded, its worker and admission."""

    name: str
    load: Callable[[], LoadedModel]
    worker: BatchWorker | None = None
    admission: Admission | None = None
    error: str | None = None
    loading: bool = False
    active: int = 0  # requests holding a lease
    last_used: float = 0.0

    @property
    def ready(self) -> bool:
        return self.worker is not None and self.admission is not None


@dataclass
class _Eviction:
    """A model taken out of service to make room: its worker stops before the next load."""

    name: str
    worker: BatchWorker | None


class Lease:
    """A request in flight on a model; `release()` may be called any number of times."""

    def __init__(self, pool: ModelPool, slot: ModelSlot) -> None:
        self._pool, self._slot, self._done = pool, slot, False

    def release(self, *_: object) -> None:
        with self._pool.lock:
            if not self._done:
                self._done = True
                self._slot.active -= 1
                self._slot.last_used = time.monotonic()


class ModelPool:
    """Named models behind one server (see the module docstring).

    Args:
        loaders: name -> function returning the loaded model, in the order models are listed
            (the first is the default: the chat page selects it first).
        start: makes a started worker and admission from a loaded model.
        max_loaded: most models in memory at once (None: all of them, loaded at startup).
        on_loaded: called with each slot once it serves (e.g. metrics, logs).
    """

    def __init__(self, loaders: Mapping[str, Callable[[], LoadedModel]], *, start: Starter,
                 max_loaded: int | None = None,
                 on_loaded: Callable[[ModelSlot], None] | None = None) -> None:
        if not loaders:
            raise ValueError("a server needs at least one model")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded_models must be at least 1, got {max_loaded}")
        self.slots = {name: ModelSlot(name, load) for name, load in loaders.items()}
        self.start, self.on_loaded = start, on_loaded
        self.max_loaded = len(self.slots) if max_loaded is None else min(max_loaded,
                                                                         len(self.slots))
        self.lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time bounds memory
        self.closed = False
        for slot in self.initial():  # scheduled: a request meanwhile must not load it again
            slot.loading = True

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def initial(self) -> list[ModelSlot]:
        """The models loaded at startup (readiness waits for them)."""
        return list(self.slots.values())[:self.max_loaded]

    def slot(self, name: str) -> ModelSlot:
        """The slot named `name`.

        Raises:
            APIError: 404 naming the models this server has.
        """
        found = self.slots.get(name)
        if found is None:
            raise APIError(404, f"the model {name[:200]!r} does not exist on this server; it "
                           f"serves {self.describe_names()} (GET /v1/models lists them)",
                           code="model_not_found", param="model")
        return found

    def describe_names(self) -> str:
        names = self.names
        shown = ", ".join(repr(n) for n in names[:20])
        return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")

    def load_initial(self) -> BaseException | None:
        """Load the startup models one by one; returns the first error (None: all serve)."""
        startup = self.initial()
        for i, slot in enumerate(startup):
            error = self._load(slot, evict=None)
            if error is not None:
                with self.lock:
                    for rest in startup[i + 1:]:  # not loading after all
                        rest.loading = False
                return error
        return None

    def acquire(self, name: str) -> tuple[BatchWorker, Admission, Lease]:
        """The model's worker and admission, and a lease counting this request on it.

        Raises:
            APIError: 404 unknown name; 503 while it loads (its load starts here if it is
                not in memory), when it failed to load, or when every loaded model is busy
                and none can make room for it.
        """
        slot = self.slot(name)
        with self.lock:
            if slot.ready and slot.worker is not None and slot.admission is not None:
                slot.active += 1
                slot.last_used = time.monotonic()
                return slot.worker, slot.admission, Lease(self, slot)
            if slot.error is not None:
                raise APIError(503, f"the model {name!r} failed to load: {slot.error}",
                               code="model_load_failed")
            if not slot.loading:
                victim = self._room_for(slot)
                slot.loading = True
                threading.Thread(target=self._load, args=(slot, victim), daemon=True,
                                 name=f"mmjobs-serve-load-{name[:40]}").start()
        raise APIError(503, f"the model {name!r} is loading; retry shortly (GET /readyz and "
                       "GET /v1/models say which models are loaded)", code="model_loading",
                       headers={"Retry-After": "5"})

    def _room_for(self, slot: ModelSlot) -> _Eviction | None:
        """The model to evict before `slot` loads (None: there is room). Holds `lock`."""
        taken = [s for s in self.slots.values() if s.ready or s.loading]
        if len(taken) < self.max_loaded:
            return None
        idle = [s for s in taken if s.ready and s.active == 0]
        if not idle:
            raise APIError(503, f"{len(taken)} models are in memory or loading "
                           f"(max_loaded_models={self.max_loaded}) and none is idle; retry "
                           f"shortly for {slot.name!r}", code="server_overloaded",
                           headers={"Retry-After": "5"})
        victim = min(idle, key=lambda s: s.last_used)
        worker = victim.worker
        # Out of service now, so no new request takes it; its worker stops in the load thread.
        victim.worker, victim.admission = None, None
        return _Eviction(victim.name, worker)

    def _load(self, slot: ModelSlot, evict: _Eviction | None) -> BaseException | None:
        with self._load_lock:
            if evict is not None:
                self._free(evict)
            try:
                loaded = slot.load()
                worker, admission = self.start(loaded)
            except BaseException as e:  # reported by /readyz and the requests for it
                with self.lock:
                    slot.loading, slot.error = False, f"{type(e).__name__}: {e}"
                log.exception("the model %r failed to load", slot.name)
                return e
            with self.lock:
                slot.loading = False
                if self.closed:
                    worker.stop()
                    return None
                slot.worker, slot.admission = worker, admission
                slot.last_used = time.monotonic()
        log.info("model %r is ready", slot.name)
        if self.on_loaded is not None:
            self.on_loaded(slot)
        return None

    def _free(self, evicted: _Eviction) -> None:
        """Stop an evicted model's worker and drop its weights before another loads."""
        if evicted.worker is not None:
            evicted.worker.stop()
        evicted.worker = None  # the last reference to its model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency of serving
            pass
        log.info("model %r unloaded to make room (max_loaded_models=%d)", evicted.name,
                 self.max_loaded)

    def loaded(self) -> list[str]:
        """Names of the models in memory now."""
        with self.lock:
            return [s.name for s in self.slots.values() if s.ready]

    def stop(self) -> None:
        """Stop every worker (server shutdown); a load in progress stops its worker itself."""
        with self.lock:
            self.closed = True
            workers = [s.worker for s in self.slots.values() if s.worker is not None]
            for s in self.slots.values():
                s.worker, s.admission = None, None
        for worker in workers:
            worker.stop()
