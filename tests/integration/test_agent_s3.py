"""Fetching adapters from s3:// through s3fs, against a local moto S3 server (credentials from AWS_* env)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelora.api.reasons import Reason
from kubelora.api.runtime import MANIFEST_FILE, DesiredAdapter, DesiredAdapters
from kubelora_server.agent.fetch import fetch_and_check
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.testing import free_port, write_manifest

pytestmark = pytest.mark.integration
BASE = "pvc://models/tiny"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    import boto3
    import fsspec

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"adapters-{tmp_path.name.lower().replace('_', '-')[-30:]}"
    s3.create_bucket(Bucket=name)
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                    "base_model_name_or_path": "/mnt/pvc/models/tiny"})
    )
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    write_manifest(src, BASE)
    for path in src.iterdir():
        s3.upload_file(str(path), name, f"jobs/a/rev-1/{path.name}")
    s3.put_object(Bucket=name, Key="jobs/corrupt/rev-1/adapter_model.safetensors", Body=b"other weights")
    for fname in ("adapter_config.json", MANIFEST_FILE):
        s3.upload_file(str(src / fname), name, f"jobs/corrupt/rev-1/{fname}")
    return name


def desired() -> DesiredAdapters:
    return DesiredAdapters(
        base_model=BASE,
        served_name="tiny",
        max_lora_rank=16,
        max_loras=1,
        max_cpu_loras=2,
        adapters=[DesiredAdapter(name="a", uri="s3://x/y")],
    )


def test_s3_adapter_is_fetched_and_verified(bucket: str, tmp_path: Path) -> None:
    out = fetch_and_check(Want("a", f"s3://{bucket}/jobs/a/rev-1"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready), out
    assert (Path(out.path) / "adapter_model.safetensors").read_bytes() == b"weights"


def test_s3_corruption_and_absence_are_reported(bucket: str, tmp_path: Path) -> None:
    bad = fetch_and_check(Want("c", f"s3://{bucket}/jobs/corrupt/rev-1"), desired(), tmp_path / "cache")
    assert isinstance(bad, Problem) and bad.reason == Reason.DIGEST_MISMATCH
    gone = fetch_and_check(Want("g", f"s3://{bucket}/jobs/none/rev-1"), desired(), tmp_path / "cache")
    assert isinstance(gone, Problem) and gone.reason == Reason.MANIFEST_INVALID


def test_s3_adapter_without_manifest_is_listed_digested_and_pinned(bucket: str, tmp_path: Path) -> None:
    import boto3

    from kubelora.api.digest import digest_of

    s3 = boto3.client("s3")
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                "target_modules": ["q_proj", "v_proj"],
                                                "base_model_name_or_path": "/mnt/pvc/models/tiny"}).encode(),
             "adapter_model.safetensors": b"hub weights", "README.md": b"# card\n"}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"plain/a/{key}", Body=body)
    s3.put_object(Bucket=bucket, Key="plain/a/checkpoint-5/optimizer.pt", Body=b"not served")
    digest = digest_of({k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    out = fetch_and_check(Want("p", f"s3://{bucket}/plain/a"), desired(), tmp_path / "cache")
    assert isinstance(out, Ready) and out.digest == digest, out
    assert sorted(p.name for p in Path(out.path).iterdir()) == sorted([*files, MANIFEST_FILE])
    pinned = fetch_and_check(Want("q", f"s3://{bucket}/plain/a", "sha256:" + "1" * 64), desired(), tmp_path / "c2")
    assert isinstance(pinned, Problem) and pinned.reason == Reason.DIGEST_MISMATCH and digest in pinned.message
