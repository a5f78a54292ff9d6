"""`helm test`: MLflow answers /health (and accepts the pipeline credentials when auth is
on), and the bucket is reachable with the S3 credentials the pipelines use.

Usage: python3 check_install.py
Env: MLFLOW_TRACKING_URI, S3_BUCKET, AWS_* (credentials, region, optional endpoint),
     MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (only with auth),
     CHECK_TIMEOUT (seconds per HTTP request, default 60: basic auth hashes the password
     on every request, which takes a while on a busy server).
Exit status: 0 when every check passes, 1 otherwise (each failure is printed).
"""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request


def check_mlflow(uri: str, username: str | None, password: str | None,
                 timeout: float = 60) -> list[str]:
    """Problems with the tracking server, or [] when it is healthy (and login works)."""
    problems = []
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            body = response.read().decode().strip()
            if body != "OK":
                problems.append(f"MLflow {uri}/health answered {body!r}, not 'OK'")
    except (urllib.error.URLError, OSError) as e:
        return [f"MLflow {uri}/health: {e}"]
    if username:
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as e:
            problems.append(f"MLflow login as {username!r} failed: HTTP {e.code}")
        except (urllib.error.URLError, OSError) as e:
            problems.append(f"MLflow API: {e}")
    return problems


def check_s3(bucket: str) -> list[str]:
    """Problems reaching `bucket` with the environment's credentials, or []."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as e:
        return [f"S3 bucket {bucket!r}: {e}"]
    return []


def main() -> int:
    problems = check_mlflow(os.environ["MLFLOW_TRACKING_URI"].rstrip("/"),
                            os.environ.get("MLFLOW_TRACKING_USERNAME"),
                            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
                            float(os.environ.get("CHECK_TIMEOUT", "60")))
    problems += check_s3(os.environ["S3_BUCKET"])
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if not problems:
        print("OK: MLflow is healthy and the bucket is reachable")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
