"""ModelPool: routing by name, startup loads, lazy loads within `max_loaded`, eviction of the
least recently used idle model only, and load failures. The models are stand-ins (loading a
real one is what tests/integration/serve/test_multi_model.py does); the pool's own logic and
threads are real."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from mmjobs.serve.pool import ModelPool
from mmjobs.serve.protocol import APIError


class FakeWorker:
    def __init__(self, model: str) -> None:
        self.model, self.stopped = model, threading.Event()

    def stop(self) -> None:
        self.stopped.set()


def make_pool(names: list[str], max_loaded: int | None = None, fail: set[str] = frozenset(),
              gate: threading.Event | None = None) -> tuple[ModelPool, list[str]]:
    loads: list[str] = []

    def loader(name: str):
        def load() -> Any:
            if gate is not None:
                gate.wait(10)
            loads.append(name)
            if name in fail:
                raise OSError(f"{name}: config.json is missing")
            return name
        return load

    pool = ModelPool({n: loader(n) for n in names},
                     start=lambda loaded: (FakeWorker(loaded), object()),  # type: ignore[arg-type,return-value]
                     max_loaded=max_loaded)
    return pool, loads


def wait_loaded(pool: ModelPool, name: str) -> tuple[Any, Any, Any]:
    deadline = time.monotonic() + 10
    while True:
        try:
            return pool.acquire(name)
        except APIError as e:
            assert e.code == "model_loading", e.message
            assert time.monotonic() < deadline, f"{name} never loaded"
            time.sleep(0.01)


def test_all_models_load_at_startup_and_requests_are_routed_by_name():
    pool, loads = make_pool(["a", "b", "c"])
    assert pool.load_initial() is None
    assert loads == ["a", "b", "c"] and pool.loaded() == ["a", "b", "c"]
    worker, _, lease = pool.acquire("b")
    assert worker.model == "b"
    lease.release()
    lease.release()  # idempotent: counted once
    assert pool.slots["b"].active == 0


def test_an_unknown_name_is_a_404_naming_every_served_model():
    pool, _ = make_pool(["baseline", "dec-dropout"])
    with pytest.raises(APIError) as e:
        pool.slot("inc-dropout")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert "'baseline', 'dec-dropout'" in e.value.message
    assert "GET /v1/models" in e.value.message


def test_a_model_beyond_max_loaded_loads_on_demand_in_place_of_the_idle_lru_one():
    pool, loads = make_pool(["a", "b", "c"], max_loaded=2)
    assert [s.name for s in pool.initial()] == ["a", "b"]
    pool.load_initial()
    worker_a, _, lease_a = pool.acquire("a")
    lease_a.release()
    time.sleep(0.01)
    _, _, lease_b = pool.acquire("b")
    lease_b.release()  # b used after a: a is the least recently used
    with pytest.raises(APIError) as e:
        pool.acquire("c")
    assert (e.value.status, e.value.code) == (503, "model_loading")
    assert e.value.headers["Retry-After"]
    worker_c, _, lease_c = wait_loaded(pool, "c")
    lease_c.release()
    assert worker_c.model == "c" and worker_a.stopped.is_set()
    assert sorted(pool.loaded()) == ["b", "c"] and loads == ["a", "b", "c"]


def test_a_model_answering_a_request_is_never_evicted():
    pool, _ = make_pool(["a", "b"], max_loaded=1)
    pool.load_initial()
    worker_a, _, lease = pool.acquire("a")  # in flight
    with pytest.raises(APIError) as e:
        pool.acquire("b")
    assert (e.value.status, e.value.code) == (503, "server_overloaded")
    assert "max_loaded_models=1" in e.value.message
    assert not worker_a.stopped.is_set() and pool.loaded() == ["a"]
    lease.release()
    with pytest.raises(APIError):
        pool.acquire("b")  # now it may load
    wait_loaded(pool, "b")[2].release()
    assert worker_a.stopped.is_set()


def test_a_request_during_a_load_waits_for_it_and_loads_run_one_at_a_time():
    gate = threading.Event()
    pool, loads = make_pool(["a", "b"], max_loaded=1, gate=gate)
    startup = threading.Thread(target=pool.load_initial)
    startup.start()
    for _ in range(3):  # repeated asks start no second load
        with pytest.raises(APIError) as e:
            pool.acquire("a")
        assert e.value.code == "model_loading"
    gate.set()
    startup.join(10)
    assert loads == ["a"]


def test_a_failed_load_is_reported_by_name_and_the_others_keep_serving():
    pool, _ = make_pool(["a", "b"], max_loaded=1, fail={"b"})
    assert pool.load_initial() is None
    with pytest.raises(APIError):
        pool.acquire("b")
    deadline = time.monotonic() + 10
    while pool.slots["b"].error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(APIError) as e:
        pool.acquire("b")
    assert (e.value.status, e.value.code) == (503, "model_load_failed")
    assert "'b' failed to load" in e.value.message and "config.json is missing" in e.value.message
    # a was evicted to make room for b; it loads again on demand.
    wait_loaded(pool, "a")[2].release()


def test_a_startup_failure_is_returned():
    pool, _ = make_pool(["a", "b"], fail={"b"})
    error = pool.load_initial()
    assert isinstance(error, OSError) and pool.slots["b"].error


def test_stop_stops_every_worker():
    pool, _ = make_pool(["a", "b"])
    pool.load_initial()
    workers = [s.worker for s in pool.slots.values()]
    pool.stop()
    assert all(w.stopped.is_set() for w in workers) and pool.loaded() == []


def test_a_request_before_the_startup_load_begins_loads_nothing_twice():
    gate = threading.Event()
    pool, loads = make_pool(["a", "b"], gate=gate)
    with pytest.raises(APIError) as e:  # the startup thread has not even started
        pool.acquire("b")
    assert e.value.code == "model_loading"
    gate.set()
    assert pool.load_initial() is None
    assert loads == ["a", "b"]
