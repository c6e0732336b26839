"""The rest of the fine-tuning workflow (issue 16) on a tiny model: merged vs attached serving, the cost of a
merge and a combination, and DPO vs SFT steps.

- serving: one ``kubelora-cpu-engine`` process serves the base with a rank-``--rank`` adapter attached, another
  serves the merged model (``kubelora_trainer.merge``) as its base; ``--requests`` sequential greedy chat
  completions of ``--max-tokens`` tokens each, requests/s of both (and whether the texts are identical).
- merge / combine: seconds for ``merge_into_base`` + ``save_pretrained`` (float32) and for
  ``combine_adapters`` (TIES of two adapters), in-process.
- training: seconds per optimizer step of ``kubelora_trainer.train`` with objective sft (messages rows) and
  dpo (conversational preference rows) over the same ``--steps``, batch 4, and the reward margin DPO reached.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_combine_dpo.py [--hidden-size 64] [--layers 2] [--rank 16]
        [--requests 40] [--max-tokens 16] [--steps 20] [--phases serving,merge,training] [--json out.json]
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

from kubelora_server.testing import Process, free_port, make_adapter

PROMPTS = ["What colour is the sky?", "Say hello.", "Name a fruit.", "Count to three."]


def chat_texts(url: str, model: str, n: int, max_tokens: int) -> tuple[float, list[str]]:
    """Requests/s of ``n`` sequential greedy completions (after four warm-ups) and the first four texts."""
    with httpx.Client(base_url=url, timeout=120) as c:
        def send(i: int) -> str:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % 4]}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            resp = c.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            return str(resp.json()["choices"][0]["message"]["content"])

        for i in range(4):  # warm-up: the first requests of a process pay for lazy initialisation
            send(i)
        started = time.perf_counter()
        texts = [send(i) for i in range(n)]
        return n / (time.perf_counter() - started), texts[:4]


def engine(work: Path, name: str, argv: list[str]) -> tuple[Process, str]:
    port = free_port()
    proc = Process.module("kubelora_server.engine", [*argv, "--host", "127.0.0.1", "--port", str(port)],
                          work / f"{name}.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                                                     "KUBELORA_LOG_LEVEL": "WARNING"})
    return proc, f"http://127.0.0.1:{port}"


def merged_copy(base: Path, adapter: Path, dest: Path) -> float:
    from kubelora_trainer.merge import merge_into_base
    from kubelora_trainer.modelload import ModelRef

    started = time.perf_counter()
    model = merge_into_base(adapter, ModelRef(f"file://{base}", str(base)), "float32")
    model.save_pretrained(str(dest))
    seconds = time.perf_counter() - started
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copy(base / name, dest / name)
    return seconds


def serving_phase(args: argparse.Namespace, work: Path, base: Path) -> dict[str, Any]:
    adapter = make_adapter(base, work / "adapter", rank=args.rank, seed=1, scale=3.0)
    merge_seconds = merged_copy(base, adapter, work / "merged")
    attached, a_url = engine(work, "attached", ["--model", f"file://{base}", "--served-model-name", "tiny",
                                                "--enable-lora", "--max-lora-rank", "64"])
    with attached:
        attached.wait_healthy(a_url + "/health")
        httpx.post(a_url + "/v1/load_lora_adapter", json={"lora_name": "bot", "lora_path": str(adapter)},
                   timeout=60).raise_for_status()
        adapter_rps, adapter_texts = chat_texts(a_url, "bot", args.requests, args.max_tokens)
        base_rps, _ = chat_texts(a_url, "tiny", args.requests, args.max_tokens)
    merged, m_url = engine(work, "merged", ["--model", f"file://{work / 'merged'}", "--served-model-name", "bot"])
    with merged:
        merged.wait_healthy(m_url + "/health")
        merged_rps, merged_texts = chat_texts(m_url, "bot", args.requests, args.max_tokens)
    out = {"base_rps": base_rps, "adapter_rps": adapter_rps, "merged_rps": merged_rps,
           "merged_over_adapter": merged_rps / adapter_rps, "same_text": merged_texts == adapter_texts,
           "merge_seconds": merge_seconds, "load_average": os.getloadavg()[0]}
    print(f"serving ({args.requests} x {args.max_tokens} tokens, one client): base {base_rps:.1f} req/s, base + "
          f"adapter {adapter_rps:.1f} req/s, merged {merged_rps:.1f} req/s (merged/adapter "
          f"{out['merged_over_adapter']:.2f}x); same greedy text: {out['same_text']}; merge + save "
          f"{merge_seconds:.2f} s; load avg {out['load_average']:.2f}")
    return out


def combine_phase(args: argparse.Namespace, work: Path, base: Path) -> dict[str, Any]:
    from kubelora.api.runtime import TrainerRunConfig
    from kubelora_trainer.combine import combine_adapters, fetch_all
    from kubelora_trainer.modelload import ModelRef

    paths = [make_adapter(base, work / f"in-{i}", rank=args.rank, seed=10 + i) for i in range(2)]
    run = TrainerRunConfig.model_validate({
        "name": "mix", "namespace": "bench", "revision": 1,
        "combineInputs": [{"uri": f"file://{p}", "weight": 0.5} for p in paths],
        "spec": {"baseModel": {"uri": f"file://{base}"}, "output": {"uri": f"file://{work}/mix"},
                 "combine": {"method": "ties", "inputs": [{"uri": f"file://{p}"} for p in paths]}}})
    started = time.perf_counter()
    inputs = fetch_all(run, work / "fetch")
    combine_adapters(run, inputs, ModelRef(f"file://{base}", str(base)))
    seconds = time.perf_counter() - started
    print(f"combine: TIES of two rank-{args.rank} adapters (fetch, verify, load base, combine) {seconds:.2f} s")
    return {"ties_seconds": seconds}


def training_phase(args: argparse.Namespace, work: Path, base: Path) -> dict[str, Any]:
    from kubelora.api.runtime import TrainerRunConfig
    from kubelora_local.tinymodel import write_chat_dataset
    from kubelora_trainer.train import Hooks, train

    prefs = work / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": PROMPTS[i % 4]}],
        "chosen": [{"role": "assistant", "content": "A clear, friendly answer."}],
        "rejected": [{"role": "assistant", "content": "No."}]}) + "\n" for i in range(64)))
    chat = write_chat_dataset(work / "chat.jsonl", n=64)
    out: dict[str, Any] = {}
    for objective, data in (("sft", chat), ("dpo", prefs)):
        run = TrainerRunConfig.model_validate({
            "name": objective, "namespace": "bench", "revision": 1,
            "spec": {"baseModel": {"uri": f"file://{base}"}, "dataset": {"uri": f"file://{data}", "evalSplit": 0},
                     "output": {"uri": f"file://{work}/out-{objective}"}, "method": "lora", "objective": objective,
                     "lora": {"r": args.rank, "alpha": 2 * args.rank},
                     "training": {"maxSteps": args.steps, "learningRate": 5e-3, "batchSize": 4,
                                  "gradientAccumulationSteps": 1, "scheduler": "constant", "warmupRatio": 0,
                                  "saveSteps": args.steps, "maxSeqLength": 256}}})
        m = train(run, Hooks(sinks=[], progress_interval=0)).metrics
        out[objective] = {"s_per_step": m["train_seconds"] / m["global_step"], **{
            k: m[k] for k in ("first_reward_margin", "reward_margin", "reward_accuracy") if k in m}}
    print(f"training ({args.steps} steps, batch 4): sft {out['sft']['s_per_step']:.3f} s/step, dpo "
          f"{out['dpo']['s_per_step']:.3f} s/step ({out['dpo']['s_per_step'] / out['sft']['s_per_step']:.2f}x: "
          f"chosen and rejected, policy and reference passes); dpo reward margin "
          f"{out['dpo']['first_reward_margin']:.3f} -> {out['dpo']['reward_margin']:.3f}, accuracy "
          f"{out['dpo']['reward_accuracy']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--phases", default="serving,merge,training")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from kubelora_local.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="kubelora-bench-issue16-"))
    base = build_tiny_model(work / "base", hidden_size=args.hidden_size, num_layers=args.layers)
    phases = args.phases.split(",")
    result: dict[str, Any] = {"hidden_size": args.hidden_size, "layers": args.layers, "rank": args.rank}
    try:
        if "serving" in phases:
            result["serving"] = serving_phase(args, work, base)
        if "merge" in phases:
            result["combine"] = combine_phase(args, work, base)
        if "training" in phases:
            result["training"] = training_phase(args, work, base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
