"""Storage faults around the real trainer (tiny local model, CPU), each asserting the outcome and that nothing
was lost:

* output on a full disk (a real 64 KiB tmpfs): the run fails with ENOSPC named in its result, no manifest is
  written, so nothing half-written can pass for a published adapter; with space back, the same run publishes an
  adapter that verifies;
* adapter storage unreachable (the local S3 server stopped before publishing): the run fails naming the
  endpoint, publishes nothing, and a rerun once S3 is back publishes.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


def run_config(base: Path, data: str, output: str) -> dict[str, Any]:
    return {"name": "bot", "namespace": "team", "revision": 1, "spec": {
        "baseModel": {"uri": f"file://{base}"}, "dataset": {"uri": data, "evalSplit": 0},
        "output": {"uri": output}, "method": "lora", "lora": {"r": 8, "alpha": 16},
        "training": {"maxSteps": 4, "saveSteps": 2, "learningRate": 5e-3, "batchSize": 4,
                     "gradientAccumulationSteps": 1, "maxSeqLength": 64}}}


def run_trainer(tmp: Path, config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The trainer's real entry point in-process: exit code and the result it leaves for the pod."""
    from kubelora_trainer.__main__ import main

    TrainerRunConfig.model_validate(config)
    (tmp / "job.json").write_text(json.dumps(config))
    term = tmp / "termination-log"
    code = main(["--config", str(tmp / "job.json"), "--termination-log", str(term)])
    return code, json.loads(term.read_text())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.fail(f"cannot mount a small tmpfs (this test needs root): {done.stderr}", pytrace=False)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_output_fails_and_marks_nothing_complete(
        tiny: Path, tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelora_trainer.publish import verify_adapter_dir

    monkeypatch.setenv("KUBELORA_WORK_DIR", str(tmp_path / "work"))
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    config = run_config(tiny, f"file://{data}", f"file://{small_disk}/bot")
    code, result = run_trainer(tmp_path, config)
    assert code != 0 and result["ok"] is False
    assert "No space left on device" in result["message"] or "ENOSPC" in result["message"], result
    assert not list(small_disk.rglob(MANIFEST_FILE)), "a manifest on a full disk would mark a partial adapter"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    code, result = run_trainer(tmp_path, config)
    assert code == 0 and result["ok"] is True, result
    assert verify_adapter_dir(small_disk / "bot" / "rev-1").digest == result["adapter"]["digest"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_down_fails_naming_it_and_a_rerun_publishes(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "KUBELORA_WORK_DIR": str(tmp_path / "work")}.items():
        monkeypatch.setenv(key, value)
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    config = run_config(tiny, f"file://{data}", "s3://lora-out/adapters/bot")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="lora-out")
    server.stop()  # storage goes away; the moto state is in-process and survives for the rerun
    code, result = run_trainer(tmp_path, config)
    assert code != 0 and result["ok"] is False
    assert str(port) in result["message"] or "connect" in result["message"].lower(), result

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        code, result = run_trainer(tmp_path, config)
        assert code == 0 and result["ok"] is True, result
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="lora-out").get("Contents", [])}
        assert f"adapters/bot/rev-1/{MANIFEST_FILE}" in keys
    finally:
        server.stop()
