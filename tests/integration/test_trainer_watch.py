"""Early stopping and the loss-spike warning with the real trainer on the demo's model, data and LoRAJob."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubelora.api.evaluation import EvaluationSpec, LossSpike

from .test_trainer_evaluation import demo_model, demo_run, run_trainer  # noqa: F401  (demo_model: a fixture)

pytestmark = pytest.mark.integration


def test_early_stopping_ends_the_run_and_it_still_evaluates_and_publishes(
        demo_model: Path, tmp_path: Path) -> None:  # noqa: F811
    # No evaluation can improve by 100: with patience 1 the second evaluation (step 40 of 60) stops training.
    run = demo_run(tmp_path, demo_model, earlyStopping={"patience": 1, "minDelta": 100.0}, gate=None,
                   references=[], samples=0)
    result = run_trainer(run)
    assert result.ok and result.adapter is not None and result.evaluation is not None
    assert result.metrics["global_step"] == 40.0 and result.evaluation.stopped_early is True
    assert result.evaluation.adapter.loss is not None


def test_the_watch_callback_reports_a_spike_from_the_trainer_logs() -> None:
    from transformers import TrainerControl, TrainerState

    from kubelora_trainer.watch import make_watch_callback

    seen: list[LossSpike] = []
    callback = make_watch_callback(EvaluationSpec(), has_eval=False, on_spike=seen.append)
    state, control = TrainerState(), TrainerControl()
    logs: list[dict[str, Any]] = [{"loss": x} for x in (4.0, 3.5, 3.2, 3.0, 2.9, 2.8)] + [{"loss": 30.0}]
    for step, entry in enumerate(logs, start=1):
        state.global_step = step
        callback.on_log(None, state, control, logs=entry)
    assert seen == [LossSpike(step=7, loss=30.0, median=3.1, count=1)]
