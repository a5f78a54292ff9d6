"""Which store failures are retried, and how `retry` behaves at its deadline (no servers: the
failures are botocore's own exception types, raised by a local function)."""

from __future__ import annotations

import time

import botocore.exceptions as be
import pytest

from mmjobs.storage_errors import (
    StoreError,
    StoreNotFoundError,
    StoreUnavailableError,
    is_transient,
    retry,
)


def client_error(code: str, status: int) -> be.ClientError:
    return be.ClientError({"Error": {"Code": code, "Message": code},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def code_of(exc: BaseException) -> str:
    return exc.response["Error"]["Code"] if isinstance(exc, be.ClientError) else ""


@pytest.mark.parametrize("exc", [
    be.EndpointConnectionError(endpoint_url="http://s3"),  # connection refused
    be.ConnectionClosedError(endpoint_url="http://s3"),
    be.ReadTimeoutError(endpoint_url="http://s3"),
    be.ConnectTimeoutError(endpoint_url="http://s3"),
    be.ResponseStreamingError(error="reset mid-body"),
    ConnectionResetError(104, "Connection reset by peer"),
    client_error("SlowDown", 503), client_error("ServiceUnavailable", 503),
    client_error("RequestTimeout", 400), client_error("InternalError", 500),
    client_error("Throttling", 429),
], ids=lambda e: f"{type(e).__name__}-{code_of(e)}")
def test_outages_and_throttling_are_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    client_error("AccessDenied", 403), client_error("InvalidAccessKeyId", 403),
    client_error("NoSuchBucket", 404), client_error("NoSuchKey", 404),
    be.NoCredentialsError(),
    be.SSLError(endpoint_url="https://s3", error="[SSL: CERTIFICATE_VERIFY_FAILED]"),
], ids=lambda e: f"{type(e).__name__}-{code_of(e)}")
def test_permanent_failures_are_not_retried_and_name_the_uri(exc, monkeypatch):
    monkeypatch.setenv("MMJOBS_STORE_RETRY_DEADLINE_S", "30")
    calls = []

    def fail():
        calls.append(1)
        raise exc

    with pytest.raises(StoreError, match=r"^s3://b/k: ") as caught:
        retry("s3://b/k", "read", fail)
    assert len(calls) == 1
    if code_of(exc).startswith("NoSuch"):
        assert isinstance(caught.value, StoreNotFoundError)


def test_retry_succeeds_after_transient_failures_and_gives_up_at_the_deadline(monkeypatch):
    monkeypatch.setenv("MMJOBS_STORE_RETRY_BACKOFF_S", "0.01")
    monkeypatch.setenv("MMJOBS_STORE_RETRY_DEADLINE_S", "0.3")
    failures = iter([be.EndpointConnectionError(endpoint_url="http://s3")] * 3)

    def flaky():
        exc = next(failures, None)
        if exc:
            raise exc
        return "ok"

    assert retry("s3://b/k", "read", flaky) == "ok"
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"s3://b/k: could not read: still failing "
                                                    r"after \d+ attempts over 0\.\ds .*retry "
                                                    r"deadline of 0\.3s"):
        retry("s3://b/k", "read", lambda: (_ for _ in ()).throw(
            be.EndpointConnectionError(endpoint_url="http://s3")))
    assert time.monotonic() - started < 10  # bounded by the deadline, not a hang
