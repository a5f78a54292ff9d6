"""`mode: align` — the connector alone learns to map vision features into the language model.

LLaVA's projector pretraining, ChartWiz stage 1, ChartMoE's diverse alignment. The vision
tower and the language model stay frozen and the connector trains in full, so align has no
adapter or freeze settings. Objective: next-token loss on the assistant tokens
(`mmjobs.train.objectives.LanguageModelingObjective`); export: `final/connector/`
(`mmjobs.train.model_setup.export_final`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmjobs.train.methods.common import EvalPass, TrainBase


class AlignConfig(EvalPass, TrainBase):
    """align: train the vision-to-text connector on conversations, everything else frozen."""

    mode: Literal["align"] = Field("align", description="Train the connector alone.")
