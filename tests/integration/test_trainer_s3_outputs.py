"""spec.output.merged and spec.combine with s3:// (moto server): the merged model is uploaded with its manifest
last and verifies after download (a retry reuses it); a combination reads an s3 input by its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

from .test_trainer_s3 import s3  # noqa: F401 - the moto fixture

pytestmark = pytest.mark.integration


def download(client: Any, prefix: str, dest: Path) -> Path:
    listed = client.list_objects_v2(Bucket="lora-data", Prefix=prefix)["Contents"]
    for obj in listed:
        target = dest / obj["Key"][len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("lora-data", obj["Key"], str(target))
    return dest


def test_merged_model_and_combination_on_s3(s3: Any, tiny_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from kubelora_trainer.combine import combine
    from kubelora_trainer.merge import existing_merged, verify_merged_dir
    from kubelora_trainer.train import Hooks, train

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    s3.upload_file(str(data), "lora-data", "datasets/chat.jsonl")
    run = TrainerRunConfig.model_validate({
        "name": "bot", "namespace": "team", "revision": 1,
        "spec": {"baseModel": {"uri": f"file://{tiny_llama}"}, "dataset": {"uri": "s3://lora-data/datasets/chat.jsonl"},
                 "output": {"uri": "s3://lora-data/out", "merged": {"dtype": "float32"}}, "method": "lora",
                 "lora": {"r": 8, "alpha": 16},
                 "training": {"maxSteps": 4, "learningRate": 5e-3, "batchSize": 4, "gradientAccumulationSteps": 1,
                              "saveSteps": 4, "evalSteps": 4, "maxSeqLength": 256}},
    })
    result = train(run, Hooks(sinks=[], progress_interval=0))
    assert result.ok and result.merged is not None and result.merged.uri == "s3://lora-data/out/rev-1/merged"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lora-data", Prefix="out/rev-1/merged/")["Contents"]]
    assert f"out/rev-1/merged/{MANIFEST_FILE}" in keys
    local = download(s3, "out/rev-1/merged/", tmp_path / "merged")
    assert verify_merged_dir(local).digest == result.merged.digest
    assert existing_merged(run, result.adapter.digest) == result.merged

    adapter_digest = json.loads(s3.get_object(Bucket="lora-data", Key=f"out/rev-1/{MANIFEST_FILE}")["Body"].read())[
        "digest"]
    mix = TrainerRunConfig.model_validate({
        "name": "mix", "namespace": "team", "revision": 1,
        "combineInputs": [{"uri": "s3://lora-data/out/rev-1", "digest": adapter_digest, "weight": 0.5},
                          {"uri": "s3://lora-data/out/rev-1", "digest": adapter_digest, "weight": 0.5}],
        "spec": {"baseModel": {"uri": f"file://{tiny_llama}"}, "output": {"uri": "s3://lora-data/mix"},
                 "combine": {"method": "linear", "inputs": [{"uri": "s3://lora-data/out/rev-1"},
                                                            {"uri": "s3://lora-data/out/rev-1"}]}},
    })
    combined = combine(mix)
    assert combined.ok and combined.adapter is not None and combined.adapter.uri == "s3://lora-data/mix/rev-1"
    manifest = json.loads(s3.get_object(Bucket="lora-data", Key=f"mix/rev-1/{MANIFEST_FILE}")["Body"].read())
    assert [i["digest"] for i in manifest["inputs"]] == [adapter_digest, adapter_digest]
