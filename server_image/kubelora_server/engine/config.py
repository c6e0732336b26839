"""The engine's command line: a subset of ``vllm serve``'s flags, with the same names and defaults.

Unknown flags are accepted and ignored with a warning, so the operator can hand the CPU engine the same
``extraArgs`` it hands vLLM (``--gpu-memory-utilization`` and friends) without breaking it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM accepts only these for --max-lora-rank."""


@dataclass(frozen=True)
class EngineArgs:
    model: str
    served_model_name: str
    host: str = "0.0.0.0"
    port: int = 8000
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1
    max_num_seqs: int = 256
    max_logprobs: int = 20
    max_model_len: int | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)
    dtype: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    revision: str | None = None
    middleware: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def _lora_module(value: str) -> tuple[str, str]:
    """vLLM's two spellings: ``name=path``, or JSON ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON for --lora-modules: {exc}") from None
        if not isinstance(data, dict) or not data.get("name") or not data.get("path"):
            raise argparse.ArgumentTypeError(f"--lora-modules JSON needs 'name' and 'path', got {value!r}")
        return str(data["name"]), str(data["path"])
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubelora-cpu-engine",
                                description="OpenAI-compatible CPU server (transformers + peft) with vLLM's "
                                            "runtime LoRA API.")
    p.add_argument("--model", default=None, help="model path, pvc:// or file:// URI, or hub id")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the base model; the first is reported (default: --model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--revision", default=None, help="hub revision of a hub model id (like vLLM's)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--enable-lora", action="store_true", help="allow LoRA adapters")
    p.add_argument("--max-loras", type=int, default=1, help="distinct adapters in one batch")
    p.add_argument("--max-lora-rank", type=int, default=16, choices=LORA_RANKS, help="largest rank accepted")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters whose weights stay in memory, least recently used evicted; any number can be "
                        "registered (default: --max-loras; must be >= it)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch (vLLM's scheduler limit)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="most log-probs a request may ask for per token (-1: the vocabulary), like vLLM's")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens (default: the model's max_position_embeddings)")
    p.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=PATH|JSON",
                   help="adapters to load at start-up: name=path or vLLM's JSON form")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: float32, the fast one on most CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that bring none")
    p.add_argument("--middleware", action="append", default=[], metavar="IMPORT.PATH",
                   help="ASGI middleware class or http middleware function to add, as vLLM's flag (repeatable)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> EngineArgs:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    model = ns.model
    if not model:
        parser.error("a model is required (--model PATH_OR_URI)")
    if unknown and not unknown[0].startswith("-"):
        parser.error(f"unexpected argument {unknown[0]!r}")
    if unknown:
        log.warning("ignoring flags the CPU engine does not implement: %s", " ".join(unknown))
    max_cpu = ns.max_cpu_loras if ns.max_cpu_loras is not None else ns.max_loras
    if max_cpu < ns.max_loras:
        parser.error(f"--max-cpu-loras ({max_cpu}) must be >= --max-loras ({ns.max_loras})")
    if ns.max_loras < 1:
        parser.error("--max-loras must be >= 1")
    if ns.max_num_seqs < 1:
        parser.error("--max-num-seqs must be >= 1")
    if ns.lora_modules and not ns.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    served = ns.served_model_name[0] if ns.served_model_name else model
    return EngineArgs(
        model=model, served_model_name=served, host=ns.host, port=ns.port, enable_lora=ns.enable_lora,
        max_loras=ns.max_loras, max_lora_rank=ns.max_lora_rank, max_cpu_loras=max_cpu,
        max_num_seqs=ns.max_num_seqs, max_logprobs=ns.max_logprobs,
        max_model_len=ns.max_model_len, lora_modules=dict(ns.lora_modules),
        dtype=ns.dtype, seed=ns.seed,
        tokenizer=ns.tokenizer, revision=ns.revision, middleware=tuple(ns.middleware), ignored=tuple(unknown),
    )
