"""Adapter attach latency at scale and CPU-engine throughput of the serving side (local processes).

Attach latency: time from writing a new desired set (one new adapter beside ``N`` already registered ones) to
that adapter's first successful chat completion, through the whole path the operator triggers in a cluster:
the agent notices the change, copies and verifies the adapter into its cache, checks compatibility and calls
``/v1/load_lora_adapter``; the clock stops when the engine answers a chat request for the new name. Every
repeat uses a new adapter name and digest, so nothing is served from the agent's cache. Measured at each
``--registered`` level (10, 100, 1,000 adapters registered in the engine, far beyond ``--max-cpu-loras``), with
the status lag: from the engine's first answer to the agent's ``GET /adapters`` saying ``Loaded`` (what the
operator reads). The desired set comes from ``--desired-file`` here; in a cluster a ConfigMap watch does it.

Throughput (a fresh engine, no agent): chat completions of ``--max-tokens`` tokens, one client in sequence vs
``--clients`` concurrent clients, over ``--adapters`` adapters and over the base model, so the engine's
batching (several adapters in one forward pass) shows as the concurrent/sequential ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/adapter_attach.py [--registered 10,100,1000] [--repeats 10]
        [--requests 40] [--clients 8] [--phases attach,throughput] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from kubelora.api.runtime import DesiredAdapter, DesiredAdapters
from kubelora_server.testing import Process, free_port, make_adapter, write_manifest

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


def clone_adapter(template: Path, dest: Path, base: Path, seed: int) -> Path:
    """A copy of ``template`` with perturbed weights (a distinct digest) and its own manifest: making 1,000
    adapters with peft would take minutes; this takes milliseconds each."""
    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "adapter_config.json", dest / "adapter_config.json")
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    save_file({k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()},
              str(dest / "adapter_model.safetensors"))
    write_manifest(dest, str(base))
    return dest


def agent_states(agent_url: str) -> dict[str, str]:
    report = httpx.get(agent_url + "/adapters", timeout=30).json()
    return {a["name"]: a["state"] for a in report["adapters"]}


def wait_all_loaded(agent_url: str, names: set[str], timeout: float, agent: Process) -> float:
    started = time.perf_counter()
    while True:
        states = agent_states(agent_url)
        if all(states.get(n) == "Loaded" for n in names):
            return time.perf_counter() - started
        failed = [n for n in names if states.get(n) == "Failed"]
        if failed:
            raise RuntimeError(f"{failed[:3]} failed:\n{agent.log_tail()}")
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{len(names)} adapters not loaded after {timeout}s:\n{agent.log_tail()}")
        time.sleep(0.5)


def attach_phase(args: argparse.Namespace, work: Path, base: Path) -> dict[str, Any]:
    levels = sorted(int(x) for x in args.registered.split(","))
    template = make_adapter(base, work / "src" / "template", rank=args.rank, seed=100)
    background = {f"reg-{i}": clone_adapter(template, work / "src" / f"reg-{i}", base, 1000 + i)
                  for i in range(levels[-1])}
    probes = {f"probe-{n}-{i}": clone_adapter(template, work / "src" / f"probe-{n}-{i}", base, 5000 + n * 100 + i)
              for n in levels for i in range(args.repeats + 1)}
    adapter_bytes = sum(p.stat().st_size for p in template.iterdir())
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
    out: dict[str, Any] = {"rank": args.rank, "adapter_bytes": adapter_bytes, "repeats": args.repeats,
                           "file_poll_interval_s": args.file_poll_interval, "levels": {}}
    with engine, agent:
        engine.wait_healthy(engine_url + "/health")
        agent.wait_healthy(agent_url + "/readyz")
        client = httpx.Client(base_url=engine_url, timeout=60)
        for n in levels:
            registered = {k: background[k] for k in list(background)[:n]}
            write_desired(desired_file, base, registered)
            fill_s = wait_all_loaded(agent_url, set(registered), 1800, agent)
            before = ""
            attach: list[float] = []
            lag: list[float] = []
            for i in range(args.repeats + 1):
                name = f"probe-{n}-{i}"
                started = time.perf_counter()
                write_desired(desired_file, base, {**registered, name: probes[name]})
                while (resp := chat(client, name, 1)).status_code != 200:
                    if resp.status_code != 404:
                        raise RuntimeError(resp.text)
                    if time.perf_counter() - started > 120:
                        raise TimeoutError(f"{name} not served after 120s:\n{agent.log_tail()}")
                    time.sleep(0.005)
                served = time.perf_counter()
                while agent_states(agent_url).get(name) != "Loaded":
                    if time.perf_counter() - served > 60:
                        raise TimeoutError(f"{name} served but not Loaded after 60s")
                    time.sleep(0.005)
                if i == 0:  # the warm-up attach at this level, not measured
                    before = httpx.get(agent_url + "/metrics").text
                    continue
                attach.append(served - started)
                lag.append(time.perf_counter() - served)
            metrics = httpx.get(agent_url + "/metrics").text
            fetch_avg, load_avg = averages(before, metrics, "kubelora_agent_fetch_seconds",
                                           "kubelora_agent_load_seconds")
            engine_models = len(client.get("/v1/models").json()["data"]) - 1
            out["levels"][str(n)] = {
                "registered_in_engine": engine_models, "fill_s": fill_s,
                "attach_p50_s": statistics.median(attach), "attach_p95_s": percentile(attach, 0.95),
                "attach_min_s": min(attach), "attach_max_s": max(attach),
                "loaded_lag_p50_s": statistics.median(lag), "loaded_lag_max_s": max(lag),
                "agent_fetch_verify_avg_s": fetch_avg, "engine_load_avg_s": load_avg,
                "load_average": os.getloadavg()[0],
            }
            lv = out["levels"][str(n)]
            print(f"{n:>5} registered ({engine_models} in the engine, filled in {fill_s:.0f} s): attach p50 "
                  f"{lv['attach_p50_s'] * 1000:.0f} ms, p95 {lv['attach_p95_s'] * 1000:.0f} ms (min "
                  f"{lv['attach_min_s'] * 1000:.0f}, max {lv['attach_max_s'] * 1000:.0f}); status Loaded lag p50 "
                  f"{lv['loaded_lag_p50_s'] * 1000:.0f} ms, max {lv['loaded_lag_max_s'] * 1000:.0f} ms; fetch+verify "
                  f"{fetch_avg * 1000:.1f} ms, engine load {load_avg * 1000:.1f} ms; load avg "
                  f"{lv['load_average']:.2f}", flush=True)
        client.close()
    first, last = out["levels"][str(levels[0])], out["levels"][str(levels[-1])]
    out["p95_ratio_last_over_first"] = last["attach_p95_s"] / first["attach_p95_s"]
    print(f"attach p95 at {levels[-1]} / at {levels[0]}: {out['p95_ratio_last_over_first']:.2f} (target <= 2)")
    return out


def rate(clients: int, total: int, call: Callable[[int], None]) -> float:
    """Requests/s of ``total`` requests spread over ``clients`` threads; ``call(i)`` sends request ``i``."""
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            call(i)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - started)


def throughput_phase(args: argparse.Namespace, work: Path, base: Path) -> dict[str, Any]:
    adapters = {f"tp-{i}": make_adapter(base, work / "tp" / f"tp-{i}", rank=args.rank, seed=200 + i)
                for i in range(args.adapters)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = Process.module("kubelora_server.engine", [
        "--model", f"file://{base}", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-loras", str(args.adapters), "--max-cpu-loras", str(args.adapters),
        "--max-lora-rank", "64"],
        work / "engine-tp.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "KUBELORA_LOG_LEVEL": "WARNING"})
    names = list(adapters)
    with engine:
        engine.wait_healthy(url + "/health")
        local = threading.local()

        def client() -> httpx.Client:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=120)
            return local.client  # type: ignore[no-any-return]

        for name, path in adapters.items():
            client().post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}).raise_for_status()

        def send(model: str) -> None:
            chat(client(), model, args.max_tokens).raise_for_status()

        for model in ["tiny", *names]:
            send(model)  # warm-up
        n, c = args.requests, args.clients
        figures = {
            "seq_base_rps": rate(1, n, lambda i: send("tiny")),
            "seq_adapters_rps": rate(1, n, lambda i: send(names[i % len(names)])),
            "conc_base_rps": rate(c, n * 2, lambda i: send("tiny")),
            "conc_adapters_rps": rate(c, n * 2, lambda i: send(names[i % len(names)])),
        }
    out: dict[str, Any] = {**figures, "clients": c, "adapters": len(names), "requests_seq": n,
                           "requests_conc": 2 * n, "max_tokens": args.max_tokens,
                           "load_average": os.getloadavg()[0]}
    out["conc_over_seq_adapters"] = figures["conc_adapters_rps"] / figures["seq_adapters_rps"]
    out["adapter_over_base_seq"] = figures["seq_adapters_rps"] / figures["seq_base_rps"]
    out["adapter_over_base_conc"] = figures["conc_adapters_rps"] / figures["conc_base_rps"]
    print(f"throughput ({args.max_tokens} tokens/request, hidden {args.hidden_size}): one client: base "
          f"{figures['seq_base_rps']:.1f} req/s, {len(names)} adapters {figures['seq_adapters_rps']:.1f} req/s; "
          f"{c} clients: base {figures['conc_base_rps']:.1f} req/s, adapters {figures['conc_adapters_rps']:.1f} "
          f"req/s; load avg {out['load_average']:.2f}")
    print(f"  {c} clients / one client over adapters: {out['conc_over_seq_adapters']:.2f}x (target >= 3); "
          f"adapter/base: {out['adapter_over_base_seq']:.2f} one client, {out['adapter_over_base_conc']:.2f} "
          f"{c} clients (target >= 0.9)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registered", default="10,100,1000", help="adapters registered besides the new one")
    parser.add_argument("--repeats", type=int, default=10, help="attaches measured per level")
    parser.add_argument("--requests", type=int, default=40, help="requests per sequential throughput run "
                                                                 "(concurrent runs send twice as many)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4, help="adapters the throughput clients spread over")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny model width")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth")
    parser.add_argument("--file-poll-interval", type=float, default=0.05)
    parser.add_argument("--phases", default="attach,throughput")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from kubelora_local.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="kubelora-bench-attach-"))
    base = build_tiny_model(work / "base", hidden_size=args.hidden_size, num_layers=args.layers)
    phases = args.phases.split(",")
    result: dict[str, Any] = {"hidden_size": args.hidden_size, "layers": args.layers,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        if "attach" in phases:
            result["attach"] = attach_phase(args, work, base)
        if "throughput" in phases:
            result["throughput"] = throughput_phase(args, work, base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
