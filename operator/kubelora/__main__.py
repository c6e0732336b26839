"""``kubelora-operator``: run the KubeLoRA operator.

    kubelora-operator --all-namespaces            # cluster-wide
    kubelora-operator -n ml -n research --log-format json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
from typing import Any

from kubelora.settings import Settings


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (Loki, Cloud Logging, Elasticsearch).

    ``object`` is the Kubernetes object the line is about: kopf's per-object loggers put it in
    ``record.k8s_ref`` (an ObjectReference: apiVersion, kind, namespace, name, uid), and so do the
    operator's own records about one object (``extra={"k8s_ref": ..., "reason": ...}``). ``reason`` is
    the status/Event reason when the code knows it; ``traceback`` is the formatted exception.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            out["object"] = {key: value for key, value in ref.items() if value}
        reason = getattr(record, "reason", None)
        if reason:
            out["reason"] = str(reason)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    base = Settings.from_env()
    parser = argparse.ArgumentParser(prog="kubelora-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--namespace", action="append", default=None, help="namespace to watch (repeatable)")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--trainer-image", default=base.trainer_image)
    parser.add_argument("--server-image", default=base.server_image)
    parser.add_argument("--peering", default=base.peering, help="kopf peering name for HA; omit to run standalone")
    parser.add_argument("--log-format", choices=["text", "json"], default=base.log_format)
    parser.add_argument("--metrics-port", type=int, default=base.metrics_port,
                        help="port of the Prometheus /metrics endpoint (0 disables)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' disables)")
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be 0-65535, not {args.metrics_port}")
    namespaces = [] if args.all_namespaces else (args.namespace or base.namespaces)
    settings = base.model_copy(update={
        "namespaces": namespaces, "trainer_image": args.trainer_image, "server_image": args.server_image,
        "peering": args.peering or None, "log_format": args.log_format,
        "metrics_port": args.metrics_port})
    return settings, args


def peering_priority() -> int:
    """This process's kopf peering priority, drawn at random.

    kopf pauses every operator that sees a live peer of the same or a higher priority, so replicas that all kept
    kopf's default (0) would all pause and none would reconcile. With distinct priorities the highest is active and
    the others stand by; when it goes, the next highest resumes.
    """
    return secrets.randbelow(2**31 - 1) + 1


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    import kopf

    from kubelora import handlers
    from kubelora.handlers import metrics

    handlers.configure(settings)
    metrics.serve(settings.metrics_port)
    asyncio.run(kopf.operator(
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=settings.peering is None,
        peering_name=settings.peering,  # only when set: kopf makes any named peering mandatory
        priority=peering_priority() if settings.peering else None,
        liveness_endpoint=args.liveness or None,
    ))


if __name__ == "__main__":
    main()
