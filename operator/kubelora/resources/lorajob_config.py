"""What a training pod needs besides its Job: the run config and an identity to report progress with.

* ConfigMap ``<job>-trainer-<revision>`` (key ``job.json``): the :class:`TrainerRunConfig` of one
  revision. It is immutable: the spec of a revision is fixed when the revision starts, and a resumed
  or retried pod must train exactly what the first pod trained, whatever happens to the LoRAJob spec.
* ServiceAccount, Role and RoleBinding ``<job>-trainer``: the trainer may ``get`` and ``patch`` the
  status of its own LoRAJob and nothing else (``resourceNames`` pins the one object), so a trainer
  that runs arbitrary user data cannot touch other jobs or read Secrets.

All are owned by the LoRAJob and go away with it by garbage collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubelora.api.combine import ResolvedInput
from kubelora.api.common import GROUP
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import TrainerRunConfig
from kubelora.resources.lorajob_names import (
    CONFIG_COMPONENT,
    IDENTITY_COMPONENT,
    child_labels,
    trainer_config_name,
    trainer_identity_name,
)
from kubelora.resources.pods import Manifest, object_meta

CONFIG_KEY = "job.json"
STATUS_RESOURCE = "lorajobs/status"


def run_config(job: ObjectRef, revision: int, spec: LoRAJobSpec,
               combine_inputs: Sequence[ResolvedInput] = ()) -> TrainerRunConfig:
    return TrainerRunConfig(name=job.name, namespace=job.namespace, revision=revision, spec=spec,
                            combine_inputs=list(combine_inputs))


def trainer_config_map(job: ObjectRef, revision: int, spec: LoRAJobSpec,
                       combine_inputs: Sequence[ResolvedInput] = ()) -> Manifest:
    """ConfigMap ``<job>-trainer-<revision>`` holding ``job.json``, mounted at /etc/kubelora in the pods.

    ``combine_inputs``: spec.combine.inputs resolved (loraJobRef -> the uri and digest it published), fixed here
    with the revision: a retried pod combines exactly the adapters the first one did."""
    name = job.name
    config = run_config(job, revision, spec, combine_inputs)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(trainer_config_name(name, revision), job,
                                child_labels(name, CONFIG_COMPONENT, revision)),
        "immutable": True,
        "data": {CONFIG_KEY: config.model_dump_json(by_alias=True, exclude_none=True)},
    }


def parse_trainer_config_map(config_map: Mapping[str, Any]) -> TrainerRunConfig | None:
    """The run config stored in a ConfigMap, None when it is missing or unreadable."""
    raw = (config_map.get("data") or {}).get(CONFIG_KEY)
    if not raw:
        return None
    try:
        return TrainerRunConfig.model_validate_json(raw)
    except ValueError:
        return None


def trainer_service_account(job: ObjectRef) -> Manifest:
    name = job.name
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(trainer_identity_name(name), job, child_labels(name, IDENTITY_COMPONENT)),
    }


def trainer_role(job: ObjectRef) -> Manifest:
    """get/patch on ``lorajobs/status`` of this one LoRAJob: all the trainer needs to publish progress."""
    name = job.name
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(trainer_identity_name(name), job, child_labels(name, IDENTITY_COMPONENT)),
        "rules": [{
            "apiGroups": [GROUP],
            "resources": [STATUS_RESOURCE],
            "resourceNames": [name],
            "verbs": ["get", "patch"],
        }],
    }


def trainer_role_binding(job: ObjectRef) -> Manifest:
    identity = trainer_identity_name(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(identity, job, child_labels(job.name, IDENTITY_COMPONENT)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": identity},
        "subjects": [{"kind": "ServiceAccount", "name": identity, "namespace": job.namespace}],
    }


def trainer_identity(job: ObjectRef) -> list[Manifest]:
    """ServiceAccount, Role, RoleBinding: in creation order (the binding refers to the other two)."""
    return [trainer_service_account(job), trainer_role(job), trainer_role_binding(job)]
