"""Can this adapter be served by this deployment? Pure checks over adapter_config.json and the manifest.

They run in the agent, before the engine is asked, because vLLM's answer to a bad adapter is a generic
error (or, for a wrong base model of the same shape, no error at all and garbage output); the agent can
say precisely which rule was broken and mark only that adapter Failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest
from kubelora.api.uris import DEFAULT_PVC_ROOT, FileURI, HfURI, PvcURI, URIError, parse_uri, pvc_root
from kubelora_server.peft_rules import vllm_refusals

_HF_CACHE_DIR = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+?)(?:/snapshots/[^/]+)?$")


@dataclass(frozen=True)
class Incompatible:
    """Why an adapter cannot be served; ``reason`` is a :class:`Reason` value for the status."""

    reason: Reason
    message: str


def base_model_aliases(value: str | None, root: str | None = None) -> set[str]:
    """Every spelling that names the same base model as ``value``.

    The served base is a URI (``pvc://models/llama``), while adapter_config.json records the path the trainer
    loaded it from (``/mnt/pvc/models/llama``, a hub id, or a hub cache snapshot directory) and the manifest
    records the LoRAJob's URI. Mapping all of them into one set of aliases lets them be compared.
    """
    if not value or not value.strip():
        return set()
    raw = value.strip().rstrip("/")
    out = {raw}
    try:
        parsed = parse_uri(raw) if "://" in raw else None
    except URIError:
        parsed = None
    if isinstance(parsed, PvcURI):
        for base in {root or pvc_root(), DEFAULT_PVC_ROOT}:
            out.add(parsed.local_path(base).rstrip("/"))
    elif isinstance(parsed, FileURI):
        out.add(parsed.path.rstrip("/") or "/")
    elif isinstance(parsed, HfURI):
        out.add(parsed.repo)
    elif raw.startswith("/"):
        for base in {root or pvc_root(), DEFAULT_PVC_ROOT}:
            prefix = base.rstrip("/") + "/"
            if raw.startswith(prefix) and len(raw) > len(prefix):
                out.add("pvc://" + raw[len(prefix):])
        out.add("file://" + raw)
        cached = _HF_CACHE_DIR.search(raw)
        if cached:
            out.add(f"{cached.group(1)}/{cached.group(2)}")
    return out


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest rank any module of the adapter uses (``r`` and per-module ``rank_pattern`` overrides)."""
    ranks = [int(config.get("r") or 0)]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        ranks.extend(int(v) for v in pattern.values())
    return max(ranks)


def check_compatible(config: Mapping[str, Any], manifest: AdapterManifest | None, served_base: str,
                     max_lora_rank: int, root: str | None = None) -> Incompatible | None:
    """``None`` when the adapter may be loaded; otherwise the first rule it breaks.

    The base model is the manifest's ``baseModel`` (the LoRAJob's URI) when there is a manifest. Only an
    adapter without one (from the Hub, or made elsewhere) is judged by adapter_config's
    ``base_model_name_or_path``, peft's field: a repo id or a path, compared through
    :func:`base_model_aliases`. A trainer's config holds the path it loaded the base from, which may be a
    download folder inside its pod, so with a manifest the config's value is not consulted.
    """
    peft_type = str(config.get("peft_type") or "")
    if peft_type.upper() != "LORA" or (manifest is not None and manifest.peft_type.upper() != "LORA"):
        found = peft_type or "missing"
        return Incompatible(Reason.NOT_LORA, f"adapter_config.json peft_type is {found!r}; only LORA can be served")
    refused = vllm_refusals(config, max_lora_rank)
    if refused:
        # vLLM's own words, so the status reads like the engine's answer would have
        reason = Reason.RANK_TOO_LARGE if all("max_lora_rank" in m for m in refused) else Reason.UNSUPPORTED_ADAPTER
        return Incompatible(reason, "vLLM refuses this adapter: " + " ".join(refused))
    served = base_model_aliases(served_base, root)
    if manifest is not None:
        declared, field = manifest.base_model, f"{MANIFEST_FILE} baseModel"
    else:
        value = config.get("base_model_name_or_path")
        declared, field = (value if isinstance(value, str) else ""), "adapter_config.json base_model_name_or_path"
    declared_aliases = base_model_aliases(declared, root)
    if not declared_aliases:
        return Incompatible(Reason.BASE_MODEL_MISMATCH,
                            f"the adapter does not say which base model it was trained on (no {field})")
    if not served & declared_aliases:
        return Incompatible(Reason.BASE_MODEL_MISMATCH, f"the adapter was trained on {declared} ({field}), "
                            f"but this deployment serves {served_base}")
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        return Incompatible(Reason.RANK_TOO_LARGE,
                            f"adapter rank {rank} exceeds vllm.maxLoraRank {max_lora_rank}")
    return None
