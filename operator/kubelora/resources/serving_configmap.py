"""ConfigMap ``<ad>-adapters``: the resolved adapter list every replica's agent loads.

It is the only child that changes when adapters are added, removed or rolled forward; the agents watch
it and load/unload at runtime, so serving pods are never restarted for an adapter change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import DESIRED_ADAPTERS_KEY, DesiredAdapter, DesiredAdapters
from kubelora.resources.pods import Manifest, object_meta
from kubelora.resources.serving_common import child_labels, configmap_name


def desired_adapters(spec: AdapterDeploymentSpec, adapters: Iterable[DesiredAdapter]) -> DesiredAdapters:
    """The agents' input: the base model, the limits they check against, and the resolved adapters."""
    return DesiredAdapters(
        base_model=spec.base_model.uri,
        served_name=spec.base_model.served_name,
        max_lora_rank=spec.vllm.max_lora_rank,
        max_loras=spec.vllm.max_loras,
        max_cpu_loras=spec.vllm.max_cpu_loras,
        adapters=list(adapters),
    )


def render_desired(desired: DesiredAdapters) -> str:
    """Stable JSON (sorted keys, no whitespace): equal inputs give byte-equal ConfigMaps, so no churn."""
    return json.dumps(desired.wire(), sort_keys=True, separators=(",", ":"))


def adapters_configmap(owner: ObjectRef, desired: DesiredAdapters) -> Manifest:
    name = owner.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(configmap_name(name), owner, child_labels(name, "adapters")),
        "data": {DESIRED_ADAPTERS_KEY: render_desired(desired)},
    }
