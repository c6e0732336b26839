"""Trainer throughput: this trainer's batching vs the seed recipe's plain SFTTrainer, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trainer_throughput.py [--rows 1024] [--rounds 3]

Same tiny random Llama (hidden 128, 2 layers, built locally), same long-tailed chat dataset, same LoRA
(r 16, all-linear), same hyperparameters, one epoch, CPU, one thread. Arms, run in alternation each round
so that load from other processes hits every arm alike:

- ``seed``: the seed recipe (``SFTConfig(... optim="paged_adamw_32bit")`` + ``SFTTrainer``: padded batches in
  random order, no packing, SFTConfig's default activation checkpointing), with only what it needs to run
  on a CPU (``use_cpu=True``, ``bf16=False``).
- ``seed-matched``: the seed recipe with this trainer's optimizer and checkpointing choices, so that
  ``ours / seed-matched`` isolates the batching.
- ``ours``: ``kubelora_trainer.train.build_trainer`` exactly as ``kubelora-train`` builds it from the spec.
- ``ours-padding-free``: the same with ``KUBELORA_CPU_BATCHING=padding_free`` (the alternative CPU strategy).

Throughput is real (non-pad) tokens trained per second of ``trainer.train()``: TRL counts attention-mask
ones for padded batches and row lengths for padding-free ones, so pad tokens never count.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubelora_local.tinymodel import build_tiny_model, sample_rows

ARMS = ("seed", "seed-matched", "ours", "ours-padding-free")


def make_run(base: Path, out: Path, batch: int) -> Any:
    from kubelora.api.runtime import TrainerRunConfig

    return TrainerRunConfig.model_validate({
        "name": "bench", "namespace": "bench", "revision": 1,
        "spec": {"baseModel": {"uri": f"file://{base}"}, "dataset": {"uri": "file:///unused.jsonl", "evalSplit": 0},
                 "output": {"uri": f"file://{out}"}, "method": "lora",
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
                 "training": {"epochs": 1, "batchSize": batch, "gradientAccumulationSteps": 1,
                              "learningRate": 2e-4, "saveSteps": 100000, "maxSeqLength": 1024}}})


def run_arm(arm: str, base: Path, rows: list[dict[str, Any]], batch: int, workdir: Path) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from kubelora_trainer import mapping
    from kubelora_trainer.data import DatasetSplits, Record
    from kubelora_trainer.modelload import detect_device, load_tokenizer, resolve_base_model
    from kubelora_trainer.train import build_trainer
    from kubelora_trainer.validate import plan_loss

    out = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=workdir))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if arm.startswith("ours"):
        os.environ[mapping.CPU_BATCHING_ENV] = "padding_free" if arm == "ours-padding-free" else "grouped"
        run = make_run(base, out, batch)
        tok = load_tokenizer(resolve_base_model(str(run.spec.base_model.uri)))
        splits = DatasetSplits("messages", [Record(r, "bench", f"row {i}") for i, r in enumerate(rows)])
        trainer = build_trainer(run, model=model, tokenizer=tok, splits=splits, loss=plan_loss(tok, "messages"),
                                device=detect_device(), output_dir=str(out))
        os.environ.pop(mapping.CPU_BATCHING_ENV, None)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none",
                          task_type="CAUSAL_LM")
        extra: dict[str, Any] = {"optim": "paged_adamw_32bit"}  # seed recipe; checkpointing: SFTConfig default
        if arm == "seed-matched":
            extra = {"optim": "adamw_torch_fused", "activation_checkpointing": False}
        args = SFTConfig(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=1, learning_rate=2e-4, logging_steps=10, seed=42,
                         use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, save_steps=100000,
                         **extra)
        trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), peft_config=lora, args=args,
                             processing_class=tok)
        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = float(trainer._total_train_tokens)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds, "steps": trainer.state.global_step,
            "loss": float(trainer.state.log_history[-1].get("train_loss", float("nan")))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--json", help="also write the raw figures here")
    a = p.parse_args()

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    import warnings

    warnings.filterwarnings("ignore")

    arms = a.arms.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="kubelora-bench-"))
    base = build_tiny_model(workdir / "tiny", hidden_size=a.hidden)
    rows = sample_rows(a.rows, seed=1, long_tail=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    print(f"model: tiny llama hidden {a.hidden}, 2 layers; data: {len(rows)} chat rows, tokens/row min "
          f"{min(lengths)} median {statistics.median(lengths):.0f} mean {statistics.mean(lengths):.1f} max "
          f"{max(lengths)}; batch {a.batch_size}; 1 epoch; torch threads {torch.get_num_threads()}", flush=True)

    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for rnd in range(a.rounds):
        order = arms if rnd % 2 == 0 else list(reversed(arms))
        for arm in order:
            r = run_arm(arm, base, rows, a.batch_size, workdir)
            results[arm].append(r)
            print(f"round {rnd + 1} {arm:18s} {r['tok_per_s']:8.0f} tok/s  {r['seconds']:6.2f} s  "
                  f"{int(r['steps'])} steps  {int(r['tokens'])} tokens  train_loss {r['loss']:.4f}", flush=True)

    med = {arm: statistics.median(x["tok_per_s"] for x in rs) for arm, rs in results.items()}
    print("\nmedian tokens/s:")
    for arm in arms:
        print(f"  {arm:18s} {med[arm]:8.0f}")

    def ratio(x: str, y: str) -> None:
        if x in med and y in med:
            per_round = [rx["tok_per_s"] / ry["tok_per_s"] for rx, ry in zip(results[x], results[y], strict=True)]
            print(f"  {x} / {y}: {med[x] / med[y]:.2f}x (per round: {', '.join(f'{v:.2f}' for v in per_round)})")

    print("ratios:")
    ratio("ours", "seed")
    ratio("ours", "seed-matched")
    ratio("ours-padding-free", "seed-matched")
    ratio("seed-matched", "seed")
    if a.json:
        Path(a.json).write_text(json.dumps({"median": med, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
