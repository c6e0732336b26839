"""Early stopping and the loss-spike warning: the pure decisions, the progress record, and the LossSpike
condition with its one Warning Event that the operator derives from it."""

from __future__ import annotations

import pytest

from kubelora.api.evaluation import EarlyStopping, LossSpike
from kubelora.reconcile.lorajob import needs_reconcile
from kubelora_trainer.progress import ProgressTracker, RecordingSink
from kubelora_trainer.watch import EarlyStopper, SpikeDetector

from .test_lorajob_world import LATER, cond, running_world

STEADY = [4.0, 3.5, 3.2, 3.0, 2.9, 2.8]


def feed(detector: SpikeDetector, losses: list[float]) -> list[LossSpike | None]:
    return [detector.observe(step, loss) for step, loss in enumerate(losses, start=1)]


def test_a_spike_needs_history_and_the_factor() -> None:
    assert feed(SpikeDetector(3.0), [1.0, 9.0, 1.0, 1.0, 1.0]) == [None] * 5, "no verdict on 4 points"
    detector = SpikeDetector(3.0)
    assert feed(detector, [*STEADY, 8.0]) == [None] * 7, "2.6x the median is no spike"
    spike = detector.observe(8, 10.0)
    assert spike == LossSpike(step=8, loss=10.0, median=3.2, count=1)
    again = detector.observe(9, 12.0)
    assert again is not None and (again.step, again.count) == (8, 2), "the first spike is kept, later ones counted"
    assert list(detector.history)[-1] == 8.0, "spiking values do not become the baseline"


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stops_at"),
    [
        pytest.param([3.0, 2.0, 1.0, 0.5], 1, 0.0, None, id="improving"),
        pytest.param([3.0, 2.0, 2.5, 2.6], 2, 0.0, 4, id="rises-twice"),
        pytest.param([3.0, 2.0, 2.5, 1.0, 2.1], 2, 0.0, None, id="one-bad-then-better"),
        pytest.param([3.0, 2.95, 2.9], 2, 0.1, 3, id="improvements-below-min-delta"),
    ],
)
def test_early_stopper(losses: list[float], patience: int, min_delta: float, stops_at: int | None) -> None:
    stopper = EarlyStopper(EarlyStopping(patience=patience, minDelta=min_delta))
    decisions = [stopper.observe(step, loss) for step, loss in enumerate(losses, start=1)]
    assert stopper.stopped_at == stops_at
    assert decisions[-1] is (stops_at is not None)


def test_a_spike_reaches_the_status_at_once() -> None:
    sink = RecordingSink()
    tracker = ProgressTracker([sink], interval=3600.0)
    tracker.loss_spiked(LossSpike(step=8, loss=9.5, median=3.1))
    assert sink.updates[-1].loss_spike == LossSpike(step=8, loss=9.5, median=3.1)
    assert sink.updates[-1].wire()["lossSpike"] == {"step": 8, "loss": 9.5, "median": 3.1, "count": 1}


def test_the_operator_raises_loss_spike_once() -> None:
    world = running_world()
    steady = world.reconcile(LATER)
    assert (cond(steady, "LossSpike")["status"], cond(steady, "LossSpike")["reason"]) == ("False", "LossSteady")
    assert world.status is not None
    world.status["progress"] = {"step": 8, "lossSpike": {"step": 8, "loss": 9.5, "median": 3.1, "count": 1}}
    assert needs_reconcile("MODIFIED", world.body), "a recorded spike is worth a reconcile"
    plan = world.step(LATER)
    spike = cond(plan, "LossSpike")
    assert (spike["status"], spike["reason"], spike["observedGeneration"]) == ("True", "LossSpiked", 1)
    assert spike["message"].startswith("training loss 9.5 at step 8 is 3.1x the median 3.1 of the steps before it")
    assert plan.warnings == (("LossSpiked", spike["message"]),)
    assert not needs_reconcile("MODIFIED", world.body)
    again = world.reconcile(LATER)
    assert (again.patch, again.warnings) == ({}, ())
