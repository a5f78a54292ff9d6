"""One typed config per training method, combined as `TrainConfig` (a union chosen by `mode`).

| mode  | module  | trains on           | objective / recipe                                  |
|-------|---------|---------------------|-----------------------------------------------------|
| align | `align` | conversations       | next-token loss, connector only                     |
| sft   | `sft`   | conversations       | next-token loss, full or LoRA                       |
| dpo   | `dpo`   | preference pairs    | `mmjobs.train.preference.DPOObjective`              |
| rm    | `rm`    | preference pairs    | `mmjobs.train.reward_model.RewardObjective`         |
| ppo   | `ppo`   | prompts (rollouts)  | `mmjobs.train.rl.RLRecipe` + `mmjobs.train.ppo`      |
| grpo  | `grpo`  | prompts (rollouts)  | `mmjobs.train.rl.RLRecipe` + `mmjobs.train.grpo`     |

Each class holds only its own settings (shared ones in `common.TrainBase` / `FineTuneBase` /
`EvalPass`) and checks its combinations in its `problems()`. These modules import pydantic only
(no torch), so `mmjobs.config` and `mmjobs validate` stay fast. The recipe-level `train:`
section (defaults for several steps of different modes) is `defaults.TrainDefaults`.
"""

from mmjobs.train.methods.align import AlignConfig
from mmjobs.train.methods.common import (
    NOT_FINGERPRINTED,
    EvalPass,
    FineTuneBase,
    LayerDropoutConfig,
    LoraConfig,
    TrainBase,
)
from mmjobs.train.methods.defaults import (
    TrainDefaults,
    defaults_for,
    fingerprinted_settings,
    settings_table,
    unused_defaults,
)
from mmjobs.train.methods.dpo import DpoConfig, DpoPreference
from mmjobs.train.methods.grpo import GrpoConfig, GrpoRL
from mmjobs.train.methods.modes import (
    DEFAULT_MODE,
    METHODS,
    PREFERENCE_MODES,
    RL_MODES,
    TRAIN_MODES,
    TrainConfig,
    mode_of,
    stage_input_problems,
    train_config,
)
from mmjobs.train.methods.ppo import PpoConfig, PpoRL
from mmjobs.train.methods.rl import RewardConfig, RLBase
from mmjobs.train.methods.rm import RmConfig, RmPreference
from mmjobs.train.methods.sft import SftConfig

__all__ = [
    "DEFAULT_MODE", "METHODS", "NOT_FINGERPRINTED", "PREFERENCE_MODES", "RL_MODES",
    "TRAIN_MODES", "AlignConfig", "DpoConfig", "DpoPreference", "EvalPass", "FineTuneBase",
    "GrpoConfig", "GrpoRL", "LayerDropoutConfig", "LoraConfig", "PpoConfig", "PpoRL", "RLBase",
    "RewardConfig", "RmConfig", "RmPreference", "SftConfig", "TrainBase", "TrainConfig",
    "TrainDefaults", "defaults_for", "fingerprinted_settings", "mode_of", "settings_table",
    "stage_input_problems", "train_config", "unused_defaults",
]
