"""The agent's pure state machine: desired set + engine view + results -> records and actions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubelora.api.reasons import Reason
from kubelora.api.runtime import DesiredAdapter, DesiredAdapters
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
    transition,
)

POLICY = Policy(max_fetch_attempts=3, max_load_attempts=2, backoff_base=1.0, backoff_max=8.0, permanent_retry=100.0)
PIN = "sha256:" + "a" * 64


def desired(*names: str, max_cpu_loras: int = 8, pins: dict[str, str] | None = None) -> DesiredAdapters:
    pins = pins or {}
    return DesiredAdapters(
        base_model="pvc://models/tiny",
        served_name="tiny",
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=max_cpu_loras,
        adapters=[DesiredAdapter(name=n, uri=f"pvc://adapters/{n}", digest=pins.get(n)) for n in names],
    )


def healthy(**loaded: str) -> EngineView:
    return EngineView(True, dict(loaded))


def fetched(
    records: dict[str, Record], name: str, path: str | None = None, digest: str = PIN, now: float = 1.0
) -> dict[str, Record]:
    rec = records[name]
    out = dict(records)
    out[name] = on_fetched(rec, rec.want, Ready(path or f"/cache/{name}-aaaa", digest), now, POLICY)
    return out


def test_unknown_desired_set_does_nothing() -> None:
    result = plan(None, {}, healthy(stray="/x"), 0.0)
    assert result.actions == [] and result.records == {}


def test_new_adapters_are_fetched_then_loaded_then_reported_loaded() -> None:
    want = desired("a", "b")
    first = plan(want, {}, healthy(), 0.0)
    assert first.actions == [Fetch(Want("a", "pvc://adapters/a")), Fetch(Want("b", "pvc://adapters/b"))]
    assert {r.state for r in first.records.values()} == {"Downloading"}

    again = plan(want, first.records, healthy(), 0.5)
    assert again.actions == [], "a fetch in flight is not started twice"

    recs = fetched(fetched(again.records, "a"), "b")
    second = plan(want, recs, healthy(), 2.0)
    assert second.actions == [Load("a", "/cache/a-aaaa"), Load("b", "/cache/b-aaaa")]
    assert second.records["a"].state == "Loading"

    third = plan(want, second.records, healthy(a="/cache/a-aaaa", b="/cache/b-aaaa"), 3.0)
    assert third.actions == []
    assert [r.state for r in third.records.values()] == ["Loaded", "Loaded"]
    assert third.records["a"].since == 3.0
    assert is_ready(want, third.records, healthy(a="/cache/a-aaaa", b="/cache/b-aaaa"))


def test_adapters_not_desired_are_unloaded_only_when_engine_is_healthy() -> None:
    want = desired("a")
    assert Unload("old") in plan(want, {}, healthy(old="/cache/old-1"), 0.0).actions
    assert not any(isinstance(a, Unload) for a in plan(want, {}, EngineView(False), 0.0).actions)
    assert not any(isinstance(a, Unload) for a in plan(want, {}, None, 0.0).actions)


def test_changed_digest_reloads_in_place_of_the_old_version() -> None:
    want = desired("a")
    recs = fetched(plan(want, {}, healthy(), 0.0).records, "a", "/cache/a-new", "sha256:" + "b" * 64)
    result = plan(want, recs, healthy(a="/cache/a-old"), 1.0)
    assert result.actions == [Load("a", "/cache/a-new", replace=True)]


def test_changed_pin_starts_over_with_a_fresh_fetch() -> None:
    recs = fetched(plan(desired("a"), {}, healthy(), 0.0).records, "a")
    loaded = plan(desired("a"), recs, healthy(a="/cache/a-aaaa"), 1.0).records
    assert loaded["a"].state == "Loaded"
    repinned = plan(desired("a", pins={"a": "sha256:" + "c" * 64}), loaded, healthy(a="/cache/a-aaaa"), 2.0)
    assert repinned.actions == [Fetch(Want("a", "pvc://adapters/a", "sha256:" + "c" * 64))]
    assert repinned.records["a"].state == "Downloading"


def test_engine_restart_is_recovered_by_loading_everything_again() -> None:
    want = desired("a", "b")
    recs = fetched(fetched(plan(want, {}, healthy(), 0.0).records, "a"), "b")
    steady = plan(want, recs, healthy(a="/cache/a-aaaa", b="/cache/b-aaaa"), 1.0).records
    down = plan(want, steady, EngineView(False), 2.0)
    assert down.actions == []
    assert {r.state for r in down.records.values()} == {"Pending"}
    assert not is_ready(want, down.records, EngineView(False))
    back = plan(want, down.records, healthy(), 3.0)
    assert back.actions == [Load("a", "/cache/a-aaaa"), Load("b", "/cache/b-aaaa")]


def test_permanent_fetch_failure_fails_only_that_adapter_and_counts_as_settled() -> None:
    want = desired("good", "bad")
    recs = plan(want, {}, healthy(), 0.0).records
    recs = fetched(recs, "good")
    bad = recs["bad"]
    recs["bad"] = on_fetched(bad, bad.want, Problem(Reason.DIGEST_MISMATCH, "x changed", permanent=True), 1.0, POLICY)
    assert recs["bad"].state == "Failed" and recs["bad"].reason == "DigestMismatch"
    result = plan(want, recs, healthy(), 2.0)
    assert result.actions == [Load("good", "/cache/good-aaaa")]
    done = plan(want, result.records, healthy(good="/cache/good-aaaa"), 3.0)
    assert done.records["bad"].state == "Failed"
    assert is_ready(want, done.records, healthy(good="/cache/good-aaaa"))
    later = plan(want, done.records, healthy(good="/cache/good-aaaa"), 1.0 + POLICY.permanent_retry)
    assert later.actions == [Fetch(Want("bad", "pvc://adapters/bad"))], "retried slowly"
    assert later.records["bad"].state == "Failed", "stays Failed while re-checking"


def test_transient_fetch_failures_back_off_then_give_up() -> None:
    want = desired("a")
    recs = plan(want, {}, healthy(), 0.0).records
    now = 0.0
    for attempt in range(1, POLICY.max_fetch_attempts + 1):
        rec = recs["a"]
        recs = {"a": on_fetched(rec, rec.want, Problem(Reason.FETCH_FAILED, "timeout"), now, POLICY)}
        if attempt < POLICY.max_fetch_attempts:
            assert recs["a"].state == "Pending" and recs["a"].reason == "FetchFailed"
            assert not recs["a"].settled
            assert plan(want, recs, healthy(), now + 0.1).actions == [], "waits for the backoff"
            now = recs["a"].retry_at
            recs = plan(want, recs, healthy(), now).records
            assert recs["a"].fetching
    assert recs["a"].state == "Failed" and recs["a"].settled
    assert "gave up after 3 attempts" in recs["a"].message


def test_fetch_result_for_an_outdated_want_is_dropped() -> None:
    recs = plan(desired("a"), {}, healthy(), 0.0).records
    old_want = recs["a"].want
    recs = plan(desired("a", pins={"a": PIN}), recs, healthy(), 1.0).records
    updated = on_fetched(recs["a"], old_want, Ready("/cache/a-old", "sha256:" + "0" * 64), 2.0, POLICY)
    assert updated is recs["a"]


def test_load_failure_retries_then_fails_and_unloads_nothing_it_did_not_load() -> None:
    want = desired("a")
    recs = fetched(plan(want, {}, healthy(), 0.0).records, "a")
    recs = plan(want, recs, healthy(), 1.0).records
    rec = on_loaded(recs["a"], "/cache/a-aaaa", Problem(Reason.LOAD_FAILED, "HTTP 500"), 1.0, POLICY)
    assert rec.state == "Pending" and rec.load_attempts == 1
    assert plan(want, {"a": rec}, healthy(), 1.5).actions == []
    retry = plan(want, {"a": rec}, healthy(), rec.retry_at)
    assert retry.actions == [Load("a", "/cache/a-aaaa")]
    rec = on_loaded(retry.records["a"], "/cache/a-aaaa", Problem(Reason.LOAD_FAILED, "HTTP 500"), 3.0, POLICY)
    assert rec.state == "Failed" and rec.settled and rec.reason == "LoadFailed"


def test_engine_4xx_on_load_is_permanent_at_once() -> None:
    want = desired("a")
    recs = plan(want, fetched(plan(want, {}, healthy(), 0.0).records, "a"), healthy(), 1.0).records
    rec = on_loaded(recs["a"], "/cache/a-aaaa", Problem(Reason.LOAD_FAILED, "rank", permanent=True), 1.0, POLICY)
    assert rec.state == "Failed" and rec.settled


def test_successful_load_reports_loaded_and_clears_problems() -> None:
    want = desired("a")
    recs = plan(want, fetched(plan(want, {}, healthy(), 0.0).records, "a"), healthy(), 1.0).records
    rec = on_loaded(recs["a"], "/cache/a-aaaa", None, 2.0, POLICY)
    assert rec.state == "Loaded" and rec.problem is None
    assert on_loaded(recs["a"], "/cache/other", None, 2.0, POLICY) is recs["a"], "stale answers are ignored"


def test_max_cpu_loras_is_a_cache_size_not_a_cap_on_registered_adapters() -> None:
    # vLLM registers any number of names; --max-cpu-loras only sizes the LRU cache of loaded weights
    want = desired(*(f"a{i}" for i in range(10)), max_cpu_loras=2)
    result = plan(want, {}, healthy(a9="/cache/a9-1"), 0.0)
    assert [type(a) for a in result.actions] == [Fetch] * 10
    assert {r.state for r in result.records.values()} == {"Downloading"}


def test_readiness_needs_desired_set_and_healthy_engine() -> None:
    assert not is_ready(None, {}, healthy())
    assert is_ready(desired(), {}, healthy())
    assert not is_ready(desired(), {}, EngineView(False))
    assert not is_ready(desired("a"), {}, healthy())


def test_transition_keeps_since_when_nothing_visible_changed() -> None:
    rec = Record(Want("a", "u"), state="Loaded", since=5.0)
    assert transition(rec, "Loaded", 9.0) is rec
    moved = transition(rec, "Failed", 9.0, "LoadFailed", "x")
    assert moved.since == 9.0
    assert transition(moved, "Failed", 10.0, "LoadFailed", "y").since == 9.0


def test_cache_paths_in_use_include_engine_roots() -> None:
    recs = {"a": replace(Record(Want("a", "u")), ready=Ready("/c/a-1", PIN))}
    assert cache_paths_in_use(recs, healthy(b="/c/b-2")) == {"/c/a-1", "/c/b-2"}


def test_backoff_grows_and_is_capped() -> None:
    assert [POLICY.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize(
    ("was_ready", "settled", "engine", "expected"),
    [
        pytest.param(False, False, EngineView(True), False, id="new-replica-waits-for-its-set"),
        pytest.param(False, True, EngineView(True), True, id="set-settled"),
        pytest.param(True, False, EngineView(True), True, id="serving-replica-stays-while-adding"),
        pytest.param(True, True, EngineView(False), False, id="engine-down-takes-it-out"),
        pytest.param(True, True, None, False, id="engine-unknown"),
    ],
)
def test_readiness_latch(was_ready: bool, settled: bool, engine: EngineView | None, expected: bool) -> None:
    assert stays_ready(was_ready, settled, engine) is expected
