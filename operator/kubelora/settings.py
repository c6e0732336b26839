"""Operator settings: one typed object, filled from environment variables and command-line flags.

Every field can be set as ``KUBELORA_<FIELD>`` (upper case) so the Helm chart configures the operator
with plain env vars; flags of ``kubelora-operator`` override them.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field

from kubelora import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubelora/trainer:{__version__}"
DEFAULT_SERVER_IMAGE = f"ghcr.io/kubelora/server:{__version__}"


class Settings(BaseModel):
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means cluster-wide."""
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image for pre-flight and training pods when a LoRAJob sets no spec.image."""
    server_image: str = DEFAULT_SERVER_IMAGE
    """Image for the engine and agent containers when an AdapterDeployment sets no vllm.image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    peering: str | None = None
    """kopf peering name for HA (one active operator); None runs standalone."""
    log_format: Literal["text", "json"] = "text"
    adapter_poll_seconds: float = Field(default=2.0, gt=0)
    """How often each AdapterDeployment's agents are asked for their adapter states."""
    progress_interval_seconds: float = Field(default=3.0, gt=0)
    """Passed to the trainer: the least time between two progress patches."""
    webhook: Literal["", "self-signed", "cluster"] = ""
    """The validating admission webhook: "" off; "self-signed" serves https://<webhookHost>:<port> with a
    generated certificate (the API server runs on this host: local clusters, tests); "cluster" serves
    behind the Service ``webhook_service`` (the chart's webhook.enabled)."""
    webhook_port: int = Field(default=9443, ge=0, le=65535)
    """Port the webhook server listens on; 0 picks a free one."""
    webhook_host: str = "127.0.0.1"
    """self-signed: the address the API server calls (and the certificate names)."""
    webhook_service: str = ""
    """cluster: ``<namespace>/<name>`` of the Service (port 443) in front of the operator's webhook port."""
    webhook_cert_dir: str = ""
    """cluster: a directory with tls.crt and tls.key (a mounted Secret); empty generates a certificate."""
    webhook_managed: str = "kubelora.io"
    """Name of the ValidatingWebhookConfiguration the operator creates and keeps up to date."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(f"KUBELORA_{name.upper()}")
            if raw is None or raw == "":
                continue
            values[name] = [ns for ns in raw.split(",") if ns] if name == "namespaces" else raw
        return cls.model_validate(values)
