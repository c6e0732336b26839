"""checkov, as a platform team runs it, on the chart with each value set and on the objects the operator builds
for the documented examples: every failed check must be one of the allowlist below, which docs/security.md
explains. checkov lives in its own virtualenv (`make checkov`): it pins packages that would downgrade ours."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.resources.lorajob_jobs import rendezvous_service, training_job, validation_job
from kubelora.resources.serving_deployment import server_deployment, server_pdb
from kubelora.settings import Settings

from .test_chart import VALUE_SETS, helm

REPO = Path(__file__).resolve().parents[2]
CHECKOV = REPO / ".venv" / "tools" / "checkov" / "bin" / "checkov"
EXAMPLES = REPO / "examples"
MONITORING = ("monitoring.serviceMonitor.enabled=true", "monitoring.servingPodMonitor.enabled=true",
              "monitoring.dashboard.enabled=true")
SETTINGS = Settings(trainer_image="ghcr.io/kubelora/trainer:0.1.0", server_image="ghcr.io/kubelora/server:0.1.0")

Obj = dict[str, Any]


@dataclass(frozen=True)
class Allowed:
    check: str
    resources: str
    """Regex over ``<render>:<checkov's resource id>`` (``chart-ha:Deployment.kubelora.kl-operator``,
    ``built:Job.ml.support-bot-train-1``): an exception names what it covers."""
    why: str


HELM_TEST_POD = r"chart-.*:Pod\.kubelora\.kl-operator-test"
ALLOWLIST = (
    Allowed("CKV_K8S_11", r".*", "No CPU limits: CPU is compressible, and a limit throttles data loaders, "
            "tokenizers and the operator's event loop under CFS while the node has idle cores."),
    Allowed("CKV_K8S_43", r".*", "Images by tag by default; `image.digest` (chart) and digest references in "
            "trainerImage/serverImage pin them, which is what release installs do."),
    Allowed("CKV_K8S_15", r".*", "imagePullPolicy IfNotPresent: trainer and server images are several GB; a "
            "digest-pinned image cannot change under the same reference."),
    Allowed("CKV_K8S_38", r"chart-.*:(Deployment\.kubelora\.kl-operator|Pod\.kubelora\.kl-operator-test)|"
            r"built:(Job\.ml\..*-train-\d+|Deployment\.ml\..*)",
            "These talk to the API server: the operator, the helm test pod (discovery), the trainer (patches "
            "its own LoRAJob's status) and the serving pod's agent (reads its own adapter ConfigMap), each with a "
            "Role limited to that. The pre-flight pod gets no token."),
    Allowed("CKV_K8S_35", r"built:(Job|Deployment)\.ml\..*",
            "Model-hub and S3 credentials as environment variables from a Secret reference: huggingface_hub "
            "(HF_TOKEN) and botocore (AWS_*) read them from the environment; values are never logged "
            "(tests/e2e/test_secret_hygiene.py)."),
    Allowed("CKV2_K8S_6", r"(?!chart-networkpolicy:Pod\.kubelora\.kl-operator\.).*",
            "NetworkPolicy: networkPolicy.enabled (off by default: it needs the API server's address) covers "
            "the operator and the serving pods, and the networkpolicy render must pass for the operator; trainer "
            "and pre-flight pods reach the model hubs and object stores the namespace owner chooses, and the "
            "one-shot helm test pod only calls the API server."),
    Allowed("CKV_K8S_8", HELM_TEST_POD, "The helm test pod runs once and exits: no liveness probe."),
    Allowed("CKV_K8S_9", HELM_TEST_POD, "The helm test pod runs once and exits: no readiness probe."),
)


def example(path: str) -> Obj:
    return dict(yaml.safe_load((EXAMPLES / path).read_text()))


def with_uid(body: Obj) -> Obj:
    return {**body, "metadata": {"namespace": "ml", **body["metadata"], "uid": "uid-1", "generation": 1}}


def built_objects() -> list[Obj]:
    """What the operator creates for the GPU examples (one node and two), and for the CPU quickstart."""
    docs: list[Obj] = []
    for job_file in ("gpu/lorajob.yaml", "cpu-quickstart/lorajob.yaml"):
        body = with_uid(example(job_file))
        ref = ObjectRef.of(body)
        spec = LoRAJobSpec.model_validate(body["spec"])
        docs += [validation_job(ref, spec, 1, SETTINGS), training_job(ref, spec, 1, 1, SETTINGS)]
    body = with_uid(example("gpu/lorajob.yaml"))
    two_nodes = LoRAJobSpec.model_validate({**body["spec"], "resources": {**body["spec"]["resources"], "nodes": 2}})
    ref = ObjectRef.of(body)
    docs += [training_job(ref, two_nodes, 2, 1, SETTINGS), rendezvous_service(ref, 2, 1)]
    for deployment_file in ("gpu/adapterdeployment.yaml", "cpu-quickstart/adapterdeployment.yaml"):
        body = with_uid(example(deployment_file))
        ref = ObjectRef.of(body)
        spec = AdapterDeploymentSpec.model_validate(body["spec"])
        docs += [server_deployment(ref, spec, image=SETTINGS.server_image, adapter_uris=[]), server_pdb(ref)]
    return docs


def scan(path: Path) -> list[Obj]:
    """checkov's failed checks on one file, each tagged ``<file stem>:<resource id>`` (one run per file: its
    graph checks would otherwise credit one render's NetworkPolicy to another render's pods)."""
    assert CHECKOV.exists(), "checkov is missing: run `make checkov` (`make test` does)"
    done = subprocess.run([str(CHECKOV), "-f", str(path), "--framework", "kubernetes", "-o", "json",
                           "--quiet", "--compact", "--skip-download"],
                          capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: some check failed
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["check_type"] == "kubernetes" for r in reports), done.stdout[:2000]
    assert sum(r["summary"]["passed"] for r in reports) > 50, f"checkov ran no checks on {path.name}"
    return [{**c, "resource": f"{path.stem}:{c['resource']}"} for r in reports for c in r["results"]["failed_checks"]]


def allowed(check: Obj) -> Allowed | None:
    for entry in ALLOWLIST:
        if entry.check == check["check_id"] and re.fullmatch(entry.resources, check["resource"]):
            return entry
    return None


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    files = {f"chart-{name}": helm("template", "kl", str(REPO / "charts" / "kubelora"), "--namespace", "kubelora",
                                   *[a for s in sets for a in ("--set", s)])
             for name, sets in {**VALUE_SETS, "monitoring": MONITORING}.items()}
    files["built"] = yaml.safe_dump_all(built_objects())
    folder = tmp_path_factory.mktemp("checkov")
    failed: list[Obj] = []
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
        failed += scan(folder / f"{name}.yaml")
    return failed


def test_every_failed_check_is_allowlisted(failed: list[Obj]) -> None:
    unexpected = sorted({f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in failed if not allowed(c)})
    assert not unexpected, "checkov failures outside the allowlist:\n" + "\n".join(unexpected)


def test_the_allowlist_has_no_dead_entries(failed: list[Obj]) -> None:
    used = {id(allowed(c)) for c in failed}
    assert [e.check for e in ALLOWLIST if id(e) not in used] == []


def test_the_scan_sees_what_the_operator_builds(failed: list[Obj]) -> None:
    """The Jobs and Deployments are scanned (their kinds appear in failures of the allowlisted kind)."""
    resources = {".".join(c["resource"].split(".")[:3]) for c in failed}
    assert {"built:Job.ml.support-bot-train-1", "built:Job.ml.support-bot-validate-1",
            "built:Deployment.ml.support", "chart-default:Deployment.kubelora.kl-operator"} <= resources, resources


def test_the_allowlist_is_documented() -> None:
    doc = (REPO / "docs" / "security.md").read_text()
    assert all(entry.check in doc for entry in ALLOWLIST)
