"""Replica fixtures for this folder (until the root conftest lists tests.fixtures_replicas)."""

from tests.fixtures_replicas import replica_dir  # noqa: F401
