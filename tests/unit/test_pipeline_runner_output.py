"""`mmjobs run` leaves the process's output as it found it."""

from __future__ import annotations

import builtins
import sys
import threading
from types import SimpleNamespace

from kfp.local import logging_utils

from mmjobs import pipeline_logs


def test_parallel_kfp_tasks_do_not_leave_print_indented() -> None:
    original_print, original_stdout = builtins.print, sys.stdout
    # Two tasks whose indented_print scopes interleave (A enters, B enters, A exits, B exits),
    # as parallel tasks of KFP's local runner do: B restores A's indenting print on exit.
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def task_a() -> None:
        with logging_utils.indented_print():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def task_b() -> None:
        a_in.wait(5)
        with logging_utils.indented_print():
            b_in.set()
            a_out.wait(5)

    with pipeline_logs.step_logs(False, SimpleNamespace(steps=[])):
        threads = [threading.Thread(target=task_a), threading.Thread(target=task_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert builtins.print is not original_print  # KFP's race did leave one behind
    assert builtins.print is original_print
    assert sys.stdout is original_stdout
