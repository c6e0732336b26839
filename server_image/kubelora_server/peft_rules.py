"""What vLLM refuses in an ``adapter_config.json``, in vLLM's own words, as one pure function.

vLLM's ``PEFTHelper.validate_legal`` (``vllm/lora/peft_helper.py``) refuses, joined into one ``ValueError``
that the load route answers as 400 BadRequestError:

- ``modules_to_save`` set: "vLLM only supports modules_to_save being None."
- ``use_dora``: "vLLM does not yet support DoRA."
- ``r`` above ``--max-lora-rank``: "LoRA rank {r} is greater than max_lora_rank {max}."
- ``bias`` other than "none" without ``--enable-lora-bias``: "Adapter bias cannot be used without bias_enabled."

and ``PEFTHelper.from_dict`` refuses a config without ``r``, ``lora_alpha`` or ``target_modules``
("Missing required configuration fields: {...}").

:func:`vllm_refusals` is that list; the CPU engine answers with it (so it refuses what vLLM refuses, with the
same message) and the agent checks it before asking the engine (so a refusal is reported with a reason
instead of a round trip). :func:`serving_hazards` adds what vLLM accepts but serves wrongly - adapters whose
weights only make sense on a base model that peft changed while training (PiSSA/OLoRA/LoftQ initialisation
not converted back to plain LoRA, ``layer_replication``); only the agent refuses those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "eva")
"""init_lora_weights values that rewrite the base weights while training (peft's residual initialisations)."""


def vllm_refusals(config: Mapping[str, Any], max_lora_rank: int, bias_enabled: bool = False) -> list[str]:
    """The messages vLLM's PEFTHelper raises for ``config``, in vLLM's order; empty when vLLM loads it."""
    missing = {name for name in REQUIRED_FIELDS if name not in config}
    if missing:
        return [f"Missing required configuration fields: {missing}"]
    errors: list[str] = []
    if config.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    rank = int(config.get("r") or 0)
    if rank > max_lora_rank:
        errors.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if str(config.get("bias") or "none") != "none" and not bias_enabled:
        errors.append("Adapter bias cannot be used without bias_enabled.")
    return errors


def vllm_refusal_message(config: Mapping[str, Any], max_lora_rank: int, bias_enabled: bool = False) -> str | None:
    """The one message vLLM's load route answers (its errors joined by spaces), or ``None``."""
    errors = vllm_refusals(config, max_lora_rank, bias_enabled)
    return " ".join(errors) if errors else None


def serving_hazards(config: Mapping[str, Any]) -> list[str]:
    """What vLLM would load but serve wrongly: the adapter's deltas assume a base model peft modified."""
    out: list[str] = []
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        out.append(f"init_lora_weights {init!r} changes the base weights while training; save the adapter with "
                   "path_initial_model_for_weight_conversion so it applies to the original base model")
    if config.get("layer_replication"):
        out.append("layer_replication changes the base model's layer stack; vLLM serves the original layers")
    return out
