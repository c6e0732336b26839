"""QLoRA on CUDA: ``kubelora-train`` beside the seed recipe on a random-init ~1B Llama, tokens/s and peak memory.

    bench/gpu_check.sh [--rows 4000] [--arm-timeout 190]      (on the GPU machine: installs the wheels, then this)
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --tiny      (here: the same flow on CPU, tiny model)

Model: a Llama built on the spot (no hub): hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, the tiny
byte-level tokenizer of ``kubelora_local.tinymodel`` (vocab 452), ~0.97B parameters, random init, bf16.
Data: ``--rows`` long-tailed chat rows (``write_chat_dataset``, 22-169 tokens, mean 48). Both arms train one
epoch over the same rows with the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers), learning rate
2e-4, batch 4 x 4 accumulation steps, at most 1,024 tokens a row, activation checkpointing on:

- ``ours``: ``kubelora_trainer``'s real entry point (``main``) on a ``TrainerRunConfig``: method qlora, nf4 +
  double quant + bf16 compute, ``paged_adamw_32bit``, packing (TRL's padding-free packed rows);
- ``seed``: the seed recipe as written (``BitsAndBytesConfig`` nf4 + bf16 compute, no double quant,
  ``device_map="auto"``, ``SFTConfig(bf16=True, optim="paged_adamw_32bit")`` + ``SFTTrainer``: padded batches,
  no packing), only ``num_train_epochs`` 1 instead of 3 and LoRA on all linear layers (the seed names q/k/v/o;
  all-linear is the API default, so the arms differ in batching, double quant and what the trainer adds).

Each arm runs in its own process (a clean CUDA context, so each peak is its own). Tokens/s: real (non-pad)
tokens TRL counted over ``trainer.train()`` / its seconds. Peak memory: ``torch.cuda.max_memory_allocated``
and ``max_memory_reserved`` of that process. ``--tiny`` swaps in a hidden-64 model and runs on CPU with
float32 compute (what the trainer's mapping does on a CPU), to check the flow without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in ("operator", "trainer_image", "hack"):
    sys.path.insert(0, str(ROOT / _p))

ARMS = ("ours", "seed")
FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
BATCH, ACCUM, MAX_LEN, LR = 4, 4, 1024, 2e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="hidden-64 model on CPU: checks the flow, measures nothing")
    p.add_argument("--rows", type=int, default=None, help="chat rows (default 4000; 64 with --tiny)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--arm-timeout", type=float, default=190.0, help="seconds one arm may take, load included")
    p.add_argument("--work", type=Path, default=None, help="folder for the model, data and outputs (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    # Internal: one arm in this process (the parent starts one child per arm).
    p.add_argument("--run-arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rows is None:
        a.rows = 64 if a.tiny else 4000
    unknown = set(a.arms.split(",")) - set(ARMS)
    if unknown:
        p.error(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    return a


def model_config(tiny: bool, vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                       **(TINY if tiny else FULL))


def build_model(dest: Path, tiny: bool) -> tuple[Path, int]:
    """Random-init Llama + the tiny tokenizer saved to ``dest``; returns (dest, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubelora_local.tinymodel import build_tokenizer

    tok = build_tokenizer()
    cfg = model_config(tiny, len(tok), tok)
    torch.manual_seed(0)
    # On the GPU the ~1B random init takes a second instead of ~20 s of CPU normal_().
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest, params


def run_config(model: Path, data: Path, out: Path, tiny: bool) -> Any:
    from kubelora.api.runtime import TrainerRunConfig

    return TrainerRunConfig.model_validate({
        "name": "gpu-check", "namespace": "bench", "revision": 1,
        "spec": {"baseModel": {"uri": f"file://{model}"}, "dataset": {"uri": f"file://{data}", "evalSplit": 0},
                 "output": {"uri": f"file://{out}"}, "method": "qlora",
                 "quantization": {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"},
                 "lora": LORA, "resources": {"gpus": 0 if tiny else 1},
                 "training": {"epochs": 1, "batchSize": BATCH, "gradientAccumulationSteps": ACCUM,
                              "learningRate": LR, "maxSeqLength": MAX_LEN, "packing": True,
                              "gradientCheckpointing": True, "optimizer": "paged_adamw_32bit",
                              "saveSteps": 100000}}})


def arm_ours(model: Path, data: Path, work: Path, tiny: bool) -> dict[str, Any]:
    """The trainer's own entry point, exactly as the container runs it, on a config file."""
    from kubelora_trainer.__main__ import main

    out = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    cfg = out / "job.json"
    cfg.write_text(run_config(model, data, out / "published", tiny).model_dump_json(by_alias=True))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--config", str(cfg), "--termination-log", ""])
    result = json.loads(buf.getvalue().strip().splitlines()[-1])
    if code != 0 or not result.get("ok"):
        raise SystemExit(f"ours: exit {code}: {result.get('reason')}: {result.get('message', '')[:1500]}")
    m = result["metrics"]
    return {"tokens": m["train_tokens"], "seconds": m["train_seconds"], "tok_per_s": m["tokens_per_second"],
            "loss": m.get("final_loss")}


def arm_seed(model: Path, data: Path, work: Path, tiny: bool) -> dict[str, Any]:
    """The seed recipe (shared/seeds 000, "A complete training example") on the same model and rows."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    compute = torch.float32 if tiny else torch.bfloat16
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    base = AutoModelForCausalLM.from_pretrained(str(model), quantization_config=bnb_config,
                                                device_map="cpu" if tiny else "auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    lora_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                             lora_dropout=LORA["dropout"], bias="none", task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(output_dir=tempfile.mkdtemp(prefix="seed-", dir=work), num_train_epochs=1,
                       per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, learning_rate=LR,
                       bf16=not tiny, use_cpu=tiny, logging_steps=10, optim="paged_adamw_32bit",
                       max_length=MAX_LEN, report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = SFTTrainer(model=base, train_dataset=dataset, peft_config=lora_config, args=config,
                         processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = float(trainer._total_train_tokens)
    # The last logged step's loss, else (fewer steps than logging_steps) the run's mean train_loss.
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    losses = losses or [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1),
            "loss": losses[-1] if losses else None}


def child(a: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fn = arm_ours if a.run_arm == "ours" else arm_seed
    got = fn(a.model, a.data, a.result.parent, a.tiny)
    if cuda:
        got["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        got["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    a.result.write_text(json.dumps(got))
    return 0


def run_child(arm: str, a: argparse.Namespace, model: Path, data: Path, work: Path) -> dict[str, Any]:
    result = work / f"{arm}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-arm", arm, "--model", str(model), "--data",
           str(data), "--result", str(result), *(["--tiny"] if a.tiny else [])]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=a.arm_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"over --arm-timeout {a.arm_timeout:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}", "wall_s": wall}
    return {**json.loads(result.read_text()), "wall_s": wall}


def fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.run_arm:
        return child(a)
    import torch

    from kubelora_local.tinymodel import write_chat_dataset

    if not a.tiny and not torch.cuda.is_available():
        print("no CUDA device visible: run with --tiny for the CPU flow check", file=sys.stderr)
        return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="kubelora-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, params = build_model(work / "model", a.tiny)
    data = write_chat_dataset(work / "chat.jsonl", n=a.rows, seed=1, long_tail=True)
    device = "cpu (--tiny)" if a.tiny else torch.cuda.get_device_name(0)
    print(f"model: random-init Llama, {params / 1e6:,.1f}M parameters, built in {time.perf_counter() - t0:.0f} s; "
          f"data: {a.rows} chat rows; device: {device}; torch {torch.__version__}", flush=True)
    got: dict[str, dict[str, Any]] = {}
    for arm in a.arms.split(","):
        got[arm] = run_child(arm, a, model, data, work)
        print(f"{arm}: {json.dumps(got[arm])}", flush=True)
    print("\n| arm | tok/s | tokens | train s | peak allocated GiB | peak reserved GiB | last loss | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, r in got.items():
        if "error" in r:
            print(f"| {arm} | failed: {r['error'].splitlines()[-1][:200]} | | | | | | |")
            continue
        print(f"| {arm} | {r['tok_per_s']:,.0f} | {r['tokens']:,.0f} | {r['seconds']:.1f} | "
              f"{fmt(r.get('peak_allocated_gib'), '.2f')} | {fmt(r.get('peak_reserved_gib'), '.2f')} | "
              f"{fmt(r.get('loss'), '.4f')} | {r['wall_s']:.0f} |")
    ours, seed = got.get("ours", {}), got.get("seed", {})
    if "tok_per_s" in ours and "tok_per_s" in seed:
        line = f"\nours / seed: tokens/s {ours['tok_per_s'] / seed['tok_per_s']:.2f}x"
        if ours.get("peak_allocated_gib") and seed.get("peak_allocated_gib"):
            line += f", peak allocated memory {ours['peak_allocated_gib'] / seed['peak_allocated_gib']:.2f}x"
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"params": params, "rows": a.rows, "device": device, "arms": got}, indent=2))
    return 0 if all("error" not in r for r in got.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
