"""Ask every serving pod's agent for its adapter states (GET http://<podIP>:8081/adapters).

All pods are asked at once with short timeouts over one shared ``httpx.AsyncClient`` (made at operator
start, so connections are reused across polls): one hung agent costs one timeout per poll, not one per
pod, and an agent that does not answer (or answers garbage, or has an address no URL can hold) becomes a
replica without a report, which the aggregation counts as "not reporting" rather than failing the poll.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

import httpx
from pydantic import ValidationError

from kubelora.api.runtime import AgentReport
from kubelora.reconcile.adapterdeployment_views import PodView, ReplicaReport
from kubelora.resources.serving_common import AGENT_PORT

TIMEOUT = httpx.Timeout(2.0, connect=1.0)
AGENT_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, ValidationError)
"""What one agent's answer may raise; ``InvalidURL`` and ``StreamError`` are not ``HTTPError``s."""


def agent_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The one client for every agent poll of the operator process (no proxies from the environment)."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    return httpx.AsyncClient(timeout=TIMEOUT, transport=transport, trust_env=False, limits=limits)


def agent_url(ip: str) -> str:
    """``http://10.0.0.5:8081/adapters``; an IPv6 pod IP is bracketed: ``http://[fd00::1]:8081/adapters``."""
    try:
        host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:  # not an IP literal: bracket anything with a colon, let httpx judge the rest
        host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
    return f"http://{host}:{AGENT_PORT}/adapters"


async def _ask(client: httpx.AsyncClient, pod: PodView) -> ReplicaReport:
    try:
        resp = await client.get(agent_url(pod.ip or ""))
        resp.raise_for_status()
        return ReplicaReport(pod=pod.name, ready=pod.ready, report=AgentReport.model_validate(resp.json()))
    except AGENT_ERRORS as exc:
        return ReplicaReport(pod=pod.name, ready=pod.ready, error=f"{type(exc).__name__}: {exc}")


async def poll_agents(pods: Iterable[PodView], client: httpx.AsyncClient) -> list[ReplicaReport]:
    """Reports of the pollable pods (Running, with an IP, not terminating), sorted by pod name."""
    targets = sorted((p for p in pods if p.pollable), key=lambda p: p.name)
    if not targets:
        return []
    return list(await asyncio.gather(*(_ask(client, p) for p in targets)))
