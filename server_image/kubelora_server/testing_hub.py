"""A local stand-in for the Hugging Face Hub, for tests: the few endpoints ``huggingface_hub`` calls to read a
model repository, served over real HTTP so the agent's hf:// reader is tested through huggingface_hub itself
(``HF_ENDPOINT=<server url>``), not through a mock of it.

- ``GET /api/models/<org>/<name>/revision/<rev>``: ``model_info`` (commit ``sha`` and ``siblings``)
- ``HEAD|GET /<org>/<name>/resolve/<rev>/<path>``: ``hf_hub_download`` (``X-Repo-Commit``, ``ETag``, the bytes)

Unknown repositories, revisions and files answer 404 with the Hub's ``X-Error-Code`` header, which
huggingface_hub turns into its own ``RepositoryNotFoundError``/``RevisionNotFoundError``/``EntryNotFoundError``.
Repositories are folders of files; a revision is a branch name or a commit (40 hex digits).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class FakeHub:
    """Repositories by id; each branch points at a commit, each commit at a folder of files."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, dict[str, str]] = field(default_factory=dict)
    history: dict[str, set[str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def push(self, repo: str, folder: Path, branch: str = "main") -> str:
        """Commit every file under ``folder`` to ``repo`` on ``branch``; returns the commit sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        h = hashlib.sha1(repo.encode())
        for name, blob in files.items():
            h.update(name.encode() + hashlib.sha256(blob).digest())
        sha = h.hexdigest()
        self.commits[sha] = files
        self.branches.setdefault(repo, {})[branch] = sha
        self.history.setdefault(repo, set()).add(sha)
        return sha

    def resolve(self, repo: str, revision: str) -> str | None:
        refs = self.branches.get(repo)
        if refs is None:
            return None
        if revision in refs:
            return refs[revision]
        return revision if revision in self.history.get(repo, set()) else None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(404, json.dumps({"error": message}).encode(), headers)

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                repo, revision = "/".join(parts[2:4]), "/".join(parts[5:])
                if repo not in hub.branches:
                    return self._error("RepoNotFound", f"Repository {repo} not found")
                sha = hub.resolve(repo, revision)
                if sha is None:
                    return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
                info = {"id": repo, "modelId": repo, "sha": sha, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(hub.commits[sha])]}
                return self._send(200, json.dumps(info).encode())
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo not in hub.branches:
                    return self._error("RepoNotFound", f"Repository {repo} not found")
                sha = hub.resolve(repo, revision)
                if sha is None:
                    return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
                blob = hub.commits[sha].get(name)
                if blob is None:
                    return self._error("EntryNotFound", f"{name} does not exist at {sha}", sha)
                etag = '"' + hashlib.sha256(blob).hexdigest() + '"'
                return self._send(200, blob, {"X-Repo-Commit": sha, "ETag": etag}, "application/octet-stream")
            self._send(404, b'{"error": "not found"}')

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

    return Handler


@contextmanager
def serve_on_loopback(handler: type[BaseHTTPRequestHandler], name: str) -> Iterator[int]:
    """Serve ``handler`` on a free loopback port in a thread for the duration of the block; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_hub(hub: FakeHub) -> Iterator[str]:
    """Run ``hub`` on a free local port for the duration of the block; yields its URL (for HF_ENDPOINT)."""
    with serve_on_loopback(_handler(hub), "fake-hub") as port:
        yield f"http://127.0.0.1:{port}"
