"""The operator's Prometheus metrics on the local cluster, read as a platform team would.

1. Its ``/metrics`` endpoint, scraped after a LoRAJob succeeds: the job is counted as Succeeded in its
   namespace, its reconciles and its time to training start were recorded, and its live training
   series were there while it ran and are gone now that it finished.
2. A real Prometheus (Debian's ``prometheus`` package; ``make test`` installs it) scrapes the operator
   from a static config every second; PromQL through its HTTP API shows the LoRAJob reaching Succeeded
   and its adapter Loaded by an AdapterDeployment, with the create-to-served latency recorded.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubelora_local.tinymodel import build_tiny_model

from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_adapterdeployment import Env as ServingEnv
from .test_adapterdeployment import adapter_deployment, publish_lorajob
from .test_lorajob import RUN_TIMEOUT, make_env, spec

pytestmark = pytest.mark.e2e

GROUP_PATH = "/apis/kubelora.io/v1alpha1/namespaces"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of a Prometheus text page."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(page: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /,
           **labels: str) -> float | None:
    return page.get((metric, frozenset(labels.items())))


def test_metrics_endpoint_after_a_lorajob_succeeds(cluster: LocalCluster, namespace: str,
                                                   operator: OperatorProcess) -> None:
    env = make_env(cluster, namespace, operator)
    before = samples(operator.metrics())
    successes = sample(before, "kubelora_reconciles_total", kind="LoRAJob", result="success") or 0.0
    started = sample(before, "kubelora_lorajob_time_to_training_start_seconds_count") or 0.0
    env.create("bot", spec("bot", max_steps=20))
    steps_seen: list[float] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and env.status("bot").get("phase") not in ("Succeeded", "Failed"):
        step = sample(samples(operator.metrics()), "kubelora_lorajob_training_step", namespace=namespace, name="bot")
        if step is not None:
            steps_seen.append(step)
        time.sleep(0.2)
    env.wait_phase("bot", "Succeeded", timeout=1)

    page = samples(operator.metrics())
    assert steps_seen and max(steps_seen) > 0, "no live training step was exposed while the job ran"
    assert sample(page, "kubelora_lorajobs", namespace=namespace, phase="Succeeded") == 1
    assert sample(page, "kubelora_lorajobs", namespace=namespace, phase="Running") == 0
    assert (sample(page, "kubelora_reconciles_total", kind="LoRAJob", result="success") or 0) > successes
    assert sample(page, "kubelora_lorajob_time_to_training_start_seconds_count") == started + 1
    for series in ("step", "loss", "tokens_per_second", "eta_seconds"):
        assert sample(page, f"kubelora_lorajob_training_{series}", namespace=namespace, name="bot") is None, series

    # One Normal Event per phase transition, and nothing else: kopf posts them just after the status patch.
    chain = [("Pending", "Validating"), ("Validating", "Running"), ("Running", "Succeeded")]

    def transitions() -> list[tuple[str, str, str]]:
        return [(e["type"], e["reason"], e["message"].split(":")[0]) for e in env.events("bot")
                if e["reason"] != "ChatTemplate"]

    expected = sorted(("Normal", new, f"{old} -> {new}") for old, new in chain)
    cluster.wait_for(lambda: sorted(transitions()) == expected, timeout=15,
                     what=f"Normal Events {expected} (got {transitions()})")
    # Besides the transitions, pre-flight's rendered first row, once (supervised tokens inside [[ ]]).
    [template] = [e for e in env.events("bot") if e["reason"] == "ChatTemplate"]
    assert template["type"] == "Normal" and "[[" in template["message"] and " as trained (" in template["message"]
    assert all(e.get("count", 1) == 1 for e in env.events("bot")), env.events("bot")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API; the result vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, None when it returns nothing."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(operator: OperatorProcess, tmp_path: Path) -> Iterator[Prometheus]:
    """Debian's Prometheus scraping the operator fixture every second, with its own storage and port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no prometheus binary: `apt-get install prometheus` (make test installs it)", pytrace=False)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kubelora-operator",
                            "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"]}]}],
    }))
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
            try:
                if prom.value('up{job="kubelora-operator"}') == 1:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"prometheus never scraped the operator:\n{log.read_text()[-3000:]}", pytrace=False)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def eventually(cluster: LocalCluster, prom: Prometheus, promql: str, expected: float, timeout: float = 30) -> None:
    """Prometheus scrapes every second: wait a few scrapes for the value."""
    cluster.wait_for(lambda: prom.value(promql) == expected, timeout=timeout,
                     what=f"PromQL {promql} == {expected} (last: {prom.query(promql)})")


def test_prometheus_sees_the_lorajob_succeed_and_its_adapter_loaded(cluster: LocalCluster, namespace: str,
                                                                    operator: OperatorProcess,
                                                                    prometheus: Prometheus, tmp_path: Path) -> None:
    base_dir = build_tiny_model(cluster.pvc_dir(namespace, "models") / "tiny")
    for claim in ("data", "adapters"):
        cluster.pvc_dir(namespace, claim)
    env = ServingEnv(cluster, namespace, base_dir)
    served_before = prometheus.value("sum(kubelora_lorajob_time_to_adapter_served_seconds_count)") or 0.0

    publish_lorajob(env, "support-bot")
    env.cluster.wait_for(lambda: env.cluster.kube.get(f"{GROUP_PATH}/{namespace}/lorajobs/support-bot")
                         ["status"].get("phase") == "Succeeded", timeout=RUN_TIMEOUT, what="support-bot Succeeded")
    eventually(cluster, prometheus, f'kubelora_lorajobs{{namespace="{namespace}",phase="Succeeded"}}', 1)
    assert prometheus.value(f'sum(kubelora_lorajobs{{namespace="{namespace}"}})') == 1

    cluster.kube.create(f"{GROUP_PATH}/{namespace}/adapterdeployments",
                        adapter_deployment("chat", [{"name": "support", "loraJobRef": {"name": "support-bot"}}]))
    env.wait_adapters("chat", {"support": "Loaded"})
    eventually(cluster, prometheus, f'kubelora_adapters{{namespace="{namespace}",state="Loaded"}}', 1)
    eventually(cluster, prometheus, f'kubelora_adapterdeployments{{namespace="{namespace}",phase="Ready"}}', 1,
               timeout=120)
    eventually(cluster, prometheus, "sum(kubelora_lorajob_time_to_adapter_served_seconds_count)", served_before + 1)
    # Both kinds were reconciled successfully along the way.
    for kind in ("LoRAJob", "AdapterDeployment"):
        assert (prometheus.value(f'kubelora_reconciles_total{{kind="{kind}",result="success"}}') or 0) > 0, kind
