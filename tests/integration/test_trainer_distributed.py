"""The trainer with PyTorch distributed on CPU (gloo): two processes train what one process trains.

DDP runs as two "nodes" on this machine: two ``kubelora-train`` launchers with ``nodes: 2`` that find each
other through torchrun's c10d rendezvous at 127.0.0.1, node ranks from ``JOB_COMPLETION_INDEX``, exactly
as the pods of an Indexed Job do. FSDP runs as one launcher with two local processes (``gpus: 2`` on a
machine without GPUs gives two CPU processes).

Why the loss curves must agree: with per-process batch 2 on 2 processes and batch 4 on 1 process, every
optimizer step sees the same 4 samples (accelerate hands out consecutive batches of one seeded sampler), the
LoRA init is rank 0's (DDP broadcasts it; it equals the single process's, same seed), dropout is 0, and the
loss is normalised by the global token count. What is left is float32 summation order (gloo adds two
partial gradients); measured differences after 8 AdamW steps were below 1e-6, so 1e-4 leaves room without
hiding a real error (one wrong sample or a gradient not averaged moves the loss by > 1e-2 by step 3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

pytestmark = pytest.mark.integration

STEPS = 8
TOLERANCE = 1e-4


def make_config(tmp_path: Path, name: str, base: Path, data: Path, resources: dict[str, Any], batch: int,
                strategy: str = "auto") -> Path:
    run = TrainerRunConfig.model_validate({
        "name": "bot", "namespace": "team", "revision": 1,
        "spec": {
            "baseModel": {"uri": f"file://{base}"},
            "dataset": {"uri": f"file://{data}", "evalSplit": 0},
            "output": {"uri": f"file://{tmp_path}/{name}"},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0},
            "resources": resources,
            "distributed": {"strategy": strategy},
            "training": {"maxSteps": STEPS, "saveSteps": 4, "learningRate": 5e-3, "batchSize": batch,
                         "gradientAccumulationSteps": 1, "scheduler": "constant", "warmupRatio": 0,
                         "maxSeqLength": 128, "packing": False},
        },
    })
    path = tmp_path / f"{name}.json"
    path.write_text(run.model_dump_json(by_alias=True))
    return path


def trainer(config: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kubelora_trainer", "--config", str(config),
                             "--termination-log", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def finish(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def loss_curve(output: Path) -> list[float]:
    state = json.loads((output / "checkpoints" / "rev-1" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_dataset(tmp_path_factory.mktemp("data") / "chat.jsonl", n=64)


@pytest.fixture(scope="module")
def single(tiny_llama: Path, chat: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    tmp = tmp_path_factory.mktemp("single")
    result, _ = finish(trainer(make_config(tmp, "one", tiny_llama, chat, {"gpus": 0}, batch=4)))
    assert result["ok"]
    return loss_curve(tmp / "one")


def test_ddp_on_two_nodes_follows_the_single_process_loss_curve_and_publishes_once(
        tiny_llama: Path, chat: Path, tmp_path: Path, single: list[float]) -> None:
    from kubelora_trainer.publish import verify_adapter_dir

    config = make_config(tmp_path, "ddp", tiny_llama, chat, {"gpus": 0, "nodes": 2}, batch=2)
    rdzv = {"KUBELORA_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "KUBELORA_RDZV_ID": "ddp-test"}
    nodes = [trainer(config, JOB_COMPLETION_INDEX=str(i), **rdzv) for i in (0, 1)]
    (r0, log0), (r1, log1) = (finish(p) for p in nodes)

    curve = loss_curve(tmp_path / "ddp")
    assert len(curve) == len(single) == STEPS
    assert curve == pytest.approx(single, abs=TOLERANCE)
    assert curve[-1] < curve[0] - 0.1  # and it learned
    # One adapter, published once and verifiable; both pods report it (whichever holds global rank 0).
    manifest = verify_adapter_dir(tmp_path / "ddp" / "rev-1")
    assert r0["adapter"]["digest"] == r1["adapter"]["digest"] == manifest.digest
    assert [p.name for p in (tmp_path / "ddp").rglob(MANIFEST_FILE)] == [MANIFEST_FILE]
    # Only rank 0 reports progress: exactly one of the two nodes logged the training lines.
    assert sorted(log.count("train step") for log in (log0, log1)) == [0, STEPS]
    assert "2 processes (2 node(s)), DDP, gloo" in log0 + log1
    # Global throughput: the tokens counted are all processes' (the same total as the single run).
    assert r0["metrics"]["train_tokens"] == r1["metrics"]["train_tokens"]


def test_fsdp_on_two_processes_publishes_a_standard_peft_adapter(
        tiny_llama: Path, chat: Path, tmp_path: Path, single: list[float]) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kubelora_trainer.publish import verify_adapter_dir

    config = make_config(tmp_path, "fsdp", tiny_llama, chat, {"gpus": 2}, batch=2, strategy="fsdp")
    result, log = finish(trainer(config))
    assert result["ok"], result
    assert "2 processes (1 node(s)), FSDP, gloo" in log
    ckpt = tmp_path / "fsdp" / "checkpoints" / "rev-1" / f"checkpoint-{STEPS}"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()  # sharded, really
    assert loss_curve(tmp_path / "fsdp") == pytest.approx(single, abs=TOLERANCE)

    adapter = tmp_path / "fsdp" / "rev-1"
    manifest = verify_adapter_dir(adapter)
    assert manifest.digest == result["adapter"]["digest"]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    # The same key layout as a single-process adapter: no FSDP wrapper names, every LoRA B trained (non-zero).
    assert saved and all(k.startswith("base_model.model.") and "_fsdp" not in k for k in saved)
    b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(loaded) == len(b)
    for key, value in b.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)
