"""What a stage does when its pod is told to stop (SIGTERM), in one place.

Kubernetes sends SIGTERM when it evicts, preempts or deletes a pod, then SIGKILL after
`terminationGracePeriodSeconds`. Stages react in one of a few ways: training sets a flag and
checkpoints at the next step boundary, inference raises so the rows answered so far are
uploaded, a multi-node launcher deletes its job, a server shuts down and returns normally.
`handling` installs such a reaction for the duration of a block and restores the previous
handler afterwards. Python delivers signals to the main thread only, so off the main thread
it installs nothing and says so (it yields False).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

EXIT_BASE = 128  # a process ended by signal N exits 128 + N, as shells and Kubernetes expect


@contextlib.contextmanager
def handling(react: Callable[[int], object],
             signals: Sequence[signal.Signals] = (signal.SIGTERM,)) -> Iterator[bool]:
    """Call `react(signum)` when one of `signals` arrives while the block runs.

    Yields True if the handler is installed, False off the main thread (nothing installed).
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: react(signum)) for sig in signals}
    try:
        yield True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_for(signum: int) -> NoReturn:
    """Raise `SystemExit(128 + signum)`: unwinds the stack (`finally` blocks and `except
    BaseException` clean-ups run) and ends the process with the code a signal death has."""
    raise SystemExit(EXIT_BASE + signum)


def sigterm_exits() -> contextlib.AbstractContextManager[bool]:
    """SIGTERM raises `SystemExit(143)` in the block, so clean-ups run within the grace
    period (instead of the default: the process dies where it stands)."""
    return handling(exit_for)


def stop_signals_return() -> contextlib.AbstractContextManager[bool]:
    """SIGINT and SIGTERM do nothing in the block beyond what the code running there makes of
    them (a server that shuts itself down gracefully, then returns)."""
    return handling(lambda signum: None, (signal.SIGINT, signal.SIGTERM))
