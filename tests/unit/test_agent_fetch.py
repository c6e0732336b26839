"""Fetching adapters into the cache: manifest and digest verification, pins, reuse, garbage collection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, DesiredAdapter, DesiredAdapters
from kubelora_server.agent.fetch import (
    HttpsSource,
    LocalSource,
    cache_dir_name,
    collect_garbage,
    fetch_adapter,
    fetch_and_check,
    open_source,
)
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.testing import write_manifest

BASE = "pvc://models/tiny"


def fake_adapter(
    root: Path, name: str = "a", rank: int = 8, base: str = "/mnt/pvc/models/tiny", manifest: bool = True
) -> Path:
    d = root / "src" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 16,
                "base_model_name_or_path": base,
                "target_modules": ["q_proj"],
            }
        )
    )
    (d / "adapter_model.safetensors").write_bytes(b"weights-" + name.encode())
    (d / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (d / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"not part of the adapter")
    if manifest:
        write_manifest(d, BASE)
    return d


def desired(max_lora_rank: int = 16) -> DesiredAdapters:
    return DesiredAdapters(
        base_model=BASE,
        served_name="tiny",
        max_lora_rank=max_lora_rank,
        max_loras=1,
        max_cpu_loras=4,
        adapters=[DesiredAdapter(name="a", uri="file:///x")],
    )


def digest_of_dir(d: Path) -> str:
    return str(json.loads((d / MANIFEST_FILE).read_text())["digest"])


def test_fetch_copies_only_manifest_files_and_names_the_dir_by_digest(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    cache = tmp_path / "cache"
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), cache)
    assert isinstance(out, Ready)
    assert out.digest == digest_of_dir(src)
    assert Path(out.path).name == cache_dir_name("a", out.digest)
    assert sorted(p.name for p in Path(out.path).iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE]
    )
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_pvc_uri_reads_under_the_pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_adapter(tmp_path)
    monkeypatch.setenv("KUBELORA_PVC_ROOT", str(tmp_path))
    out = fetch_and_check(Want("a", "pvc://src/a"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready), out


def test_corrupted_file_is_a_digest_mismatch(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    (src / "adapter_model.safetensors").write_bytes(b"tampered")
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.DIGEST_MISMATCH and out.permanent
    assert "adapter_model.safetensors" in out.message and ".tmp-" not in out.message


def test_pinned_digest_must_match(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    out = fetch_and_check(Want("a", f"file://{src}", "sha256:" + "f" * 64), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.DIGEST_MISMATCH
    assert "pinned" in out.message
    ok = fetch_and_check(Want("a", f"file://{src}", digest_of_dir(src)), desired(), tmp_path / "cache")
    assert isinstance(ok, Ready)


def test_a_folder_with_neither_manifest_nor_adapter_is_manifest_invalid(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path, manifest=False)
    (src / "adapter_model.safetensors").unlink()
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.MANIFEST_INVALID and out.permanent
    assert "holds no adapter" in out.message
    gone = fetch_and_check(Want("a", f"file://{tmp_path}/nothing-here"), desired(), tmp_path / "cache")
    assert isinstance(gone, Problem) and gone.reason == Reason.MANIFEST_INVALID and "nothing-here" in gone.message


def test_manifest_listing_a_missing_file_is_manifest_invalid(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    (src / "adapter_model.safetensors").unlink()
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.MANIFEST_INVALID


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(digest="sha256:" + "1" * 64),
        lambda m: m["files"].update({"../escape": "0" * 64}),
        lambda m: m["files"].pop("adapter_config.json"),
        lambda m: m.pop("baseModel"),
    ],
)
def test_inconsistent_manifests_are_manifest_invalid(tmp_path: Path, mutate: object) -> None:
    src = fake_adapter(tmp_path)
    data = json.loads((src / MANIFEST_FILE).read_text())
    mutate(data)  # type: ignore[operator]
    (src / MANIFEST_FILE).write_text(json.dumps(data))
    out = fetch_and_check(Want("a", f"file://{src}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.MANIFEST_INVALID, out


def test_compatibility_is_checked_after_fetch(tmp_path: Path) -> None:
    big = fake_adapter(tmp_path, "big", rank=64)
    out = fetch_and_check(Want("big", f"file://{big}"), desired(max_lora_rank=16), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.RANK_TOO_LARGE
    other = fake_adapter(tmp_path, "other", base="/mnt/pvc/models/other")
    data = json.loads((other / MANIFEST_FILE).read_text())
    data["baseModel"] = "pvc://models/other"
    (other / MANIFEST_FILE).write_text(json.dumps(data))
    out = fetch_and_check(Want("other", f"file://{other}"), desired(), tmp_path / "cache")
    assert isinstance(out, Problem) and out.reason == Reason.BASE_MODEL_MISMATCH


def test_unreachable_source_is_transient(tmp_path: Path) -> None:
    class Broken:
        def read_bytes(self, rel: str) -> bytes:
            raise OSError("connection reset")

        def download(self, rel: str, dest: Path) -> None:
            raise OSError("connection reset")

    out = fetch_and_check(Want("a", "s3://bucket/a"), desired(), tmp_path / "cache", lambda uri: Broken())
    assert isinstance(out, Problem) and out.reason == Reason.FETCH_FAILED and not out.permanent


def test_verified_cache_entry_is_reused_without_the_source(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    cache = tmp_path / "cache"
    pin = digest_of_dir(src)
    first = fetch_adapter(Want("a", f"file://{src}", pin), cache)
    calls: list[str] = []

    def no_source(uri: str) -> LocalSource:
        calls.append(uri)
        raise AssertionError("the source must not be read")

    again = fetch_adapter(Want("a", f"file://{src}", pin), cache, no_source)
    assert again.path == first.path and calls == []


def test_tampered_cache_entry_is_fetched_again(tmp_path: Path) -> None:
    src = fake_adapter(tmp_path)
    cache = tmp_path / "cache"
    first = fetch_adapter(Want("a", f"file://{src}"), cache)
    (first.path / "adapter_model.safetensors").write_bytes(b"rotten")
    again = fetch_adapter(Want("a", f"file://{src}"), cache)
    assert (again.path / "adapter_model.safetensors").read_bytes() == b"weights-a"


def test_garbage_collection_keeps_used_and_in_flight_entries(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name in ("a-1", "b-2", ".tmp-c-xyz"):
        (cache / name).mkdir(parents=True)
    removed = collect_garbage(cache, {str(cache / "a-1")})
    assert [p.name for p in removed] == ["b-2"]
    assert sorted(p.name for p in cache.iterdir()) == [".tmp-c-xyz", "a-1"]


def test_https_source_reads_files_next_to_the_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    src = fake_adapter(tmp_path)
    served = {f"/adapters/a/{p.relative_to(src).as_posix()}": p.read_bytes() for p in src.rglob("*") if p.is_file()}
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = served.get(request.url.path)
        return httpx.Response(200, content=body) if body is not None else httpx.Response(404)

    transport = httpx.MockTransport(handler)
    real_client = httpx.Client

    def patched_get(url: str, **kw: object) -> httpx.Response:
        with real_client(transport=transport) as c:
            return c.get(url)

    def patched_stream(method: str, url: str, **kw: object):  # type: ignore[no-untyped-def]
        client = real_client(transport=transport)
        return client.stream(method, url)

    monkeypatch.setattr(httpx, "get", patched_get)
    monkeypatch.setattr(httpx, "stream", patched_stream)
    assert isinstance(open_source("https://example.test/adapters/a"), HttpsSource)
    out = fetch_and_check(Want("a", "https://example.test/adapters/a"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready), out
    assert "/adapters/a/checkpoints/checkpoint-1/optimizer.pt" not in seen
    missing = fetch_and_check(Want("b", "https://example.test/adapters/b"), desired(), tmp_path / "cache")
    assert isinstance(missing, Problem) and missing.reason == Reason.MANIFEST_INVALID
