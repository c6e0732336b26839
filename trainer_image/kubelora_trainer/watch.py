"""Watching a run while it trains: early stopping on the eval loss, and a warning when the loss spikes.

Both are pitfalls the recipes name: an eval loss that stops falling (or rises) after the first epoch means
further steps only overfit; a training loss that suddenly jumps is usually a learning rate that is too high.
The decisions are small pure classes (unit-tested on plain numbers); :func:`make_watch_callback` feeds them
from transformers' callback events. A spike is recorded in ``status.progress.lossSpike`` (the operator turns
it into the LossSpike condition and a Warning Event); early stopping sets ``control.should_training_stop``,
which ends ``trainer.train()`` normally, so the run evaluates and publishes as usual.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from typing import Any

from kubelora.api.evaluation import EarlyStopping, EvaluationSpec, LossSpike, spike_message

log = logging.getLogger(__name__)

SPIKE_MIN_HISTORY = 5
"""Logged losses needed before a spike can be judged (the first steps of a run fall fast)."""
SPIKE_WINDOW = 20


class SpikeDetector:
    """A loss above ``factor`` x the median of the previous logged losses (at least 5, the last 20)."""

    def __init__(self, factor: float, window: int = SPIKE_WINDOW) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.spike: LossSpike | None = None

    def observe(self, step: int, loss: float) -> LossSpike | None:
        """The spike record when ``loss`` spikes (the first one is kept, later ones counted), else None."""
        spiked = None
        if len(self.history) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                if self.spike is None:
                    self.spike = LossSpike(step=step, loss=round(loss, 4), median=round(median, 4))
                else:
                    self.spike = self.spike.model_copy(update={"count": self.spike.count + 1})
                spiked = self.spike
        # A spiking value is not history: a run that stays high keeps being compared with what it was.
        if spiked is None:
            self.history.append(loss)
        return spiked


class EarlyStopper:
    """Stop after ``patience`` evaluations in a row that did not lower the best eval loss by ``min_delta``."""

    def __init__(self, config: EarlyStopping) -> None:
        self.patience = config.patience
        self.min_delta = config.min_delta
        self.best: float | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def observe(self, step: int, eval_loss: float) -> bool:
        if self.best is None or eval_loss < self.best - self.min_delta:
            self.best, self.bad = eval_loss, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.stopped_at = step
            return True
        return False


def make_watch_callback(spec: EvaluationSpec, has_eval: bool, on_spike: Any) -> Any:
    """The TrainerCallback; ``on_spike(LossSpike)`` records a spike (the progress tracker)."""
    from transformers import TrainerCallback

    detector = SpikeDetector(spec.loss_spike_factor)
    stopper = EarlyStopper(spec.early_stopping) if spec.early_stopping is not None and has_eval else None
    if spec.early_stopping is not None and not has_eval:
        log.warning("spec.evaluation.earlyStopping is set but there is no eval set: training runs every step")

    class WatchCallback(TrainerCallback):  # type: ignore[misc]
        stopped_early = False

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if isinstance(loss, int | float):
                spike = detector.observe(state.global_step, float(loss))
                if spike is not None:
                    log.warning("loss spike: %s", spike_message(spike))
                    on_spike(spike)

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                        **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if stopper is None or not isinstance(loss, int | float):
                return
            if stopper.observe(state.global_step, float(loss)):
                log.info("early stopping at step %d: eval loss has not improved on %.4f for %d evaluations",
                         state.global_step, stopper.best or 0.0, stopper.patience)
                self.stopped_early = True
                control.should_training_stop = True

    return WatchCallback()


def stopped_early(trainer: Any) -> bool:
    """Whether the watch callback of ``trainer`` stopped training."""
    return any(getattr(cb, "stopped_early", False) for cb in trainer.callback_handler.callbacks)
