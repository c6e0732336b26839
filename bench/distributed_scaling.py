"""Distributed scaling on CPU: tokens/s of ``kubelora-train`` with 1 and 2 processes, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distributed_scaling.py [--rows 512] [--steps 40] [--rounds 2]

Same tiny random Llama (hidden 128, 2 layers, built locally), same long-tailed chat dataset, same LoRA (r 16,
all-linear: the API's default, left unset), same global batch of 8 rows per optimizer step, CPU, one torch thread
per process. Arms, run in alternation each round so that load from other processes hits every arm alike:

- ``1 process``: ``resources: {gpus: 0}``, batch 8;
- ``2 processes DDP``: ``resources: {gpus: 0, nodes: 2}``, batch 4 each: two ``kubelora-train`` launchers on
  this machine meeting at a c10d rendezvous on 127.0.0.1, as two pods of an Indexed Job do;
- ``2 processes FSDP``: ``resources: {gpus: 2}`` (two local CPU processes), ``strategy: fsdp``, batch 4 each.

Tokens/s is the trainer's own metric (``train_tokens / train_seconds``): real tokens of all processes
(TRL gathers the count) over ``trainer.train()``, so imports and process start are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))

from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

ARMS = ("1 process", "2 processes DDP", "2 processes FSDP")


def config(tmp: Path, arm: str, base: Path, data: Path, steps: int) -> Path:
    from kubelora.api.runtime import TrainerRunConfig

    resources, batch, strategy = {
        "1 process": ({"gpus": 0}, 8, "auto"),
        "2 processes DDP": ({"gpus": 0, "nodes": 2}, 4, "ddp"),
        "2 processes FSDP": ({"gpus": 2}, 4, "fsdp"),
    }[arm]
    out = Path(tempfile.mkdtemp(dir=tmp))
    run = TrainerRunConfig.model_validate({
        "name": "bench", "namespace": "bench", "revision": 1,
        "spec": {"baseModel": {"uri": f"file://{base}"}, "dataset": {"uri": f"file://{data}", "evalSplit": 0},
                 "output": {"uri": f"file://{out}"}, "method": "lora",
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                 "resources": resources, "distributed": {"strategy": strategy},
                 "training": {"maxSteps": steps, "batchSize": batch, "gradientAccumulationSteps": 1,
                              "learningRate": 2e-4, "saveSteps": 100000, "maxSeqLength": 1024,
                              "packing": False}}})
    path = out / "job.json"
    path.write_text(run.model_dump_json(by_alias=True))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_arm(arm: str, cfg: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "kubelora_trainer", "--config", str(cfg), "--termination-log", ""]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if arm == "2 processes DDP":
        env.update(KUBELORA_RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", KUBELORA_RDZV_ID="bench")
        procs = [subprocess.Popen(cmd, env={**env, "JOB_COMPLETION_INDEX": str(i)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for i in (0, 1)]
    else:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"{arm}: exit {p.returncode}: {out[-500:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    metrics: dict[str, float] = results[0]["metrics"]
    return {"tok_s": metrics["tokens_per_second"], "seconds": metrics["train_seconds"],
            "tokens": metrics["train_tokens"], "loss": metrics["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = build_tiny_model(tmp / "model", hidden_size=128, num_layers=2)
        data = write_chat_dataset(tmp / "chat.jsonl", n=args.rows, long_tail=True)
        got: dict[str, list[dict[str, float]]] = {a: [] for a in ARMS}
        for r in range(args.rounds):
            order = ARMS if r % 2 == 0 else tuple(reversed(ARMS))
            for arm in order:
                got[arm].append(run_arm(arm, config(tmp, arm, base, data, args.steps)))
                print(f"round {r + 1} {arm}: {got[arm][-1]}", file=sys.stderr)
    one = statistics.median(x["tok_s"] for x in got["1 process"])
    print(f"\n{args.steps} steps, global batch 8, {args.rows} rows, {os.cpu_count()} CPUs\n")
    print("| arm | tok/s (median) | per round | train s (median) | final loss | vs 1 process |")
    print("|---|---|---|---|---|---|")
    for arm in ARMS:
        runs: list[dict[str, Any]] = got[arm]
        med = statistics.median(x["tok_s"] for x in runs)
        rounds = " / ".join(f"{x['tok_s']:,.0f}" for x in runs)
        print(f"| {arm} | {med:,.0f} | {rounds} | "
              f"{statistics.median(x['seconds'] for x in runs):.2f} | {runs[-1]['loss']:.4f} | {med / one:.2f}x |")


if __name__ == "__main__":
    main()
