"""Pure builders of a LoRAJob's children: names, config, identity, pre-flight and training Jobs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import TrainerRunConfig
from kubelora.resources.lorajob_config import (
    parse_trainer_config_map,
    trainer_config_map,
    trainer_identity,
    trainer_role,
)
from kubelora.resources.lorajob_jobs import training_job, validation_job
from kubelora.resources.lorajob_names import (
    NAME_ANNOTATION,
    bounded,
    label_value,
    revision_of,
    training_job_name,
    validation_job_name,
)
from kubelora.settings import Settings

BODY = {
    "apiVersion": "kubelora.io/v1alpha1",
    "kind": "LoRAJob",
    "metadata": {"name": "bot", "namespace": "ml", "uid": "uid-1", "generation": 3},
}
REF = ObjectRef.of(BODY)
SPEC = {
    "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct", "credentialsSecretRef": "hf"},
    "dataset": {"uri": "pvc://data/train.jsonl"},
    "output": {"uri": "s3://adapters/bot", "credentialsSecretRef": "s3-creds"},
    "resources": {
        "gpus": 2,
        "requests": {"memory": "64Gi"},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
    },
    "backoffLimit": 4,
    "activeDeadlineSeconds": 3600,
}
SETTINGS = Settings(trainer_image="ghcr.io/kubelora/trainer:test", progress_interval_seconds=1.5)


def spec(**overrides: Any) -> LoRAJobSpec:
    return LoRAJobSpec.model_validate({**SPEC, **overrides})


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def env_names(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(job)["env"]}


def test_owner_reference_makes_children_collectable() -> None:
    for manifest in [
        trainer_config_map(REF, 1, spec()),
        *trainer_identity(REF),
        training_job(REF, spec(), 1, 3, SETTINGS),
        validation_job(REF, spec(), 1, SETTINGS),
    ]:
        ref = manifest["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("LoRAJob", "bot", "uid-1", True)
        assert manifest["metadata"]["namespace"] == "ml"
        assert manifest["metadata"]["labels"]["kubelora.io/lorajob"] == "bot"


def test_config_map_holds_the_run_config_and_is_immutable() -> None:
    cm = trainer_config_map(REF, 2, spec())
    assert cm["metadata"]["name"] == "bot-trainer-2"
    assert cm["immutable"] is True
    config = TrainerRunConfig.model_validate_json(cm["data"]["job.json"])
    assert (config.name, config.namespace, config.revision) == ("bot", "ml", 2)
    assert config.spec == spec()
    assert parse_trainer_config_map(cm) == config


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({}, id="no-data"),
        pytest.param({"job.json": "not json"}, id="garbage"),
        pytest.param({"job.json": json.dumps({"name": "x"})}, id="incomplete"),
    ],
)
def test_unreadable_config_map_is_none(data: dict[str, str]) -> None:
    assert parse_trainer_config_map({"data": data}) is None


def test_trainer_identity_may_patch_only_its_own_status() -> None:
    sa, role, binding = trainer_identity(REF)
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "bot-trainer"
    assert role["rules"] == [
        {
            "apiGroups": ["kubelora.io"],
            "resources": ["lorajobs/status"],
            "resourceNames": ["bot"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bot-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bot-trainer", "namespace": "ml"}]
    assert trainer_role(REF)["metadata"]["name"] == "bot-trainer"


def test_training_job() -> None:
    job = training_job(REF, spec(), 2, 3, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert job["metadata"]["name"] == "bot-train-3"
    assert job["metadata"]["labels"]["kubelora.io/revision"] == "2"
    assert job["spec"]["backoffLimit"] == 4 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert c["image"] == "ghcr.io/kubelora/trainer:test"
    assert c["command"] == ["kubelora-train", "--config", "/etc/kubelora/job.json"]
    assert c["resources"] == {"requests": {"memory": "64Gi", "nvidia.com/gpu": "2"},
                              "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}, "the memory request is the limit"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "bot-trainer" and pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "training"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {v["name"] for v in pod["volumes"]} == {"trainer-config", "pvc-data", "dshm", "scratch"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "scratch", "mountPath": "/home/kubelora"} in c["volumeMounts"], "HOME and TMPDIR are writable"
    assert env_names(job)["TMPDIR"]["value"] == env_names(job)["HOME"]["value"] == "/home/kubelora"
    template_meta = job["spec"]["template"]["metadata"]
    assert template_meta["labels"]["kubelora.io/lorajob"] == "bot"
    assert template_meta["labels"]["app.kubernetes.io/component"] == "trainer"
    assert template_meta["annotations"] == {NAME_ANNOTATION: "bot"}
    assert env_names(job)["KUBELORA_PROGRESS_INTERVAL"] == {"name": "KUBELORA_PROGRESS_INTERVAL", "value": "1.5"}


def test_credentials_come_from_secret_refs_never_values() -> None:
    env = env_names(training_job(REF, spec(), 1, 1, SETTINGS))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    plain = {"KUBELORA_PROGRESS_INTERVAL", "HOME", "TMPDIR"}  # settings, no credentials
    assert all("value" not in e for name, e in env.items() if name not in plain)


def test_inputs_read_only_output_read_write() -> None:
    job = training_job(
        REF,
        spec(baseModel={"uri": "pvc://models/qwen"}, output={"uri": "pvc://data/out"}, resources={"gpus": 0}),
        1,
        1,
        SETTINGS,
    )
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert mounts["pvc-models"]["readOnly"] is True
    assert mounts["pvc-data"]["readOnly"] is False  # dataset and output share the claim: writable once
    assert mounts["pvc-data"]["mountPath"] == "/mnt/pvc/data"
    assert mounts["trainer-config"] == {"name": "trainer-config", "mountPath": "/etc/kubelora", "readOnly": True}
    assert "dshm" not in mounts
    assert "nvidia.com/gpu" not in str(container(job)["resources"])
    assert not [e for e in container(job)["env"] if "secretKeyRef" in str(e)]  # pvc:// needs no Secret


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        pytest.param("", "ghcr.io/kubelora/trainer:test", id="operator-default"),
        pytest.param("ghcr.io/kubelora/noop", "ghcr.io/kubelora/noop", id="spec-override"),
    ],
)
def test_image(image: str, expected: str) -> None:
    assert container(training_job(REF, spec(image=image), 1, 1, SETTINGS))["image"] == expected
    assert container(validation_job(REF, spec(image=image), 1, SETTINGS))["image"] == expected


def test_validation_job_is_small_and_never_retried() -> None:
    job = validation_job(REF, spec(), 2, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert job["metadata"]["name"] == "bot-validate-2"
    assert job["spec"]["backoffLimit"] == 0
    assert c["command"][-1] == "--validate-only"
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "preflight"
    assert "dshm" not in {v["name"] for v in pod["volumes"]}


def test_file_uris_need_no_volumes() -> None:
    local = spec(
        baseModel={"uri": "file:///models/tiny"},
        dataset={"uri": "file:///data/d.jsonl"},
        output={"uri": "file:///out"},
        resources={"gpus": 0},
    )
    pod = training_job(REF, local, 1, 1, SETTINGS)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["trainer-config", "scratch"]


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        pytest.param("bot", "-train-12", id="short"),
        pytest.param("a" * 60, "-train-12", id="long"),
        pytest.param("x-" * 40, "-validate-3", id="long-with-dashes"),
    ],
)
def test_job_names_fit_a_label(name: str, suffix: str) -> None:
    out = bounded(name, suffix)
    assert len(out) <= 63 and out.endswith(suffix)
    assert "--" not in out.replace(suffix, "")
    assert bounded(name, suffix) == out  # deterministic
    if len(name) + len(suffix) <= 63:
        assert out == name + suffix


def test_long_names_stay_distinct() -> None:
    a, b = "a" * 70 + "x", "a" * 70 + "y"
    assert label_value(a) != label_value(b)
    assert training_job_name(a, 1) != training_job_name(b, 1)
    assert validation_job_name("bot", 4) == "bot-validate-4"


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        pytest.param({"kubelora.io/revision": "3"}, 3, id="set"),
        pytest.param({}, None, id="missing"),
        pytest.param({"kubelora.io/revision": "x"}, None, id="garbage"),
        pytest.param(None, None, id="no-labels"),
    ],
)
def test_revision_label(labels: dict[str, str] | None, expected: int | None) -> None:
    assert revision_of(labels) == expected


def multi_node(nodes: int = 2, gpus: int = 0, **over: Any) -> LoRAJobSpec:
    return spec(resources={"gpus": gpus, "nodes": nodes}, **over)


def test_one_node_is_one_pod_of_a_plain_job() -> None:
    job = training_job(REF, spec(), 2, 3, SETTINGS)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert "completionMode" not in job["spec"] and "backoffLimitPerIndex" not in job["spec"]
    pod = job["spec"]["template"]["spec"]
    assert "subdomain" not in pod and "KUBELORA_RDZV_ENDPOINT" not in env_names(job)


def test_several_nodes_are_an_indexed_job_that_restarts_as_a_group() -> None:
    job = training_job(REF, multi_node(4, gpus=8), 2, 3, SETTINGS)
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 4, 4)
    # Each index has the spec's retries; one out of them fails the Job (maxFailedIndexes 0) instead of hanging.
    assert (s["backoffLimitPerIndex"], s["maxFailedIndexes"]) == (4, 0) and "backoffLimit" not in s
    assert s["podReplacementPolicy"] == "Failed"  # a new group only once the old pods have stopped
    assert {r["action"] for r in s["podFailurePolicy"]["rules"]} == {"FailJob", "Ignore"}
    pod = s["template"]["spec"]
    assert pod["subdomain"] == "bot-train-3"
    env = env_names(job)
    # Pod 0 of the Job is bot-train-3-0 (the Job controller's hostname), bot-train-3-0.bot-train-3 in DNS.
    assert env["KUBELORA_RDZV_ENDPOINT"]["value"] == "bot-train-3-0.bot-train-3:29400"
    assert env["KUBELORA_RDZV_ID"]["value"] == "bot-train-3"
    assert container(job)["ports"] == [{"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"}]
    assert container(job)["resources"]["limits"] == {"nvidia.com/gpu": "8"}  # GPUs per node, per pod


def test_rendezvous_service_is_headless_and_selects_the_jobs_pods() -> None:
    from kubelora.resources.lorajob_jobs import rendezvous_service

    svc = rendezvous_service(REF, 2, 3)
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == "bot-train-3"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert svc["metadata"]["labels"]["kubelora.io/lorajob"] == "bot"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "bot-train-3"}


def test_rendezvous_service_name_starts_with_a_letter() -> None:
    from kubelora.resources.lorajob_names import rendezvous_service_name

    assert rendezvous_service_name("bot", 3) == "bot-train-3"
    assert rendezvous_service_name("7b-bot", 3) == "t7b-bot-train-3"
    long = rendezvous_service_name("9" * 80, 3)
    assert long[0].isalpha() and len(long) <= 63
