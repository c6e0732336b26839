"""The agent's read-only HTTP endpoints on :8081 (probes, the operator's status source, Prometheus).

Nothing here changes state: the desired set comes only from the ConfigMap the operator writes, so a caller
that can reach the pod cannot make it load or unload anything.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from kubelora_server.agent.runner import Agent

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="kubelora-agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = agent.alive()
        return JSONResponse({"status": "ok" if ok else "stalled"}, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        report = agent.report()
        pending = [a.name for a in report.adapters if a.state != "Loaded" and a.state != "Failed"]
        body = {"ready": agent.ready(), "engineReady": report.engine_ready, "pending": pending,
                "desiredKnown": agent.source.desired is not None}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/adapters")
    async def adapters() -> JSONResponse:
        return JSONResponse(agent.report().wire())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(agent.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
