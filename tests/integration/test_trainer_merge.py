"""spec.output.merged for real on a tiny model (CPU): the merged model generates exactly what base + adapter
generates (greedy), in transformers and in the CPU engine serving it as its base, and its digest verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.digest import DigestMismatchError
from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

from .test_cpu_engine import InProcessEngine
from .test_trainer import make_run

pytestmark = pytest.mark.integration

PROMPTS = ["What colour is the sky?", "Say hello.", "Name a fruit."]
NEW_TOKENS = 12


def merged_run(tmp_path: Path, base: Path, method: str, dtype: str, steps: int) -> TrainerRunConfig:
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=64)
    wire = make_run(tmp_path, base, f"file://{data}", method=method, maxSteps=steps).model_dump(by_alias=True)
    wire["spec"]["output"]["merged"] = {"dtype": dtype, "maxShardSize": "100KB"}  # several shards, even tiny
    return TrainerRunConfig.model_validate(wire)


def greedy(model: Any, tokenizer: Any) -> list[list[int]]:
    import torch

    out = []
    for prompt in PROMPTS:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def lora_merged(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from kubelora_trainer.progress import RecordingSink
    from kubelora_trainer.train import Hooks, train

    tmp = tmp_path_factory.mktemp("merge")
    run = merged_run(tmp, tiny_llama, "lora", "float32", steps=30)
    return train(run, Hooks(sinks=[RecordingSink()], progress_interval=0)), tmp


def test_merged_model_generates_exactly_what_base_plus_adapter_generates(
        tiny_llama: Path, lora_merged: tuple[Any, Path]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubelora_trainer.merge import verify_merged_dir
    from kubelora_trainer.publish import verify_adapter_dir

    result, tmp = lora_merged
    assert result.ok and result.adapter is not None and result.merged is not None
    rev = tmp / "out" / "rev-1"
    merged_dir = rev / "merged"
    assert result.merged.uri == f"file://{tmp}/out/rev-1/merged"
    assert result.merged.adapter_digest == result.adapter.digest and result.merged.dtype == "float32"
    manifest = verify_merged_dir(merged_dir)
    assert manifest.digest == result.merged.digest and manifest.kind == "merged-model"
    assert verify_adapter_dir(rev).digest == result.adapter.digest, "merged/ must stay outside the adapter's digest"
    shards = sorted(p.name for p in merged_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file(), shards
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in merged_dir.iterdir()}
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    tok = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base_only = greedy(base, tok)
    with_adapter = greedy(PeftModel.from_pretrained(base, str(rev)).eval(), tok)
    merged = greedy(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), tok)
    assert merged == with_adapter
    assert merged != base_only, "the adapter must change the output, or the comparison proves nothing"


def test_merged_digest_catches_a_changed_shard(lora_merged: tuple[Any, Path], tmp_path: Path) -> None:
    import shutil

    from kubelora_trainer.merge import verify_merged_dir

    _, tmp = lora_merged
    copy = tmp_path / "merged"
    shutil.copytree(tmp / "out" / "rev-1" / "merged", copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match=shard.name):
        verify_merged_dir(copy)


def test_a_retried_pod_reuses_the_merged_model(lora_merged: tuple[Any, Path], tiny_llama: Path) -> None:
    from kubelora_trainer.merge import existing_merged

    result, tmp = lora_merged
    run = merged_run(tmp, tiny_llama, "lora", "float32", steps=30)
    again = existing_merged(run, result.adapter.digest)
    assert again == result.merged
    assert existing_merged(run, "sha256:" + "00" * 32) is None, "a merge of another adapter is not reused"


def test_cpu_engine_serves_the_merged_model_as_its_base(lora_merged: tuple[Any, Path], tiny_llama: Path) -> None:
    """The same greedy text from the merged base as from the original base with the adapter attached."""
    import httpx

    from kubelora.api.adapterdeployment import AdapterDeploymentSpec
    from kubelora.resources.serving_engine import cpu_engine_command

    _, tmp = lora_merged
    spec = AdapterDeploymentSpec.model_validate({"baseModel": {"uri": "pvc://adapters/bot/rev-1/merged",
                                                               "servedName": "bot-merged"}, "engine": "cpu"})
    command = cpu_engine_command(spec)
    assert command[command.index("--model") + 1] == "/mnt/pvc/adapters/bot/rev-1/merged"

    def texts(argv: list[str], model: str, adapter: Path | None = None) -> list[str]:
        with InProcessEngine([*argv, "--max-model-len", "128"]) as eng, httpx.Client(base_url=eng.url,
                                                                                       timeout=60) as c:
            if adapter is not None:
                loaded = c.post("/v1/load_lora_adapter", json={"lora_name": model, "lora_path": str(adapter)})
                assert loaded.status_code == 200, loaded.text
            out = []
            for prompt in PROMPTS:
                body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
                resp = c.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                out.append(resp.json()["choices"][0]["message"]["content"])
            return out

    rev = tmp / "out" / "rev-1"
    merged = texts(["--model", f"file://{rev}/merged", "--served-model-name", "bot-merged"], "bot-merged")
    attached = texts(["--model", f"file://{tiny_llama}", "--served-model-name", "tiny", "--enable-lora",
                      "--max-lora-rank", "16"], "bot", adapter=rev)
    assert merged == attached


def test_qlora_merges_into_a_16_bit_base_never_into_4_bit(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from kubelora_trainer.merge import verify_merged_dir
    from kubelora_trainer.progress import RecordingSink
    from kubelora_trainer.train import Hooks, train

    result = train(merged_run(tmp_path, tiny_llama, "qlora", "bfloat16", steps=4),
                   Hooks(sinks=[RecordingSink()], progress_interval=0))
    assert result.ok and result.merged is not None and result.merged.dtype == "bfloat16"
    assert result.metrics["base_linear4bit_layers"] > 0, "the run itself trained on a 4-bit base"
    merged_dir = tmp_path / "out" / "rev-1" / "merged"
    verify_merged_dir(merged_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    dtypes = set()
    for shard in merged_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            dtypes |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}, dtypes
    assert not any(MANIFEST_FILE in str(p) for p in merged_dir.glob("*.safetensors"))
