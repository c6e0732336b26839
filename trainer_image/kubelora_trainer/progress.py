"""Training progress: one human log line per logging step, and ``status.progress`` on the LoRAJob.

The tracker turns Trainer events into a :class:`kubelora.api.lorajob.Progress` and hands it to sinks behind
the tiny :class:`ProgressSink` interface: the Kubernetes sink merge-patches the LoRAJob's status
subresource from a background thread (so a slow or unreachable API server never stalls training, and a
failing one is logged, never fatal); tests plug in :class:`RecordingSink`. Sink updates are throttled to
one per ``KUBELORA_PROGRESS_INTERVAL`` seconds (default 3); the final update is always sent.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from kubelora.api.common import GROUP, VERSION, now_rfc3339
from kubelora.api.evaluation import LossSpike
from kubelora.api.lorajob import AdapterInfo, Progress

log = logging.getLogger(__name__)

INTERVAL_ENV = "KUBELORA_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 3.0
PLURAL = "lorajobs"


class ProgressSink(Protocol):
    """Where progress goes. ``publish`` must not block for long and must not raise."""

    def publish(self, progress: Progress) -> None: ...

    def close(self) -> None: ...


class RecordingSink:
    """Keeps every update (for tests and benchmarks)."""

    def __init__(self) -> None:
        self.updates: list[Progress] = []

    def publish(self, progress: Progress) -> None:
        self.updates.append(progress)

    def close(self) -> None:
        pass


class KubeStatusSink:
    """Merge-patches ``status.progress`` of one LoRAJob, latest update wins, from a daemon thread.

    Runs as the ServiceAccount ``<job>-trainer`` (in-cluster config), whose Role allows get/patch on
    ``lorajobs/status`` for this one object only.
    """

    def __init__(self, name: str, namespace: str, api: Any = None, timeout: float = 5.0) -> None:
        self.name, self.namespace, self.timeout = name, namespace, timeout
        self._api = api
        self._latest: Progress | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._failures = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="progress-patch", daemon=True)
        self._thread.start()

    def publish(self, progress: Progress) -> None:
        with self._cond:
            self._latest = progress
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def _send(self, progress: Progress) -> None:
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name,
                {"status": {"progress": progress.wire()}},
                _content_type="application/merge-patch+json", _request_timeout=self.timeout,
            )
            self.sent += 1
            if self._failures:
                log.info("progress updates reach the API server again")
            self._failures = 0
        except Exception as exc:  # never let status reporting kill training
            self._failures += 1
            if self._failures == 1 or self._failures % 20 == 0:
                log.warning("could not patch status.progress of lorajob %s/%s (%d failure(s)): %s",
                            self.namespace, self.name, self._failures, str(exc).splitlines()[0][:200])

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._closing:
                    self._cond.wait()
                progress, self._latest = self._latest, None
                closing = self._closing
            if progress is not None:
                self._send(progress)
            if closing and progress is None:
                return


def default_sinks(name: str, namespace: str) -> list[ProgressSink]:
    """The Kubernetes sink inside a cluster; nothing extra outside one (progress is then only logged)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return [KubeStatusSink(name, namespace)]
    log.info("not running in a cluster (no KUBERNETES_SERVICE_HOST): progress is only logged")
    return []


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _finite(value: Any, digits: int | None = None) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return round(f, digits) if digits is not None else f


class ProgressTracker:
    """Turns Trainer events into Progress updates: a log line per logging step, throttled sink updates."""

    def __init__(self, sinks: list[ProgressSink], interval: float | None = None,
                 checkpoint_uri: Callable[[str], str] | None = None,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False) -> None:
        self.sinks = sinks
        self.quiet = quiet
        """Keep lines in ``log_lines`` but do not log them (ranks other than 0 of a distributed run)."""
        self.interval = progress_interval() if interval is None else interval
        self.checkpoint_uri = checkpoint_uri or (lambda name: name)
        self.clock = clock
        self.progress = Progress()
        self._start: tuple[float, int] | None = None
        self._last_sent = -math.inf
        self._last_tokens: tuple[float, float] | None = None
        self.log_lines: list[str] = []

    # ---------------------------------------------------------------- events
    def start(self, step: int, total: int) -> None:
        """Training (re)starts at ``step``: ETA counts only steps run by this process."""
        self._start = (self.clock(), step)
        self._update(step=step, total_steps=total)
        self._emit(force=True)

    def step(self, step: int, total: int, epoch: float | None) -> None:
        self._update(step=step, total_steps=total, epoch=epoch)
        self._emit()

    def logged(self, step: int, total: int, logs: dict[str, Any]) -> None:
        now = self.clock()
        changes: dict[str, Any] = {"step": step, "total_steps": total}
        if "loss" in logs:
            changes["loss"] = _finite(logs["loss"], 4)  # what `kubectl get lj` shows
        if "learning_rate" in logs:
            changes["learning_rate"] = _finite(logs["learning_rate"])
        if "epoch" in logs:
            changes["epoch"] = _finite(logs["epoch"])
        if "eval_loss" in logs:
            changes["eval_loss"] = _finite(logs["eval_loss"], 4)
        if "rewards/margins" in logs:  # DPO
            changes["reward_margin"] = _finite(logs["rewards/margins"], 4)
        if "rewards/accuracies" in logs:
            changes["reward_accuracy"] = _finite(logs["rewards/accuracies"], 4)
        tokens = _finite(logs.get("num_tokens"))
        if tokens is not None:
            if self._last_tokens is not None and now > self._last_tokens[0] and tokens >= self._last_tokens[1]:
                changes["tokens_per_second"] = round((tokens - self._last_tokens[1]) / (now - self._last_tokens[0]), 1)
            self._last_tokens = (now, tokens)
        self._update(**changes)
        if "loss" in logs or "eval_loss" in logs:
            self._log_line("eval" if "eval_loss" in logs and "loss" not in logs else "train")
        self._emit()

    def saved(self, checkpoint_name: str) -> None:
        self._update(last_checkpoint=self.checkpoint_uri(checkpoint_name))
        if not self.quiet:
            log.info("saved %s", self.progress.last_checkpoint)
        self._emit(force=True)

    def finish(self) -> None:
        """Send the final state of training (100%) to every sink; they stay open for :meth:`published`."""
        p = self.progress
        if p.total_steps and p.step >= p.total_steps:
            self._update(percent=100, eta_seconds=0)
        self._emit(force=True)

    def published(self, adapter: AdapterInfo) -> None:
        """Record the published adapter in the status, so the result outlives the pod and its termination message."""
        self._update(adapter=adapter)
        self._emit(force=True)

    def loss_spiked(self, spike: LossSpike) -> None:
        """Record a loss spike in the status at once (the operator raises the LossSpike condition from it)."""
        self._update(loss_spike=spike)
        self._emit(force=True)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing progress sink failed: %s", exc)

    # ---------------------------------------------------------------- internals
    def _update(self, **changes: Any) -> None:
        data = self.progress.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        step, total = data["step"], data["total_steps"]
        if total:
            data["percent"] = min(100, int(100 * step / total))
        if self._start is not None and total:
            t0, s0 = self._start
            elapsed, done = self.clock() - t0, step - s0
            if done > 0 and elapsed > 0:
                data["eta_seconds"] = max(0, round((total - step) * elapsed / done))
        data["updated_at"] = now_rfc3339()
        self.progress = Progress.model_validate(data)

    def _emit(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_sent < self.interval:
            return
        self._last_sent = now
        for sink in self.sinks:
            try:
                sink.publish(self.progress)
            except Exception as exc:  # a sink must never stop training
                log.warning("progress sink %s failed: %s", type(sink).__name__, exc)

    def _log_line(self, kind: str) -> None:
        p = self.progress

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        line = (f"{kind} step {p.step}/{p.total_steps} ({p.percent}%) epoch {p.epoch:.2f} "
                f"loss {num(p.loss, '.4f')} eval_loss {num(p.eval_loss, '.4f')} lr {num(p.learning_rate, '.3g')} "
                f"{num(p.tokens_per_second, '.0f')} tok/s eta {format_duration(p.eta_seconds)}")
        self.log_lines.append(line)
        if not self.quiet:
            log.info(line)


def make_callback(tracker: ProgressTracker, on_save: Callable[[str], None] | None = None) -> Any:
    """A transformers TrainerCallback feeding ``tracker`` (built lazily: transformers is heavy to import)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tracker.start(state.global_step, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tracker.step(state.global_step, state.max_steps, state.epoch)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs:
                tracker.logged(state.global_step, state.max_steps, logs)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            name = f"checkpoint-{state.global_step}"
            if on_save is not None:
                on_save(os.path.join(args.output_dir, name))
            tracker.saved(name)

    return ProgressCallback()
