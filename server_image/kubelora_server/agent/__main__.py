"""``kubelora-agent``: the adapter sidecar beside vLLM or the CPU engine.

In a pod (see docs/design.md)::

    kubelora-agent --configmap <ad>-adapters --engine-url http://$(POD_IP):8000 --host $(POD_IP)

Locally and in tests, ``--desired-file adapters.json`` replaces the ConfigMap.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from kubelora.api.runtime import ADAPTER_CACHE_DIR
from kubelora_server.agent.engine_client import EngineClient
from kubelora_server.agent.runner import Agent
from kubelora_server.agent.server import create_app
from kubelora_server.agent.sources import ConfigMapSource, DesiredSource, FileSource, default_namespace
from kubelora_server.agent.state import Policy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubelora-agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--configmap", help="name of the ConfigMap holding adapters.json (DesiredAdapters)")
    src.add_argument("--desired-file", type=Path, help="read DesiredAdapters JSON from this file instead")
    p.add_argument("--namespace", default=None,
                   help="ConfigMap namespace (default: $POD_NAMESPACE, then the ServiceAccount namespace)")
    p.add_argument("--engine-url", default=os.environ.get("KUBELORA_ENGINE_URL", "http://127.0.0.1:8000"),
                   help="base URL of the engine's OpenAI API (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path(ADAPTER_CACHE_DIR),
                   help="where verified adapters are kept, shared with the engine (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address for the HTTP endpoints (default: %(default)s)")
    p.add_argument("--port", type=int, default=8081, help="port for the HTTP endpoints (default: %(default)s)")
    p.add_argument("--pod-name", default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="name reported in GET /adapters (default: $POD_NAME or the hostname)")
    p.add_argument("--resync-interval", type=float, default=5.0,
                   help="seconds between engine checks when nothing happens (default: %(default)s)")
    p.add_argument("--file-poll-interval", type=float, default=0.5,
                   help="seconds between reads of --desired-file (default: %(default)s)")
    p.add_argument("--reload-inplace", action="store_true",
                   help="ignored: a changed adapter is always tried under a probe name, then switched with "
                        "load_inplace (kept so existing manifests keep starting)")
    p.add_argument("--max-fetch-attempts", type=int, default=5,
                   help="failed fetches before an adapter is reported Failed (default: %(default)s)")
    p.add_argument("--max-load-attempts", type=int, default=3,
                   help="failed loads before an adapter is reported Failed (default: %(default)s)")
    p.add_argument("--load-call-attempts", type=int, default=3,
                   help="tries per load for transient refusals (OOM, I/O, timeouts), with backoff "
                        "(default: %(default)s)")
    p.add_argument("--load-timeout", type=float, default=300.0, help="seconds one load may take")
    p.add_argument("--log-level", default=os.environ.get("KUBELORA_LOG_LEVEL", "INFO"))
    return p


def make_source(args: argparse.Namespace) -> DesiredSource:
    if args.desired_file is not None:
        return FileSource(args.desired_file, args.file_poll_interval)
    return ConfigMapSource(args.configmap, args.namespace or default_namespace())


async def serve(args: argparse.Namespace) -> None:
    engine = EngineClient(args.engine_url, load_timeout=args.load_timeout, load_attempts=args.load_call_attempts)
    policy = Policy(max_fetch_attempts=args.max_fetch_attempts, max_load_attempts=args.max_load_attempts)
    # the engine is told absolute paths: it may run in another working directory (or container)
    agent = Agent(make_source(args), engine, args.cache_dir.absolute(), pod=args.pod_name, policy=policy,
                  resync_interval=args.resync_interval)
    config = uvicorn.Config(create_app(agent), host=args.host, port=args.port, log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    agent_task = asyncio.create_task(agent.run(), name="agent")
    try:
        await server.serve()
    finally:
        agent_task.cancel()
        await asyncio.gather(agent_task, return_exceptions=True)
        await engine.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine poll is noise
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
