"""The logging helper: rank 0 only, periodic progress lines off a terminal."""

from __future__ import annotations

import io
import logging

from mmjobs import logs


def test_only_rank_zero_logs_below_error(monkeypatch, caplog):
    log = logs.get_logger("mmjobs.test")
    handler = logging.getLogger("mmjobs").handlers[0]
    records = []
    monkeypatch.setattr(handler, "emit", records.append)
    monkeypatch.setenv("RANK", "1")
    log.info("from rank 1")
    log.error("rank 1 failed")
    monkeypatch.setenv("RANK", "0")
    log.info("from rank 0")
    assert [r.getMessage() for r in records] == ["rank 1 failed", "from rank 0"]


def test_progress_logs_periodic_lines_when_not_a_terminal(monkeypatch):
    lines = []
    monkeypatch.setattr(logs.get_logger("mmjobs.progress"), "info",
                        lambda msg, *args: lines.append(msg % args))
    clock = iter(range(0, 1000, 10))  # every item takes "10 s"
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    assert list(logs.progress(range(5), total=5, desc="shards", every_seconds=25)) == [0, 1, 2,
                                                                                       3, 4]
    assert lines[0].startswith("shards: 3/5 done")
    assert lines[-1].startswith("shards: 5 done in")


def test_progress_is_silent_on_other_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    lines = []
    monkeypatch.setattr(logs.get_logger("mmjobs.progress"), "info",
                        lambda msg, *args: lines.append(msg % args))
    assert list(logs.progress(range(3), desc="x", every_seconds=0)) == [0, 1, 2]
    assert lines == []


def test_a_closed_stream_under_the_handler_falls_back_to_sys_stderr(capsys):
    """Logging configured while a test (or tool) had swapped sys.stderr keeps that stream; once
    it is closed, log lines go to the current sys.stderr instead of turning into
    '--- Logging error ---' tracebacks."""
    handler = logging.getLogger("mmjobs").handlers[0]
    swapped = io.StringIO()
    configured = handler.stream
    handler.stream = swapped  # as if logging had been configured under a swapped stream
    try:
        logs.get_logger("mmjobs.test_logs").warning("into the configured stream")
        assert "into the configured stream" in swapped.getvalue()
        swapped.close()
        logs.get_logger("mmjobs.test_logs").warning("after it closed")
    finally:
        handler.stream = configured
    err = capsys.readouterr().err
    assert "after it closed" in err and "Logging error" not in err


def test_transformers_logs_to_the_session_capture_not_a_closed_test_stream():
    """tests/conftest.py configures transformers' logging before any test: configured by a
    lazy import inside a capsys test, its handler would keep that test's closed stream."""
    from transformers.utils import logging as hf_logging

    handler = hf_logging._default_handler  # what transformers bound at configuration
    assert handler is not None and not handler.stream.closed
