"""The agent loop against a fake vLLM (httpx.MockTransport) and a fake fetcher: no model, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tenacity import wait_none

from kubelora.api.reasons import Reason
from kubelora.api.runtime import AgentReport, DesiredAdapter, DesiredAdapters
from kubelora_server.agent.engine_client import EngineClient
from kubelora_server.agent.runner import Agent
from kubelora_server.agent.server import create_app
from kubelora_server.agent.state import Policy, Problem, Ready, Want
from tests.unit.test_agent_engine_client import VLLM_LOAD_ERRORS, FakeVllm


class StaticSource:
    def __init__(self, desired: DesiredAdapters | None, generation: str = "1") -> None:
        self.desired = desired
        self.generation = generation

    async def run(self, notify: Callable[[], None]) -> None:
        await asyncio.Event().wait()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def desired(*names: str, pins: dict[str, str] | None = None) -> DesiredAdapters:
    pins = pins or {}
    return DesiredAdapters(
        base_model="pvc://models/tiny",
        served_name="base",
        max_lora_rank=16,
        max_loras=2,
        max_cpu_loras=4,
        adapters=[DesiredAdapter(name=n, uri=f"pvc://a/{n}", digest=pins.get(n)) for n in names],
    )


def fetcher(bad: dict[str, Problem] | None = None) -> Callable[[Want, DesiredAdapters, Path], Ready | Problem]:
    bad = bad or {}

    def fetch(want: Want, _: DesiredAdapters, cache: Path) -> Ready | Problem:
        if want.name in bad:
            return bad[want.name]
        digest = want.pin or "sha256:" + "1" * 64
        return Ready(str(cache / f"{want.name}-{digest[7:19]}"), digest)

    return fetch


def make_agent(tmp_path: Path, fake: FakeVllm, source: StaticSource, **kw: object) -> Agent:
    engine = EngineClient("http://engine:8000", transport=httpx.MockTransport(fake), retry_wait=wait_none())
    return Agent(
        source,
        engine,
        tmp_path / "cache",
        pod="pod-0",
        clock=kw.pop("clock", Clock()),  # type: ignore[arg-type]
        fetcher=kw.pop("fetcher", fetcher()),
        **kw,
    )  # type: ignore[arg-type]


async def settle(agent: Agent, rounds: int = 10) -> None:
    """Step until nothing is in flight and a step changes nothing."""
    for _ in range(rounds):
        await agent.step()
        while agent._fetches:
            await asyncio.gather(*agent._fetches.values())
        if not agent._wake.is_set():
            return
        agent._wake.clear()


def states(agent: Agent) -> dict[str, tuple[str, str]]:
    return {a.name: (a.state, a.reason) for a in agent.report().adapters}


def test_good_adapters_load_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    fake = FakeVllm()
    bad = {"broken": Problem(Reason.DIGEST_MISMATCH, "adapter_model.safetensors changed", permanent=True)}

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a", "broken", "b")), fetcher=fetcher(bad))
        assert not agent.ready()
        await settle(agent)
        assert states(agent) == {"a": ("Loaded", ""), "broken": ("Failed", "DigestMismatch"), "b": ("Loaded", "")}
        assert agent.ready()
        assert set(fake.loras) == {"a", "b"}
        report = agent.report()
        assert report.engine_ready and report.pod == "pod-0" and report.generation == "1"
        assert report.adapters[0].digest == "sha256:" + "1" * 64 and report.adapters[0].since

    asyncio.run(scenario())


def test_engine_restart_restores_the_whole_set(tmp_path: Path) -> None:
    fake = FakeVllm()
    down = {"now": False}

    def engine(request: httpx.Request) -> httpx.Response:
        if down["now"]:
            raise httpx.ConnectError("refused", request=request)
        return fake(request)

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a", "b")))
        agent.engine = EngineClient("http://engine:8000", transport=httpx.MockTransport(engine))
        await settle(agent)
        assert set(fake.loras) == {"a", "b"}
        down["now"] = True
        fake.loras.clear()  # the restarted engine remembers nothing
        await settle(agent)
        assert not agent.ready()
        assert {s for s, _ in states(agent).values()} == {"Pending"}
        down["now"] = False
        await settle(agent)
        assert set(fake.loras) == {"a", "b"} and agent.ready()
        assert b"kubelora_agent_engine_recoveries_total 1.0" in agent.metrics.render()

    asyncio.run(scenario())


A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def load_calls(fake: FakeVllm) -> list[tuple[str, str, bool]]:
    return [(path.rsplit("/", 1)[-1], body["lora_name"], bool(body.get("load_inplace")))
            for _, path, body in fake.requests if body]


def test_digest_change_is_probed_then_switched_in_place_without_a_gap(tmp_path: Path) -> None:
    fake = FakeVllm()
    source = StaticSource(desired("a", pins={"a": A}))

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, source)
        await settle(agent)
        source.desired = desired("a", pins={"a": B})
        fake.requests.clear()
        await settle(agent)
        assert fake.loras == {"a": str(tmp_path / "cache" / "a-bbbbbbbbbbbb")}, "the probe is gone"
        assert load_calls(fake) == [("load_lora_adapter", "a~next-bbbbbbbbbbbb", False),
                                    ("load_lora_adapter", "a", True),
                                    ("unload_lora_adapter", "a~next-bbbbbbbbbbbb", False)]
        assert states(agent) == {"a": ("Loaded", "")}
        assert agent.report().adapters[0].digest == B

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["dora", "targets", "noweights", "pissa"])
def test_a_refused_new_version_leaves_the_old_one_serving_and_says_why(tmp_path: Path, kind: str) -> None:
    fake = FakeVllm()
    source = StaticSource(desired("a", pins={"a": A}))

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, source)
        await settle(agent)
        old = fake.loras["a"]
        fake.refuse[str(tmp_path / "cache" / "a-bbbbbbbbbbbb")] = kind
        source.desired = desired("a", pins={"a": B})
        fake.requests.clear()
        await settle(agent)
        assert fake.loras == {"a": old}, "the old version keeps serving under its name"
        assert load_calls(fake) == [("load_lora_adapter", "a~next-bbbbbbbbbbbb", False)], "one try, no retries"
        report = agent.report().adapters[0]
        assert (report.state, report.reason) == ("Failed", "LoadFailed")
        assert VLLM_LOAD_ERRORS[kind][0] in report.message
        assert agent.ready(), "a serving replica stays in the Service"

    asyncio.run(scenario())


def test_an_engine_that_ignores_load_inplace_gets_unload_and_load_after_the_probe(tmp_path: Path) -> None:
    fake = FakeVllm(ignore_inplace=True)
    source = StaticSource(desired("a", pins={"a": A}))

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, source)
        await settle(agent)
        source.desired = desired("a", pins={"a": B})
        fake.requests.clear()
        await settle(agent)
        assert fake.loras == {"a": str(tmp_path / "cache" / "a-bbbbbbbbbbbb")}
        assert load_calls(fake) == [("load_lora_adapter", "a~next-bbbbbbbbbbbb", False),
                                    ("load_lora_adapter", "a", True),
                                    ("unload_lora_adapter", "a", False),
                                    ("load_lora_adapter", "a", False),
                                    ("unload_lora_adapter", "a~next-bbbbbbbbbbbb", False)]
        assert states(agent) == {"a": ("Loaded", "")}

    asyncio.run(scenario())


def test_already_loaded_from_the_same_path_counts_as_loaded(tmp_path: Path) -> None:
    fake = FakeVllm()
    fake.loras["a"] = str(tmp_path / "cache" / f"a-{'1' * 12}")
    fake.hidden.add("a")  # the first listing came from a process that had not seen it yet

    def listing_catches_up(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/load_lora_adapter":
            fake.hidden.discard("a")
        return fake(request)

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a")))
        agent.engine = EngineClient("http://engine:8000", transport=httpx.MockTransport(listing_catches_up),
                                    retry_wait=wait_none())
        await settle(agent)
        assert states(agent) == {"a": ("Loaded", "")}
        assert len([c for c in load_calls(fake) if c[0] == "load_lora_adapter"]) == 1

    asyncio.run(scenario())


def test_already_loaded_elsewhere_backs_off_instead_of_looping(tmp_path: Path) -> None:
    fake = FakeVllm()
    clock = Clock()
    fake.loras["a"] = "/other/process/a"
    fake.hidden.add("a")  # another API-server process holds it; this one never lists it

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a")), clock=clock,
                           policy=Policy(backoff_base=5.0, max_load_attempts=3))
        await settle(agent, rounds=20)
        assert len(load_calls(fake)) == 1, "no second try before the backoff ends"
        assert states(agent) == {"a": ("Pending", "LoadFailed")}
        assert "already has 'a' loaded" in agent.report().adapters[0].message
        clock.t += 6
        await settle(agent, rounds=20)
        assert len(load_calls(fake)) == 2

    asyncio.run(scenario())


def test_transient_refusals_back_off_and_recover(tmp_path: Path) -> None:
    fake = FakeVllm()
    clock = Clock()
    path = str(tmp_path / "cache" / f"a-{'1' * 12}")
    fake.fail_times[path] = 4  # CUDA OOM on the first call's 3 tries and on the next call's first

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a")), clock=clock,
                           policy=Policy(backoff_base=5.0, max_load_attempts=3))
        await settle(agent)
        assert states(agent) == {"a": ("Pending", "LoadFailed")}
        assert "out of memory" in agent.report().adapters[0].message
        assert b'kubelora_agent_load_failures_total{kind="transient",reason="LoadFailed"} 1.0' in \
            agent.metrics.render()
        clock.t += 6
        await settle(agent)
        assert states(agent) == {"a": ("Loaded", "")} and fake.loras == {"a": path}

    asyncio.run(scenario())


def test_removed_adapters_are_unloaded_and_their_cache_collected(tmp_path: Path) -> None:
    fake = FakeVllm()
    source = StaticSource(desired("a", "b"))

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, source)
        await settle(agent)
        for path in fake.loras.values():
            Path(path).mkdir(parents=True)
        source.desired = desired("a")
        await settle(agent)
        assert set(fake.loras) == {"a"}
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(fake.loras["a"]).name]

    asyncio.run(scenario())


def test_transient_engine_refusal_retries_then_fails(tmp_path: Path) -> None:
    fake = FakeVllm()
    clock = Clock()

    def corrupt_fetch(want: Want, _: DesiredAdapters, cache: Path) -> Ready:
        return Ready(str(cache / "a-oom"), "sha256:" + "2" * 64)

    async def scenario() -> None:
        agent = make_agent(
            tmp_path,
            fake,
            StaticSource(desired("a")),
            clock=clock,
            fetcher=corrupt_fetch,
            policy=Policy(max_load_attempts=2, backoff_base=5.0),
        )
        await settle(agent)
        assert states(agent) == {"a": ("Pending", "LoadFailed")}
        assert not agent.ready()
        clock.t += 10
        await settle(agent)
        assert states(agent) == {"a": ("Failed", "LoadFailed")}
        assert agent.ready(), "permanently failed adapters do not hold readiness back"

    asyncio.run(scenario())


def test_a_permanent_vllm_400_fails_the_adapter_at_once(tmp_path: Path) -> None:
    def rank_fetch(want: Want, _: DesiredAdapters, cache: Path) -> Ready:
        return Ready(str(cache / "a-rank64"), "sha256:" + "3" * 64)

    async def scenario() -> None:
        agent = make_agent(tmp_path, FakeVllm(), StaticSource(desired("a")), fetcher=rank_fetch)
        await settle(agent)
        report = agent.report().adapters[0]
        assert (report.state, report.reason) == ("Failed", "LoadFailed")
        assert "max_lora_rank" in report.message

    asyncio.run(scenario())


def test_unknown_desired_set_is_not_ready_and_unloads_nothing(tmp_path: Path) -> None:
    fake = FakeVllm()
    fake.loras["keep"] = "/cache/keep-1"

    async def scenario() -> None:
        agent = make_agent(tmp_path, fake, StaticSource(None))
        await settle(agent)
        assert fake.loras == {"keep": "/cache/keep-1"}
        assert not agent.ready()

    asyncio.run(scenario())


def test_http_endpoints_report_without_changing_state(tmp_path: Path) -> None:
    fake = FakeVllm()
    bad = {"broken": Problem(Reason.BASE_MODEL_MISMATCH, "trained on qwen", permanent=True)}

    async def build() -> Agent:
        agent = make_agent(tmp_path, fake, StaticSource(desired("a", "broken")), fetcher=fetcher(bad))
        agent.last_step = 1e18  # alive
        return agent

    agent = asyncio.run(build())
    client = TestClient(create_app(agent))
    assert client.get("/healthz").status_code == 200
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False

    async def converge() -> None:
        agent._wake = asyncio.Event()
        await settle(agent)

    asyncio.run(converge())
    assert client.get("/readyz").status_code == 200
    body = client.get("/adapters").json()
    report = AgentReport.model_validate(body)
    assert body["engineReady"] is True and report.pod == "pod-0"
    assert [(a.name, a.state, a.reason) for a in report.adapters] == [
        ("a", "Loaded", ""),
        ("broken", "Failed", "BaseModelMismatch"),
    ]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'kubelora_agent_adapters{state="Loaded"} 1.0' in metrics.text
    assert 'kubelora_agent_adapters{state="Failed"} 1.0' in metrics.text
    before = dict(fake.loras)
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/adapters").status_code == 405
    assert fake.loras == before


def test_stalled_loop_fails_liveness(tmp_path: Path) -> None:
    async def build() -> Agent:
        return make_agent(tmp_path, FakeVllm(), StaticSource(desired()))

    agent = asyncio.run(build())
    agent.last_step = 0.0
    assert TestClient(create_app(agent)).get("/healthz").status_code == 503
