"""objective dpo: the API shape and the DPO numbers a run keeps (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubelora.api.lorajob import LoRAJobSpec
from kubelora_trainer.dpo import run_metrics
from kubelora_trainer.preference import check_preference_row

from .test_lorajob_world import SPEC, merge


def test_sft_is_the_default_and_dpo_has_trl_defaults() -> None:
    assert LoRAJobSpec.model_validate(SPEC).objective == "sft"
    spec = LoRAJobSpec.model_validate(merge(SPEC, {"objective": "dpo"}))
    assert (spec.dpo.beta, spec.dpo.loss_type) == (0.1, "sigmoid")


@pytest.mark.parametrize(("changes", "words"), [
    pytest.param({"objective": "orpo"}, "objective", id="unknown-objective"),
    pytest.param({"objective": "dpo", "dpo": {"beta": 0}}, "beta", id="zero-beta"),
    pytest.param({"objective": "dpo", "dpo": {"lossType": "kto"}}, "lossType", id="unknown-loss"),
])
def test_dpo_rules(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        LoRAJobSpec.model_validate(merge(SPEC, changes))


def test_dpo_needs_a_dataset_not_a_combination() -> None:
    body = {k: v for k, v in SPEC.items() if k != "dataset"}
    body.update(objective="dpo", combine={"inputs": [{"uri": "pvc://a/x"}, {"uri": "pvc://a/y"}]})
    with pytest.raises(ValidationError, match="objective dpo trains on a preference dataset"):
        LoRAJobSpec.model_validate(body)


def test_run_metrics_keep_first_and_last_margin_and_the_last_eval() -> None:
    history = [{"loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
               {"eval_loss": 0.6, "eval_rewards/margins": 0.2},
               {"loss": 0.4, "rewards/margins": 0.9, "rewards/accuracies": 1.0, "rewards/chosen": 0.5}]
    assert run_metrics(history) == {"reward_margin": 0.9, "first_reward_margin": 0.0, "reward_accuracy": 1.0,
                                    "first_reward_accuracy": 0.0, "eval_reward_margin": 0.2, "reward_chosen": 0.5}


def test_an_implicit_prompt_conversation_is_accepted_as_it_is() -> None:
    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rejected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]
    assert check_preference_row({"chosen": chosen, "rejected": rejected}) == (
        {"chosen": chosen, "rejected": rejected}, None)
