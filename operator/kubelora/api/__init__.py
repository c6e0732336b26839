"""The KubeLoRA API (group ``kubelora.io``, version ``v1alpha1``) as pydantic models.

These models are the single source of truth: the CRDs in ``crds/`` and the chart, the API reference in
``docs/api.md``, the operator's validation and the wire formats between the operator, the trainer and
the adapter agent are all derived from them.
"""

from kubelora.api.adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from kubelora.api.common import GROUP, VERSION, Condition
from kubelora.api.lorajob import LoRAJob, LoRAJobSpec, LoRAJobStatus
from kubelora.api.uris import ArtifactURI, parse_uri

__all__ = [
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "ArtifactURI",
    "Condition",
    "LoRAJob",
    "LoRAJobSpec",
    "LoRAJobStatus",
    "parse_uri",
]
