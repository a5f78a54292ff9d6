"""`mode: dpo` — direct preference optimisation on preference pairs.

Objective: `mmjobs.train.preference.DPOObjective` (sigmoid DPO, conservative DPO with label
smoothing, or IPO) against a reference policy: the base weights with the LoRA adapters off, or a
frozen copy of the base model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.config_base import StrictModel
from mmjobs.train.methods.common import EvalPass, FineTuneBase, Problems


class DpoPreference(StrictModel):
    """DPO's loss and reference model (train.preference in mode dpo)."""

    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model; higher "
        "keeps the policy closer to it (IPO: the regularisation tau). 0.1 is the usual start.")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid (the DPO paper; with label_smoothing > 0 conservative "
        "DPO) or ipo (squared loss on per-token log-ratio differences, TRL's "
        "length-normalised form).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO (sigmoid loss only): the assumed "
        "probability that a preference label is flipped. 0 = plain DPO.")
    reference: Literal["implicit_lora", "frozen_copy"] = Field(
        "implicit_lora", description="Reference model: implicit_lora computes reference "
        "log-probs with the LoRA adapters disabled (the base weights; no second copy in "
        "memory; needs finetune: lora); frozen_copy loads a second, frozen copy of the base "
        "model (needed for finetune: full; doubles the weight memory).")


class DpoConfig(EvalPass, FineTuneBase):
    """dpo: direct preference optimisation on preference pairs (full or LoRA)."""

    mode: Literal["dpo"] = Field("dpo", description="Direct preference optimisation.")
    preference: DpoPreference = Field(default_factory=DpoPreference,
                                      description="The DPO loss and its reference model.")

    def problems(self) -> Problems:
        problems = super().problems() + self.packed_problem("preference pairs")
        pref = self.preference
        if self.finetune == "full" and pref.reference == "implicit_lora":
            problems.append(("preference.reference", "implicit_lora takes the reference from "
                             "the base weights with the LoRA adapters disabled, so it needs "
                             "finetune: lora; set preference.reference: frozen_copy for full "
                             "fine-tuning"))
        if pref.loss == "ipo" and pref.label_smoothing > 0:
            problems.append(("preference.label_smoothing", "applies to the sigmoid loss "
                             "(conservative DPO); remove it or use preference.loss: sigmoid"))
        if pref.reference == "frozen_copy" and self.deepspeed.startswith("zero3"):
            problems.append(("preference.reference", "frozen_copy keeps a whole second model "
                             "on every GPU, which ZeRO-3 is meant to avoid; use finetune: lora "
                             "with reference: implicit_lora, or deepspeed: zero2"))
        return problems
