"""Time `kubelora-local up` (cached binaries) until the cluster is ready, over a few runs.

Ready means what `up` waits for: apiserver /readyz, CRDs Established, SA default/default and the
kube-root-ca.crt ConfigMap (what a pod's token volume needs), CoreDNS ready, and Node local-node
Ready (so Pods schedule and run). Each run uses a private state dir and
pod subnet, so the benchmark does not disturb a cluster you have running.

    .venv/bin/python bench/cluster_start.py [--runs 5] [--crds DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kubelora_local import build, cluster
from kubelora_local.paths import cache_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--crds", type=Path, default=None, help="CRD dir (default: repo crds/ or $KUBELORA_CRD_DIR)")
    args = parser.parse_args()
    if not build.binaries_present():
        started = time.monotonic()
        build.build()
        print(f"build (not cached): {time.monotonic() - started:.0f} s")
    ups, downs = [], []
    for i in range(args.runs):
        (cache_root() / "e2e").mkdir(exist_ok=True)
        state = Path(tempfile.mkdtemp(prefix="bench-", dir=cache_root() / "e2e"))
        try:
            started = time.monotonic()
            cluster.up(state, args.crds, build_if_missing=False, pod_subnet=f"10.250.{i + 1}")
            ups.append(time.monotonic() - started)
            started = time.monotonic()
            cluster.down(state)
            downs.append(time.monotonic() - started)
        finally:
            cluster.down(state)
            shutil.rmtree(state, ignore_errors=True)
        print(f"run {i + 1}: up {ups[-1]:.2f} s, down {downs[-1]:.2f} s", flush=True)
    for name, values in (("up -> ready", ups), ("down", downs)):
        print(
            f"{name}: min {min(values):.2f} s, median {statistics.median(values):.2f} s, "
            f"max {max(values):.2f} s ({len(values)} runs)"
        )


if __name__ == "__main__":
    main()
