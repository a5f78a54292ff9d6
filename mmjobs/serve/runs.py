"""The models of a finished run to serve side by side: each setting's merged model.

    swept_models("~/.mmjobs/store/lavin-sweep/run-1a2b3c")  # [ServedModel(name="baseline",
                                                             #   model=".../merge-baseline"), ...]

A run's outputs follow the store layout `{store}/{experiment}/{run_id}/{step}`; a sweep's
merge step writes `merge-<setting>` for each setting (a recipe without a sweep: `merge`). Only
committed folders count (a manifest is written last), so a setting still training or one whose
merge failed is never served as if it were finished: it is named in a warning instead.
`mmjobs.pipeline_runner.run_dir` finds a local run's folder from its recipe (`mmjobs chat`).
"""

from __future__ import annotations

from mmjobs import storage
from mmjobs.logs import get_logger
from mmjobs.serve.config import ServedModel

__all__ = ["RunModelsError", "swept_models"]

log = get_logger(__name__)
MERGE_STEP = "merge"


class RunModelsError(ValueError):
    """The run folder has no finished model to serve."""


def swept_models(run: str) -> list[ServedModel]:
    """Each committed `merge-<setting>` (or `merge`) folder directly under `run`, named after
    its setting, in name order.

    Raises:
        RunModelsError: none is committed (the message says what the folder holds).
    """
    steps: dict[str, bool] = {}  # step folder -> committed
    for obj in storage.list_objects(run):
        step, _, rest = obj.relpath.partition("/")
        if step == MERGE_STEP or step.startswith(MERGE_STEP + "-"):
            steps[step] = steps.get(step, False) or rest == storage.MANIFEST_NAME
    finished = sorted(s for s, committed in steps.items() if committed)
    unfinished = sorted(s for s, committed in steps.items() if not committed)
    if unfinished:
        log.warning("%s: not serving %s: not committed (the step is running, or it failed; "
                    "run the recipe again to finish it)", run, ", ".join(unfinished))
    if not finished:
        what = (f"only unfinished {', '.join(unfinished)}" if unfinished
                else "no merge or merge-<setting> folder")
        raise RunModelsError(f"run {run}: nothing to serve, it has {what}. Finish the run "
                             "first (`mmjobs run RECIPE` with the same --set overrides), or "
                             "point run at a finished run's folder ({store}/{experiment}/"
                             "{run_id}: `store` in mmjobs run's summary)")
    return [ServedModel(name=_setting(step), model=storage.join(run, step))
            for step in finished]


def _setting(step: str) -> str:
    """`merge-dec-dropout` -> `dec-dropout`; an unswept run's `merge` keeps its name."""
    return step.removeprefix(MERGE_STEP + "-") if step != MERGE_STEP else step
