"""Credentials reach the trainer as env vars and never come back out: not in logs, not in the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubelora.api.runtime import TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

pytestmark = pytest.mark.integration
TOKEN = "hf_kubelora_test_token_must_not_leak_8d1f"
AWS_SECRET = "aws-secret-must-not-leak-5c2e"


def test_hub_token_and_s3_keys_are_never_printed(tmp_path: Path) -> None:
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=8)
    run = TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 1,
            "spec": {
                "baseModel": {"uri": "hf://kubelora-test/does-not-exist", "credentialsSecretRef": "hf"},
                "dataset": {"uri": f"file://{data}"},
                "output": {"uri": f"file://{tmp_path}/out"},
                "method": "lora",
            },
        }
    )
    config = tmp_path / "job.json"
    config.write_text(run.model_dump_json(by_alias=True))
    term = tmp_path / "term"
    env = {
        **os.environ,
        "HF_TOKEN": TOKEN,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "HF_HUB_OFFLINE": "1",
        "KUBELORA_LOG_LEVEL": "DEBUG",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubelora_trainer",
            "--config",
            str(config),
            "--validate-only",
            "--termination-log",
            str(term),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 2 and result["reason"] == "BaseModelUnavailable", proc.stderr
    for output in (proc.stdout, proc.stderr, term.read_text()):
        assert TOKEN not in output and AWS_SECRET not in output
