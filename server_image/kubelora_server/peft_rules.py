"""What vLLM refuses in an ``adapter_config.json``, in vLLM's own words, as one pure function.

Mirrors ``vllm/lora/peft_helper.py`` of the release ``server_image/Dockerfile`` pins (v0.34.0): ``from_dict``
refuses a config without ``r``, ``lora_alpha`` or ``target_modules``; ``__post_init__`` a non-positive rank;
``validate_legal`` joins, with spaces, one sentence per unsupported feature - ``modules_to_save`` other than a
classification head, DoRA, ``lora_bias``, initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA,
LoftQ...), aLoRA, ``layer_replication``, BD-LoRA, QALoRA - then a rank (``r`` or any ``rank_pattern`` value)
above ``--max-lora-rank``, then any ``bias`` but "none". The load route answers that text (vLLM v0.34: 500
InternalServerError; before v0.12: 400 BadRequestError).

The CPU engine answers with :func:`vllm_refusal_message` (so it refuses what vLLM refuses, with the same
text) and the agent checks :func:`vllm_refusals` before asking the engine (so the status names the rule
instead of relaying a server error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
CLASSIFICATION_HEADS = ("classifier", "score")
"""The only modules_to_save vLLM serves (classification models)."""
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
"""String init_lora_weights values that only set the initial adapter weights (vLLM's _init_is_supported)."""


def _features(config: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    modules = list(config.get("modules_to_save") or [])
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        modules = list(dict.fromkeys([*modules, *CLASSIFICATION_HEADS]))
    unsupported = [m for m in modules if m not in CLASSIFICATION_HEADS]
    if unsupported:
        errors.append('vLLM only supports modules_to_save being either None or ["classifier", "score"] for '
                      f"classification models. Unsupported modules_to_save: {unsupported}")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        errors.append(f"vLLM does not support init_lora_weights={init!r}. Inits such as PiSSA, OLoRA, CorDA and "
                      "LoftQ modify the base model weights when PEFT loads the adapter. Convert it to a regular "
                      "LoRA adapter with PEFT's path_initial_model_for_weight_conversion, or set "
                      "init_lora_weights to true if the served base model already contains the modified weights.")
    if config.get("alora_invocation_tokens"):
        errors.append("vLLM does not support Activated LoRA (aLoRA).")
    if config.get("layer_replication"):
        errors.append("vLLM does not support layer_replication.")
    if config.get("use_bdlora"):
        errors.append("vLLM does not support block-diagonal LoRA (BD-LoRA).")
    if config.get("use_qalora"):
        errors.append("vLLM does not support QALoRA.")
    return errors


def vllm_refusals(config: Mapping[str, Any], max_lora_rank: int) -> list[str]:
    """The sentences vLLM raises for ``config``, in vLLM's order; empty when vLLM loads it."""
    missing = {name for name in REQUIRED_FIELDS if name not in config}
    if missing:
        return [f"Missing required configuration fields: {missing}"]
    rank = int(config.get("r") or 0)
    if rank <= 0:
        return [f"LoRA rank `r` must be a positive integer, got {config.get('r')}."]
    pattern = config.get("rank_pattern") or {}
    for key, value in pattern.items():
        if not isinstance(value, int) or value <= 0:
            return [f"LoRA rank for `{key}` in `rank_pattern` must be a positive integer, got {value}."]
    errors = _features(config)
    top = max([rank, *pattern.values()])
    if top > max_lora_rank:
        errors.append(f"LoRA rank {top} is greater than max_lora_rank {max_lora_rank}.")
    if str(config.get("bias") or "none") != "none":
        errors.append("Adapter bias is not supported.")
    return errors


def vllm_refusal_message(config: Mapping[str, Any], max_lora_rank: int) -> str | None:
    """The one message vLLM's load route answers (its sentences joined by spaces), or ``None``."""
    errors = vllm_refusals(config, max_lora_rank)
    return " ".join(errors) if errors else None
