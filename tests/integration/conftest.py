"""Integration fixtures: one tiny model per session, single-threaded torch (2-core CI machines are shared).

With the default two OpenMP threads, a step of the tiny model slowed 10x whenever another process used
the second core; one thread is steady. Set before any test module imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~100k-parameter random Llama with a chat tokenizer (built once per session, ~0.5 s)."""
    from kubelora_local.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubelora_local.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")
