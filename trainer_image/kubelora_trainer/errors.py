"""Failures the trainer reports in its termination message.

Each carries the ``Reason`` the operator shows and the exit code the Job sees: 2 for bad input (the
dataset, the spec or the base model: a retry cannot help, so the operator does not retry), 1 otherwise.
"""

from __future__ import annotations

from kubelora.api.reasons import Reason
from kubelora.api.runtime import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_STOPPED


class TrainerError(Exception):
    """A failure with a reason, a human message and an exit code."""

    reason: str = Reason.TRAINING_FAILED.value
    exit_code: int = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidDatasetError(TrainerError):
    """The dataset is unreadable or malformed; the message names the file, the line and the fix."""

    reason = Reason.INVALID_DATASET.value
    exit_code = EXIT_BAD_INPUT


class BaseModelUnavailableError(TrainerError):
    """The base model (or its tokenizer) cannot be found or loaded."""

    reason = Reason.BASE_MODEL_UNAVAILABLE.value
    exit_code = EXIT_BAD_INPUT


class InvalidSpecError(TrainerError):
    """The config file is missing, not JSON, or breaks a rule of the API."""

    reason = Reason.INVALID_SPEC.value
    exit_code = EXIT_BAD_INPUT


class TrainingFailedError(TrainerError):
    """Training or publishing failed for a reason a retry may fix (I/O, OOM, a killed node...)."""

    reason = Reason.TRAINING_FAILED.value
    exit_code = EXIT_FAILED


class TrainingStoppedError(TrainerError):
    """SIGTERM (suspend, Job deletion, node drain): a checkpoint was saved and the run stopped early."""

    reason = Reason.TRAINING_FAILED.value
    exit_code = EXIT_STOPPED
