"""The Prometheus text format written without prometheus_client."""

from __future__ import annotations

from mmjobs.serve.metrics import Counter, Histogram, Registry, ServeMetrics


def test_counter_histogram_exposition():
    registry = Registry()
    requests = Counter(registry, "reqs_total", "Requests.", ("route", "status"))
    latency = Histogram(registry, "lat_seconds", "Latency.", ("route",), buckets=(0.1, 1.0))
    requests.inc(route="/a", status="200")
    requests.inc(2, route="/a", status="200")
    requests.inc(route='/b"x', status="404")
    latency.observe(0.05, route="/a")
    latency.observe(0.5, route="/a")
    latency.observe(5, route="/a")
    text = registry.render()
    assert "# TYPE reqs_total counter" in text
    assert 'reqs_total{route="/a",status="200"} 3' in text
    assert 'reqs_total{route="/b\\"x",status="404"} 1' in text  # quotes escaped
    assert 'lat_seconds_bucket{route="/a",le="0.1"} 1' in text
    assert 'lat_seconds_bucket{route="/a",le="1"} 2' in text  # cumulative
    assert 'lat_seconds_bucket{route="/a",le="+Inf"} 3' in text
    assert 'lat_seconds_sum{route="/a"} 5.55' in text
    assert 'lat_seconds_count{route="/a"} 3' in text
    assert requests.total() == 4 and latency.count(route="/a") == 3


def test_server_metrics_render_before_any_traffic():
    text = ServeMetrics().render()
    for name in ("mmjobs_serve_requests_total", "mmjobs_serve_request_duration_seconds",
                 "mmjobs_serve_generated_tokens_total", "mmjobs_serve_batch_size"):
        assert f"# TYPE {name} " in text
    assert "mmjobs_serve_generated_tokens_total 0" in text
    assert "mmjobs_serve_model_ready 0" in text
