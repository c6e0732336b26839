"""Adapters without a KubeLoRA manifest (peft's save_pretrained, the Hub): which files are copied, the digest the
agent computes and reports, a pinned digest enforced against it, and each URI scheme's way of listing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubelora.api.digest import digest_of
from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest, DesiredAdapter, DesiredAdapters
from kubelora_server.agent.fetch import AGENT_SOURCE, fetch_adapter, fetch_and_check
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.agent.stores import HubSource, adapter_files
from kubelora_server.testing_hub import FakeHub, serve_hub

BASE = "pvc://models/tiny"
ADAPTER = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def peft_folder(root: Path, base: str = "/mnt/pvc/models/tiny", weights: bytes = b"weights") -> Path:
    """What peft's save_pretrained leaves (plus what training tools leave beside it), no manifest."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base}))
    (root / "adapter_model.safetensors").write_bytes(weights)
    (root / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    (root / "training_args.bin").write_bytes(b"pickle")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (root / "checkpoint-10").mkdir()
    (root / "checkpoint-10" / "optimizer.pt").write_bytes(b"optimizer state")
    return root


def expected_digest(folder: Path, names: tuple[str, ...] = ADAPTER) -> str:
    return digest_of({n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names})


def desired() -> DesiredAdapters:
    return DesiredAdapters(base_model=BASE, served_name="tiny", max_lora_rank=16, max_loras=1, max_cpu_loras=4,
                           adapters=[DesiredAdapter(name="a", uri="file:///x")])


def test_listing_keeps_top_level_adapter_files_only() -> None:
    names = ["adapter_config.json", "adapter_model.safetensors", "README.md", ".gitattributes", "training_args.bin",
             "checkpoint-10/optimizer.pt", "merged/model.safetensors", "optimizer.pt", "tokenizer.json"]
    assert adapter_files(names) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]


def test_plain_folder_is_served_by_the_digest_the_agent_computes(tmp_path: Path) -> None:
    src = peft_folder(tmp_path / "src")
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready), out
    assert out.digest == expected_digest(src)
    cached = Path(out.path)
    assert sorted(p.name for p in cached.iterdir()) == sorted([*ADAPTER, MANIFEST_FILE])
    recorded = AdapterManifest.model_validate_json((cached / MANIFEST_FILE).read_text())
    assert recorded.digest == out.digest and recorded.source.startswith(AGENT_SOURCE)
    assert recorded.base_model == "/mnt/pvc/models/tiny" and recorded.rank == 8


def test_pinned_digest_is_enforced_on_a_plain_folder(tmp_path: Path) -> None:
    src = peft_folder(tmp_path / "src")
    wrong = fetch_and_check(Want("a", f"file://{src}", "sha256:" + "e" * 64), desired(), tmp_path / "cache")
    assert isinstance(wrong, Problem) and wrong.reason == Reason.DIGEST_MISMATCH and wrong.permanent
    assert "pinned digest sha256:eeee" in wrong.message and expected_digest(src) in wrong.message
    assert not list((tmp_path / "cache").iterdir()), "nothing of a refused copy stays in the cache"
    pin = expected_digest(src)
    right = fetch_and_check(Want("a", f"file://{src}", pin), desired(), tmp_path / "cache")
    assert isinstance(right, Ready) and right.digest == pin

    def no_source(uri: str) -> object:
        raise AssertionError("a pinned, verified cache entry is reused without reading the source")

    again = fetch_adapter(Want("a", f"file://{src}", pin), tmp_path / "cache", no_source)  # type: ignore[arg-type]
    assert str(again.path) == right.path and not again.has_own_manifest


def test_changed_weights_are_a_new_digest(tmp_path: Path) -> None:
    src = peft_folder(tmp_path / "src")
    first = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    (src / "adapter_model.safetensors").write_bytes(b"retrained")
    second = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(first, Ready) and isinstance(second, Ready) and first.digest != second.digest


def test_plain_adapter_base_comes_from_its_config(tmp_path: Path) -> None:
    src = peft_folder(tmp_path / "src", base="/mnt/pvc/models/other")
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.BASE_MODEL_MISMATCH
    assert "adapter_config.json base_model_name_or_path" in out.message


def test_safetensors_win_over_bin(tmp_path: Path) -> None:
    src = peft_folder(tmp_path / "src")
    (src / "adapter_model.bin").write_bytes(b"old pickle weights")
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready) and not (Path(out.path) / "adapter_model.bin").exists()


def https_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: dict[str, bytes],
                want: Want) -> tuple[Ready | Problem, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = served.get(request.url.path)
        return httpx.Response(200, content=body) if body is not None else httpx.Response(404)

    transport = httpx.MockTransport(handler)
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "get", lambda url, **kw: real_client(transport=transport).get(url))
    monkeypatch.setattr(httpx, "stream", lambda method, url, **kw: real_client(transport=transport).stream(method, url))
    return fetch_and_check(want, desired(), tmp_path / "cache"), seen


def test_https_without_manifest_uses_peft_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = peft_folder(tmp_path / "src")
    served = {f"/a/{p.name}": p.read_bytes() for p in src.iterdir() if p.is_file()}
    out, seen = https_fetch(tmp_path, monkeypatch, served, Want("a", "https://example.test/a"))
    assert isinstance(out, Ready), out
    assert out.digest == expected_digest(src, ("adapter_config.json", "adapter_model.safetensors"))
    assert set(seen) == {"/a/kubelora-manifest.json", "/a/adapter_config.json", "/a/adapter_model.safetensors"}


def test_https_falls_back_to_bin_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = peft_folder(tmp_path / "src")
    served = {"/a/adapter_config.json": (src / "adapter_config.json").read_bytes(), "/a/adapter_model.bin": b"w"}
    out, _ = https_fetch(tmp_path, monkeypatch, served, Want("a", "https://example.test/a"))
    assert isinstance(out, Ready) and sorted(p.name for p in Path(out.path).iterdir()) == [
        "adapter_config.json", "adapter_model.bin", MANIFEST_FILE]
    served.pop("/a/adapter_model.bin")
    none, _ = https_fetch(tmp_path, monkeypatch, served, Want("b", "https://example.test/a"))
    assert isinstance(none, Problem) and none.reason == Reason.MANIFEST_INVALID


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHub, str]]:
    import huggingface_hub.constants

    # The test session runs offline (conftest); this one talks to its own local Hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub()
    with serve_hub(fake) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        yield fake, url


def test_hub_adapter_at_a_branch_and_at_a_commit(tmp_path: Path, hub: tuple[FakeHub, str]) -> None:
    fake, _ = hub
    src = peft_folder(tmp_path / "src")
    first = fake.push("org/tiny-lora", src)
    (src / "adapter_model.safetensors").write_bytes(b"second version")
    second = fake.push("org/tiny-lora", src)
    out = fetch_and_check(Want("a", "hf://org/tiny-lora"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready) and out.digest == expected_digest(src)
    assert not any("checkpoint-10" in r or "training_args" in r for r in fake.requests)
    old = fetch_and_check(Want("old", f"hf://org/tiny-lora@{first}"), desired(), tmp_path / "cache")
    assert isinstance(old, Ready) and old.digest != out.digest
    assert (Path(old.path) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert HubSource("org/tiny-lora", "main")._resolve() == second


def test_hub_pin_mismatch_and_missing_repo(tmp_path: Path, hub: tuple[FakeHub, str]) -> None:
    fake, _ = hub
    src = peft_folder(tmp_path / "src")
    fake.push("org/tiny-lora", src)
    pinned = fetch_and_check(Want("a", "hf://org/tiny-lora@main", "sha256:" + "0" * 64), desired(), tmp_path / "c")
    assert isinstance(pinned, Problem) and pinned.reason == Reason.DIGEST_MISMATCH and pinned.permanent
    missing = fetch_and_check(Want("a", "hf://org/nope"), desired(), tmp_path / "c")
    assert isinstance(missing, Problem) and missing.reason == Reason.MANIFEST_INVALID and "org/nope" in missing.message
    bad_rev = fetch_and_check(Want("a", "hf://org/tiny-lora@no-such-branch"), desired(), tmp_path / "c")
    assert isinstance(bad_rev, Problem) and bad_rev.reason == Reason.MANIFEST_INVALID


def test_hub_repo_with_a_manifest_is_verified_against_it(tmp_path: Path, hub: tuple[FakeHub, str]) -> None:
    from kubelora_server.testing import write_manifest

    fake, _ = hub
    src = peft_folder(tmp_path / "src")
    for junk in ("training_args.bin", ".gitattributes"):
        (src / junk).unlink()
    (src / "checkpoint-10" / "optimizer.pt").unlink()
    (src / "checkpoint-10").rmdir()
    manifest = write_manifest(src, BASE)
    fake.push("org/published", src)
    out = fetch_and_check(Want("a", "hf://org/published", manifest.digest), desired(), tmp_path / "cache")
    assert isinstance(out, Ready) and out.digest == manifest.digest
