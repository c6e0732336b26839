"""Desired-set sources: the polled file and the ConfigMap list+watch (against a fake API)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client import V1ConfigMap, V1ObjectMeta

from kubelora.api.runtime import DESIRED_ADAPTERS_KEY, DesiredAdapter, DesiredAdapters
from kubelora_server.agent import sources
from kubelora_server.agent.__main__ import build_parser, make_source
from kubelora_server.agent.sources import ConfigMapSource, FileSource, default_namespace


def wire(*names: str) -> str:
    value = DesiredAdapters(
        base_model="pvc://m/tiny",
        served_name="tiny",
        max_lora_rank=16,
        max_loras=1,
        max_cpu_loras=4,
        adapters=[DesiredAdapter(name=n, uri=f"pvc://a/{n}") for n in names],
    )
    return json.dumps(value.wire())


def test_file_source_reads_changes_and_ignores_garbage(tmp_path: Path) -> None:
    path = tmp_path / "adapters.json"
    src = FileSource(path)
    assert src.poll() is False and src.desired is None
    path.write_text(wire("a"))
    assert src.poll() is True
    assert src.desired is not None and [a.name for a in src.desired.adapters] == ["a"]
    first = src.generation
    assert first.startswith("sha256:")
    assert src.poll() is False
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    assert src.poll() is False and [a.name for a in src.desired.adapters] == ["a"]
    path.write_text(wire("a", "b"))
    assert src.poll() is True and src.generation != first


def configmap(rv: str, raw: str | None) -> V1ConfigMap:
    data = {DESIRED_ADAPTERS_KEY: raw} if raw is not None else {"other": "x"}
    return V1ConfigMap(metadata=V1ObjectMeta(name="ad-adapters", resource_version=rv), data=data)


def test_configmap_apply_takes_client_objects_and_dicts() -> None:
    src = ConfigMapSource("ad-adapters", "ns", api=object())
    assert src.apply(configmap("5", wire("a"))) is True
    assert src.generation == "5" and src.desired is not None
    assert src.apply(configmap("5", wire("a"))) is False
    assert src.apply({"metadata": {"resourceVersion": "6"}, "data": {DESIRED_ADAPTERS_KEY: wire("a", "b")}})
    assert src.generation == "6" and len(src.desired.adapters) == 2
    assert src.apply(configmap("7", None)) is False
    assert src.apply(configmap("8", "[]")) is False
    assert src.generation == "6"


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def list_namespaced_config_map(self, namespace: str, **kw: Any) -> Any:
        self.calls.append({"namespace": namespace, **kw})
        return SimpleNamespace(items=[configmap("10", wire("a"))], metadata=SimpleNamespace(resource_version="10"))


def test_configmap_follow_lists_then_watches_and_relists(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    src = ConfigMapSource("ad-adapters", "team", api=api, retry_delay=0.01)
    streams: list[dict[str, Any]] = []

    class FakeWatch:
        def stream(self, func: Any, namespace: str, **kw: Any) -> Any:
            streams.append(kw)
            if len(streams) == 1:
                yield {"type": "MODIFIED", "object": configmap("11", wire("a", "b"))}
                yield {"type": "ERROR", "raw_object": {"code": 410}}
            else:
                yield {"type": "DELETED", "object": configmap("12", wire())}
                src._stop.set()

        def stop(self) -> None:
            pass

    import kubernetes.watch

    monkeypatch.setattr(kubernetes.watch, "Watch", FakeWatch)
    seen: list[str] = []
    src._follow(lambda obj: seen.append(obj.metadata.resource_version))
    assert seen == ["10", "11", "10"], "list, watch event, re-list after the watch error"
    assert api.calls[0] == {"namespace": "team", "field_selector": "metadata.name=ad-adapters"}
    assert streams[0]["resource_version"] == "10"
    assert streams[0]["field_selector"] == "metadata.name=ad-adapters"


def test_configmap_follow_survives_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client.exceptions import ApiException

    src = ConfigMapSource("cm", "ns", retry_delay=0.01)
    attempts: list[int] = []

    class Failing:
        def list_namespaced_config_map(self, namespace: str, **kw: Any) -> Any:
            attempts.append(1)
            if len(attempts) >= 3:
                src._stop.set()
            raise ApiException(status=403, reason="Forbidden")

    src._api = Failing()
    src._follow(lambda obj: None)
    assert len(attempts) == 3


def test_configmap_run_hands_changes_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    src = ConfigMapSource("cm", "ns", api=object())
    started = threading.Event()

    def follow(emit: Any) -> None:
        emit(configmap("3", wire("x")))
        started.set()
        src._stop.wait(5)

    monkeypatch.setattr(src, "_follow", follow)

    async def scenario() -> None:
        notified = asyncio.Event()
        task = asyncio.create_task(src.run(notified.set))
        await asyncio.wait_for(notified.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert src.generation == "3" and src._stop.is_set()


def test_namespace_comes_from_env_then_the_service_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert default_namespace() == "from-env"
    monkeypatch.delenv("POD_NAMESPACE")
    ns_file = tmp_path / "namespace"
    ns_file.write_text("from-sa\n")
    monkeypatch.setattr(sources, "SA_NAMESPACE_FILE", str(ns_file))
    assert default_namespace() == "from-sa"


def test_cli_picks_the_source() -> None:
    args = build_parser().parse_args(["--desired-file", "/tmp/x.json"])
    assert isinstance(make_source(args), FileSource)
    args = build_parser().parse_args(["--configmap", "ad-adapters", "--namespace", "n1"])
    src = make_source(args)
    assert isinstance(src, ConfigMapSource) and (src.name, src.namespace) == ("ad-adapters", "n1")
    assert args.port == 8081 and str(args.cache_dir) == "/var/cache/kubelora/adapters"
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
