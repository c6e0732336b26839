"""vLLM's runtime LoRA API, as the agent uses it (works unchanged against the CPU engine).

Errors are turned into a few exception types that mean something to the state machine:

- :class:`EngineUnavailable` - connection refused, timeout, 5xx on health: the engine, not the adapter, is
  at fault, so no adapter is failed for it.
- :class:`AdapterAlreadyLoaded` / :class:`AdapterNotLoaded` - the agent's view was stale; re-observe.
- :class:`EngineRejected` - the engine refused this adapter (4xx, or a 5xx on load, which newer vLLM uses
  for any error while reading the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

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

    def __str__(self) -> str:
        kind = f" {self.error.type}" if self.error.type else ""
        return f"HTTP {self.error.status}{kind}: {self.error.message}"


class AdapterAlreadyLoaded(EngineRejected):
    """Load of a name the engine already has (vLLM: 400 "has already been loaded")."""


class AdapterNotLoaded(EngineRejected):
    """Unload of a name the engine does not have (vLLM: 404 NotFoundError; some versions 400)."""


class RuntimeLoRADisabled(EngineRejected):
    """404 on the load route itself: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set on the engine."""


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
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.load_timeout = load_timeout
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
        if resp.status_code in (502, 503, 504):
            raise EngineUnavailable(f"POST {LOAD_LORA_PATH}: HTTP {resp.status_code}: {err.message}")
        raise EngineRejected(err)

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
