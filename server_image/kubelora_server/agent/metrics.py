"""Prometheus metrics of one agent, in a registry of its own (several agents can live in one test process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kubelora.api.adapterdeployment import AdapterState
from kubelora_server.agent.state import Record

STATES: tuple[AdapterState, ...] = get_args(AdapterState)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.adapters = Gauge("kubelora_agent_adapters", "Desired adapters by state", ["state"],
                              registry=self.registry)
        self.engine_healthy = Gauge("kubelora_agent_engine_healthy", "1 when the engine answered /health",
                                    registry=self.registry)
        self.ready = Gauge("kubelora_agent_ready", "1 when /readyz answers 200", registry=self.registry)
        self.actions = Counter("kubelora_agent_actions_total", "Fetch/load/unload actions by result",
                               ["action", "result"], registry=self.registry)
        self.fetch_seconds = Histogram("kubelora_agent_fetch_seconds", "Time to fetch and verify an adapter",
                                       registry=self.registry)
        self.load_seconds = Histogram("kubelora_agent_load_seconds", "Time the engine took to load an adapter",
                                      registry=self.registry)
        self.load_failures = Counter("kubelora_agent_load_failures_total",
                                     "Refused loads by reason and kind (transient: retried with backoff)",
                                     ["reason", "kind"], registry=self.registry)
        self.engine_restarts = Counter("kubelora_agent_engine_recoveries_total",
                                       "Times the engine came back healthy after being unreachable",
                                       registry=self.registry)

    def observe_records(self, records: Iterable[Record]) -> None:
        tally = Tally(rec.state for rec in records)
        for state in STATES:
            self.adapters.labels(state).set(tally.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
