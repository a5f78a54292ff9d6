"""What can go wrong in the store, and what is done about it: error types and the retry policy.

Every store request goes through `retry`. A transient failure — the endpoint refusing or
resetting connections, timeouts, truncated bodies, throttling (SlowDown, 429, 503,
RequestTimeout) and other 5xx — is retried with exponential backoff and jitter until the
request has been failing for `MMJOBS_STORE_RETRY_DEADLINE_S` seconds (default 120), so an S3
outage shorter than that is ridden out. Then `StoreUnavailableError` says how long it tried and
what to check. Permanent failures (403, a missing bucket or key, no credentials, a certificate
that does not verify) are not retried: they raise at once, naming the URI.

    MMJOBS_STORE_RETRY_DEADLINE_S   how long one request may keep failing (default 120)
    MMJOBS_STORE_RETRY_BACKOFF_S    first delay; doubled per failure (default 0.5)
    MMJOBS_STORE_RETRY_MAX_DELAY_S  longest single delay (default 15)
"""

from __future__ import annotations

import http.client
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mmjobs.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_RETRY_DEADLINE_S = 120.0
# S3 error codes that mean "try again later", whatever the HTTP status says.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
    "BandwidthLimitExceeded", "OperationAborted", "PriorRequestNotComplete", "BadDigest",
    "XAmzContentSHA256Mismatch", "IncompleteBody",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "ExpiredToken", "InvalidToken", "AllAccessDisabled"})


class StoreError(Exception):
    """A store operation failed for a reason retrying will not fix; the message names the URI."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The object, directory or bucket does not exist."""


class IncompleteDirectoryError(StoreError):
    """A directory has no `_MANIFEST.json`: its writer did not finish."""


class IntegrityError(StoreError):
    """An object is missing, or its size or sha256 differs from the manifest."""


class StoreUnavailableError(StoreError):
    """The store kept failing transiently for longer than the retry deadline."""


class TransientError(Exception):
    """A failure found by mmjobs itself (a short body, a part that vanished) worth retrying."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry one request (see the module docstring)."""

    deadline_s: float = DEFAULT_RETRY_DEADLINE_S
    backoff_s: float = 0.5
    max_delay_s: float = 15.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy set by `MMJOBS_STORE_RETRY_*` (read per call: tests and jobs may change
        it). A value that is not a non-negative number is a `StoreError` naming the variable."""
        values = {}
        for name, field in (("DEADLINE_S", "deadline_s"), ("BACKOFF_S", "backoff_s"),
                            ("MAX_DELAY_S", "max_delay_s")):
            var = f"MMJOBS_STORE_RETRY_{name}"
            raw = os.environ.get(var, "").strip()
            if not raw:
                continue
            try:
                values[field] = float(raw)
            except ValueError:
                values[field] = -1.0
            if not values[field] >= 0:
                raise StoreError(f"{var}={raw!r}: expected a number of seconds >= 0")
        return cls(**values)

    def delay(self, failures: int) -> float:
        """Backoff before retry number `failures` (1-based): exponential, capped, jittered."""
        cap = min(self.max_delay_s, self.backoff_s * 2 ** min(failures - 1, 30))
        return random.uniform(cap / 2, cap)


def retry(uri: str, action: str, fn: Callable[[], T]) -> T:
    """Run `fn` (one request), retrying transient failures until the deadline.

    Raises:
        StoreNotFoundError: the object, key or bucket does not exist.
        StoreUnavailableError: it was still failing transiently at the deadline.
        StoreError: a permanent failure (access denied, bad credentials, ...).
    """
    policy = RetryPolicy.from_env()
    failures, first_failure, last_note = 0, 0.0, 0.0
    while True:
        try:
            return fn()
        except StoreError:
            raise
        except FileNotFoundError as e:
            raise StoreNotFoundError(f"{uri}: not found ({action})") from e
        except Exception as e:
            if not is_transient(e):
                raise permanent_error(e, uri, action) from e
            now = time.monotonic()
            failures += 1
            if failures == 1:
                first_failure = now
            failing = now - first_failure
            if failing >= policy.deadline_s:
                raise StoreUnavailableError(_gave_up(uri, action, e, failures, failing,
                                                     policy)) from e
            if now - last_note >= 10:  # the first failure, then every 10 s: not per retry
                last_note = now
                log.warning("%s: %s failed (%s: %s); retrying for up to %.0fs more", uri, action,
                            type(e).__name__, e, policy.deadline_s - failing)
            time.sleep(min(policy.delay(failures), policy.deadline_s - failing))


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt may fix (see the module docstring)."""
    import botocore.exceptions as be
    import urllib3.exceptions

    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status in (408, 429) or err.get("Code") in TRANSIENT_CODES
    if isinstance(exc, be.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return False  # a wrong CA bundle or a man in the middle: waiting will not fix it
    # be.ConnectionError covers EndpointConnectionError (refused), ConnectTimeoutError and
    # ProxyConnectionError; be.HTTPClientError covers ConnectionClosedError, ReadTimeoutError
    # and ResponseStreamingError (a body cut mid-read).
    return isinstance(exc, (
        be.ConnectionError, be.HTTPClientError, be.IncompleteReadError, be.FlexibleChecksumError,
        urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError,
        TransientError))


def permanent_error(exc: BaseException, uri: str, action: str) -> StoreError:
    """A `StoreError` naming `uri` for a failure that retrying will not fix."""
    import botocore.exceptions as be

    if isinstance(exc, be.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES or status == 404:
            what = "bucket does not exist" if code == "NoSuchBucket" else "not found"
            return StoreNotFoundError(f"{uri}: {what} ({action})")
        if status == 403 or code in _DENIED_CODES:
            return StoreError(f"{uri}: access denied ({code or status}) while trying to {action}; "
                              "check the S3 credentials in the environment / Kubernetes Secret "
                              "and the bucket policy")
        if status == 412 or code == "PreconditionFailed":
            return StoreError(f"{uri}: the object changed while it was being read ({action}); "
                              "another writer replaced it: run the command again")
        return StoreError(f"{uri}: {code or status} while trying to {action}: {exc}")
    if isinstance(exc, be.NoCredentialsError | be.PartialCredentialsError):
        return StoreError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, be.SSLError):
        return StoreError(f"{uri}: TLS certificate of the S3 endpoint does not verify ({exc}); "
                          "set AWS_CA_BUNDLE to the CA that signed it")
    return StoreError(f"{uri}: failed to {action}: {type(exc).__name__}: {exc}")


def _gave_up(uri: str, action: str, exc: BaseException, failures: int, failing: float,
             policy: RetryPolicy) -> str:
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the AWS S3 endpoint")
    return (f"{uri}: could not {action}: still failing after {failures} attempts over "
            f"{failing:.1f}s (last: {type(exc).__name__}: {exc}). The store at {endpoint} was "
            f"unreachable or overloaded for longer than the retry deadline of "
            f"{policy.deadline_s:g}s: check that it is up and reachable from here (endpoint URL, "
            "DNS, network policy, proxy), or raise MMJOBS_STORE_RETRY_DEADLINE_S to wait out "
            "longer outages")
