"""The merged model: the base with a LoRAJob's adapter folded into its weights, published beside the adapter.

Serving one adapter at full speed, or with an engine that cannot attach adapters, wants a plain model
("merge for production unless you specifically need adapter-swapping"). The trainer writes it to
``rev-<revision>/merged/`` under ``spec.output.uri``: sharded safetensors, config and tokenizer, and its
own ``kubelora-manifest.json`` (kind ``merged-model``) whose digest covers exactly those files. The
adapter's digest leaves ``merged/`` out, so asking for a merged copy never changes the adapter's digest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubelora.api.common import ApiModel, Digest

MERGED_DIR = "merged"
"""Sub-folder of ``rev-<revision>/`` that holds the merged model."""
MergeDtype = Literal["bfloat16", "float16", "float32"]


class MergedOutputSpec(ApiModel):
    """Also publish the base model with the adapter merged in (peft merge_and_unload) at rev-<revision>/merged/."""

    dtype: MergeDtype = "bfloat16"
    """Dtype of the merged weights. The base is loaded in this dtype for the merge, also after a qlora run: an
    adapter is never merged into 4-bit weights (the rounding would change what the model generates)."""
    max_shard_size: str = Field(default="5GB", pattern=r"^[0-9]+(KB|MB|GB)$")
    """Largest safetensors shard (transformers' max_shard_size), e.g. 5GB."""


class MergedModelInfo(ApiModel):
    """The published merged model."""

    uri: str
    """Where its files are: <output.uri>/rev-<revision>/merged. Usable as an AdapterDeployment's baseModel.uri."""
    digest: Digest
    """sha256 over its files, as in its kubelora-manifest.json."""
    size_bytes: int = Field(ge=0)
    """Total size of its files."""
    base_model: str
    """The base model URI the adapter was merged into."""
    adapter_digest: Digest
    """Digest of the adapter that was merged."""
    dtype: MergeDtype
    """Dtype of the merged weights."""


class MergedModelManifest(ApiModel):
    """``merged/kubelora-manifest.json``: written last, so a merged folder without it is incomplete."""

    kind: Literal["merged-model"] = "merged-model"
    """Tells it apart from an adapter's manifest (an agent must never load a full model as an adapter)."""
    digest: str
    files: dict[str, str]
    """Relative path -> sha256 hex of that file."""
    size_bytes: int
    base_model: str
    adapter_digest: str
    dtype: MergeDtype
    created_at: str
    source: str = ""
    """namespace/name@revision of the LoRAJob that produced it."""
