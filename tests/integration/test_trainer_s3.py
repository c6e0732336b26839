"""s3:// data and output against a local S3 (moto server): checkpoints are mirrored and pulled back on
restart, the adapter is uploaded with its manifest last and verifies after download."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "KUBELORA_WORK_DIR": str(tmp_path / "work"),
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="lora-data")
    try:
        yield client
    finally:
        server.stop()


def test_s3_dataset_output_and_checkpoint_mirror(s3: object, tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    from kubelora_trainer.publish import verify_adapter_dir
    from kubelora_trainer.train import Hooks, train

    client = s3
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    client.upload_file(str(data), "lora-data", "datasets/chat.jsonl")  # type: ignore[attr-defined]
    run = TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 1,
            "spec": {
                "baseModel": {"uri": f"file://{tiny_llama}"},
                "dataset": {"uri": "s3://lora-data/datasets/chat.jsonl", "evalSplit": 0},
                "output": {"uri": "s3://lora-data/adapters/bot"},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16},
                "training": {
                    "maxSteps": 6,
                    "saveSteps": 3,
                    "learningRate": 5e-3,
                    "batchSize": 4,
                    "gradientAccumulationSteps": 1,
                    "maxSeqLength": 128,
                },
            },
        }
    )
    result = train(run, Hooks(sinks=[]))
    assert result.ok and result.adapter is not None
    assert result.adapter.uri == "s3://lora-data/adapters/bot/rev-1"

    def keys() -> set[str]:
        listing = client.list_objects_v2(Bucket="lora-data", Prefix="adapters/bot/rev-1/")  # type: ignore[attr-defined]
        return {o["Key"].removeprefix("adapters/bot/rev-1/") for o in listing.get("Contents", [])}

    got = keys()
    assert {MANIFEST_FILE, "adapter_config.json", "adapter_model.safetensors", "README.md"} <= got
    assert not any(key.startswith("checkpoints/") for key in got), got  # the adapter folder is only the adapter
    listing = client.list_objects_v2(Bucket="lora-data", Prefix="adapters/bot/checkpoints/rev-1/")  # type: ignore[attr-defined]
    ckpt_keys = {o["Key"].removeprefix("adapters/bot/checkpoints/rev-1/") for o in listing.get("Contents", [])}
    assert {"checkpoint-3/trainer_state.json", "checkpoint-6/trainer_state.json"} <= ckpt_keys

    local = tmp_path / "download"
    for key in got:
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("lora-data", f"adapters/bot/rev-1/{key}", str(local / key))  # type: ignore[attr-defined]
    assert verify_adapter_dir(local).digest == result.adapter.digest

    # A new pod on another node: no local state, no manifest (it died before publishing, after
    # checkpoint-3 was mirrored and before checkpoint-6 was). It pulls checkpoint-3 from s3 and trains
    # steps 4-6 instead of starting over (or, resuming from the last step, training nothing).
    client.delete_object(Bucket="lora-data", Key=f"adapters/bot/rev-1/{MANIFEST_FILE}")  # type: ignore[attr-defined]
    listing = client.list_objects_v2(Bucket="lora-data")  # type: ignore[attr-defined]
    newest = [o["Key"] for o in listing.get("Contents", []) if "/checkpoint-6/" in o["Key"]]
    assert newest
    for key in newest:
        client.delete_object(Bucket="lora-data", Key=key)  # type: ignore[attr-defined]
    shutil.rmtree(tmp_path / "work")
    again = train(run, Hooks(sinks=[]))
    assert again.ok and again.metrics["resumed_from_step"] == 3 and again.metrics["global_step"] == 6
    assert MANIFEST_FILE in keys()
