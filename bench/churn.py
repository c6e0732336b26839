"""Leak check under churn: memory, file descriptors and cache files of the real CPU engine and agent (issue 14).

Two phases against local processes (a tiny Llama, rank-8 adapters, the engine with the LoRA guard):

- ``engine``: ``--cycles`` load/unload pairs straight on the engine's runtime LoRA API (the calls the agent
  makes), rotating over ``--pool`` adapter directories under fresh names, one chat completion every 50
  cycles so the loaded weights are really used;
- ``agent``: ``--changes`` desired-set changes through the agent (what an AdapterDeployment edit becomes: the
  operator rewrites the ConfigMap; here ``--desired-file``), each swapping one of the 4 served adapters for
  one of a pool of ``--versions`` published versions (new digest, so the agent fetches, verifies, probes and
  loads it in place), waiting each time until the agent reports the new set Loaded.

RSS, open fds and threads of both processes and the files in the agent's cache are sampled after a warm-up
(``before``), at each quarter, and at the end (``after``); growth that keeps climbing across the quarters is a
leak, a step after warm-up that stays flat is not.

    OMP_NUM_THREADS=1 .venv/bin/python bench/churn.py [--cycles 1000] [--changes 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status}
    return {"rss_kib": int(fields["VmRSS"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"][0])}


def cache_files(cache: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(cache)) if cache.exists() else 0


def wait(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(what)


class Stack:
    def __init__(self, root: Path, pool: int, versions: int) -> None:
        from kubelora_local.tinymodel import build_tiny_model

        self.root = root
        self.base = build_tiny_model(root / "base")
        self.adapters = [make_adapter(self.base, root / "pool" / f"p{i}", rank=8, seed=i) for i in range(pool)]
        self.versions = [make_adapter(self.base, root / "versions" / f"v{i}", rank=8, seed=100 + i)
                         for i in range(versions)]
        self.cache = root / "cache"
        self.desired = root / "adapters.json"
        port, agent_port = free_port(), free_port()
        self.engine_url, self.agent_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agent_port}"
        self.engine = Process.module("kubelora_server.engine", [
            "--model", f"file://{self.base}", "--served-model-name", "tiny", "--host", "127.0.0.1",
            "--port", str(port), "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "8",
            "--max-lora-rank", "16", "--max-model-len", "128",
            "--middleware", "kubelora_server.lora_guard.PodLocalLoRAUpdates",
        ], root / "engine.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
        self.agent = Process.module("kubelora_server.agent", [
            "--desired-file", str(self.desired), "--engine-url", self.engine_url, "--cache-dir", str(self.cache),
            "--host", "127.0.0.1", "--port", str(agent_port), "--resync-interval", "0.5",
            "--file-poll-interval", "0.02", "--pod-name", "bench",
        ], root / "agent.log")

    def write_desired(self, adapters: dict[str, Path]) -> None:
        desired = DesiredAdapters(base_model=f"file://{self.base}", served_name="tiny", max_lora_rank=16,
                                  max_loras=4, max_cpu_loras=8,
                                  adapters=[DesiredAdapter(name=n, uri=f"file://{p}") for n, p in adapters.items()])
        tmp = self.desired.with_suffix(".tmp")
        tmp.write_text(json.dumps(desired.wire()))
        tmp.replace(self.desired)

    def sample(self, label: str) -> dict[str, Any]:
        assert self.engine.proc is not None and self.agent.proc is not None
        return {"at": label, "engine": proc_stats(self.engine.proc.pid), "agent": proc_stats(self.agent.proc.pid),
                "cache_files": cache_files(self.cache)}


def engine_churn(stack: Stack, cycles: int) -> list[dict[str, Any]]:
    samples = []
    with httpx.Client(base_url=stack.engine_url, timeout=60) as http:
        def cycle(i: int) -> None:
            name = f"churn-{i}"
            path = stack.adapters[i % len(stack.adapters)]
            resp = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            resp.raise_for_status()
            if i % 50 == 0:
                chat = http.post("/v1/chat/completions", json={"model": name, "messages": PROMPT, "max_tokens": 4,
                                                               "temperature": 0, "ignore_eos": True})
                chat.raise_for_status()
            http.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()

        for i in range(20):  # warm-up: first loads allocate peft's modules, the allocator's arenas grow
            cycle(-1 - i)
        samples.append(stack.sample("before"))
        started = time.monotonic()
        for i in range(cycles):
            cycle(i)
            if (i + 1) % (cycles // 4) == 0:
                samples.append(stack.sample(f"{i + 1} cycles"))
        samples[-1]["seconds"] = round(time.monotonic() - started, 1)
        served = [m["id"] for m in http.get("/v1/models").json()["data"]]
        samples[-1]["engine_models_after"] = served
    return samples


def agent_churn(stack: Stack, changes: int) -> list[dict[str, Any]]:
    names = ["support", "legal", "sales", "ops"]
    current = {n: stack.versions[i] for i, n in enumerate(names)}

    def settled() -> bool:
        report = httpx.get(stack.agent_url + "/adapters", timeout=5).json()
        states = {a["name"]: (a["state"], a.get("digest")) for a in report["adapters"]}
        if set(states) != set(current) or any(s != "Loaded" for s, _ in states.values()):
            return False
        roots = {m["id"]: m["root"] for m in httpx.get(stack.engine_url + "/v1/models", timeout=5).json()["data"]
                 if m.get("parent")}
        return set(roots) == set(current) and all(
            Path(roots[n]).name.split("-")[-1] in digest_of(current[n]) for n in current)

    stack.write_desired(current)
    wait("the first desired set", settled, 120)
    for i in range(8):  # warm-up
        current[names[i % 4]] = stack.versions[(4 + i) % len(stack.versions)]
        stack.write_desired(current)
        wait(f"warm-up change {i}", settled)
    samples = [stack.sample("before")]
    started = time.monotonic()
    rotation = iter(range(10**9))
    for i in range(changes):
        slot = names[i % 4]
        while True:  # the next version no other name serves right now
            candidate = stack.versions[next(rotation) % len(stack.versions)]
            if candidate not in current.values():
                break
        current[slot] = candidate
        stack.write_desired(current)
        wait(f"change {i}", settled)
        if (i + 1) % (changes // 4) == 0:
            samples.append(stack.sample(f"{i + 1} changes"))
    samples[-1]["seconds"] = round(time.monotonic() - started, 1)
    return samples


def digest_of(adapter: Path) -> str:
    return str(json.loads((adapter / "kubelora-manifest.json").read_text())["digest"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--pool", type=int, default=20, help="adapter directories the engine cycles over")
    p.add_argument("--versions", type=int, default=24, help="published versions the desired set rotates over")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kubelora-churn-"))
    stack = Stack(root, args.pool, args.versions)
    result: dict[str, Any] = {}
    try:
        stack.engine.start()
        stack.engine.wait_healthy(stack.engine_url + "/health")
        stack.agent.start()
        stack.agent.wait_healthy(stack.agent_url + "/healthz")
        result["engine"] = engine_churn(stack, args.cycles)
        result["agent"] = agent_churn(stack, args.changes)
    finally:
        stack.agent.stop()
        stack.engine.stop()
    for phase, samples in result.items():
        print(f"\n{phase} phase")
        print(f"{'at':>14} {'engine RSS MiB':>15} {'fds':>5} {'thr':>4} {'agent RSS MiB':>14} {'fds':>5} {'thr':>4} "
              f"{'cache files':>12}")
        for s in samples:
            e, a = s["engine"], s["agent"]
            print(f"{s['at']:>14} {e['rss_kib'] / 1024:>15.1f} {e['fds']:>5} {e['threads']:>4} "
                  f"{a['rss_kib'] / 1024:>14.1f} {a['fds']:>5} {a['threads']:>4} {s['cache_files']:>12}")
        print(f"took {samples[-1]['seconds']} s")
        if "engine_models_after" in samples[-1]:
            print(f"engine serves after: {samples[-1]['engine_models_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
