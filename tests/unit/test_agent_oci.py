"""oci:// adapters through a local registry (what oras push stores): files from titled layers, the digest the
agent computes, pins, tags vs manifest digests, the token handshake, and blobs checked against their digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelora.api.digest import digest_of
from kubelora.api.reasons import Reason
from kubelora.api.uris import ADAPTER_SCHEMES, OciURI, URIError, parse_uri
from kubelora_server.agent.fetch import fetch_and_check, open_source
from kubelora_server.agent.oci import OciSource
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.testing_oci import FakeRegistry, serve_registry
from tests.unit.test_agent_plain_adapters import desired, peft_folder

FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


@pytest.fixture
def registry() -> Iterator[tuple[FakeRegistry, str]]:
    reg = FakeRegistry()
    with serve_registry(reg) as host:
        yield reg, host


def digest(folder: Path) -> str:
    return digest_of({n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in FILES})


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        pytest.param("oci://ghcr.io/org/lora:v1", OciURI("ghcr.io", "org/lora", "v1"), id="tag"),
        pytest.param("oci://localhost:5000/lora", OciURI("localhost:5000", "lora", "latest"), id="default-tag"),
        pytest.param("oci://r.io/a/b@sha256:" + "a" * 64, OciURI("r.io", "a/b", "sha256:" + "a" * 64), id="digest"),
    ],
)
def test_oci_uris_parse(uri: str, want: OciURI) -> None:
    assert parse_uri(uri, ADAPTER_SCHEMES) == want and str(want) in (uri, uri + ":latest")


@pytest.mark.parametrize("uri", ["oci://ghcr.io/Org/x", "oci://user@r.io/x", "oci://r.io/x@md5:1", "oci://r.io"])
def test_bad_oci_uris_are_refused(uri: str) -> None:
    with pytest.raises(URIError):
        parse_uri(uri, ADAPTER_SCHEMES)


def test_oci_is_for_adapters_only() -> None:
    with pytest.raises(URIError, match="not allowed"):
        parse_uri("oci://ghcr.io/org/base:v1")


def test_artifact_layers_are_the_adapter_files(tmp_path: Path, registry: tuple[FakeRegistry, str]) -> None:
    reg, host = registry
    src = peft_folder(tmp_path / "src")
    manifest_digest = reg.push("org/lora", "v1", src)
    assert isinstance(open_source(f"oci://{host}/org/lora:v1"), OciSource)
    out = fetch_and_check(Want("a", f"oci://{host}/org/lora:v1"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready), out
    assert out.digest == digest(src)
    assert sorted(p.name for p in Path(out.path).iterdir()) == sorted([*FILES, "kubelora-manifest.json"])
    by_digest = fetch_and_check(Want("b", f"oci://{host}/org/lora@{manifest_digest}", out.digest), desired(),
                                tmp_path / "cache")
    assert isinstance(by_digest, Ready) and by_digest.digest == out.digest
    pinned = fetch_and_check(Want("c", f"oci://{host}/org/lora:v1", "sha256:" + "2" * 64), desired(), tmp_path / "c")
    assert isinstance(pinned, Problem) and pinned.reason == Reason.DIGEST_MISMATCH and out.digest in pinned.message


def test_missing_artifact_and_tampered_blob(tmp_path: Path, registry: tuple[FakeRegistry, str]) -> None:
    reg, host = registry
    missing = fetch_and_check(Want("a", f"oci://{host}/org/none:v1"), desired(), tmp_path / "cache")
    assert isinstance(missing, Problem) and missing.reason == Reason.MANIFEST_INVALID and missing.permanent
    src = peft_folder(tmp_path / "src")
    reg.push("org/lora", "v1", src)
    weights = hashlib.sha256((src / "adapter_model.safetensors").read_bytes()).hexdigest()
    reg.blobs["sha256:" + weights] = b"swapped on the registry"
    bad = fetch_and_check(Want("a", f"oci://{host}/org/lora:v1"), desired(), tmp_path / "cache")
    assert isinstance(bad, Problem) and bad.reason == Reason.FETCH_FAILED and "layer digest" in bad.message
    assert not list((tmp_path / "cache").iterdir())


def test_token_handshake_with_credentials(tmp_path: Path, registry: tuple[FakeRegistry, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reg, host = registry
    reg.token, reg.user, reg.password = "t0k", "robot", "s3cret"
    src = peft_folder(tmp_path / "src")
    reg.push("org/private", "v1", src)
    refused = fetch_and_check(Want("a", f"oci://{host}/org/private:v1"), desired(), tmp_path / "cache")
    assert isinstance(refused, Problem) and refused.reason == Reason.FETCH_FAILED and "401" in refused.message
    monkeypatch.setenv("OCI_USERNAME", "robot")
    monkeypatch.setenv("OCI_PASSWORD", "s3cret")
    out = fetch_and_check(Want("a", f"oci://{host}/org/private:v1"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready) and out.digest == digest(src)
    assert reg.requests.count("/token") >= 2


def test_deployments_take_oci_adapters_and_give_the_agent_registry_credentials() -> None:
    from kubelora.api.adapterdeployment import AdapterDeploymentSpec
    from tests.unit.test_adapterdeployment_builders import containers, deployment, make_body

    body = make_body(baseModel={"uri": "hf://Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen",
                                "credentialsSecretRef": "creds"},
                     adapters=[{"name": "a", "uri": "oci://ghcr.io/org/lora:v1"}, {"name": "b", "uri": "pvc://x/b"}])
    dep = deployment(body, ["oci://ghcr.io/org/lora:v1", "pvc://x/b"])
    env = {e["name"]: e for e in containers(dep)["agent"]["env"]}
    for key in ("OCI_USERNAME", "OCI_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": key, "optional": True}
    assert "OCI_USERNAME" not in {e["name"] for e in containers(dep)["engine"]["env"]}
    with pytest.raises(ValueError, match="not allowed"):
        AdapterDeploymentSpec.model_validate({**body["spec"], "baseModel": {"uri": "oci://ghcr.io/org/m:v1",
                                                                             "servedName": "m"}})
