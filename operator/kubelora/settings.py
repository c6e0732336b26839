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
    metrics_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the Prometheus ``/metrics`` endpoint on every interface; 0 turns it off."""
    adapter_poll_seconds: float = Field(default=2.0, gt=0)
    """How often each AdapterDeployment's agents are asked for their adapter states."""
    progress_interval_seconds: float = Field(default=3.0, gt=0)
    """Passed to the trainer: the least time between two progress patches."""

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
