"""A corrupt checkpoint is skipped, never resumed from (issue 14), with the real trainer on a tiny model.

The trainer is SIGKILLed once two checkpoints exist; the newest is then damaged the way a failing disk or a
copy cut short would leave it (a flipped byte inside the optimizer state, whose zip entry's CRC no longer
matches). The restarted trainer must resume from the checkpoint before it, run every later step exactly once,
and publish an adapter that verifies.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubelora.api.runtime import TrainerRunConfig
from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

pytestmark = pytest.mark.integration
STEPS = 150


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_previous_one_resumed(tiny: Path, tmp_path: Path) -> None:
    from kubelora_trainer.publish import verify_adapter_dir

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=64)
    run = TrainerRunConfig.model_validate({"name": "bot", "namespace": "team", "revision": 1, "spec": {
        "baseModel": {"uri": f"file://{tiny}"}, "dataset": {"uri": f"file://{data}", "evalSplit": 0},
        "output": {"uri": f"file://{tmp_path}/out"}, "method": "lora", "lora": {"r": 8, "alpha": 16},
        "training": {"maxSteps": STEPS, "saveSteps": 10, "learningRate": 5e-3, "batchSize": 4,
                     "gradientAccumulationSteps": 1, "maxSeqLength": 128}}})
    cfg = tmp_path / "job.json"
    cfg.write_text(run.model_dump_json(by_alias=True))
    ckpts = tmp_path / "out" / "checkpoints" / "rev-1"
    cmd = [sys.executable, "-m", "kubelora_trainer", "--config", str(cfg), "--termination-log", ""]

    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        while not (ckpts / "checkpoint-20" / "trainer_state.json").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, "the trainer finished before it could be killed: raise STEPS"
    newest = max((p for p in ckpts.iterdir() if (p / "trainer_state.json").exists()),
                 key=lambda p: int(p.name.split("-")[1]))
    previous = ckpts / f"checkpoint-{int(newest.name.split('-')[1]) - 10}"
    optimizer = bytearray((newest / "optimizer.pt").read_bytes())
    optimizer[len(optimizer) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(optimizer))

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log2 = second.stderr
    assert f"checkpoint {newest} is incomplete (optimizer.pt is corrupt" in log2
    step = int(previous.name.split("-")[1])
    assert f"resuming from {previous} at step {step}" in log2
    steps = [int(m) for m in re.findall(r"train step (\d+)/", log2)]
    assert steps[0] == step + 1 and steps[-1] == STEPS
    result = json.loads(second.stdout)
    assert result["ok"] and result["metrics"]["resumed_from_step"] == step
    verify_adapter_dir(tmp_path / "out" / "rev-1")
