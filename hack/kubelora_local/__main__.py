"""`kubelora-local up|down|status|build|env|logs`: a local Kubernetes for dev and e2e tests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import build, cluster
from .paths import default_state_dir


def _logs(state: Path, namespace: str, pod: str, container: str | None) -> int:
    pod_dir = state / "logs" / namespace / pod
    files = sorted(pod_dir.glob("*.log")) if pod_dir.is_dir() else []
    if container:
        files = [f for f in files if f.stem == container]
    if len(files) != 1:
        names = ", ".join(f.stem for f in sorted(pod_dir.glob("*.log"))) if pod_dir.is_dir() else "none"
        print(f"choose one container of {namespace}/{pod}: {names}", file=sys.stderr)
        return 1
    sys.stdout.write(files[0].read_text(errors="replace"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubelora-local", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=None, help=f"default: {default_state_dir()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start a fresh cluster (builds the binaries first if needed)")
    p_up.add_argument("--crds", type=Path, default=None, help="directory of CRD YAMLs (default: repo crds/)")
    p_up.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    p_up.add_argument(
        "--pod-subnet", default=cluster.DEFAULT_SUBNET, help="pods get <subnet>.2 .. .254 (default %(default)s)"
    )
    p_up.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu capacity the node offers (default 0)")
    sub.add_parser("down", help="stop the runner, CoreDNS, scheduler, controller-manager, apiserver and etcd")
    sub.add_parser("status", help="show component PIDs and readiness (exit 1 if not ready)")
    p_build = sub.add_parser("build", help="build and cache the cluster's binaries from Go modules (~12 min once)")
    p_build.add_argument("--force", action="store_true")
    p_build.add_argument("programs", nargs="*", help=f"default: {' '.join(build.CLUSTER)}; also kstatus, kueue")
    p_build.add_argument("--all", action="store_true", help="every program, the tests' neighbours included")
    sub.add_parser("env", help="print `export KUBECONFIG=...` for eval")
    p_logs = sub.add_parser("logs", help="print a container's log")
    p_logs.add_argument("namespace")
    p_logs.add_argument("pod")
    p_logs.add_argument("container", nargs="?")
    args = parser.parse_args(argv)
    state = args.state_dir or default_state_dir()

    if args.cmd == "build":
        names = tuple(build.PROGRAMS) if args.all else tuple(args.programs) or build.CLUSTER
        for name, path in build.build(names, force=args.force).items():
            print(f"{name}\t{path}")
    elif args.cmd == "up":
        started = time.monotonic()
        info = cluster.up(
            state, args.crds, build_if_missing=not args.no_build, pod_subnet=args.pod_subnet, gpus=args.gpus
        )
        print(f"cluster ready in {time.monotonic() - started:.1f} s: {info.server}", file=sys.stderr)
        print(f"export KUBECONFIG={info.kubeconfig}")
    elif args.cmd == "down":
        stopped = cluster.down(state)
        print("stopped: " + (", ".join(stopped) or "nothing was running"), file=sys.stderr)
    elif args.cmd == "status":
        result = cluster.status(state)
        print(json.dumps(result, indent=2))
        return 0 if result["apiserver_ready"] and result["node_ready"] else 1
    elif args.cmd == "env":
        print(f"export KUBECONFIG={cluster.load(state).kubeconfig}")
    elif args.cmd == "logs":
        return _logs(state, args.namespace, args.pod, args.container)
    return 0


if __name__ == "__main__":
    sys.exit(main())
