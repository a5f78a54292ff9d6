"""Entrypoint of the PoT pod (`python -m mmjobs.eval.pot.job`; see `mmjobs.eval.pot.pod`).

The pod holds no credentials: it gets two presigned store URLs and its settings in the
environment, and nothing else:

- POT_PROGRAMS_URL: GET {"programs": [source, ...]};
- POT_RESULTS_URL: PUT {"results": [PotResult as dict, ...], "protections": [...]}, or
  {"error": "..."} when the sandbox cannot run here (the evaluate step raises it);
- POT_CONFIG: {"limits": SandboxLimits fields, "isolation": Isolation fields, "workers": n,
  "split_locals": bool}.

Before any program runs, the process makes itself non-dumpable, so a program running as the
same user (with `isolation: none`) cannot read the URLs from /proc/<pid>/environ or its
memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import urllib.request
from typing import Any

from mmjobs.eval.pot.launch import SandboxError
from mmjobs.eval.pot.sandbox import Isolation, SandboxLimits, check_isolation, run_programs

MAX_PROGRAMS_BYTES = 256 << 20
TIMEOUT_S = 120
ENV_KEYS = ("POT_PROGRAMS_URL", "POT_RESULTS_URL", "POT_CONFIG")


def main() -> int:
    """Fetch, run, upload; returns the process exit status."""
    missing = [k for k in ENV_KEYS if not os.environ.get(k)]
    if missing:
        print(f"mmjobs.eval.pot.job: {', '.join(missing)} not set (this runs in the PoT pod "
              "that the evaluate stage creates)", file=sys.stderr)
        return 2
    programs_url, results_url = os.environ["POT_PROGRAMS_URL"], os.environ["POT_RESULTS_URL"]
    config = json.loads(os.environ["POT_CONFIG"])
    _not_dumpable()
    programs = _fetch(programs_url)["programs"]
    if not isinstance(programs, list) or not all(isinstance(p, str) for p in programs):
        _put(results_url, {"error": "programs document: expected a list of strings"})
        return 1
    isolation = Isolation(**config["isolation"])
    limits = SandboxLimits(**config["limits"])
    try:
        protections = check_isolation(isolation)
        results = run_programs(programs, limits=limits, isolation=isolation,
                               workers=int(config["workers"]),
                               split_locals=bool(config["split_locals"]))
    except SandboxError as e:
        _put(results_url, {"error": str(e)})
        print(f"mmjobs.eval.pot.job: {e}", file=sys.stderr)
        return 3
    _put(results_url, {"results": [r.to_dict() for r in results],
                       "protections": list(protections)})
    print(f"mmjobs.eval.pot.job: ran {len(results)} programs", file=sys.stderr)
    return 0


def _not_dumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid> of this process becomes root's, no ptrace."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux/glibc: the other layers still hold
        pass


def _fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        data = response.read(MAX_PROGRAMS_BYTES + 1)
    if len(data) > MAX_PROGRAMS_BYTES:
        raise ValueError(f"programs document larger than {MAX_PROGRAMS_BYTES} bytes")
    return json.loads(data)


def _put(url: str, document: dict[str, Any]) -> None:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        response.read()


if __name__ == "__main__":
    sys.exit(main())
