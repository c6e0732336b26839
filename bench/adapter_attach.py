"""Adapter attach latency and per-adapter throughput of the serving side (CPU engine + agent, local processes).

Attach latency: time from writing a new desired set (one new adapter) to that adapter's first successful chat
completion, through the whole path the operator triggers in a cluster: the agent notices the change, copies
and verifies the adapter into its cache, checks compatibility and calls ``/v1/load_lora_adapter``; the clock
stops when the engine answers a chat request for the new name. Every repeat uses a new adapter name and
digest, so nothing is served from the agent's cache. (The desired set comes from ``--desired-file`` here; in
a cluster the ConfigMap watch delivers it instead.)

Throughput: sequential chat completions (fixed token count) through an adapter and through the base model.

    .venv/bin/python bench/adapter_attach.py [--repeats 10] [--requests 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from kubelora.api.runtime import DesiredAdapter, DesiredAdapters
from kubelora_server.testing import Process, free_port, make_adapter

PROMPT = [{"role": "user", "content": "What colour is the sky?"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def write_desired(path: Path, base: Path, adapters: dict[str, Path]) -> None:
    desired = DesiredAdapters(base_model=f"file://{base}", served_name="tiny", max_lora_rank=64, max_loras=4,
                              max_cpu_loras=8,
                              adapters=[DesiredAdapter(name=n, uri=f"file://{p}") for n, p in adapters.items()])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(desired.wire()))
    tmp.replace(path)


def chat(client: httpx.Client, model: str, max_tokens: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True})


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def averages(before: str, after: str, *names: str) -> list[float]:
    """Mean of each histogram between two /metrics snapshots (so the warm-up is left out)."""
    out = []
    for name in names:
        total = metric(after, f"{name}_sum") - metric(before, f"{name}_sum")
        count = metric(after, f"{name}_count") - metric(before, f"{name}_count")
        out.append(total / count if count else float("nan"))
    return out


def throughput(client: httpx.Client, model: str, requests: int, max_tokens: int) -> float:
    chat(client, model, max_tokens).raise_for_status()  # warm-up
    started = time.perf_counter()
    for _ in range(requests):
        chat(client, model, max_tokens).raise_for_status()
    return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40, help="requests per throughput run")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny model width")
    parser.add_argument("--file-poll-interval", type=float, default=0.05)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from kubelora_local.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="kubelora-bench-attach-"))
    base = build_tiny_model(work / "base", hidden_size=args.hidden_size)
    sources = {f"bench-{i}": make_adapter(base, work / "src" / f"bench-{i}", rank=args.rank, seed=100 + i)
               for i in range(args.repeats + 1)}
    adapter_bytes = sum(p.stat().st_size for p in sources["bench-0"].iterdir())
    desired_file = work / "adapters.json"
    write_desired(desired_file, base, {})
    eport, aport = free_port(), free_port()
    engine_url, agent_url = f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{aport}"
    engine = Process.module("kubelora_server.engine", [
        "--model", f"file://{base}", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(eport),
        "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "8", "--max-lora-rank", "64"],
        work / "engine.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "KUBELORA_LOG_LEVEL": "WARNING"})
    agent = Process.module("kubelora_server.agent", [
        "--desired-file", str(desired_file), "--engine-url", engine_url, "--cache-dir", str(work / "cache"),
        "--host", "127.0.0.1", "--port", str(aport), "--file-poll-interval", str(args.file_poll_interval),
        "--resync-interval", "5", "--log-level", "WARNING"], work / "agent.log")
    with engine, agent:
        engine.wait_healthy(engine_url + "/health")
        agent.wait_healthy(agent_url + "/readyz")
        client = httpx.Client(base_url=engine_url, timeout=60)
        # warm-up attach (first peft load pays one-off import/initialisation costs), not measured
        write_desired(desired_file, base, {"bench-0": sources["bench-0"]})
        while chat(client, "bench-0", 1).status_code != 200:
            time.sleep(0.01)
        before = httpx.get(agent_url + "/metrics").text
        attach: list[float] = []
        for i in range(1, args.repeats + 1):
            name = f"bench-{i}"
            started = time.perf_counter()
            write_desired(desired_file, base, {name: sources[name]})
            while (resp := chat(client, name, 1)).status_code != 200:
                if resp.status_code != 404:
                    raise RuntimeError(resp.text)
                if time.perf_counter() - started > 60:
                    raise TimeoutError(f"{name} not served after 60s:\n{agent.log_tail()}")
                time.sleep(0.005)
            attach.append(time.perf_counter() - started)
        metrics = httpx.get(agent_url + "/metrics").text
        last = f"bench-{args.repeats}"
        base_rps = throughput(client, "tiny", args.requests, args.max_tokens)
        lora_rps = throughput(client, last, args.requests, args.max_tokens)
        client.close()

    fetch_avg, load_avg = averages(before, metrics, "kubelora_agent_fetch_seconds", "kubelora_agent_load_seconds")
    result: dict[str, Any] = {
        "repeats": args.repeats, "rank": args.rank, "hidden_size": args.hidden_size,
        "adapter_bytes": adapter_bytes, "file_poll_interval_s": args.file_poll_interval,
        "attach_p50_s": statistics.median(attach), "attach_p95_s": percentile(attach, 0.95),
        "attach_min_s": min(attach), "attach_max_s": max(attach),
        "agent_fetch_verify_avg_s": fetch_avg, "engine_load_avg_s": load_avg,
        "base_rps": base_rps, "adapter_rps": lora_rps, "adapter_over_base": lora_rps / base_rps,
        "max_tokens": args.max_tokens, "requests": args.requests,
    }
    print(f"attach latency over {args.repeats} new adapters (rank {args.rank}, {adapter_bytes / 1024:.0f} KiB): "
          f"p50 {result['attach_p50_s'] * 1000:.0f} ms, p95 {result['attach_p95_s'] * 1000:.0f} ms "
          f"(min {result['attach_min_s'] * 1000:.0f}, max {result['attach_max_s'] * 1000:.0f})")
    print(f"  of which agent fetch+verify avg {fetch_avg * 1000:.1f} ms, engine load avg {load_avg * 1000:.1f} ms, "
          f"file poll interval {args.file_poll_interval * 1000:.0f} ms")
    print(f"throughput ({args.requests} sequential chat requests x {args.max_tokens} tokens): base "
          f"{base_rps:.1f} req/s, adapter {lora_rps:.1f} req/s, adapter/base {result['adapter_over_base']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
