"""Artifact URIs: one parser shared by the operator, the trainer and the adapter agent.

Base models, datasets and adapters are addressed by URI (see ``docs/design.md``). Parsing them into
typed objects here means every component agrees on what ``pvc://claim/dir`` means and every bad URI
gets the same message, whether it is caught by the operator, the trainer's pre-flight or the agent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

Scheme = Literal["pvc", "s3", "https", "hf", "file", "oci"]
ALL_SCHEMES: tuple[Scheme, ...] = ("pvc", "s3", "https", "hf", "file")
"""Schemes of models, datasets and adapters."""
ADAPTER_SCHEMES: tuple[Scheme, ...] = (*ALL_SCHEMES, "oci")
"""Adapters may also be OCI artifacts (only the adapter agent reads those)."""
PVC_ROOT_ENV = "KUBELORA_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HF_REVISION = re.compile(r"^[\w./-]+$")
_OCI_REGISTRY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
_OCI_REPOSITORY = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
_OCI_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class URIError(ValueError):
    """A URI that cannot be used; the message says what is allowed."""


def pvc_root() -> str:
    """Where claims are mounted inside pods (overridable for tests and local runs)."""
    return os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)


def _clean_path(path: str, uri: str) -> str:
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise URIError(f"{uri!r}: '..' is not allowed in a path")
    return "/".join(p for p in parts if p not in ("/", "."))


@dataclass(frozen=True)
class PvcURI:
    """``pvc://<claim>/<path>``: a PersistentVolumeClaim in the object's namespace."""

    claim: str
    path: str
    scheme: Literal["pvc"] = "pvc"

    def __str__(self) -> str:
        return f"pvc://{self.claim}/{self.path}" if self.path else f"pvc://{self.claim}"

    def local_path(self, root: str | None = None) -> str:
        base = f"{root or pvc_root()}/{self.claim}"
        return f"{base}/{self.path}" if self.path else base

    def fsspec_url(self) -> str:
        return self.local_path()

    def join(self, *parts: str) -> PvcURI:
        return PvcURI(self.claim, "/".join(p for p in (self.path, *parts) if p))


@dataclass(frozen=True)
class S3URI:
    """``s3://bucket/key``: S3 or an S3-compatible store; credentials only by Secret reference."""

    bucket: str
    key: str
    scheme: Literal["s3"] = "s3"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def fsspec_url(self) -> str:
        return str(self)

    def join(self, *parts: str) -> S3URI:
        return S3URI(self.bucket, "/".join(p for p in (self.key, *parts) if p))


@dataclass(frozen=True)
class HttpsURI:
    """``https://...``: read-only."""

    url: str
    scheme: Literal["https"] = "https"

    def __str__(self) -> str:
        return self.url

    def fsspec_url(self) -> str:
        return self.url

    def join(self, *parts: str) -> HttpsURI:
        return HttpsURI("/".join([self.url.rstrip("/"), *parts]))


@dataclass(frozen=True)
class HfURI:
    """``hf://org/name[@revision]``: a Hugging Face Hub repository (base models)."""

    repo: str
    revision: str | None = None
    scheme: Literal["hf"] = "hf"

    def __str__(self) -> str:
        return f"hf://{self.repo}@{self.revision}" if self.revision else f"hf://{self.repo}"


@dataclass(frozen=True)
class FileURI:
    """``file:///abs/path``: a path on the node; for local and test clusters only."""

    path: str
    scheme: Literal["file"] = "file"

    def __str__(self) -> str:
        return f"file://{self.path}"

    def local_path(self, root: str | None = None) -> str:
        return self.path

    def fsspec_url(self) -> str:
        return self.path

    def join(self, *parts: str) -> FileURI:
        return FileURI("/".join([self.path.rstrip("/"), *parts]))


@dataclass(frozen=True)
class OciURI:
    """``oci://<registry>/<repository>[:<tag>|@sha256:<digest>]``: an OCI artifact whose layers are the
    adapter's files (as ``oras push`` writes them); the tag defaults to ``latest``."""

    registry: str
    repository: str
    reference: str = "latest"
    scheme: Literal["oci"] = "oci"

    def __str__(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"oci://{self.registry}/{self.repository}{sep}{self.reference}"


ArtifactURI = PvcURI | S3URI | HttpsURI | HfURI | FileURI | OciURI
WritableURI = PvcURI | S3URI | FileURI


def parse_uri(value: str, allowed: tuple[Scheme, ...] = ALL_SCHEMES) -> ArtifactURI:
    """Parse ``value`` into a typed URI, accepting only the ``allowed`` schemes."""
    if not isinstance(value, str) or not value.strip():
        raise URIError("must be a non-empty URI such as pvc://claim/path")
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise URIError(f"{value!r} has no scheme; use one of {', '.join(s + '://' for s in allowed)}")
    if scheme not in allowed:
        raise URIError(f"{value!r}: scheme {scheme!r} is not allowed here; use one of "
                       f"{', '.join(s + '://' for s in allowed)}")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not _DNS1123_SUBDOMAIN.match(claim) or len(claim) > 253:
            raise URIError(f"{value!r}: claim name {claim!r} is not a valid DNS-1123 name "
                           "(lowercase letters, digits, '-' and '.')")
        return PvcURI(claim, _clean_path(path, value))
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise URIError(f"{value!r}: {bucket!r} is not a valid S3 bucket name")
        return S3URI(bucket, _clean_path(key, value))
    if scheme == "https":
        host = rest.split("/", 1)[0]
        if not host or "@" in host:
            raise URIError(f"{value!r}: needs a host and no inline credentials (use credentialsSecretRef)")
        return HttpsURI(value)
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if not _HF_REPO.match(repo):
            raise URIError(f"{value!r}: expected hf://org/name[@revision]")
        if revision and not _HF_REVISION.match(revision):
            raise URIError(f"{value!r}: revision {revision!r} is not a valid git revision")
        return HfURI(repo, revision or None)
    if scheme == "oci":
        return _parse_oci(value, rest)
    if not rest.startswith("/"):
        raise URIError(f"{value!r}: file URIs need an absolute path, e.g. file:///data/model")
    return FileURI("/" + _clean_path(rest, value))


def _parse_oci(value: str, rest: str) -> OciURI:
    registry, _, name = rest.partition("/")
    reference = "latest"
    if "@" in name:
        name, _, reference = name.partition("@")
        if not _OCI_DIGEST.match(reference):
            raise URIError(f"{value!r}: {reference!r} is not a sha256 digest (oci://registry/repo@sha256:<64 hex>)")
    elif ":" in name.rsplit("/", 1)[-1]:
        name, _, reference = name.rpartition(":")
        if not _OCI_TAG.match(reference):
            raise URIError(f"{value!r}: tag {reference!r} is not a valid OCI tag")
    if not _OCI_REGISTRY.match(registry) or "@" in registry:
        raise URIError(f"{value!r}: needs a registry host (no inline credentials), e.g. oci://ghcr.io/org/adapter:v1")
    if not _OCI_REPOSITORY.match(name):
        raise URIError(f"{value!r}: {name!r} is not a valid repository (lowercase, '/'-separated)")
    return OciURI(registry, name, reference)


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS1123_LABEL.match(name))


def is_within(uri: str, root: str) -> bool:
    """``uri`` names something strictly below ``root`` (same scheme and location, no ``..`` segment).

    A LoRAJob's adapter is trusted only inside its own ``spec.output.uri``: the trainer's report of where it
    published is a claim, and anything else would let one job's pod point serving at foreign files.
    """
    base = root.rstrip("/") + "/"
    rest = uri.rstrip("/")
    return rest.startswith(base) and len(rest) > len(base) and ".." not in rest[len(base):].split("/")
