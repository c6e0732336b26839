"""The engine container's command line: ``vllm serve …`` on GPUs or ``kubelora-cpu-engine …`` on CPU.

Both engines get the same LoRA flags so that the agent, which loads adapters through the runtime LoRA API,
behaves the same against either. Rules the CRD schema cannot express (a base model vLLM cannot open, an
extra argument that would override a flag the operator manages) raise :class:`ServingSpecError`; the
handler turns that into phase Failed with reason InvalidSpec instead of a crash-looping pod.
"""

from __future__ import annotations

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.uris import FileURI, HfURI, PvcURI, URIError, parse_uri
from kubelora.resources.serving_common import ENGINE_PORT

VLLM_COMMAND = ("vllm", "serve")
CPU_ENGINE_COMMAND = ("kubelora-cpu-engine",)
MANAGED_FLAGS = frozenset({
    "--host", "--port", "--served-model-name", "--enable-lora", "--max-loras", "--max-lora-rank",
    "--max-cpu-loras", "--model", "--lora-modules", "--tensor-parallel-size", "--revision",
})
"""Flags the operator sets itself; an extraArgs entry that repeats one would silently win or clash."""
LORA_GUARD = "kubelora_server.lora_guard.PodLocalLoRAUpdates"
"""ASGI middleware (in the server image) that answers the runtime LoRA routes only for the pod itself: they share
the inference port, so no bind address or NetworkPolicy can keep clients away from them (see its module)."""


def guard_flags() -> list[str]:
    return ["--middleware", LORA_GUARD]


class ServingSpecError(ValueError):
    """The CRD accepted the spec, but it cannot be served (reported as InvalidSpec, never retried)."""


def model_argument(uri: str) -> tuple[str, list[str]]:
    """The model path or hub id the engine opens, plus flags it needs (``--revision`` for ``hf://x@rev``).

    ``pvc://`` claims are mounted at /mnt/pvc/<claim> and ``file://`` paths are used as they are.
    ``s3://`` and ``https://`` base models would need a download step that neither engine has.
    """
    try:
        parsed = parse_uri(uri)
    except URIError as exc:
        raise ServingSpecError(f"baseModel.uri: {exc}") from None
    if isinstance(parsed, HfURI):
        return parsed.repo, (["--revision", parsed.revision] if parsed.revision else [])
    if isinstance(parsed, PvcURI | FileURI):
        return parsed.local_path(root="/mnt/pvc"), []
    raise ServingSpecError(
        f"baseModel.uri {uri!r}: the serving engines open base models from hf://, pvc:// or file:// only; "
        "copy the model to a PersistentVolumeClaim and use pvc://<claim>/<path>")


def check_extra_args(extra_args: list[str]) -> None:
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise ServingSpecError(f"vllm.extraArgs: {flag} is set by the operator from the spec; remove it")


def lora_flags(spec: AdapterDeploymentSpec) -> list[str]:
    v = spec.vllm
    return ["--enable-lora", "--max-loras", str(v.max_loras), "--max-lora-rank", str(v.max_lora_rank),
            "--max-cpu-loras", str(v.max_cpu_loras)]


def vllm_command(spec: AdapterDeploymentSpec) -> list[str]:
    """``vllm serve`` listening on the pod IP (the agent reaches it there; probes use the pod IP too)."""
    check_extra_args(spec.vllm.extra_args)
    model, model_flags = model_argument(spec.base_model.uri)
    args = [*VLLM_COMMAND, model, *model_flags, "--host", "$(POD_IP)", "--port", str(ENGINE_PORT),
            "--served-model-name", spec.base_model.served_name, *lora_flags(spec), *guard_flags()]
    if spec.vllm.max_model_len is not None:
        args += ["--max-model-len", str(spec.vllm.max_model_len)]
    args += ["--gpu-memory-utilization", str(spec.vllm.gpu_memory_utilization)]
    if spec.resources.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.resources.gpus)]
    return [*args, *spec.vllm.extra_args]


def cpu_engine_command(spec: AdapterDeploymentSpec) -> list[str]:
    """The transformers+peft engine: the same flags minus the GPU-only ones (memory fraction, TP)."""
    check_extra_args(spec.vllm.extra_args)
    model, model_flags = model_argument(spec.base_model.uri)
    args = [*CPU_ENGINE_COMMAND, "--model", model, *model_flags, "--served-model-name",
            spec.base_model.served_name, "--host", "$(POD_IP)", "--port", str(ENGINE_PORT), *lora_flags(spec),
            *guard_flags()]
    if spec.vllm.max_model_len is not None:
        args += ["--max-model-len", str(spec.vllm.max_model_len)]
    return [*args, *spec.vllm.extra_args]


def engine_command(spec: AdapterDeploymentSpec) -> list[str]:
    return vllm_command(spec) if spec.engine == "vllm" else cpu_engine_command(spec)
