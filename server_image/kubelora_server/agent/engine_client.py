"""vLLM's runtime LoRA API, as the agent uses it (works unchanged against the CPU engine).

vLLM answers a failed load with one status whatever the cause: v0.34 (the release the server image pins)
answers 500 InternalServerError with the exception's text, releases before v0.12 answered 400
BadRequestError; only "No adapter found" (no adapter_config.json at the path) is a 404 NotFoundError. So the
status says little, and the message is what tells a transient failure (CUDA out of memory, an I/O error on
the volume, a timeout, a dead engine core) from a permanent one (vLLM's PEFTHelper refusals, target modules
the model lacks, a config that is not JSON, no weight files). :func:`is_permanent` encodes that reading; the
client retries transient refusals a few times with exponential backoff (tenacity) before it hands them to
the state machine, which backs off further and gives up after ``max_load_attempts``.

Errors are turned into a few exception types that mean something to the state machine:

- :class:`EngineUnavailable` - connection refused, timeout, a gateway's 502/503/504: the engine, not the
  adapter, is at fault, so no adapter is failed for it.
- :class:`AdapterAlreadyLoaded` / :class:`AdapterNotLoaded` - the agent's view was stale; re-observe.
- :class:`EngineRejected` - the engine refused this adapter; ``permanent`` says whether retrying can help.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from tenacity.wait import wait_base

from kubelora_server.openai_api import (
    HEALTH_PATH,
    LOAD_LORA_PATH,
    MODELS_PATH,
    UNLOAD_LORA_PATH,
    ApiError,
    parse_error,
)


class EngineError(Exception):
    """Base of every error the client raises."""


class EngineUnavailable(EngineError):
    """The engine did not answer usefully (down, restarting, overloaded)."""


@dataclass
class EngineRejected(EngineError):
    """The engine answered the request with an error about the adapter itself."""

    error: ApiError
    permanent: bool = True

    def __str__(self) -> str:
        kind = f" {self.error.type}" if self.error.type else ""
        return f"HTTP {self.error.status}{kind}: {self.error.message}"


class AdapterAlreadyLoaded(EngineRejected):
    """Load of a name the engine already has (vLLM: 400 "has already been loaded")."""


class AdapterNotLoaded(EngineRejected):
    """Unload of a name the engine does not have (vLLM: 404 NotFoundError; some versions 400)."""


class RuntimeLoRADisabled(EngineRejected):
    """404 on the load route itself: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set on the engine."""


# vLLM's own words for what no retry fixes: PEFTHelper.from_dict / __post_init__ / validate_legal (v0.34 and
# older wordings), LoRAModel.from_local_checkpoint (target modules, no tensors, extra vocab), json.load of
# adapter_config.json, safetensors' header errors, peft_type checks.
_PERMANENT = re.compile("|".join([
    r"is greater than max_lora_rank", r"must be a positive integer", r"Adapter bias", r"bias_enabled",
    r"does not yet support DoRA", r"vLLM does not support", r"modules_to_save",
    r"Missing required configuration fields", r"expected target modules", r"doesn't contain tensors",
    r"Expecting value", r"Expecting property name", r"JSONDecodeError", r"Unterminated string",
    r"is greater than lora_extra_vocab_size", r"not supported", r"is not LORA", r"peft_type",
    r"HeaderTooLarge", r"InvalidHeader", r"MetadataIncompleteBuffer",
]), re.IGNORECASE)
# What may go away on its own: memory pressure (the LRU evicts), the volume, the engine core, time.
_TRANSIENT = re.compile("|".join([
    r"out of memory", r"OutOfMemoryError", r"CUDA error", r"No space left", r"Input/output error",
    r"\bI/O error", r"Errno 5\b", r"Stale file handle", r"timed? ?out", r"Timeout", r"temporarily unavailable",
    r"Connection (reset|refused|aborted)", r"Resource exhausted", r"try again", r"EngineDeadError",
    r"EngineCore", r"engine core", r"shutting down",
]), re.IGNORECASE)


def is_permanent(err: ApiError) -> bool:
    """Whether a refused load stays refused, read from the message: vLLM answers every cause with one status.

    A message in neither list counts as transient, so it is retried a bounded number of times rather than
    failing the adapter for the slow-retry period at once; so does any 408 or 429.
    """
    if err.status in (408, 429) or _TRANSIENT.search(err.message):
        return False
    return bool(_PERMANENT.search(err.message))


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, EngineRejected) and not isinstance(exc, AdapterAlreadyLoaded | RuntimeLoRADisabled) \
        and not exc.permanent


@dataclass(frozen=True)
class ModelsView:
    """``GET /v1/models`` split into base models and adapters (entries with a ``parent``)."""

    base: list[str]
    adapters: dict[str, str]
    """adapter name -> ``root`` (the path it was loaded from)."""


def _raise_if_route_missing(err: ApiError, path: str) -> None:
    """FastAPI's bare 404 for an unknown route: vLLM runs without runtime LoRA updating."""
    if err.status == 404 and err.message == "Not Found":
        raise RuntimeLoRADisabled(ApiError(404, f"{path} is not served: set "
                                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the engine"))


class EngineClient:
    """Async client for one engine. ``transport`` lets tests plug in ``httpx.MockTransport``."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, load_timeout: float = 300.0,
                 load_attempts: int = 3, retry_wait: wait_base | None = None,
                 retry_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.load_timeout = load_timeout
        self.load_attempts = load_attempts
        """Tries per load call for transient refusals (the state machine's own retries come on top)."""
        self.retry_wait = retry_wait if retry_wait is not None else wait_exponential(multiplier=0.5, max=8)
        self.retry_sleep = retry_sleep
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, *, json: object | None = None,
                       timeout: float | None = None) -> httpx.Response:
        try:
            if timeout is None:
                return await self._client.request(method, path, json=json)
            return await self._client.request(method, path, json=json, timeout=timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    async def health(self) -> bool:
        """``GET /health`` is 200: the model is loaded and the server serves."""
        try:
            resp = await self._request("GET", HEALTH_PATH)
        except EngineUnavailable:
            return False
        return resp.status_code == 200

    async def models(self) -> ModelsView:
        resp = await self._request("GET", MODELS_PATH)
        if resp.status_code != 200:
            raise EngineUnavailable(f"GET {MODELS_PATH}: HTTP {resp.status_code}")
        try:
            data = resp.json()["data"]
            base = [str(m["id"]) for m in data if not m.get("parent")]
            adapters = {str(m["id"]): str(m.get("root") or "") for m in data if m.get("parent")}
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"GET {MODELS_PATH}: unexpected answer: {exc}") from exc
        return ModelsView(base, adapters)

    async def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Register ``name`` -> ``path``; transient refusals are retried ``load_attempts`` times with backoff."""
        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.load_attempts), wait=self.retry_wait,
                                           sleep=self.retry_sleep, retry=retry_if_exception(_transient), reraise=True):
            with attempt:
                await self._load_once(name, path, inplace)

    async def _load_once(self, name: str, path: str, inplace: bool) -> None:
        body: dict[str, object] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        resp = await self._request("POST", LOAD_LORA_PATH, json=body, timeout=self.load_timeout)
        if resp.status_code == 200:
            return
        err = parse_error(resp.status_code, resp.content)
        if resp.status_code == 400 and "already been loaded" in err.message:
            raise AdapterAlreadyLoaded(err)
        _raise_if_route_missing(err, LOAD_LORA_PATH)
        if resp.status_code in (502, 503, 504) and not err.message.startswith("Loading lora"):
            raise EngineUnavailable(f"POST {LOAD_LORA_PATH}: HTTP {resp.status_code}: {err.message}")
        raise EngineRejected(err, permanent=is_permanent(err))

    async def unload(self, name: str) -> None:
        resp = await self._request("POST", UNLOAD_LORA_PATH, json={"lora_name": name})
        if resp.status_code == 200:
            return
        err = parse_error(resp.status_code, resp.content)
        _raise_if_route_missing(err, UNLOAD_LORA_PATH)
        if resp.status_code in (400, 404) and ("cannot be found" in err.message or "not found" in err.message.lower()):
            raise AdapterNotLoaded(err)
        if resp.status_code >= 500:
            raise EngineUnavailable(f"POST {UNLOAD_LORA_PATH}: HTTP {resp.status_code}: {err.message}")
        raise EngineRejected(err)
