"""The chart's monitoring parts: ServiceMonitor / PodMonitor on the operator's metrics port (off by default),
and a Grafana dashboard that uses only series the operator exposes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kubelora.api.metrics import CATALOGUE

from .test_chart import CHART, helm, render

DASHBOARD = CHART / "dashboards" / "kubelora.json"
ALL_ON = ("monitoring.serviceMonitor.enabled=true", "monitoring.podMonitor.enabled=true",
          "monitoring.dashboard.enabled=true", "monitoring.serviceMonitor.labels.release=prom")


def kinds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def test_off_by_default_and_lints_when_on() -> None:
    assert not {"ServiceMonitor", "PodMonitor"} & set(kinds(render()))
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard") for d in render())
    args = [a for item in ALL_ON for a in ("--set", item)]
    helm("lint", "--strict", str(CHART), *args)


def test_monitors_scrape_the_metrics_port_of_the_operator_pods() -> None:
    docs = render(*ALL_ON, "metricsPort=9102")
    found = kinds(docs)
    deployment = found["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9102} in container["ports"]
    assert {"name": "KUBELORA_METRICS_PORT", "value": "9102"} in container["env"]
    service = found["Service"]
    assert {"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        monitor = found[kind]
        [endpoint] = monitor["spec"][key]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kubelora-system"]}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert found["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert found["ServiceMonitor"]["metadata"]["labels"]["release"] == "prom"


def test_dashboard_configmap_carries_the_json() -> None:
    [cm] = [d for d in render(*ALL_ON) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubelora.json"]) == json.loads(DASHBOARD.read_text())


def expressions(dashboard: dict[str, Any]) -> list[str]:
    out = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    out += [str(v.get("definition", "")) for v in dashboard["templating"]["list"]]
    return out


def test_dashboard_uses_only_metrics_the_operator_registers() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = {name for metric in CATALOGUE for name in metric.samples}
    used = {name for expr in expressions(dashboard) for name in re.findall(r"\bkubelora_[a-z_]+", expr)}
    assert used, "the dashboard queries nothing"
    assert used <= exposed, f"not exposed by the operator: {sorted(used - exposed)}"
    # Every metric has a panel.
    assert {m.name for m in CATALOGUE if not set(m.samples).isdisjoint(used)} == {m.name for m in CATALOGUE}


@pytest.mark.parametrize("value", ["monitoring.serviceMonitor.interval=soon", "metricsPort=0",
                                   "monitoring.dashboard.colour=red"])
def test_schema_rejects_bad_monitoring_values(value: str) -> None:
    from .test_chart import helm_error

    assert "values don't meet the specifications of the schema" in helm_error("template", "kl", str(CHART),
                                                                                 "--set", value)


def serving_pod() -> dict[str, Any]:
    """The pod template of an AdapterDeployment, as the operator builds it."""
    from .test_adapterdeployment_builders import deployment, make_body

    template: dict[str, Any] = deployment(make_body())["spec"]["template"]
    return template


def test_serving_monitor_scrapes_engine_and_agent_metrics_of_the_pods_the_operator_builds() -> None:
    assert "PodMonitor" not in kinds(render()), "opt-in"
    on = ("monitoring.servingPodMonitor.enabled=true", "monitoring.servingPodMonitor.labels.release=prom")
    [monitor] = [d for d in render(*on) if d["kind"] == "PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    pod = serving_pod()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    named_ports = {p["name"]: c["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    scraped = {named_ports[e["port"]] for e in monitor["spec"]["podMetricsEndpoints"] if e["path"] == "/metrics"}
    assert scraped == {"engine", "agent"}, "vLLM's metrics on the engine port, the agent's on its own"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}, "serving pods live in the users' namespaces"
    [scoped] = [d for d in render(*on, "watchNamespaces={a,b}") if d["kind"] == "PodMonitor"]
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
    helm("lint", "--strict", str(CHART), *[a for item in on for a in ("--set", item)])


def test_network_policy_lets_the_configured_prometheus_scrape_the_serving_pods() -> None:
    from kubelora.resources.serving_common import AGENT_PORT, ENGINE_PORT

    base = ("networkPolicy.enabled=true", "watchNamespaces={a}")
    [closed] = [d for d in render(*base) if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "a"]
    assert len(closed["spec"]["ingress"]) == 2, "no scrape rule unless asked for"
    [policy] = [d for d in render(*base, "networkPolicy.prometheus.enabled=true")
                if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "a"]
    scrape = policy["spec"]["ingress"][-1]
    assert {p["port"] for p in scrape["ports"]} == {ENGINE_PORT, AGENT_PORT}
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
