"""The Helm chart renders, lints, and grants only what the operator needs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".venv" / "bin" / "helm"
CHART = REPO / "charts" / "kubelora"


def helm(*args: str) -> str:
    assert HELM.exists(), "helm is missing: run `make venv` (hack/install-kube-tools.sh installs it)"
    return subprocess.run([str(HELM), *args], check=True, capture_output=True, text=True).stdout


VALUE_SETS = {
    "default": (),
    "ha": ("replicas=2", "peering.enabled=true"),
    "namespaced": ("watchNamespaces={a,b}",),
    "namespaced-ha": ("watchNamespaces={a,b}", "replicas=3", "peering.enabled=true"),
    "digest": ("image.digest=sha256:" + "ab" * 32,),
    "networkpolicy": ("networkPolicy.enabled=true", "watchNamespaces={a,b}",
                      "networkPolicy.apiServer.cidrs={10.0.0.1/32}"),
    "argocd": ("argocd.healthChecks.enabled=true",),
}


def sets_args(sets: tuple[str, ...]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


def helm_error(*args: str) -> str:
    """What a helm command that must fail says (lint reports on stdout, template on stderr)."""
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)
    assert done.returncode != 0, f"helm {' '.join(args)} must fail:\n{done.stdout[:2000]}"
    return done.stdout + done.stderr


def render(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "kl", str(CHART), "--namespace", "kubelora-system"]
    for item in sets:
        args += ["--set", item]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


@pytest.mark.parametrize("sets", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_lint_strict_and_template(sets: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", str(CHART), *sets_args(sets))
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out, out
    docs = render(*sets)
    assert [d for d in docs if d["kind"] == "Deployment"], "every value set renders the operator"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("replicas=two", "at '/replicas': got string, want integer", id="replicas-string"),
        pytest.param("replicas=0", "at '/replicas': minimum: got 0, want 1", id="replicas-zero"),
        pytest.param("logFormat=xml", "at '/logFormat': value must be one of 'json', 'text'", id="log-format"),
        pytest.param("image.digest=latest", "at '/image/digest'", id="digest"),
        pytest.param("image.pullPolicy=Sometimes", "at '/image/pullPolicy'", id="pull-policy"),
        pytest.param("watchNamespaces={Bad_NS}", "at '/watchNamespaces/0'", id="namespace-name"),
        pytest.param("replica=2", "additional properties 'replica' not allowed", id="typo"),
        pytest.param("peering.enable=true", "additional properties 'enable' not allowed", id="nested-typo"),
    ],
)
def test_schema_rejects_bad_values_with_a_readable_message(value: str, message: str) -> None:
    for command in (["template", "kl"], ["lint", "--strict"]):
        assert message in helm_error(*command, str(CHART), "--set", value)


def test_several_replicas_need_peering() -> None:
    err = helm_error("template", "kl", str(CHART), "--set", "replicas=2")
    assert "replicas=2 needs peering.enabled=true" in err
    # `helm lint` renders in lint mode, where Helm 4 logs `fail` instead of failing: install/template refuse it.


def deployment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


def test_rollout_strategy_follows_peering() -> None:
    assert deployment_of(render())["spec"]["strategy"] == {"type": "Recreate"}
    ha = deployment_of(render(*VALUE_SETS["ha"]))["spec"]["strategy"]
    assert ha == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_probes_use_kopf_health_endpoint() -> None:
    container = deployment_of(render())["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert probe["httpGet"]["path"] == "/healthz" and ports[probe["httpGet"]["port"]] == 8080, kind
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "slow first starts must not be killed"


def test_image_digest_pins_the_operator_image() -> None:
    digest = "sha256:" + "ab" * 32
    image = deployment_of(render(f"image.digest={digest}"))["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/kubelora/operator:0.1.0@{digest}"
    assert deployment_of(render())["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "ghcr.io/kubelora/operator:0.1.0")
    trainer = f"ghcr.io/kubelora/trainer:0.1.0@{digest}"
    env = deployment_of(render(f"trainerImage={trainer}"))["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBELORA_TRAINER_IMAGE", "value": trainer} in env
    assert "at '/trainerImage'" in helm_error("template", "kl", str(CHART), "--set", "trainerImage=Trainer:latest")


def test_pdb_only_with_several_replicas() -> None:
    assert not [d for d in render() if d["kind"] == "PodDisruptionBudget"]
    [pdb] = [d for d in render(*VALUE_SETS["ha"]) if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment_of(render())["spec"]["selector"]["matchLabels"]


def test_operator_runs_non_root_with_read_only_root() -> None:
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "--all-namespaces" in container["args"]


def test_rbac_is_least_privilege() -> None:
    for role in (d for d in render() if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"], "the operator must never read Secrets"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_namespaced_install_binds_per_namespace() -> None:
    docs = render("watchNamespaces={ml,research}")
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == ["kl-operator-discovery"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=ml", "--namespace=research"]


def test_chart_ships_the_generated_crds() -> None:
    names = sorted(p.name for p in (CHART / "crds").glob("kubelora.io_*.yaml"))
    assert names == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert (CHART / "crds" / "kopf.dev_peerings.yaml").exists(), "HA needs kopf's peering CRDs"


@pytest.mark.parametrize("values", [pytest.param(("peering.enabled=true", "replicas=2"), id="ha")])
def test_ha_uses_peering(values: tuple[str, ...]) -> None:
    docs = render(*values)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "--peering=kubelora" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterKopfPeering"] == ["kubelora"]


def test_no_admission_webhook_is_installed() -> None:
    """CEL rules in the CRDs replace the webhook: nothing cluster-wide to leave behind on uninstall."""
    docs = render()
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
    assert not [d for d in docs if d["kind"] == "Service" and "webhook" in d["metadata"]["name"]]
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    assert not [r for r in rules if "admissionregistration.k8s.io" in r["apiGroups"]]


def test_network_policies_follow_the_code_ports_and_labels() -> None:
    from kubelora.resources.serving_common import AGENT_PORT, ENGINE_PORT, server_labels

    assert not [d for d in render() if d["kind"] == "NetworkPolicy"], "opt-in"
    docs = render(*VALUE_SETS["networkpolicy"], "networkPolicy.gateway.namespaceSelector.matchLabels.team=edge")
    policies = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"] for d in docs
                if d["kind"] == "NetworkPolicy"}
    assert sorted(policies) == [("a", "kl-operator-serving"), ("b", "kl-operator-serving"),
                                ("kubelora-system", "kl-operator")]
    pod_labels = deployment_of(docs)["spec"]["template"]["metadata"]["labels"]
    operator = policies["kubelora-system", "kl-operator"]
    assert operator["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert operator["policyTypes"] == ["Egress"]
    api, _dns, agents = operator["egress"]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert agents["ports"] == [{"protocol": "TCP", "port": AGENT_PORT}]
    serving = server_labels("chat")
    assert agents["to"][0]["podSelector"]["matchLabels"].items() <= serving.items()

    spec = policies["a", "kl-operator-serving"]
    assert spec["podSelector"]["matchLabels"].items() <= serving.items(), "selects the pods the operator builds"
    from_operator, from_gateway = spec["ingress"]
    assert from_operator["ports"] == [{"protocol": "TCP", "port": AGENT_PORT}]
    assert from_operator["from"][0]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert from_operator["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "kubelora-system"}}
    assert from_gateway["ports"] == [{"protocol": "TCP", "port": ENGINE_PORT}]
    assert from_gateway["from"][0]["namespaceSelector"]["matchLabels"] == {"kubelora.io/gateway": "true",
                                                                           "team": "edge"}


def test_helm_test_pod_checks_crds_and_health() -> None:
    docs = render()
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][2]
    assert "/apis/kubelora.io/v1alpha1" in script and "http://kl-operator.kubelora-system.svc:8080/healthz" in script
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert service["metadata"]["name"] == "kl-operator" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= deployment_of(docs)["spec"]["template"]["metadata"]["labels"].items()
    compile(script, "helm-test", "exec")  # the check itself is valid python


def notes(*sets: str) -> str:
    out = helm("install", "kl", str(CHART), "--namespace", "kubelora-system", "--dry-run=client", *sets_args(sets))
    return out[out.index("NOTES:"):]


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={ml}",)], ids=["cluster-wide", "namespaced"])
def test_notes_tell_the_next_three_commands(sets: tuple[str, ...]) -> None:
    text = notes(*sets)
    ns = "ml" if sets else "default"
    commands = [line.strip() for line in text.splitlines() if line.startswith("       ")]
    assert commands == [
        "helm test kl -n kubelora-system",
        f"kubectl apply -n {ns} -f examples/cpu-quickstart/lorajob.yaml",
        f"kubectl get lorajobs,adapterdeployments -n {ns} -w",
    ]
    assert "…" not in text and "://" not in text, "no placeholder URL"
    assert (REPO / "examples" / "cpu-quickstart" / "lorajob.yaml").exists()
    assert (REPO / "examples" / "cpu-quickstart" / "storage.yaml").exists()
