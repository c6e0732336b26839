"""Graceful stop on SIGTERM: save a checkpoint at the end of the current step, then exit.

Kubernetes sends SIGTERM when a LoRAJob is suspended, its Job is deleted or the node drains, and SIGKILL
after the grace period (30 s by default). Without a handler Python dies at once and the work since the last
``saveSteps`` checkpoint is lost; with it, the trainer finishes the step it is in, writes a checkpoint and
stops, so the resumed run loses nothing. If saving takes longer than the grace period the SIGKILL leaves an
incomplete checkpoint, which the resume logic skips (see :mod:`kubelora_trainer.checkpoints`).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class GracefulStop:
    """Remembers that a stop was requested; the callback turns that into save-and-stop at a step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under some test runners)
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", self.signal_name)

    def callback(self, rank: Any = None) -> Any:
        """A TrainerCallback that saves and stops once a stop was requested.

        With several processes the decision is taken together (one tiny all-reduce per step): saving is a
        collective, so a pod that got SIGTERM alone (an eviction) must not save while its peers step on.
        """
        from transformers import TrainerCallback

        from kubelora_trainer import distributed

        stop = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if rank is not None and rank.distributed and distributed.any_rank(stop.requested, rank) \
                        and not stop.requested:
                    stop.requested, stop.signal_name = True, "a peer's SIGTERM"
                if stop.requested:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()
