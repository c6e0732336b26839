"""The CLI contract: fast --help, exit codes, one JSON result on stdout and in the termination log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubelora.api.runtime import TrainerResult
from kubelora_trainer.__main__ import TERMINATION_LIMIT, main, result_json


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys, runpy; sys.argv=['kubelora-train','--help']\n"
        "try:\n    runpy.run_module('kubelora_trainer', run_name='__main__')\nexcept SystemExit: pass\n"
        "heavy=[m for m in ('torch','transformers','trl','peft','datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert time.monotonic() - t0 < 5
    assert "--validate-only" in out and "--termination-log" in out
    assert "HEAVY []" in out


def test_bad_config_is_exit_2_with_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"name": "x", "namespace": "y", "revision": 1, "spec": {"baseModel": {}}}))
    term = tmp_path / "term"
    assert main(["--config", str(cfg), "--termination-log", str(term)]) == 2
    out = json.loads(capsys.readouterr().out.strip())
    assert out["ok"] is False and out["reason"] == "InvalidSpec"
    assert json.loads(term.read_text()) == out
    assert main(["--config", str(tmp_path / "missing.json"), "--termination-log", str(term)]) == 2


def test_unwritable_termination_log_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope"), "--termination-log", str(tmp_path / "no" / "dir")]) == 2
    assert json.loads(capsys.readouterr().out)["reason"] == "InvalidSpec"


def test_result_json_fits_the_termination_message() -> None:
    big = TrainerResult(ok=False, reason="InvalidDataset", message="x" * 10_000)
    text = result_json(big)
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert json.loads(text)["message"].endswith("[...]")
    small = TrainerResult(ok=True, metrics={"loss": 1.0})
    assert json.loads(result_json(small)) == small.wire()
