"""Names and labels of everything a LoRAJob owns (see docs/design.md, "LoRAJob run").

The names are deterministic so that a restarted operator finds the children it made before instead
of creating duplicates: the pre-flight Job and the config ConfigMap are keyed by revision, the
training Job by the generation at which it was created (a resume after ``suspend`` gets a fresh one).

Job names end up in the ``job-name`` label of their pods and label values are limited to 63
characters, so long LoRAJob names are shortened with a hash that keeps them unique.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from kubelora.resources.pods import COMPONENT, LORAJOB_LABEL

LABEL_LIMIT = 63
REVISION_LABEL = "kubelora.io/revision"
NAME_ANNOTATION = "kubelora.io/lorajob-name"
"""On pod templates: the full LoRAJob name, which the (63-character) label may have shortened."""
TRAINER_COMPONENT = "trainer"
PREFLIGHT_COMPONENT = "preflight"
CONFIG_COMPONENT = "trainer-config"
IDENTITY_COMPONENT = "trainer-identity"
CONTAINER_NAME = "trainer"
JOB_NAME_LABEL = "job-name"
"""Set on pods by the Job controller."""
BATCH_JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""The same, under the Job controller's prefixed name (the one to select on)."""
RENDEZVOUS_COMPONENT = "trainer-rendezvous"


def bounded(name: str, suffix: str = "", limit: int = LABEL_LIMIT) -> str:
    """``name + suffix`` when it fits in ``limit``; else a prefix of ``name``, a hash of it, and ``suffix``."""
    if len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = max(limit - len(suffix) - len(digest) - 1, 1)
    prefix = name[:keep].rstrip("-.")
    return f"{prefix}-{digest}{suffix}"


def label_value(job: str) -> str:
    """The value of ``kubelora.io/lorajob`` on every child: the LoRAJob name, bounded to 63 characters."""
    return bounded(job)


def trainer_config_name(job: str, revision: int) -> str:
    return bounded(job, f"-trainer-{revision}", 253)


def trainer_identity_name(job: str) -> str:
    """ServiceAccount, Role and RoleBinding share this name."""
    return bounded(job, "-trainer", 253)


def validation_job_name(job: str, revision: int) -> str:
    return bounded(job, f"-validate-{revision}")


def training_job_name(job: str, generation: int) -> str:
    return bounded(job, f"-train-{generation}")


def rendezvous_service_name(job: str, generation: int) -> str:
    """Headless Service of a multi-node training Job: its pods are ``<training job>-<index>.<this>``.

    The training Job's name, so a pod's full name reads as the Job's; Service names must start with a
    letter (DNS-1035), so a LoRAJob name starting with a digit gets a ``t`` in front.
    """
    name = training_job_name(job, generation)
    return name if name[0].isalpha() else bounded(f"t{job}", f"-train-{generation}")


def child_labels(job: str, component: str, revision: int | None = None) -> dict[str, str]:
    """Labels that let the operator's label-selected watches find the child and its LoRAJob."""
    # kubelora.io/lorajob is the instance label: app.kubernetes.io/instance is Argo CD's tracking label,
    # and a child carrying it would look like a resource of another Argo CD Application (and be pruned).
    labels = {LORAJOB_LABEL: label_value(job), COMPONENT: component}
    if revision is not None:
        labels[REVISION_LABEL] = str(revision)
    return labels


def revision_of(labels: Mapping[str, str] | None) -> int | None:
    """The revision label as an int, None when absent or malformed (objects made by someone else)."""
    try:
        return int((labels or {})[REVISION_LABEL])
    except (KeyError, ValueError):
        return None
