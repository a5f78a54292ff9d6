"""The six training methods as one config type, `TrainConfig`, chosen by `mode`.

`TrainConfig` is a pydantic discriminated union: a mapping with `mode: dpo` validates as
`DpoConfig` and nothing else, so settings of other modes are errors naming the mode they belong
to (`mmjobs.config_errors`). A mapping without `mode` is an sft config, as before the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from mmjobs.train.methods.align import AlignConfig
from mmjobs.train.methods.common import EvalPass, Problems, TrainBase
from mmjobs.train.methods.dpo import DpoConfig
from mmjobs.train.methods.grpo import GrpoConfig
from mmjobs.train.methods.ppo import PpoConfig
from mmjobs.train.methods.rm import RmConfig
from mmjobs.train.methods.sft import SftConfig

METHODS: dict[str, type[TrainBase]] = {
    "align": AlignConfig, "sft": SftConfig, "dpo": DpoConfig, "rm": RmConfig,
    "ppo": PpoConfig, "grpo": GrpoConfig,
}
TRAIN_MODES = tuple(METHODS)
DEFAULT_MODE = "sft"
PREFERENCE_MODES = ("dpo", "rm")  # train on preference pairs
RL_MODES = ("ppo", "grpo")  # sample their own responses to prompts


def mode_of(value: Any) -> str | None:
    """The `mode` of a train config or its mapping (sft when a mapping has none)."""
    if isinstance(value, Mapping):
        return value.get("mode", DEFAULT_MODE)
    return getattr(value, "mode", DEFAULT_MODE)


# Each member is tagged with its mode, so a bad setting is reported for the chosen mode only
# (pydantic's plain unions report one error per member).
TrainConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(mode)] for mode, cls in METHODS.items())],  # noqa: UP007
    Discriminator(mode_of),
]


@cache
def _adapter() -> TypeAdapter[Any]:
    return TypeAdapter(TrainConfig)


def train_config(data: Mapping[str, Any] | None = None, /, **settings: Any) -> TrainBase:
    """Validate train settings into their mode's config class, e.g.
    `train_config(mode="rm", finetune="full")` -> `RmConfig`.

    Raises:
        pydantic.ValidationError: as for any config model (`mmjobs.config.load_config` turns
            it into a `ConfigError` with one line per problem).
    """
    return _adapter().validate_python({**(data or {}), **settings})


def stage_input_problems(train: TrainBase, *, eval_data: str | None,
                         ptx_data: str | None) -> Problems:
    """Problems of the train stage's extra inputs for `train.mode`, as `(field, message)`:
    `eval_data` needs a mode with an eval pass, `ptx_data` an RL mode."""
    problems = []
    if eval_data and not isinstance(train, EvalPass):
        problems.append(("eval_data", f"train.mode {train.mode} has no eval pass (each step "
                         "logs its responses' reward and KL); remove it"))
    if ptx_data and train.mode not in RL_MODES:
        problems.append(("ptx_data", f"ptx_data is used by train.mode ppo and grpo only (mode "
                         f"is '{train.mode}'); remove it"))
    return problems
