"""A local OCI registry for tests: what ``oras push`` leaves (one layer per file, titled) served over the
distribution API the agent's oci:// reader speaks, optionally behind the token handshake registries use.

- ``GET /v2/<repo>/manifests/<tag|digest>``, ``GET /v2/<repo>/blobs/<digest>``
- with ``token`` set: 401 + ``WWW-Authenticate: Bearer realm=".../token",service="fake",scope=...`` until the
  request carries ``Authorization: Bearer <token>``; ``GET /token`` hands it out (to ``user``/``password`` by
  basic auth when those are set, else to anyone).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from kubelora_server.testing_hub import serve_on_loopback

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = b"{}"


@dataclass
class FakeRegistry:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    """``<repo>@<tag or digest>`` -> manifest bytes."""
    token: str | None = None
    user: str | None = None
    password: str | None = None
    requests: list[str] = field(default_factory=list)

    def _blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def push(self, repo: str, tag: str, files: dict[str, bytes] | Path) -> str:
        """Store ``files`` as oras does (one titled layer each); returns the manifest digest."""
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        layers = [{"mediaType": "application/octet-stream", "digest": self._blob(blob), "size": len(blob),
                   "annotations": {"org.opencontainers.image.title": name}} for name, blob in files.items()]
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": "application/vnd.peft.lora.v1",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": self._blob(EMPTY_CONFIG),
                       "size": len(EMPTY_CONFIG)},
            "layers": layers}).encode()
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.manifests[f"{repo}@{tag}"] = self.manifests[f"{repo}@{digest}"] = manifest
        return digest


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            reg.requests.append(path)
            auth = self.headers.get("Authorization", "")
            if path == "/token":
                if reg.user and auth != "Basic " + base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode():
                    return self._send(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}')
                return self._send(200, json.dumps({"token": reg.token}).encode())
            if reg.token and auth != f"Bearer {reg.token}":
                host = self.headers.get("Host", "")
                challenge = f'Bearer realm="http://{host}/token",service="fake"'
                return self._send(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
            parts = path.strip("/").split("/")
            if len(parts) >= 4 and parts[0] == "v2" and parts[-2] in ("manifests", "blobs"):
                repo, kind, ref = "/".join(parts[1:-2]), parts[-2], parts[-1]
                if kind == "manifests" and f"{repo}@{ref}" in reg.manifests:
                    return self._send(200, reg.manifests[f"{repo}@{ref}"], {"Content-Type": MANIFEST_TYPE})
                if kind == "blobs" and ref in reg.blobs:
                    return self._send(200, reg.blobs[ref], {"Content-Type": "application/octet-stream"})
            self._send(404, b'{"errors": [{"code": "NAME_UNKNOWN"}]}')

    return Handler


@contextmanager
def serve_registry(reg: FakeRegistry) -> Iterator[str]:
    """Run ``reg`` on a free loopback port; yields ``127.0.0.1:<port>`` (the registry part of an oci:// URI)."""
    with serve_on_loopback(_handler(reg), "fake-registry") as port:
        yield f"127.0.0.1:{port}"
