"""vLLM's OpenAI-compatible HTTP API: paths, the error envelope and how to read errors back.

The CPU engine writes these shapes and the agent's engine client reads them, so one module keeps both sides
honest. The shapes follow vLLM (v0.34, the pinned release): errors are ``{"error": {"message", "type",
"param", "code"}}`` with ``code`` the HTTP status; older vLLM releases answered ``{"object": "error",
"message", "type", "code"}`` at the top level, which :func:`parse_error` also accepts so the agent works against either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
"""vLLM only mounts the load/unload routes when this is "1" or "true" (any case)."""


def runtime_lora_updating_allowed(environ: dict[str, str] | None = None) -> bool:
    """vLLM's own reading of ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``."""
    env = os.environ if environ is None else environ
    return env.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """The JSON vLLM sends with a 4xx/5xx."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


@dataclass(frozen=True)
class ApiError:
    """An error answer from an OpenAI-compatible server, whichever envelope it used."""

    status: int
    message: str
    type: str = ""


def parse_error(status: int, content: bytes | str) -> ApiError:
    """Read vLLM's new or old envelope, FastAPI's ``{"detail": ...}`` or plain text."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    try:
        data = json.loads(text)
    except ValueError:
        return ApiError(status, text.strip())
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            return ApiError(status, str(inner.get("message", "")), str(inner.get("type", "")))
        if "message" in data:
            return ApiError(status, str(data["message"]), str(data.get("type", "")))
        if "detail" in data:
            return ApiError(status, json.dumps(data["detail"]) if not isinstance(data["detail"], str)
                            else data["detail"], "")
    return ApiError(status, text.strip())
