"""The operator's Kubernetes client (kr8s underneath) against a scripted HTTP API server on localhost.

What the reconcilers rely on: the path, query, body and content type they give reach the server as given;
every refusal comes back as ApiError with the HTTP code (0 when nothing answered), so 403/409/422 are
told apart; server-side apply retries a lost create race; status writes go to the subresource.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.handlers import kube
from kubelora.handlers.kube import ApiError, KubeApi

CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}, "data": {"k": "v"}}


class Server:
    """Answers each request from ``script`` (status, body); /version always answers (kr8s asks first)."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, Any]]] = []
        self.seen: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.rstrip("/") == "/version":
                    status, payload = 200, {"major": "1", "minor": "37", "gitVersion": "v1.37.2"}
                else:
                    server.seen.append({"method": self.command, "path": self.path, "body": body.decode(),
                                        "type": self.headers.get("Content-Type"),
                                        "auth": self.headers.get("Authorization")})
                    status, payload = server.script.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
              "clusters": [{"name": "t", "cluster": {"server": srv.url}}],
              "users": [{"name": "t", "user": {"token": "s3cret"}}],
              "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    yield srv
    srv.http.shutdown()


def run(coro: Any) -> Any:
    async def main() -> Any:
        api = KubeApi()
        try:
            return await coro(api)
        finally:
            await api.close()
    return asyncio.run(main())


def failure(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"kind": "Status", "status": "Failure", "message": message, "code": status}


def test_request_reaches_the_server_as_given(server: Server) -> None:
    server.script = [(201, {"kind": "Job", "metadata": {"name": "j"}})]
    got = run(lambda api: api.request("POST", kube.path("batch/v1", "Job", "ml"), {"kind": "Job"},
                                      params={"fieldManager": "kubelora"}))
    assert got == {"kind": "Job", "metadata": {"name": "j"}}
    [seen] = server.seen
    assert seen["method"] == "POST" and seen["path"] == "/apis/batch/v1/namespaces/ml/jobs?fieldManager=kubelora"
    assert json.loads(seen["body"]) == {"kind": "Job"} and seen["type"] == "application/json"
    assert seen["auth"] == "Bearer s3cret"


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
def test_refusals_keep_their_code_and_message(server: Server, status: int) -> None:
    server.script = [failure(status, "jobs.batch \"j\" is invalid: spec.template: Required value")]
    with pytest.raises(ApiError) as refused:
        run(lambda api: api.request("GET", "/apis/batch/v1/namespaces/ml/jobs/j"))
    assert refused.value.status == status
    assert "GET /apis/batch/v1/namespaces/ml/jobs/j" in str(refused.value)
    if status < 500:
        assert "spec.template: Required value" in str(refused.value)


def test_forbidden_is_reported_after_kr8s_rereads_its_credentials(server: Server) -> None:
    server.script = [failure(403, "jobs is forbidden: exceeded quota")] * 4
    with pytest.raises(ApiError) as refused:
        run(lambda api: api.request("POST", "/apis/batch/v1/namespaces/ml/jobs", {}))
    assert refused.value.status == 403 and "exceeded quota" in str(refused.value)


def test_nothing_listening_is_status_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
              "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:9"}}],
              "users": [{"name": "t", "user": {"token": "x"}}],
              "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    with pytest.raises(ApiError) as refused:
        run(lambda api: api.request("GET", "/api/v1/namespaces/ml/pods"))
    assert refused.value.status == 0


def test_apply_is_a_forced_server_side_apply_that_retries_a_lost_create_race(server: Server) -> None:
    server.script = [failure(409, "configmaps \"c\" already exists"), (200, CONFIGMAP)]
    assert run(lambda api: kube.apply(api, CONFIGMAP, "kubelora-operator")) == CONFIGMAP
    assert [s["path"] for s in server.seen] == ["/api/v1/namespaces/n/configmaps/c?fieldManager=kubelora-operator"
                                                "&force=true"] * 2
    assert {s["type"] for s in server.seen} == {"application/apply-patch+yaml"}
    assert json.loads(server.seen[0]["body"]) == CONFIGMAP


def test_apply_gives_up_on_other_refusals(server: Server) -> None:
    server.script = [failure(422, "Deployment.apps \"d\" is invalid")]
    with pytest.raises(ApiError) as refused:
        run(lambda api: kube.apply(api, CONFIGMAP, "kubelora-operator"))
    assert refused.value.status == 422 and len(server.seen) == 1


def test_status_is_a_merge_patch_on_the_subresource(server: Server) -> None:
    server.script = [(200, {})]
    run(lambda api: kube.patch_status(api, "/apis/kubelora.io/v1alpha1/namespaces/n/adapterdeployments/a",
                                      {"phase": "Ready"}, "kubelora-operator"))
    [seen] = server.seen
    assert seen["path"] == ("/apis/kubelora.io/v1alpha1/namespaces/n/adapterdeployments/a/status"
                            "?fieldManager=kubelora-operator")
    assert seen["type"] == "application/merge-patch+json" and json.loads(seen["body"]) == {"status": {"phase": "Ready"}}
