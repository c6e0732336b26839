"""spec.combine for real (tiny Llama, CPU): TIES and DARE combinations of two adapters publish a standard adapter
whose manifest lists its inputs' digests, that loads in peft and in the CPU engine; bad inputs fail pre-flight."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig

from .test_cpu_engine import InProcessEngine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubelora_server.testing import make_adapter

    root = tmp_path_factory.mktemp("inputs")
    return {
        "a": make_adapter(tiny_llama, root / "a", rank=8, seed=1, scale=3.0),
        "b": make_adapter(tiny_llama, root / "b", rank=8, seed=2, scale=3.0),
        "wide": make_adapter(tiny_llama, root / "wide", rank=16, seed=3, scale=3.0),
    }


def run_config(tmp_path: Path, base: Path, paths: list[Path], method: str, digests: list[str | None] | None = None,
               weights: tuple[float, ...] = (0.6, 0.4)) -> TrainerRunConfig:
    digests = digests or [None] * len(paths)
    combine = {"method": method, "density": 0.5,
               "inputs": [{"uri": f"file://{p}", "weight": w} for p, w in zip(paths, weights, strict=True)]}
    resolved = [{"uri": f"file://{p}", "weight": w, **({"digest": d} if d else {})}
                for p, w, d in zip(paths, weights, digests, strict=True)]
    return TrainerRunConfig.model_validate({
        "name": "mix", "namespace": "team", "revision": 1, "combineInputs": resolved,
        "spec": {"baseModel": {"uri": f"file://{base}"}, "output": {"uri": f"file://{tmp_path}/out"},
                 "combine": combine, "training": {"seed": 7}},
    })


def digest_of_dir(path: Path) -> str:
    return str(json.loads((path / MANIFEST_FILE).read_text())["digest"])


def greedy(model: Any, tok: Any) -> list[int]:
    import torch

    enc = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    return list(out[0, enc["input_ids"].shape[1]:].tolist())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_combination_publishes_an_adapter_that_loads_in_peft_and_the_cpu_engine(
        method: str, tiny_llama: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubelora_trainer.combine import combine, validate_only
    from kubelora_trainer.publish import verify_adapter_dir

    paths = [inputs["a"], inputs["b"]]
    run = run_config(tmp_path, tiny_llama, paths, method, digests=[digest_of_dir(p) for p in paths])
    assert validate_only(run).ok
    result = combine(run)
    assert result.ok and result.adapter is not None
    rev = tmp_path / "out" / "rev-1"
    manifest = verify_adapter_dir(rev)
    assert manifest.digest == result.adapter.digest and manifest.method == "combine"
    assert manifest.combine_method == method
    assert [(i.uri, i.digest, i.weight) for i in manifest.inputs] == [
        (f"file://{p}", digest_of_dir(p), w) for p, w in zip(paths, (0.6, 0.4), strict=True)]
    config = json.loads((rev / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert "combined by" in (rev / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    plain = greedy(base, tok)
    combined = PeftModel.from_pretrained(base, str(rev)).eval()
    assert greedy(combined, tok) != plain, "the combined adapter must change the output"

    with InProcessEngine(["--model", f"file://{tiny_llama}", "--served-model-name", "tiny", "--enable-lora",
                          "--max-lora-rank", "16", "--max-model-len", "128"]) as eng, \
            httpx.Client(base_url=eng.url, timeout=60) as c:
        loaded = c.post("/v1/load_lora_adapter", json={"lora_name": "mix", "lora_path": str(rev)})
        assert loaded.status_code == 200, loaded.text
        body = {"model": "mix", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0}
        answer = c.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text


def test_dare_is_reproducible_with_the_seed(tiny_llama: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    from kubelora_trainer.combine import combine

    paths = [inputs["a"], inputs["b"]]
    first = combine(run_config(tmp_path / "one", tiny_llama, paths, "dare_linear"))
    second = combine(run_config(tmp_path / "two", tiny_llama, paths, "dare_linear"))
    assert first.adapter is not None and second.adapter is not None
    one = (tmp_path / "one" / "out" / "rev-1" / "adapter_model.safetensors").read_bytes()
    two = (tmp_path / "two" / "out" / "rev-1" / "adapter_model.safetensors").read_bytes()
    assert one == two


def test_cat_combines_different_ranks(tiny_llama: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    from kubelora_trainer.combine import combine

    result = combine(run_config(tmp_path, tiny_llama, [inputs["a"], inputs["wide"]], "cat"))
    assert result.ok and result.adapter is not None and result.adapter.rank == 24


@pytest.mark.parametrize("case", ["rank", "base", "digest"])
def test_bad_inputs_fail_preflight_with_a_clear_error(case: str, tiny_llama: Path, tiny_qwen2: Path,
                                                      inputs: dict[str, Path], tmp_path: Path) -> None:
    from kubelora_server.testing import make_adapter
    from kubelora_trainer.combine import validate_only
    from kubelora_trainer.errors import InvalidSpecError

    paths, digests, words = [inputs["a"], inputs["b"]], None, ""
    if case == "rank":
        paths, words = [inputs["a"], inputs["wide"]], "ranks differ (8, 16)"
    elif case == "base":
        paths = [inputs["a"], make_adapter(tiny_qwen2, tmp_path / "qwen", rank=8, targets=("q_proj", "v_proj"))]
        words = f"input 2 (file://{tmp_path}/qwen) was trained on {tiny_qwen2}, not spec.baseModel.uri"
    else:
        digests, words = ["sha256:" + "0" * 64, None], "is pinned: the adapter changed"
    with pytest.raises(InvalidSpecError) as info:
        validate_only(run_config(tmp_path, tiny_llama, paths, "ties", digests=digests))
    assert words in info.value.message
