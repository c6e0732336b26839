"""Only the pod itself may change which adapters an engine serves.

vLLM serves inference and its runtime LoRA API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``) on
one port, so neither a bind address nor a NetworkPolicy (which sees ports, not paths) can let clients reach
one but not the other. This ASGI middleware, which both engines install with ``--middleware`` (vLLM's own flag
for it, which the CPU engine copies), answers the LoRA routes only for a peer inside the pod's network
namespace: a loopback address, or the pod's own address (a connection from the agent to the pod IP has the
pod IP as its source). Anyone else, a client, a gateway or another pod, gets 403 and the adapter set does not
change. Requests that carry proxy headers are refused too: the agent never sends them, and a server that
trusts them (uvicorn's ``--forwarded-allow-ips``) would otherwise let a remote client claim to be local.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kubelora_server.openai_api import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LORA_UPDATE_ROUTES = frozenset({"load_lora_adapter", "unload_lora_adapter"})
"""Last path segment of vLLM's runtime LoRA routes (whatever root path or prefix is in front of them)."""
PROXY_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})


def is_lora_update(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].lower() in LORA_UPDATE_ROUTES


def _ip(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def from_the_pod(scope: Scope) -> bool:
    """True when the TCP peer is in the pod's own network namespace (and no proxy speaks for someone else)."""
    if any(name.lower() in PROXY_HEADERS for name, _ in scope.get("headers") or []):
        return False
    client, server = scope.get("client"), scope.get("server")
    peer = _ip(client[0]) if client else None
    if peer is None:
        return False
    if peer.is_loopback:
        return True
    return server is not None and peer == _ip(server[0])


def _forbidden(path: str) -> bytes:
    message = (f"{path} is reachable only from inside the serving pod (the adapter agent); adapters are "
               "changed through the AdapterDeployment")
    return json.dumps(error_body(message, "PermissionDenied", 403)).encode()


class PodLocalLoRAUpdates:
    """Pure ASGI (no buffering, so streamed completions pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope.get("type") == "http" and is_lora_update(path) and not from_the_pod(scope):
            body = _forbidden(path)
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install(app: Any, import_path: str) -> None:
    """Add the middleware at ``import_path`` as ``vllm serve --middleware`` does: a class is added with
    ``add_middleware``, a coroutine function as an ``http`` middleware."""
    import importlib
    import inspect

    module_path, _, name = import_path.rpartition(".")
    obj = getattr(importlib.import_module(module_path), name)
    if inspect.isclass(obj):
        app.add_middleware(obj)
    elif inspect.iscoroutinefunction(obj):
        app.middleware("http")(obj)
    else:
        raise ValueError(f"--middleware {import_path}: must be a class or a coroutine function")
