"""`needs_pot_isolation`: skip tests that run PoT programs where bubblewrap cannot isolate them.

The sandbox fails closed (SandboxError) without bubblewrap or user namespaces; `.ci/run`
installs bubblewrap, so these tests run in CI. The reason names what is missing.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def pot_isolation_problem() -> str | None:
    """Why PoT programs cannot be isolated here, or None when they can."""
    from mmjobs.eval.pot import SandboxError, check_isolation

    try:
        check_isolation()
    except SandboxError as e:
        return str(e)
    return None


needs_pot_isolation = pytest.mark.skipif(
    pot_isolation_problem() is not None,
    reason=f"PoT isolation unavailable here: {pot_isolation_problem()}")
