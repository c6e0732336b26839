"""The trainer's identity may change only ``status.progress`` of a LoRAJob: a ValidatingAdmissionPolicy.

RBAC cannot express it: ``lorajobs/status`` is one subresource, so the Role that lets a training pod
report progress (``resources/lorajob_config.py``, pinned to its own LoRAJob by ``resourceNames``) also
lets code running user data rewrite ``status.adapter``, the phase or the conditions, which
AdapterDeployments then trust. A separate progress object (a ConfigMap the operator copies) would need
one more watch and write per update and would still rely on the operator to check it; the API server
can refuse the write itself. The policy's rule is generated from :class:`LoRAJobStatus`, so a status
field added to the model is frozen for the trainer without anyone remembering to list it
(``tests/unit/test_trainer_policy.py`` fails on drift, ``tests/e2e/test_trainer_policy.py`` checks it on
the real API server with a trainer's token).

What the trainer writes into ``status.progress.adapter`` is a claim, not a fact: the operator copies it
into ``status.adapter`` only when it lies under ``spec.output.uri``, and the agent serves it only when
the manifest at that location confirms the digest.
"""

from __future__ import annotations

from typing import Any

from kubelora.api.common import GROUP
from kubelora.api.lorajob import LoRAJobStatus

TRAINER_FIELD = "progress"
TRAINER_SUFFIX = "-trainer"
"""Every training pod runs as ServiceAccount ``<job>-trainer`` (``resources/lorajob_names.py`` keeps the
suffix when it shortens a long name)."""
MESSAGE = "a LoRAJob's trainer may change only status.progress"


def frozen_status_fields() -> list[str]:
    """Wire names of every status field but the trainer's, in model order."""
    return [f.alias or name for name, f in LoRAJobStatus.model_fields.items() if (f.alias or name) != TRAINER_FIELD]


def trainer_match_condition() -> str:
    """CEL: the request comes from a ``*-trainer`` ServiceAccount of the LoRAJob's own namespace."""
    return (f"request.userInfo.username.startsWith('system:serviceaccount:' + request.namespace + ':') && "
            f"request.userInfo.username.endsWith('{TRAINER_SUFFIX}')")


def unchanged_rule() -> str:
    """CEL: every status field but ``progress`` is as it was (absent stays absent)."""
    return " && ".join(f"object.?status.?{f} == oldObject.?status.?{f}" for f in frozen_status_fields())


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"], "operations": ["UPDATE"],
                "resources": ["lorajobs/status"],
            }]},
            "matchConditions": [{"name": "trainer-identity", "expression": trainer_match_condition()}],
            "validations": [{"expression": unchanged_rule(), "message": MESSAGE, "reason": "Forbidden"}],
        },
    }


def binding(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
