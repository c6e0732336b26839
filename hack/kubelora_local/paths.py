"""Default locations: one cache root so CI can cache a single directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$KUBELORA_CACHE` or `~/.cache/kubelora`; created on demand."""
    root = Path(os.environ.get("KUBELORA_CACHE") or Path.home() / ".cache" / "kubelora")
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_state_dir() -> Path:
    """`$KUBELORA_STATE_DIR` or `<cache>/cluster`: PKI, etcd data, kubeconfig, logs, PVC dirs."""
    env = os.environ.get("KUBELORA_STATE_DIR")
    return Path(env) if env else cache_root() / "cluster"


def repo_root() -> Path:
    """The checkout (hack/kubelora_local/ is two levels below it)."""
    return Path(__file__).resolve().parents[2]
