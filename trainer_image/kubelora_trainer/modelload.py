"""Finding and loading the base model and its tokenizer, from a volume, s3, https or the Hugging Face Hub.

Every way this can fail (missing directory, no config.json, a gated repo, bad credentials, a corrupt
safetensors file) becomes :class:`BaseModelUnavailableError`: exit code 2, reason BaseModelUnavailable,
so the operator reports it instead of retrying a Job that cannot succeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubelora.api.uris import S3URI, FileURI, HfURI, HttpsURI, PvcURI, parse_uri
from kubelora_trainer.errors import BaseModelUnavailableError
from kubelora_trainer.mapping import Device, Precision

log = logging.getLogger(__name__)

CACHE_ENV = "KUBELORA_MODEL_CACHE"
TOKENIZER_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
WEIGHT_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelRef:
    """What ``from_pretrained`` gets: a local directory, or a Hub repo id with revision and token."""

    uri: str
    name_or_path: str
    revision: str | None = None
    token: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.revision:
            kwargs["revision"] = self.revision
        if self.token:
            kwargs["token"] = self.token
        return kwargs


def _cache_dir(uri: str) -> Path:
    # The temp dir, not /tmp: pods run with a read-only root filesystem and TMPDIR on a scratch volume.
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "kubelora", "models"))
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _check_local(uri: str, path: str) -> None:
    if not os.path.isdir(path):
        raise BaseModelUnavailableError(
            f"base model {uri} not found: {path} is not a directory. Fix: check spec.baseModel.uri (pvc:// paths "
            "are relative to the claim's root) and that the volume holds the model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise BaseModelUnavailableError(
            f"base model {uri} at {path} has no config.json. Fix: point spec.baseModel.uri at a directory saved "
            "with save_pretrained (config.json, *.safetensors, tokenizer files)")


def _fetch_remote(uri: str, tokenizer_only: bool) -> str:
    """Download an s3:// or https:// model directory into the local cache (tokenizer files only if asked)."""
    from kubelora_trainer.storage import locate

    loc = locate(uri)
    dest = _cache_dir(uri)
    dest.mkdir(parents=True, exist_ok=True)
    wanted: list[str] = list(TOKENIZER_FILES)
    try:
        if isinstance(loc.uri, S3URI):
            listing = [posixpath.relpath(p, loc.path) for p in loc.fs.find(loc.path)]
            if not listing:
                raise BaseModelUnavailableError(f"base model {uri} not found: no objects under that prefix")
            names = listing if not tokenizer_only else [n for n in listing if n in TOKENIZER_FILES]
        else:  # https: no listing, so ask for the well-known names and follow the weight index
            names = wanted
            if not tokenizer_only:
                index_url = loc.child(WEIGHT_INDEX)
                if loc.fs.exists(index_url):
                    with loc.fs.open(index_url, "rb") as fh:
                        shards = sorted(set(json.load(fh)["weight_map"].values()))
                    names = [*names, WEIGHT_INDEX, *shards]
                else:
                    names = [*names, "model.safetensors"]
        for name in names:
            target = dest / name
            if target.exists():
                continue
            remote = loc.child(name)
            if not loc.fs.exists(remote):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            loc.fs.get(remote, str(tmp))
            tmp.replace(target)
    except BaseModelUnavailableError:
        raise
    except Exception as exc:
        raise BaseModelUnavailableError(f"base model {uri} cannot be downloaded: {exc}. Fix: check the URI "
                                        "and the credentialsSecretRef") from exc
    _check_local(uri, str(dest))
    return str(dest)


def resolve_base_model(uri: str, tokenizer_only: bool = False) -> ModelRef:
    """Turn ``spec.baseModel.uri`` into something ``from_pretrained`` can load (downloading s3/https)."""
    parsed = parse_uri(uri)
    if isinstance(parsed, PvcURI | FileURI):
        path = parsed.local_path()
        _check_local(uri, path)
        return ModelRef(uri, path)
    if isinstance(parsed, HfURI):
        # Real users load from the Hub: HF_TOKEN comes from the referenced Secret (gated/private repos).
        return ModelRef(uri, parsed.repo, parsed.revision, os.environ.get("HF_TOKEN") or None)
    if isinstance(parsed, S3URI | HttpsURI):
        return ModelRef(uri, _fetch_remote(uri, tokenizer_only))
    raise BaseModelUnavailableError(f"base model {uri}: unsupported scheme")


def load_tokenizer(ref: ModelRef) -> Any:
    """The base model's tokenizer, padding on the right (what causal-LM training with labels expects)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.name_or_path, **ref.pretrained_kwargs())
    except Exception as exc:
        raise BaseModelUnavailableError(f"tokenizer of base model {ref.uri} cannot be loaded: "
                                        f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    tok.padding_side = "right"
    return tok


def detect_device() -> Device:
    """CUDA if a GPU is visible, else CPU; with bf16 and flash-attention capabilities."""
    import importlib.util

    import torch

    if torch.cuda.is_available():
        return Device("cuda", bf16=bool(torch.cuda.is_bf16_supported()),
                      flash_attention=importlib.util.find_spec("flash_attn") is not None)
    cpu_bf16 = False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
        cpu_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return Device("cpu", bf16=cpu_bf16)


def _dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_base_model(ref: ModelRef, method: str, precision: Precision, device: Device,
                    bnb: dict[str, Any] | None = None, local_rank: int = 0, sharded: bool = False) -> Any:
    """Load the frozen base: 4-bit through bitsandbytes for qlora (then prepared for k-bit training).

    Each process puts the model on its own GPU (``local_rank``); with FSDP (``sharded``) it stays in host
    memory and FSDP moves each process's shard to its GPU, so no GPU ever holds the whole model.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": _dtype(precision.model_dtype), **ref.pretrained_kwargs()}
    if device.is_cpu or sharded:
        kwargs["device_map"] = "cpu"
    else:
        kwargs["device_map"] = {"": local_rank}
    if not device.is_cpu:
        kwargs["attn_implementation"] = "flash_attention_2" if device.flash_attention else "sdpa"
    if method == "qlora":
        assert bnb is not None
        names = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
        dtypes: dict[str, Any] = {k: _dtype(bnb[k]) for k in names if k in bnb}
        kwargs["quantization_config"] = BitsAndBytesConfig(**{**bnb, **dtypes})  # type: ignore[no-untyped-call]
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.name_or_path, **kwargs)
    except Exception as exc:
        raise BaseModelUnavailableError(f"base model {ref.uri} cannot be loaded: {type(exc).__name__}: "
                                        f"{str(exc)[:300]}") from exc
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and freezes the base; checkpointing is enabled later by the Trainer if asked.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False)
    model.config.use_cache = False  # the KV cache is useless (and wasteful) while training
    return model
