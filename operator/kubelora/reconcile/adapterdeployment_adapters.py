"""Per-adapter state over replicas: many agents' reports -> one ``status.adapters[]`` entry.

An adapter is Loaded when every replica that reports has it loaded with the desired digest, Failed when any
replica failed it (the checks are deterministic, so one failure means the name is unreliable behind the
Service), and otherwise in the least advanced state any replica is in. lastTransitionTime moves only when
the state does, so the same observations always give the same status and the timer writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubelora.api.adapterdeployment import (
    MAX_DISAGREEING_REPLICAS,
    AdapterState,
    AdapterStatus,
    ReplicaDisagreement,
)
from kubelora.api.runtime import AgentAdapterState
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.reconcile.adapterdeployment_views import ReplicaReport

PROGRESS_ORDER: tuple[AdapterState, ...] = ("Pending", "Downloading", "Loading", "Unloading")
MAX_ADAPTER_MESSAGE = 128
"""Characters of one adapter's message in the status (an engine's error can be a page long)."""


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else text[: max(0, limit - 15)] + " ...(truncated)"


def _replica_state(adapter: ResolvedAdapter, report: ReplicaReport) -> AgentAdapterState:
    """This replica's view of the adapter; an agent that has not seen the current digest yet is Pending."""
    assert report.report is not None
    for state in report.report.adapters:
        if state.name != adapter.name:
            continue
        stale = adapter.digest is not None and state.digest is not None and state.digest != adapter.digest
        if stale and state.state in ("Loaded", "Failed"):
            return AgentAdapterState(name=adapter.name, state="Pending", message="waiting for the new digest")
        return state
    return AgentAdapterState(name=adapter.name, state="Pending")


def _transition(name: str, state: AdapterState, previous: AdapterStatus | None, now: str) -> str:
    if previous is not None and previous.name == name and previous.state == state and previous.last_transition_time:
        return previous.last_transition_time
    return now


def aggregate_adapter(adapter: ResolvedAdapter, replicas: Sequence[ReplicaReport], previous: AdapterStatus | None,
                      now: str) -> AdapterStatus:
    """One adapter's status from the operator's verdict (if any) or from the replicas that answered."""
    if adapter.verdict is not None:
        return AdapterStatus(
            name=adapter.name, state=adapter.verdict, digest=adapter.digest, uri=adapter.uri, loaded_replicas=0,
            reason=adapter.reason, message=bounded(adapter.message, MAX_ADAPTER_MESSAGE),
            last_transition_time=_transition(adapter.name, adapter.verdict, previous, now))
    answering = sorted((r for r in replicas if r.report is not None), key=lambda r: r.pod)
    states = [(r.pod, _replica_state(adapter, r)) for r in answering]
    loaded = [s for _, s in states if s.state == "Loaded"]
    failed = [(pod, s) for pod, s in states if s.state == "Failed"]
    digest = adapter.digest or next((s.digest for s in loaded if s.digest), None)
    reason, message = "", ""
    state: AdapterState
    if failed:
        state = "Failed"
        pod, first = failed[0]
        reason = first.reason
        message = first.message if len(failed) == len(states) else f"{pod}: {first.message}"
    elif not states:
        state = "Pending"
        message = "waiting for a replica to report"
    elif len(loaded) == len(states):
        state = "Loaded"
    else:
        progressing = [s for _, s in states if s.state != "Loaded"]
        state = min((s.state for s in progressing), key=PROGRESS_ORDER.index)
        example = next(s for s in progressing if s.state == state)
        reason, message = example.reason, example.message
    if not reason and not message:  # the operator's note, e.g. "its LoRAJob is retraining"
        reason, message = adapter.reason, adapter.message
    disagreeing = [ReplicaDisagreement(pod=pod, state=s.state, reason=s.reason or None)
                   for pod, s in states if s.state != state][:MAX_DISAGREEING_REPLICAS]
    return AdapterStatus(
        name=adapter.name, state=state, digest=digest, uri=adapter.uri, loaded_replicas=len(loaded),
        reason=reason, message=bounded(message, MAX_ADAPTER_MESSAGE),
        last_transition_time=_transition(adapter.name, state, previous, now), disagreeing_replicas=disagreeing)


def aggregate_adapters(resolved: Sequence[ResolvedAdapter], replicas: Sequence[ReplicaReport],
                       previous: Sequence[AdapterStatus], now: str) -> list[AdapterStatus]:
    """Spec order; adapters removed from the spec disappear from the status even while agents unload them."""
    before = {a.name: a for a in previous}
    return [aggregate_adapter(a, replicas, before.get(a.name), now) for a in resolved]
