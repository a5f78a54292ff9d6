"""Session fixtures: tiny models built from configs once per test session (a few seconds).

Use from any test directory by importing the fixtures into its `conftest.py`::

    from tests.fixtures_models import tiny_chameleon_dir, tiny_llava_dir  # noqa: F401

(or list `"tests.fixtures_models"` in the root conftest's `pytest_plugins`). The models are
built under the run's temp dir and reused by every directory that imports the fixtures and
by every pytest-xdist worker, so they are built once even when several conftests import them.
Treat the directories as read-only: copy one before changing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.once import build_once

__all__ = ["build_once", "tiny_chameleon_dir", "tiny_llava_dir"]


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (16 image tokens per 56x56 image) saved with its processor."""
    from mmjobs.models.tiny import build_tiny_llava

    return build_once(tmp_path_factory.getbasetemp(), "llava", build_tiny_llava)


@pytest.fixture(scope="session")
def tiny_chameleon_dir(tmp_path_factory) -> Path:
    """A tiny Chameleon (16 VQ tokens per 32x32 image) saved with its processor."""
    from mmjobs.models.tiny import build_tiny_chameleon

    return build_once(tmp_path_factory.getbasetemp(), "chameleon", build_tiny_chameleon)
