"""Every validation rule of the API models: a bad value is rejected with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.lorajob import LoRAJobSpec

JOB: dict[str, Any] = {
    "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"},
    "dataset": {"uri": "pvc://datasets/support.jsonl"},
    "output": {"uri": "pvc://adapters/support-bot"},
}
AD: dict[str, Any] = {
    "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen2.5-7b"},
    "adapters": [{"name": "support", "loraJobRef": {"name": "support-bot"}}],
}


def with_value(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    node = doc
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return doc


def test_minimal_job_gets_recipe_defaults() -> None:
    spec = LoRAJobSpec.model_validate(JOB)
    assert (spec.method, spec.lora.r, spec.lora.alpha, spec.lora.target_modules) == ("qlora", 16, 32, ["all-linear"])
    assert spec.training.learning_rate == 2e-4 and spec.training.optimizer == "paged_adamw_32bit"
    assert spec.effective_quantization is not None and spec.effective_quantization.quant_type == "nf4"
    assert spec.dataset.effective_eval_split == 0.1
    assert spec.wire()["lora"]["useRslora"] is False


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        pytest.param("lora.r", 0, "greater than or equal to 1", id="rank-zero"),
        pytest.param("lora.r", 1024, "less than or equal to 512", id="rank-too-big"),
        pytest.param("lora.alpha", 0, "greater than 0", id="alpha-zero"),
        pytest.param("lora.dropout", 1.0, "less than 1", id="dropout-one"),
        pytest.param("lora.targetModules", ["q_proj v_proj"], "should match pattern", id="modules-with-space"),
        pytest.param("lora.targetModules", "q_proj,v_proj", "valid list", id="modules-as-comma-string"),
        pytest.param("lora.targetModules", [], "at least 1 item", id="no-modules"),
        pytest.param("lora.targetModules", ["all-linear", "q_proj"], "list it alone", id="all-linear-mixed"),
        pytest.param("training.learningRate", 0, "greater than 0", id="lr-zero"),
        pytest.param("training.learningRate", 2, "less than or equal to 1", id="lr-too-big"),
        pytest.param("training.epochs", 0, "greater than or equal to 1", id="epochs-zero"),
        pytest.param("training.scheduler", "exponential", "'cosine'", id="unknown-scheduler"),
        pytest.param("training.optimizer", "lion", "paged_adamw_32bit", id="unknown-optimizer"),
        pytest.param("training.maxSeqLength", 8, "greater than or equal to 16", id="seq-too-short"),
        pytest.param("training.warmupRatio", 1.0, "less than 1", id="warmup-one"),
        pytest.param("dataset.evalSplit", 0.9, "less than or equal to 0.5", id="eval-split-too-big"),
        pytest.param("dataset.evalSplit", -0.1, "greater than or equal to 0", id="eval-split-negative"),
        pytest.param("dataset.format", "chatml", "'prompt-completion'", id="unknown-format"),
        pytest.param("method", "full", "'qlora' or 'lora'", id="unknown-method"),
        pytest.param("quantization.quantType", "int4", "'nf4' or 'fp4'", id="unknown-quant"),
        pytest.param("quantization.computeDtype", "float64", "'bfloat16'", id="unknown-dtype"),
        pytest.param("baseModel.uri", "gs://bucket/model", "scheme 'gs' is not allowed", id="gs-scheme"),
        pytest.param("baseModel.uri", "qwen-7b", "has no scheme", id="no-scheme"),
        pytest.param("baseModel.uri", "pvc://Models/x", "not a valid DNS-1123 name", id="pvc-bad-claim"),
        pytest.param("baseModel.uri", "file://relative/dir", "absolute path", id="file-relative"),
        pytest.param("baseModel.uri", "https://user:pw@host/model", "no inline credentials", id="https-credentials"),
        pytest.param("baseModel.uri", "hf://Qwen/Qwen2.5-7B@bad rev", "not a valid git revision", id="hf-bad-revision"),
        pytest.param("dataset.uri", "hf://org/data", "scheme 'hf' is not allowed", id="dataset-from-hf"),
        pytest.param("dataset.uri", "pvc://datasets/../etc/passwd", "'..' is not allowed", id="path-traversal"),
        pytest.param(
            "output.uri", "https://example.com/out", "use one of pvc://, s3://, file://", id="output-readonly-scheme"
        ),
        pytest.param("output.credentialsSecretRef", "My_Secret", "should match pattern", id="secret-name"),
        pytest.param("resources.gpus", -1, "greater than or equal to 0", id="negative-gpus"),
        pytest.param("resources.requests", {"memory": "lots"}, "should match pattern", id="bad-quantity"),
        pytest.param("resources.tolerations", [{"operator": "Maybe"}], "'Equal' or 'Exists'", id="bad-toleration"),
        pytest.param("backoffLimit", -1, "greater than or equal to 0", id="negative-backoff"),
        pytest.param("activeDeadlineSeconds", 5, "greater than or equal to 60", id="short-deadline"),
        pytest.param("lora.rank", 8, "Extra inputs are not permitted", id="unknown-field"),
    ],
)
def test_job_rejects(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        LoRAJobSpec.model_validate(with_value(JOB, path, value))
    text = str(err.value)
    assert message in text
    assert path.split(".")[-1] in text or path.split(".")[0] in text


def test_quantization_only_with_qlora() -> None:
    doc = with_value(JOB, "method", "lora")
    doc["quantization"] = {"quantType": "nf4"}
    with pytest.raises(ValidationError, match="quantization is only used with method: qlora"):
        LoRAJobSpec.model_validate(doc)
    assert LoRAJobSpec.model_validate(with_value(JOB, "method", "lora")).effective_quantization is None


@pytest.mark.parametrize(("resources", "ok"), [
    pytest.param({}, False, id="one-gpu"),
    pytest.param({"nodes": 1, "gpus": 0}, False, id="one-cpu-process"),
    pytest.param({"gpus": 2}, True, id="two-gpus"),
    pytest.param({"nodes": 2, "gpus": 0}, True, id="two-cpu-nodes"),
])
def test_fsdp_needs_more_than_one_process(resources: dict[str, Any], ok: bool) -> None:
    doc = {**JOB, "resources": resources, "distributed": {"strategy": "fsdp"}}
    if ok:
        assert LoRAJobSpec.model_validate(doc).distributed.strategy == "fsdp"
        return
    with pytest.raises(ValidationError, match="fsdp shards the model over several processes"):
        LoRAJobSpec.model_validate(doc)


@pytest.mark.parametrize(("resources", "world"), [
    pytest.param({}, 1, id="default"), pytest.param({"gpus": 8}, 8, id="8-gpus"),
    pytest.param({"nodes": 2, "gpus": 0}, 2, id="2-cpu-nodes"), pytest.param({"nodes": 4, "gpus": 8}, 32, id="4x8"),
])
def test_world_size_is_gpus_per_node_times_nodes(resources: dict[str, Any], world: int) -> None:
    spec = LoRAJobSpec.model_validate({**JOB, "resources": resources})
    assert spec.world_size == world and spec.distributed.strategy == "auto"


def test_node_count_is_bounded() -> None:
    for nodes in (0, 65):
        with pytest.raises(ValidationError, match="nodes"):
            LoRAJobSpec.model_validate({**JOB, "resources": {"nodes": nodes}})


def test_eval_split_and_eval_uri_are_exclusive() -> None:
    doc = with_value(JOB, "dataset.evalSplit", 0.2)
    doc["dataset"]["evalUri"] = "pvc://datasets/eval.jsonl"
    with pytest.raises(ValidationError, match="either evalSplit or evalUri"):
        LoRAJobSpec.model_validate(doc)
    only_uri = with_value(JOB, "dataset.evalUri", "pvc://datasets/eval.jsonl")
    assert LoRAJobSpec.model_validate(only_uri).dataset.effective_eval_split == 0.0


@pytest.mark.parametrize(
    ("modules", "peft_value"),
    [
        pytest.param(["q_proj", "v_proj"], ["q_proj", "v_proj"], id="names"),
        pytest.param(["all-linear"], "all-linear", id="all-linear"),
        pytest.param(None, "all-linear", id="default"),
    ],
)
def test_target_modules_list(modules: list[str] | None, peft_value: str | list[str]) -> None:
    doc = JOB if modules is None else with_value(JOB, "lora.targetModules", modules)
    spec = LoRAJobSpec.from_wire(doc)
    assert spec.lora.target_modules_value == peft_value


def test_training_fields_exclude_operational_ones() -> None:
    a = LoRAJobSpec.model_validate(JOB)
    b = LoRAJobSpec.model_validate({**JOB, "suspend": True, "backoffLimit": 5, "image": "x"})
    c = LoRAJobSpec.model_validate(with_value(JOB, "lora.r", 8))
    assert a.training_fields() == b.training_fields()
    assert a.training_fields() != c.training_fields()


def test_minimal_adapter_deployment_defaults() -> None:
    spec = AdapterDeploymentSpec.model_validate(AD)
    assert (spec.engine, spec.replicas, spec.vllm.max_loras, spec.vllm.max_lora_rank) == ("vllm", 1, 4, 64)
    assert spec.service.port == 8000


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        pytest.param("engine", "tgi", "'vllm' or 'cpu'", id="unknown-engine"),
        pytest.param("replicas", -1, "greater than or equal to 0", id="negative-replicas"),
        pytest.param("vllm.maxLoraRank", 48, "Input should be 1, 8, 16, 32, 64", id="rank-not-vllm-bucket"),
        pytest.param("vllm.maxLoras", 0, "greater than or equal to 1", id="zero-loras"),
        pytest.param("vllm.gpuMemoryUtilization", 1.5, "less than or equal to 1", id="gpu-util"),
        pytest.param("service.port", 70000, "less than or equal to 65535", id="port"),
        pytest.param("service.type", "ExternalName", "'ClusterIP'", id="service-type"),
        pytest.param("baseModel.servedName", "", "should match pattern", id="empty-served-name"),
    ],
)
def test_deployment_rejects(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AdapterDeploymentSpec.model_validate(with_value(AD, path, value))


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        pytest.param([{"name": "a"}], "set exactly one of loraJobRef or uri", id="no-source"),
        pytest.param(
            [{"name": "a", "uri": "s3://bkt/x", "loraJobRef": {"name": "j"}}],
            "set exactly one of loraJobRef or uri",
            id="both-sources",
        ),
        pytest.param(
            [{"name": "a", "uri": "s3://bkt/x"}, {"name": "a", "uri": "s3://bkt/y"}],
            "listed twice",
            id="duplicate-names",
        ),
        pytest.param([{"name": "Support_Bot", "uri": "s3://bkt/x"}], "should match pattern", id="bad-name"),
        pytest.param(
            [{"name": "a", "uri": "s3://bkt/x", "digest": "md5:abc"}], "should match pattern", id="bad-digest"
        ),
        pytest.param([{"name": "qwen2.5-7b", "uri": "s3://bkt/x"}], "equals baseModel.servedName", id="shadows-base"),
    ],
)
def test_adapter_rules(adapters: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AdapterDeploymentSpec.model_validate({**AD, "adapters": adapters})


def test_hub_adapters_are_accepted_with_a_revision_and_a_pin() -> None:
    spec = AdapterDeploymentSpec.model_validate({**AD, "adapters": [
        {"name": "a", "uri": "hf://org/adapter@0123abc", "digest": "sha256:" + "0" * 64}]})
    assert spec.adapters[0].uri == "hf://org/adapter@0123abc"


def test_cpu_loras_must_cover_gpu_loras() -> None:
    with pytest.raises(ValidationError, match=r"maxCpuLoras must be >= vllm.maxLoras"):
        AdapterDeploymentSpec.model_validate({**AD, "vllm": {"maxLoras": 4, "maxCpuLoras": 2}})
