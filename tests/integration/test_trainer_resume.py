"""Kill the trainer (SIGKILL, as a node loss or OOM kill would) once a checkpoint exists; the restarted
trainer must continue from the newest complete checkpoint, never from step 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubelora.api.runtime import TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

pytestmark = pytest.mark.integration

STEPS = 150


def test_killed_trainer_resumes_from_newest_complete_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    from kubelora_trainer.checkpoints import find_resume_checkpoint
    from kubelora_trainer.publish import verify_adapter_dir

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=64)
    run = TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 2,
            "spec": {
                "baseModel": {"uri": f"file://{tiny_llama}"},
                "dataset": {"uri": f"file://{data}", "evalSplit": 0},
                "output": {"uri": f"file://{tmp_path}/out"},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16},
                "training": {
                    "maxSteps": STEPS,
                    "saveSteps": 10,
                    "learningRate": 5e-3,
                    "batchSize": 4,
                    "gradientAccumulationSteps": 1,
                    "scheduler": "constant",
                    "warmupRatio": 0,
                    "maxSeqLength": 128,
                },
            },
        }
    )
    cfg = tmp_path / "job.json"
    cfg.write_text(run.model_dump_json(by_alias=True))
    ckpts = tmp_path / "out" / "checkpoints" / "rev-2"
    cmd = [sys.executable, "-m", "kubelora_trainer", "--config", str(cfg), "--termination-log", ""]

    with (tmp_path / "first.log").open("w") as log1:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log1)
        deadline = time.monotonic() + 240
        while not (ckpts / "checkpoint-10" / "trainer_state.json").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert proc.returncode == -9, "the trainer finished before it could be killed: raise STEPS"
    assert not (tmp_path / "out" / "rev-2" / "kubelora-manifest.json").exists()

    newest = find_resume_checkpoint(ckpts, remove_incomplete=False)
    assert newest is not None and newest.step >= 10
    killed_at = max(int(m) for m in re.findall(r"train step (\d+)/", first_log))
    assert killed_at >= newest.step

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    log2 = second.stderr
    assert f"resuming from {newest.path} at step {newest.step}" in log2
    steps = [int(m) for m in re.findall(r"train step (\d+)/", log2)]
    assert steps[0] == newest.step + 1 and steps[-1] == STEPS  # no step was run twice, none skipped
    result = json.loads(second.stdout)
    assert result["ok"] and result["metrics"]["resumed_from_step"] == newest.step
    assert result["metrics"]["global_step"] == STEPS
    state = json.loads((ckpts / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged[0] == 1 and logged[-1] == STEPS and len(logged) == len(set(logged))
    verify_adapter_dir(tmp_path / "out" / "rev-2")


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes(tiny_llama: Path, tmp_path: Path) -> None:
    import os
    import signal

    from transformers import TrainerCallback

    from kubelora_trainer.errors import TrainingStoppedError
    from kubelora_trainer.train import Hooks, train

    class Terminate(TrainerCallback):  # what the kubelet does on suspend / Job deletion
        def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
            if getattr(state, "global_step", 0) == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    run = TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 1,
            "spec": {
                "baseModel": {"uri": f"file://{tiny_llama}"},
                "dataset": {"uri": f"file://{data}", "evalSplit": 0},
                "output": {"uri": f"file://{tmp_path}/out"},
                "method": "lora",
                "training": {
                    "maxSteps": 10,
                    "saveSteps": 100,
                    "batchSize": 4,
                    "gradientAccumulationSteps": 1,
                    "maxSeqLength": 128,
                },
            },
        }
    )
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStoppedError, match="stopped by SIGTERM at step 5 after saving checkpoint-5"):
        train(run, Hooks(sinks=[], extra_callbacks=[Terminate()]))
    assert signal.getsignal(signal.SIGTERM) == previous  # handler removed again
    ckpts = tmp_path / "out" / "checkpoints" / "rev-1"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-5"]
    assert not (tmp_path / "out" / "rev-1" / "kubelora-manifest.json").exists()
    result = train(run, Hooks(sinks=[]))
    assert result.ok and result.metrics["resumed_from_step"] == 5 and result.metrics["global_step"] == 10
