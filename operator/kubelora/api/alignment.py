"""Alignment objectives: ``spec.objective: dpo`` trains the adapter on preference pairs instead of examples.

DPO (Direct Preference Optimisation) raises the likelihood of the chosen answer over the rejected one,
relative to a reference policy; with LoRA the reference is the base model itself (the adapter switched
off), so alignment costs no second copy of the weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubelora.api.cel import Rule
from kubelora.api.common import ApiModel

Objective = Literal["sft", "dpo"]
DPO_NEEDS_A_DATASET = Rule("!has(self.objective) || self.objective != 'dpo' || has(self.dataset)",
                           "objective dpo trains on a preference dataset: set dataset (rows of prompt, chosen, "
                           "rejected), not combine", field_path=".objective")


class DpoSpec(ApiModel):
    """DPO hyperparameters (TRL DPOConfig); used when objective is dpo."""

    beta: float = Field(default=0.1, gt=0.0, le=10.0)
    """How far the policy may move from the reference: larger keeps it closer to the base model."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo: IPO's squared loss (less prone to overfitting the pairs); hinge: SLiC;
    robust: DPO robust to some flipped labels."""
