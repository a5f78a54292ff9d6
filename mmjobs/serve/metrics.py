"""Prometheus metrics in the text exposition format, without `prometheus_client`.

`prometheus_client` is not a dependency of mmjobs, and the server needs only counters, gauges
and histograms with a few labels, so they are written here (format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/). All updates take one lock:
they come from the event loop and the generation worker thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "Registry", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from a tiny model's single step to a 7B model's long answer on CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str,
                 label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)
        self._lock = registry.lock
        registry.metrics.append(self)

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.label_names)}")
        return tuple((k, str(labels[k])) for k in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> Iterable[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        """The sum over all label sets."""
        with self._lock:
            return sum(self._values.values())

    def lines(self) -> Iterable[str]:
        if not self._values and not self.label_names:
            yield f"{self.name} 0"
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(key)} {_number(value)}"


class Gauge(Counter):
    """A value that goes up and down (no labels needed)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, with `_sum` and `_count`."""

    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help_text: str,
                 label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
                 ) -> None:
        super().__init__(registry, name, help_text, label_names)
        self.buckets = (*sorted(buckets), math.inf)
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return self._counts.get(self._key(labels), [0])[-1]

    def lines(self) -> Iterable[str]:
        for key, counts in sorted(self._counts.items()):
            for bound, count in zip(self.buckets, counts, strict=True):
                yield f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {count}"
            yield f"{self.name}_sum{_labels(key)} {_number(self._sums[key])}"
            yield f"{self.name}_count{_labels(key)} {counts[-1]}"


class Registry:
    """A set of metrics rendered together at `/metrics`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        out: list[str] = []
        with self.lock:
            for metric in self.metrics:
                out += metric.header()
                out += metric.lines()
        return "\n".join(out) + "\n"


class ServeMetrics:
    """The server's metrics (one instance per app, so tests never share counts)."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = Counter(r, "mmjobs_serve_requests_total",
                                "HTTP requests by route and status code.", ("route", "status"))
        self.latency = Histogram(r, "mmjobs_serve_request_duration_seconds",
                                 "Time from request to the end of the response (streams "
                                 "included), by route.", ("route",))
        self.prompt_tokens = Counter(r, "mmjobs_serve_prompt_tokens_total",
                                     "Prompt tokens processed (images included).")
        self.generated_tokens = Counter(r, "mmjobs_serve_generated_tokens_total",
                                        "Tokens generated.")
        self.cancelled = Counter(r, "mmjobs_serve_cancelled_total",
                                 "Requests whose client left before the answer was complete: "
                                 "skipped while queued, or their generation stopped at the "
                                 "next token.")
        self.batch_size = Histogram(r, "mmjobs_serve_batch_size",
                                    "Requests per generate call.", buckets=BATCH_BUCKETS)
        self.running = Gauge(r, "mmjobs_serve_running_requests",
                             "Requests in the generate call running now (0: the worker is "
                             "free).")
        self.queue_depth = Gauge(r, "mmjobs_serve_queue_depth",
                                 "Requests waiting for the generation worker.")
        self.model_ready = Gauge(r, "mmjobs_serve_model_ready",
                                 "1 once the model is loaded and serving, else 0.")

    def render(self) -> str:
        return self.registry.render()
