"""LoRAJob Events: one Normal Event per phase transition (Pending -> Validating -> Running -> Succeeded),
none for a reconcile that changes nothing, and a Warning for a failure.

``kopf.event``/``kopf.warn`` are replaced by recorders; the plans come from the pure reconcile driven
through a full run by the cluster stand-in (``World``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from kubelora.api.meta import ObjectRef
from kubelora.handlers import lorajob_runner
from kubelora.reconcile.lorajob import Plan

from .test_lorajob_world import World, job, pod, result, vjob, vpod

Posted = list[tuple[str, str, str]]


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> Posted:
    out: Posted = []

    def event(obj: Any, *, type: str, reason: str, message: str = "") -> None:
        out.append((type, reason, message))

    def warn(obj: Any, *, reason: str, message: str = "") -> None:
        out.append(("Warning", reason, message))

    monkeypatch.setattr(kopf, "event", event)
    monkeypatch.setattr(kopf, "warn", warn)
    return out


def announce(world: World, plan: Plan) -> None:
    """What the runner does after a successful status patch."""
    if plan.transitioned:
        lorajob_runner.post_transition(ObjectRef.of(world.body), plan)


def test_one_normal_event_per_transition_of_a_full_run(posted: Posted) -> None:
    world = World()
    for stage in range(4):
        announce(world, world.step())
        announce(world, world.step())  # the same facts again: no second Event
        if stage == 0:
            world.jobs = [vjob(succeeded=1, condition="Complete")]
            world.pods = [vpod("Succeeded", exit_code=0)]
        elif stage == 1:
            world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
        elif stage == 2:
            world.put(job("bot-train-1", succeeded=1, condition="Complete"),
                      pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    assert [(t, r, m.split(":")[0]) for t, r, m in posted] == [
        ("Normal", "Validating", "Pending -> Validating"),
        ("Normal", "Running", "Validating -> Running"),
        ("Normal", "Succeeded", "Running -> Succeeded"),
    ]


def test_a_failure_is_a_warning(posted: Posted) -> None:
    world = World()
    announce(world, world.step())
    world.jobs = [vjob(failed=1, condition="Failed")]
    world.pods = [vpod("Failed", exit_code=2, message=result(ok=False, reason="InvalidDataset", message="line 3"))]
    announce(world, world.step())
    assert [(t, r) for t, r, _ in posted] == [("Normal", "Validating"), ("Warning", "Failed")]


def test_transitions_are_logged_with_the_object(posted: Posted, caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    with caplog.at_level(logging.INFO, logger=lorajob_runner.__name__):
        announce(world, world.step())
    [record] = [r for r in caplog.records if "Pending -> Validating" in r.getMessage()]
    assert record.__dict__["k8s_ref"]["name"] == "bot" and record.__dict__["reason"] == "Validating"
