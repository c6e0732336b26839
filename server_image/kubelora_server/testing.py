"""Helpers for tests and benchmarks of the serving side (not used in production code paths).

- :func:`make_adapter`: a random LoRA adapter for a local base model, with a KubeLoRA manifest, so the agent's
  verification and the engine's loading are exercised on real files.
- :class:`Process`: run ``kubelora-cpu-engine`` / ``kubelora-agent`` as local processes with log files,
  wait for their health endpoint, stop them (or kill them, to test recovery).

torch and peft are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from kubelora.api.digest import digest_of, hash_tree
from kubelora.api.runtime import MANIFEST_FILE, AdapterManifest

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_manifest(adapter_dir: Path, base_model: str, *, source: str = "test") -> AdapterManifest:
    """Hash ``adapter_dir`` and write ``kubelora-manifest.json`` last, as the trainer does."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    files = hash_tree(adapter_dir)
    manifest = AdapterManifest(
        digest=digest_of(files), files=files,
        size_bytes=sum((adapter_dir / rel).stat().st_size for rel in files),
        base_model=base_model, peft_type=str(config.get("peft_type", "LORA")), rank=int(config.get("r", 0)),
        lora_alpha=float(config.get("lora_alpha", 0)), target_modules=config.get("target_modules") or [],
        method="lora", created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), source=source,
    )
    (adapter_dir / MANIFEST_FILE).write_text(json.dumps(manifest.wire(), indent=2))
    return manifest


def make_adapter(base_dir: Path, dest: Path, *, rank: int = 8, seed: int = 1, base_model: str | None = None,
                 scale: float = 1.0, targets: Sequence[str] = DEFAULT_TARGETS, manifest: bool = True) -> Path:
    """Save a random-init LoRA for the model at ``base_dir`` into ``dest``.

    ``init_lora_weights=False`` makes B non-zero, so the adapter really changes the output; ``scale``
    multiplies B to make that change as large as a test needs. ``base_model`` (default: ``base_dir``) is
    recorded both as adapter_config's base_model_name_or_path and as the manifest's baseModel.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    dest.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(dest))
    base = base_model or str(base_dir)
    config_file = dest / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2))
    readme = dest / "README.md"
    if readme.exists():
        readme.unlink()
    if manifest:
        write_manifest(dest, base)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A console-script process with its output in a log file; ``wait_healthy`` polls an HTTP path."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def module(cls, module: str, args: Sequence[str], log_path: Path,
               env: dict[str, str] | None = None) -> Process:
        return cls([sys.executable, "-m", module, *args], log_path, env)

    def start(self) -> Process:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_healthy(self, url: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crashing engine would die."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
