"""Pre-flight checks a user can see or ask for: the rendered chat template with its loss mask, and an
optional smoke run that overfits one small batch before the long run.

Two pitfalls the recipes warn about are invisible in a loss curve until hours are spent: a chat template
that renders the rows differently than the model expects (or supervises the wrong tokens), and a setup that
cannot learn at all (a wrong loss mask, frozen targets, a learning rate that does nothing). Pre-flight shows
the first rows exactly as the trainer tokenizes them, supervised tokens between ``[[`` and ``]]``; the
overfit check trains a throwaway adapter on one batch and fails the run early when its loss does not fall.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from kubelora.api.common import ApiModel

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"
"""Markers around the supervised (loss-carrying) tokens of a rendered row."""
RENDERED_ROWS = 2
RENDERED_LIMIT = 600
"""Characters of a rendered row kept (the result must fit a 4 KiB termination message)."""


class OverfitBatch(ApiModel):
    """Train a throwaway adapter on one small batch for a few steps before the run; fail early if the loss does
    not fall (the model, the loss mask or the learning rate cannot learn)."""

    steps: int = Field(default=30, ge=1, le=1000)
    """Optimizer steps on the batch."""
    rows: int = Field(default=4, ge=1, le=64)
    """Training rows in the batch (the first ones)."""
    learning_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    """Learning rate of the smoke run; default: spec.training.learningRate."""
    max_loss: float | None = Field(default=None, gt=0.0)
    """The final loss must be at most this."""
    min_reduction: float | None = Field(default=0.5, gt=0.0, lt=1.0)
    """The final loss must be at most (1 - this) x the first step's loss (0.5: halved)."""

    @model_validator(mode="after")
    def _a_bound(self) -> OverfitBatch:
        if self.max_loss is None and self.min_reduction is None:
            raise ValueError("preflight.overfitBatch: set maxLoss or minReduction")
        return self


class PreflightSpec(ApiModel):
    """Extra pre-flight checks."""

    overfit_batch: OverfitBatch | None = None
    """Overfit one small batch in the training pod before the long run (loads the weights, so it runs there)."""


class RenderedRow(ApiModel):
    """One training row as the trainer tokenizes it, supervised tokens marked."""

    source: str
    """File and line of the row."""
    text: str
    """The rendered text; the tokens that carry the loss are between [[ and ]] (cut to 600 characters)."""
    tokens: int
    """Tokens in the row."""
    supervised: int
    """Tokens that carry the loss."""


class OverfitResult(ApiModel):
    """What the overfit-batch smoke run measured."""

    steps: int
    rows: int
    first_loss: float
    final_loss: float
    passed: bool
    message: str = ""
