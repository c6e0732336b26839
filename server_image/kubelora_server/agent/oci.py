"""oci:// adapters: an OCI artifact whose layers are the adapter's files, read over the registry HTTP API.

``oras push registry/repo:tag adapter_config.json adapter_model.safetensors`` stores one layer per file and
names it in the layer annotation ``org.opencontainers.image.title``; that annotation is the file list.
Every blob is content-addressed, so each one is checked against its layer digest while it streams in (and
the manifest against the reference when the URI pins ``@sha256:``). Folder layers (a tarball that oras
unpacks) and image indexes are not read.

The client is the distribution spec's few calls (``GET /v2/<repo>/manifests/<ref>``, ``GET
/v2/<repo>/blobs/<digest>``) with its token handshake: a 401 with a ``Bearer`` challenge is answered by a
token from the realm it names, requested anonymously or with ``OCI_USERNAME``/``OCI_PASSWORD`` from the
environment (the base model's Secret, like the other credentials). Loopback registries and those listed in
``KUBELORA_OCI_PLAIN_HTTP`` (comma-separated ``host:port``) are spoken to over plain HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kubelora_server.agent.stores import SourceUnavailable

TITLE = "org.opencontainers.image.title"
PLAIN_HTTP_ENV = "KUBELORA_OCI_PLAIN_HTTP"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class OciSource:
    registry: str
    repository: str
    reference: str = "latest"
    timeout: float = 60.0
    _layers: dict[str, tuple[str, int]] | None = field(default=None, init=False, repr=False)
    _auth: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def where(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"oci://{self.registry}/{self.repository}{sep}{self.reference}"

    def _base_url(self) -> str:
        host = self.registry.rsplit(":", 1)[0]
        plain = {h.strip() for h in os.environ.get(PLAIN_HTTP_ENV, "").split(",") if h.strip()}
        insecure = host in ("localhost", "127.0.0.1", "::1") or self.registry in plain
        return f"{'http' if insecure else 'https'}://{self.registry}/v2/{self.repository}"

    def _credentials(self) -> tuple[str, str] | None:
        user, password = os.environ.get("OCI_USERNAME"), os.environ.get("OCI_PASSWORD")
        return (user, password) if user and password else None

    def _authorize(self, client: httpx.Client, challenge: str) -> bool:
        """Answer a 401's challenge; False when there is nothing to answer it with."""
        kind = challenge.split(" ", 1)[0].lower()
        creds = self._credentials()
        if kind == "basic":
            if creds is None:
                return False
            self._auth = {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}
            return True
        if kind != "bearer":
            return False
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm:
            return False
        params.setdefault("scope", f"repository:{self.repository}:pull")
        resp = client.get(realm, params=params, auth=httpx.BasicAuth(*creds) if creds else None)
        if resp.status_code != 200:
            raise SourceUnavailable(f"{self.where}: token from {realm}: HTTP {resp.status_code}")
        body = resp.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            return False
        self._auth = {"Authorization": f"Bearer {token}"}
        return True

    def _get(self, client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET with the token handshake; the response is streamed (the caller reads and closes it)."""
        url = f"{self._base_url()}/{path}"
        for attempt in range(2):
            req = client.build_request("GET", url, headers={**(headers or {}), **self._auth})
            resp = client.send(req, stream=True, follow_redirects=True)
            if resp.status_code != 401 or attempt == 1:
                break
            resp.close()
            if not self._authorize(client, resp.headers.get("WWW-Authenticate", "")):
                break
        if resp.status_code == 404:
            resp.close()
            raise FileNotFoundError(f"{self.where}: {path} not found")
        if resp.status_code >= 400:
            resp.close()
            raise SourceUnavailable(f"{self.where}: GET {path}: HTTP {resp.status_code}")
        return resp

    def _manifest(self) -> dict[str, tuple[str, int]]:
        if self._layers is None:
            try:
                with httpx.Client(timeout=self.timeout) as client:
                    resp = self._get(client, f"manifests/{self.reference}",
                                     {"Accept": ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))})
                    raw = resp.read()
                    resp.close()
            except httpx.HTTPError as exc:
                raise SourceUnavailable(f"{self.where}: {exc}") from exc
            if self.reference.startswith("sha256:") and "sha256:" + hashlib.sha256(raw).hexdigest() != self.reference:
                raise SourceUnavailable(f"{self.where}: the registry's manifest does not hash to the reference")
            manifest: dict[str, Any] = json.loads(raw)
            if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
                raise FileNotFoundError(f"{self.where} is an image index, not an artifact of adapter files")
            layers: dict[str, tuple[str, int]] = {}
            for layer in manifest.get("layers") or []:
                title = (layer.get("annotations") or {}).get(TITLE)
                if title:
                    layers[str(title)] = (str(layer["digest"]), int(layer.get("size") or 0))
            self._layers = layers
        return self._layers

    def list_files(self) -> list[str]:
        return list(self._manifest())

    def download(self, rel: str, dest: Path) -> None:
        layer = self._manifest().get(rel)
        if layer is None:
            raise FileNotFoundError(f"{self.where}: no layer titled {rel}")
        digest, _ = layer
        h = hashlib.sha256()
        try:
            with httpx.Client(timeout=self.timeout) as client:
                resp = self._get(client, f"blobs/{digest}")
                try:
                    with dest.open("wb") as fh:
                        for chunk in resp.iter_bytes(1 << 20):
                            h.update(chunk)
                            fh.write(chunk)
                finally:
                    resp.close()
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"{self.where}: blob {digest}: {exc}") from exc
        if "sha256:" + h.hexdigest() != digest:
            dest.unlink(missing_ok=True)
            raise SourceUnavailable(f"{self.where}: blob of {rel} does not hash to its layer digest {digest}")

    def read_bytes(self, rel: str) -> bytes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".oci-read-") as scratch:
            target = Path(scratch) / "file"
            self.download(rel, target)
            return target.read_bytes()
