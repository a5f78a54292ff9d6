"""What every config model builds on: `StrictModel`, and combination problems named per field.

Kept apart from `mmjobs.config` (the recipe) so component packages can define their own
config models (e.g. `mmjobs.train.methods`) without importing the recipe module, which
imports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

PROBLEMS_ERROR = "config_problems"


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def config_problems(problems: Sequence[tuple[str, str]]) -> PydanticCustomError:
    """One validation error for several problems that no single field can check.

    Args:
        problems: `(field, message)` pairs; `field` is the dotted path of the setting to change,
            relative to the model whose validator raises (e.g. `rl.reward.model`).

    Returns:
        The error to raise from a model validator. `mmjobs.config_errors` reports it as one
        line per problem, each named by its full path (`train.rl.reward.model: ...`); pydantic's
        own message joins them with "; ".
    """
    summary = "; ".join(f"{field}: {message}" for field, message in problems)
    return PydanticCustomError(PROBLEMS_ERROR, "{summary}",
                               {"summary": summary, "problems": list(problems)})
