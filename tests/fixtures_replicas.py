"""Session fixtures: the tiny replicas of the seed base models, built once per test session.

Use from a test directory by importing the fixture into its `conftest.py`::

    from tests.fixtures_replicas import replica_dir  # noqa: F401

(or list `"tests.fixtures_replicas"` in the root conftest's `pytest_plugins`). `replica_dir`
is a function: `replica_dir("llava-hf/llava-1.5-7b-hf")` builds that replica the first time it
is asked for (2-10 s each on 2 cores) and returns the same directory afterwards; under
pytest-xdist the workers share one build (tests/once.py). Treat the directories as read-only:
copy one before changing it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.once import build_once


@pytest.fixture(scope="session")
def replica_dir(tmp_path_factory) -> Callable[[str], Path]:
    """`get(hub_id) -> Path` of the replica's directory (built on first use)."""
    from mmjobs.models.replicas import build_replica

    base = tmp_path_factory.getbasetemp()
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_once(base, "replica-" + name.replace("/", "--"),
                                     lambda scratch: build_replica(name, scratch))
        return built[name]

    return get


@pytest.fixture(scope="session")
def lavin_model_dir(replica_dir, tmp_path_factory) -> Path:
    """A LaVIN built from the Meta-format LLaMA replica and the 224 px CLIP replica (float32,
    adapters seeded), once per session. Read-only, like the replicas."""
    from mmjobs.models.lavin.compose import build_lavin

    out = tmp_path_factory.getbasetemp() / "lavin-replica"
    if not (out / "generation_config.json").is_file():  # written last
        build_lavin(replica_dir("meta/llama-7b"), replica_dir("openai/clip-vit-large-patch14"),
                    out, seed=1, dtype="float32")
    return out
