"""`mode: sft` — supervised fine-tuning on conversations, full or LoRA.

Objective: next-token loss on the assistant tokens
(`mmjobs.train.objectives.LanguageModelingObjective`); what trains is decided by
`finetune`, `lora` and `freeze_*` (`mmjobs.train.model_setup.prepare_for_training`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.train.methods.common import EvalPass, FineTuneBase


class SftConfig(EvalPass, FineTuneBase):
    """sft: fine-tune on conversations (full weights or LoRA adapters)."""

    mode: Literal["sft"] = Field("sft", description="Supervised fine-tuning on conversations.")
