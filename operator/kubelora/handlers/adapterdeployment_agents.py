"""Ask every serving pod's agent for its adapter states (GET http://<podIP>:8081/adapters).

All pods are asked at once with short timeouts: one hung agent costs one timeout per poll, not one per pod,
and an agent that does not answer (or answers garbage) becomes a replica without a report, which the
aggregation counts as "not reporting" rather than failing the poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx
from pydantic import ValidationError

from kubelora.api.runtime import AgentReport
from kubelora.reconcile.adapterdeployment_views import PodView, ReplicaReport
from kubelora.resources.serving_common import AGENT_PORT

TIMEOUT = httpx.Timeout(2.0, connect=1.0)


async def _ask(client: httpx.AsyncClient, pod: PodView) -> ReplicaReport:
    try:
        resp = await client.get(f"http://{pod.ip}:{AGENT_PORT}/adapters")
        resp.raise_for_status()
        return ReplicaReport(pod=pod.name, ready=pod.ready, report=AgentReport.model_validate(resp.json()))
    except (httpx.HTTPError, ValueError, ValidationError) as exc:
        return ReplicaReport(pod=pod.name, ready=pod.ready, error=f"{type(exc).__name__}: {exc}")


async def poll_agents(pods: Iterable[PodView],
                      transport: httpx.AsyncBaseTransport | None = None) -> list[ReplicaReport]:
    """Reports of the pollable pods (Running, with an IP, not terminating), sorted by pod name."""
    targets = sorted((p for p in pods if p.pollable), key=lambda p: p.name)
    if not targets:
        return []
    async with httpx.AsyncClient(timeout=TIMEOUT, transport=transport, trust_env=False) as client:
        return list(await asyncio.gather(*(_ask(client, p) for p in targets)))
