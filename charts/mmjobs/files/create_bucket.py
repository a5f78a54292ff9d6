"""Create the S3 bucket if it does not exist (Helm hook job run with the chart's MinIO).

Retries while the server is still starting, for up to TIMEOUT seconds.

Usage: python3 create_bucket.py BUCKET
Env: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
     CREATE_BUCKET_TIMEOUT (seconds, default 300).
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

NOT_FOUND = {"404", "NoSuchBucket", "NotFound"}


def ensure_bucket(client, bucket: str, region: str) -> bool:
    """Create `bucket` unless it exists; True if it was created."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in NOT_FOUND:
            raise
    kwargs = {}
    if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=bucket, **kwargs)
    except ClientError as e:  # another replica of this job won the race
        if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise
        return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: create_bucket.py BUCKET", file=sys.stderr)
        return 2
    bucket = argv[0]
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                          region_name=region)
    deadline = time.monotonic() + float(os.environ.get("CREATE_BUCKET_TIMEOUT", "300"))
    while True:
        try:
            created = ensure_bucket(client, bucket, region)
            print(f"bucket {bucket}: {'created' if created else 'exists'}")
            return 0
        except (EndpointConnectionError, BotoCoreError) as e:
            if time.monotonic() > deadline:
                print(f"bucket {bucket}: S3 endpoint not reachable: {e}", file=sys.stderr)
                return 1
            print(f"waiting for the S3 endpoint: {e}")
            time.sleep(5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
