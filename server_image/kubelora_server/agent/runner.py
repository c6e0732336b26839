"""The agent's loop: observe the engine, ask the state machine, carry out its actions.

One step: ``GET /health`` + ``GET /v1/models`` -> :func:`state.plan` -> start fetches (in worker threads, so
one slow adapter never delays the others), then unloads, then loads (unloads first, so a slot freed by a
removed adapter is free before a new one needs it). A step runs on every change of the desired set, after
every fetch and load, and at least every ``resync_interval`` seconds - the latter is what notices an engine
restart (its ``/v1/models`` lists no adapters) and what retries failures when their backoff ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from kubelora.api.reasons import Reason
from kubelora.api.runtime import AgentAdapterState, AgentReport, DesiredAdapters
from kubelora_server.agent.engine_client import (
    AdapterAlreadyLoaded,
    AdapterNotLoaded,
    EngineClient,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    RuntimeLoRADisabled,
)
from kubelora_server.agent.fetch import collect_garbage, fetch_and_check
from kubelora_server.agent.metrics import AgentMetrics
from kubelora_server.agent.sources import DesiredSource
from kubelora_server.agent.state import (
    EngineView,
    Fetch,
    Load,
    Policy,
    Problem,
    Ready,
    Record,
    Unload,
    Want,
    cache_paths_in_use,
    is_ready,
    on_fetched,
    on_loaded,
    plan,
    stays_ready,
)

log = logging.getLogger(__name__)
Fetcher = Callable[[Want, DesiredAdapters, Path], Ready | Problem]


def rfc3339(ts: float) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Agent:
    """Holds the records and the last engine view; everything else is delegated."""

    def __init__(self, source: DesiredSource, engine: EngineClient, cache_dir: Path, *, pod: str = "",
                 policy: Policy | None = None, resync_interval: float = 5.0,
                 fetcher: Fetcher = fetch_and_check, clock: Callable[[], float] = time.time,
                 metrics: AgentMetrics | None = None) -> None:
        self.source = source
        self.engine = engine
        self.cache_dir = cache_dir
        self.pod = pod
        self.policy = policy or Policy()
        self.resync_interval = resync_interval
        self.fetcher = fetcher
        self.clock = clock
        self.metrics = metrics or AgentMetrics()
        self.records: dict[str, Record] = {}
        self.engine_view: EngineView | None = None
        self.last_step = 0.0
        self._wake = asyncio.Event()
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._engine_was_healthy = False
        self._ready = False

    # ---- what the HTTP endpoints read -------------------------------------------------------------------

    def ready(self) -> bool:
        return self._ready

    def alive(self) -> bool:
        """The loop stepped recently (the liveness probe restarts a wedged agent)."""
        return time.monotonic() - self.last_step < max(30.0, 6 * self.resync_interval)

    def report(self) -> AgentReport:
        desired = self.source.desired
        names = [a.name for a in desired.adapters] if desired else list(self.records)
        states = []
        for name in names:
            rec = self.records.get(name)
            if rec is None:
                continue
            states.append(AgentAdapterState(
                name=name, state=rec.state, digest=rec.ready.digest if rec.ready else rec.want.pin,
                uri=rec.want.uri, reason=rec.reason, message=rec.message, since=rfc3339(rec.since)))
        healthy = self.engine_view is not None and self.engine_view.healthy
        return AgentReport(pod=self.pod, engine_ready=healthy, generation=self.source.generation, adapters=states)

    # ---- the loop -------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self.last_step = time.monotonic()
        source_task = asyncio.create_task(self.source.run(self.wake), name="desired-source")
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    log.exception("agent step failed; retrying")
                self.last_step = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.resync_interval)
                self._wake.clear()
        finally:
            source_task.cancel()
            for task in self._fetches.values():
                task.cancel()

    async def observe(self) -> EngineView:
        view = EngineView(False)
        if await self.engine.health():
            try:
                view = EngineView(True, (await self.engine.models()).adapters)
            except EngineUnavailable as exc:
                log.info("engine models unavailable: %s", exc)
        previous = self.engine_view
        if previous is not None and previous.healthy != view.healthy:
            log.log(logging.INFO if view.healthy else logging.WARNING, "engine is %s",
                    "healthy" if view.healthy else "not healthy")
            if view.healthy and self._engine_was_healthy:
                self.metrics.engine_restarts.inc()
        self._engine_was_healthy = self._engine_was_healthy or view.healthy
        self.metrics.engine_healthy.set(1 if view.healthy else 0)
        return view

    async def step(self) -> None:
        self.engine_view = await self.observe()
        result = plan(self.source.desired, self.records, self.engine_view, self.clock())
        self.records = result.records
        loads: list[Load] = []
        acted = False
        for action in result.actions:
            if isinstance(action, Fetch):
                self._start_fetch(action.want)
            elif isinstance(action, Unload):
                acted = await self._unload(action.name) or acted
            else:
                loads.append(action)
        for load in loads:
            if not (self.engine_view and self.engine_view.healthy):
                break
            await self._load(load)
            acted = True
        if acted:
            self.wake()
        if not self._fetches and self.engine_view.healthy and self.source.desired is not None:
            for path in collect_garbage(self.cache_dir, cache_paths_in_use(self.records, self.engine_view)):
                log.info("removed unused cache entry %s", path)
        self.metrics.observe_records(self.records.values())
        self._ready = stays_ready(self._ready, is_ready(self.source.desired, self.records, self.engine_view),
                                  self.engine_view)
        self.metrics.ready.set(1 if self._ready else 0)

    # ---- actions --------------------------------------------------------------------------------------

    def _start_fetch(self, want: Want) -> None:
        desired = self.source.desired
        if want.name in self._fetches or desired is None:
            return
        task = asyncio.create_task(self._fetch(want, desired), name=f"fetch-{want.name}")
        self._fetches[want.name] = task

    async def _fetch(self, want: Want, desired: DesiredAdapters) -> None:
        started = time.monotonic()
        try:
            outcome = await asyncio.to_thread(self.fetcher, want, desired, self.cache_dir)
        except Exception as exc:
            outcome = Problem(Reason.FETCH_FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            self._fetches.pop(want.name, None)
        self.metrics.fetch_seconds.observe(time.monotonic() - started)
        ok = isinstance(outcome, Ready)
        self.metrics.actions.labels("fetch", "ok" if ok else "error").inc()
        if ok:
            log.info("fetched %s -> %s", want.name, outcome.path)  # type: ignore[union-attr]
        else:
            log.warning("fetch of %s failed: %s", want.name, outcome.message)  # type: ignore[union-attr]
        rec = self.records.get(want.name)
        if rec is not None:
            self.records[want.name] = on_fetched(rec, want, outcome, self.clock(), self.policy)
        self.wake()

    def _engine_down(self, exc: Exception) -> None:
        log.warning("engine unavailable: %s", exc)
        self.engine_view = EngineView(False)

    def _set_loaded(self, name: str, path: str | None) -> None:
        """Mirror a successful load/unload into the view until the next observation confirms it."""
        assert self.engine_view is not None
        adapters = dict(self.engine_view.adapters)
        if path is None:
            adapters.pop(name, None)
        else:
            adapters[name] = path
        self.engine_view = replace(self.engine_view, adapters=adapters)

    async def _unload(self, name: str) -> bool:
        try:
            await self.engine.unload(name)
        except AdapterNotLoaded:
            pass
        except EngineUnavailable as exc:
            self._engine_down(exc)
            return False
        except EngineRejected as exc:
            log.warning("engine refused to unload %s: %s", name, exc)
            self.metrics.actions.labels("unload", "error").inc()
            return False
        log.info("unloaded %s", name)
        self.metrics.actions.labels("unload", "ok").inc()
        self._set_loaded(name, None)
        return True

    async def _load(self, load: Load) -> None:
        started = time.monotonic()
        problem: Problem | None = None
        try:
            if load.replace:
                await self._replace(load)
            else:
                await self.engine.load(load.name, load.path)
        except AdapterAlreadyLoaded as exc:
            problem = await self._already_loaded(load, exc)
        except EngineUnavailable as exc:
            self._engine_down(exc)
            return
        except RuntimeLoRADisabled as exc:
            problem = Problem(Reason.LOAD_FAILED, str(exc), permanent=True)
        except EngineRejected as exc:
            problem = Problem(Reason.LOAD_FAILED, f"the engine refused the adapter: {exc}", permanent=exc.permanent)
        ok = problem is None
        self.metrics.actions.labels("load", "ok" if ok else "error").inc()
        if ok:
            self.metrics.load_seconds.observe(time.monotonic() - started)
            log.info("loaded %s from %s", load.name, load.path)
            self._set_loaded(load.name, load.path)
        else:
            assert problem is not None
            self.metrics.load_failures.labels(problem.reason, "permanent" if problem.permanent else "transient").inc()
            log.warning("load of %s failed: %s", load.name, problem.message)
        rec = self.records.get(load.name)
        if rec is not None:
            self.records[load.name] = on_loaded(rec, load.path, problem, self.clock(), self.policy)

    async def _replace(self, load: Load) -> None:
        """Swap a served adapter for a new version with no gap, and no loss if the new one is refused.

        The new version is first loaded under a probe name that no desired adapter can have (``~`` is not
        allowed in adapter names): a refusal leaves the served one untouched and is raised to the caller.
        Only then is the served name switched with ``load_inplace`` (vLLM keeps the old registration until
        the new weights loaded). An engine that ignores ``load_inplace`` (vLLM before it existed) answers
        "already loaded"; then the name is unloaded and loaded again - a short gap, but with a version the
        engine has just accepted. The probe is unloaded in every case.
        """
        probe = probe_name(load.name, load.path)
        await self.engine.load(probe, load.path)
        try:
            try:
                await self.engine.load(load.name, load.path, inplace=True)
            except AdapterAlreadyLoaded:
                log.info("engine ignored load_inplace for %s; unloading and loading again", load.name)
                with contextlib.suppress(AdapterNotLoaded):
                    await self.engine.unload(load.name)
                self._set_loaded(load.name, None)
                await self.engine.load(load.name, load.path)
        finally:
            with contextlib.suppress(EngineError):
                await self.engine.unload(probe)

    async def _already_loaded(self, load: Load, exc: AdapterAlreadyLoaded) -> Problem | None:
        """The engine has the name although our view said otherwise (another API-server process, a stale view).

        Loaded from the same path is success: record it. From another path it is a transient problem, so
        the state machine backs off instead of waking at once and asking again (no hot loop).
        """
        try:
            path = (await self.engine.models()).adapters.get(load.name)
        except EngineUnavailable as err:
            return Problem(Reason.LOAD_FAILED, f"{exc}; and the engine did not list its adapters: {err}")
        if path is not None and os.path.realpath(path) == os.path.realpath(load.path):
            log.info("engine already serves %s from %s", load.name, load.path)
            return None
        return Problem(Reason.LOAD_FAILED, f"the engine already has {load.name!r} loaded from {path or 'elsewhere'} "
                       f"and refused to replace it: {exc}")


def probe_name(name: str, path: str) -> str:
    """The name a new version is tried under before it replaces ``name``."""
    return f"{name}~next-{os.path.basename(path.rstrip('/'))[-12:]}"
