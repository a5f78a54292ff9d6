"""Run the hostile PoT programs as whoever runs this script and print their results as JSON.

`test_pot_hostile.py` starts it as uid 65534 (`setpriv`), with an interpreter that user can
read, to show the sandbox holds for a non-root evaluator too:

    python -I pot_hostile_driver.py REPO_ROOT < {"world": ..., "mode": "full" | "os-only"}

The evaluator is this process: its pid becomes the world's `parent`, and its environment
holds the canary.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    sys.path[:0] = [sys.argv[1]]
    from mmjobs.eval.pot import run_programs
    from tests.unit.eval.pot_hostile import HOSTILE, suite_settings

    request = json.load(sys.stdin)
    world = {**request["world"], "parent": os.getpid()}
    limits, isolation = suite_settings(request["mode"], site_packages=False)
    results = run_programs([case.render(world) for case in HOSTILE], limits=limits,
                           isolation=isolation, workers=int(request["workers"]))
    json.dump({"parent": os.getpid(), "uid": os.getuid(),
               "results": {case.name: r.to_dict() for case, r in zip(HOSTILE, results,
                                                                      strict=True)}},
              sys.stdout)


if __name__ == "__main__":
    main()
