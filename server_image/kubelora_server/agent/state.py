"""The agent's state machine: pure functions from facts to decisions.

Inputs are the desired set (from the ConfigMap), what the engine reports as loaded (``GET /v1/models``), the
results of fetches and loads, and the clock. Outputs are per-adapter :class:`Record` values (what
``GET /adapters`` reports) and the :class:`Action` values the runner must perform. Nothing here does I/O,
so every transition, retry and limit is covered by plain unit tests.

Two choices shape it:

- The engine is the source of truth for what is loaded. Adapters are loaded from a cache directory named
  after their digest, and vLLM reports that path as the adapter's ``root``, so comparing paths tells
  "loaded, current", "loaded, stale" and "missing" apart. An engine that restarted simply reports nothing
  loaded, and the same rule loads everything again: restart recovery needs no special case.
- Failures are per adapter. A *permanent* failure (bad digest, wrong base model, rank too large, or a
  transient one that kept failing) counts as settled for readiness and is retried only slowly, in case the
  source is fixed behind the same URI; a transient one is retried with exponential backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kubelora.api.adapterdeployment import AdapterState
from kubelora.api.runtime import DesiredAdapters


@dataclass(frozen=True)
class Want:
    """One desired adapter as the ConfigMap lists it."""

    name: str
    uri: str
    pin: str | None = None


@dataclass(frozen=True)
class Ready:
    """A verified, compatible copy in the cache; ``path`` is what the engine is told to load."""

    path: str
    digest: str


@dataclass(frozen=True)
class Problem:
    """Why a fetch or load did not succeed. ``permanent``: retrying soon will not change the answer."""

    reason: str
    message: str
    permanent: bool = False


@dataclass(frozen=True)
class Record:
    """Everything the agent knows about one desired adapter."""

    want: Want
    state: AdapterState = "Pending"
    reason: str = ""
    message: str = ""
    since: float = 0.0
    ready: Ready | None = None
    problem: Problem | None = None
    fetching: bool = False
    fetch_attempts: int = 0
    load_attempts: int = 0
    retry_at: float = 0.0

    @property
    def settled(self) -> bool:
        """Loaded, or failed for good: nothing left that readiness should wait for."""
        return self.state == "Loaded" or (self.state == "Failed" and self.problem is not None
                                          and self.problem.permanent)


@dataclass(frozen=True)
class EngineView:
    """What the engine answered: healthy or not, and adapter name -> the path it was loaded from."""

    healthy: bool
    adapters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fetch:
    want: Want


@dataclass(frozen=True)
class Load:
    name: str
    path: str
    replace: bool = False
    """The engine holds an older version under this name (unload first, or load in place)."""


@dataclass(frozen=True)
class Unload:
    name: str


Action = Fetch | Load | Unload


@dataclass(frozen=True)
class Policy:
    """Retry limits and timings."""

    max_fetch_attempts: int = 5
    max_load_attempts: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    permanent_retry: float = 300.0

    def backoff(self, attempts: int) -> float:
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Plan:
    records: dict[str, Record]
    actions: list[Action]


def transition(rec: Record, state: AdapterState, now: float, reason: str = "", message: str = "") -> Record:
    """Set the reported state, keeping ``since`` when nothing visible changed (idempotent reports)."""
    if (rec.state, rec.reason, rec.message) == (state, reason, message):
        return rec
    since = rec.since if rec.state == state and rec.since else now
    return replace(rec, state=state, reason=reason, message=message, since=since)


def _show_problem(rec: Record, now: float) -> Record:
    assert rec.problem is not None
    state: AdapterState = "Failed" if rec.problem.permanent else "Pending"
    return transition(rec, state, now, rec.problem.reason, rec.problem.message)


def _step(rec: Record, engine: EngineView | None, now: float, actions: list[Action]) -> Record:
    """Decide one adapter: fetch it, wait, (re)load it, or report it loaded."""
    loaded = engine.adapters.get(rec.want.name) if engine is not None else None
    if rec.ready is None:
        if rec.fetching:
            return rec if rec.problem else transition(rec, "Downloading", now, "", f"fetching {rec.want.uri}")
        if rec.problem is not None and now < rec.retry_at:
            if rec.problem.permanent and loaded is not None and engine is not None and engine.healthy:
                actions.append(Unload(rec.want.name))
            return _show_problem(rec, now)
        actions.append(Fetch(rec.want))
        rec = replace(rec, fetching=True)
        return rec if rec.problem else transition(rec, "Downloading", now, "", f"fetching {rec.want.uri}")
    if engine is None or not engine.healthy:
        return transition(rec, "Pending", now, "", "waiting for the engine to become healthy")
    if loaded == rec.ready.path:
        return replace(transition(rec, "Loaded", now), problem=None, load_attempts=0)
    if rec.problem is not None and now < rec.retry_at:
        # A refused new version never takes the old one down: it was probed under another name, and the
        # name still serves the previous version (whose cache entry the engine's view keeps from collection).
        shown = _show_problem(rec, now)
        if loaded is not None:
            return transition(shown, shown.state, now, shown.reason,
                               f"{shown.message}; still serving the previous version from {loaded}")
        return shown
    actions.append(Load(rec.want.name, rec.ready.path, replace=loaded is not None))
    return rec if rec.problem else transition(rec, "Loading", now, "", f"loading {rec.ready.digest}")


def plan(desired: DesiredAdapters | None, records: Mapping[str, Record], engine: EngineView | None,
         now: float) -> Plan:
    """The next records and actions.

    ``engine`` is ``None`` before the first observation. Nothing is unloaded while the desired set is
    unknown or the engine is unhealthy: an agent restart or an engine hiccup must not drop adapters.
    """
    if desired is None:
        return Plan(dict(records), [])
    out: dict[str, Record] = {}
    actions: list[Action] = []
    # No cap at max_cpu_loras: in vLLM it is the size of the worker's LRU cache of loaded weights, and any
    # number of names can be registered (adapters beyond it are read from disk again when requested).
    for item in desired.adapters:
        want = Want(item.name, item.uri, item.digest)
        rec = records.get(item.name)
        if rec is None or rec.want != want:
            rec = Record(want=want, since=now)
        out[item.name] = _step(rec, engine, now, actions)
    if engine is not None and engine.healthy:
        for name in engine.adapters:
            if name not in out:
                actions.append(Unload(name))
    return Plan(out, actions)


def on_fetched(rec: Record, want: Want, outcome: Ready | Problem, now: float, policy: Policy) -> Record:
    """Fold a fetch result into the record; a result for an outdated ``want`` is dropped."""
    if rec.want != want:
        return rec
    rec = replace(rec, fetching=False)
    if isinstance(outcome, Ready):
        return replace(rec, ready=outcome, problem=None, fetch_attempts=0, retry_at=0.0)
    attempts = rec.fetch_attempts + 1
    permanent = outcome.permanent or attempts >= policy.max_fetch_attempts
    if permanent and not outcome.permanent:
        outcome = Problem(outcome.reason, f"{outcome.message} (gave up after {attempts} attempts; "
                          f"retrying every {policy.permanent_retry:.0f}s)", permanent=True)
    delay = policy.permanent_retry if permanent else policy.backoff(attempts)
    rec = replace(rec, problem=outcome, fetch_attempts=attempts, retry_at=now + delay)
    return _show_problem(rec, now)


def on_loaded(rec: Record, path: str, outcome: Problem | None, now: float, policy: Policy) -> Record:
    """Fold the engine's answer to a load; an answer for a path no longer wanted is dropped."""
    if rec.ready is None or rec.ready.path != path:
        return rec
    if outcome is None:
        return replace(transition(rec, "Loaded", now), problem=None, load_attempts=0, retry_at=0.0)
    attempts = rec.load_attempts + 1
    permanent = outcome.permanent or attempts >= policy.max_load_attempts
    if permanent and not outcome.permanent:
        outcome = Problem(outcome.reason, f"{outcome.message} (gave up after {attempts} attempts)", True)
    delay = policy.permanent_retry if permanent else policy.backoff(attempts)
    rec = replace(rec, problem=outcome, load_attempts=attempts, retry_at=now + delay)
    return _show_problem(rec, now)


def is_ready(desired: DesiredAdapters | None, records: Mapping[str, Record], engine: EngineView | None) -> bool:
    """Readiness: the desired set is known, the engine is healthy and every adapter is settled."""
    if desired is None or engine is None or not engine.healthy:
        return False
    return all(name in records and records[name].settled for name in (a.name for a in desired.adapters))


def stays_ready(was_ready: bool, settled: bool, engine: EngineView | None) -> bool:
    """Pod readiness with a latch: a new replica waits until its whole set is settled, but a serving replica
    stays in the Service while an adapter is added or rolled (requests for that one adapter 404 briefly;
    status shows it Loading). Only an unhealthy engine takes a serving replica out."""
    if engine is None or not engine.healthy:
        return False
    return was_ready or settled


def cache_paths_in_use(records: Mapping[str, Record], engine: EngineView | None) -> set[str]:
    """Cache directories that must survive garbage collection."""
    keep = {rec.ready.path for rec in records.values() if rec.ready is not None}
    if engine is not None:
        keep |= set(engine.adapters.values())
    return keep
