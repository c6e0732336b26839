"""The CRDs' CEL rules on the real API server: every cross-field rule of the pydantic models is refused at
``kubectl apply`` time with the models' own message, and the LoRAJob transition rule freezes the training
fields while a run is in progress. The API server alone decides: the session operator, when an earlier test
started it, is paused while a test writes status by hand (``no_reconciles``)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kubelora.api.adapterdeployment import NAME_IS_A_SERVICE_NAME, AdapterDeploymentSpec
from kubelora.api.lorajob import LoRAJobSpec
from kubelora_local.kube import KubeError

from .conftest import LocalCluster

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]
API = "/apis/kubelora.io/v1alpha1/namespaces"

LORAJOB: Obj = {
    "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
    "dataset": {"uri": "pvc://data/a.jsonl"},
    "output": {"uri": "pvc://adapters/a"},
}
DEPLOYMENT: Obj = {
    "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B", "servedName": "base"},
    "adapters": [{"name": "a", "uri": "pvc://adapters/a"}],
}


def with_(base: Obj, **changes: Any) -> Obj:
    out = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


BAD_LORAJOBS = {
    "eval-split-and-uri": with_(LORAJOB, dataset__evalSplit=0.2, dataset__evalUri="pvc://data/eval.jsonl"),
    "quantization-with-lora": with_(LORAJOB, method="lora", quantization={"quantType": "nf4"}),
    "fsdp-one-process": with_(LORAJOB, distributed={"strategy": "fsdp"}, resources={"gpus": 1, "nodes": 1}),
    "fsdp-default-resources": with_(LORAJOB, distributed={"strategy": "fsdp"}),
    "all-linear-with-names": with_(LORAJOB, lora={"targetModules": ["all-linear", "q_proj"]}),
}
BAD_DEPLOYMENTS = {
    "cpu-loras-below-gpu-loras": with_(DEPLOYMENT, vllm={"maxLoras": 8, "maxCpuLoras": 4}),
    "both-sources": with_(DEPLOYMENT, adapters=[{"name": "a", "uri": "pvc://x/a", "loraJobRef": {"name": "j"}}]),
    "no-source": with_(DEPLOYMENT, adapters=[{"name": "a"}]),
    "shadows-base": with_(DEPLOYMENT, adapters=[{"name": "base", "uri": "pvc://x/a"}]),
}


def model_message(model: type[BaseModel], spec: Obj) -> str:
    with pytest.raises(ValidationError) as rejected:
        model.model_validate(spec)
    return str(rejected.value.errors()[0]["msg"]).removeprefix("Value error, ")


def refusal(cluster: LocalCluster, path: str, body: Obj) -> str:
    with pytest.raises(KubeError) as refused:
        cluster.kube.create(path, body)
    assert refused.value.status == 422, refused.value.body
    return str(json.loads(refused.value.body)["message"])


def manifest(kind: str, name: str, spec: Obj) -> Obj:
    return {"apiVersion": "kubelora.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("case", sorted(BAD_LORAJOBS))
def test_bad_lorajob_is_refused_with_the_models_message(cluster: LocalCluster, namespace: str, case: str) -> None:
    spec = BAD_LORAJOBS[case]
    expected = model_message(LoRAJobSpec, spec)
    assert expected in refusal(cluster, f"{API}/{namespace}/lorajobs", manifest("LoRAJob", case, spec))


@pytest.mark.parametrize("case", sorted(BAD_DEPLOYMENTS))
def test_bad_adapterdeployment_is_refused_with_the_models_message(
        cluster: LocalCluster, namespace: str, case: str) -> None:
    spec = BAD_DEPLOYMENTS[case]
    expected = model_message(AdapterDeploymentSpec, spec)
    got = refusal(cluster, f"{API}/{namespace}/adapterdeployments", manifest("AdapterDeployment", case, spec))
    assert expected in got, got


def test_a_name_listed_twice_is_refused_by_the_list_map(cluster: LocalCluster, namespace: str) -> None:
    twice = with_(DEPLOYMENT, adapters=[{"name": "a", "uri": "pvc://x/a"}, {"name": "a", "uri": "pvc://x/b"}])
    assert "listed twice" in model_message(AdapterDeploymentSpec, twice)
    got = refusal(cluster, f"{API}/{namespace}/adapterdeployments", manifest("AdapterDeployment", "twice", twice))
    assert 'spec.adapters[1]: Duplicate value: {"name":"a"}' in got, got


@pytest.mark.parametrize("name", ["a" * 64, "chat.v2", "2chat"])
def test_an_adapterdeployment_name_must_name_a_service(cluster: LocalCluster, namespace: str, name: str) -> None:
    got = refusal(cluster, f"{API}/{namespace}/adapterdeployments", manifest("AdapterDeployment", name, DEPLOYMENT))
    assert NAME_IS_A_SERVICE_NAME.message in got, got
    cluster.kube.create(f"{API}/{namespace}/adapterdeployments", manifest("AdapterDeployment", "c" * 63, DEPLOYMENT))


def test_good_specs_are_stored(cluster: LocalCluster, namespace: str) -> None:
    lorajob = with_(LORAJOB, dataset__evalSplit=0.0, dataset__evalUri="pvc://data/eval.jsonl", method="qlora",
                    quantization={"quantType": "fp4"})
    LoRAJobSpec.model_validate(lorajob)
    AdapterDeploymentSpec.model_validate(DEPLOYMENT)
    cluster.kube.create(f"{API}/{namespace}/lorajobs", manifest("LoRAJob", "good", lorajob))
    cluster.kube.create(f"{API}/{namespace}/adapterdeployments", manifest("AdapterDeployment", "good", DEPLOYMENT))
    fsdp = with_(LORAJOB, distributed={"strategy": "fsdp"}, resources={"gpus": 0, "nodes": 2})
    LoRAJobSpec.model_validate(fsdp)
    cluster.kube.create(f"{API}/{namespace}/lorajobs", manifest("LoRAJob", "good-fsdp", fsdp))


@pytest.mark.usefixtures("no_reconciles")
def test_training_fields_are_frozen_while_a_run_is_in_progress(cluster: LocalCluster, namespace: str) -> None:
    path = f"{API}/{namespace}/lorajobs/run"
    cluster.kube.create(f"{API}/{namespace}/lorajobs", manifest("LoRAJob", "run", LORAJOB))
    retrain = {"spec": {"training": {"learningRate": 1e-4}}}
    cluster.kube.merge_patch(path, retrain)  # no run yet (pre-flight at most): the reconciler restarts it

    cluster.kube.merge_patch(f"{path}/status", {"status": {"phase": "Running", "jobName": "run-r2-train"}})
    with pytest.raises(KubeError) as refused:
        cluster.kube.merge_patch(path, {"spec": {"training": {"learningRate": 3e-4}}})
    assert refused.value.status == 422
    assert "cannot change while a run is in progress" in json.loads(refused.value.body)["message"]
    cluster.kube.merge_patch(path, {"spec": {"suspend": True, "resources": {"gpus": 0}}})  # not training fields
    cluster.kube.merge_patch(f"{path}/status", {"status": {"phase": "Suspended"}})
    with pytest.raises(KubeError):
        cluster.kube.merge_patch(path, {"spec": {"lora": {"r": 8}}})

    # A change stored before the rule existed shows as SpecImmutable; it must stay revertable.
    cluster.kube.merge_patch(f"{path}/status", {"status": {"conditions": [
        {"type": "Validated", "status": "False", "reason": "SpecImmutable", "message": "m"}]}})
    cluster.kube.merge_patch(path, {"spec": {"lora": {"r": 8}}})

    cluster.kube.merge_patch(f"{path}/status", {"status": {"phase": "Succeeded", "conditions": []}})
    cluster.kube.merge_patch(path, {"spec": {"training": {"learningRate": 5e-4}}})  # starts the next run
    assert cluster.kube.get(path)["spec"]["training"]["learningRate"] == 5e-4
