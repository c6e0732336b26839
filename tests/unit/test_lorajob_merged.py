"""spec.output.merged: the API shape, and the merged model the trainer reports reaching status.merged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from kubelora.api.digest import EXCLUDED_DIRS
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.merged import MERGED_DIR

from .test_lorajob_world import ADAPTER, DIGEST, LATER, SPEC, config, job, merge, pod, running_world

MERGED = {
    "uri": "pvc://adapters/bot/rev-1/merged",
    "digest": "sha256:" + "cd" * 32,
    "sizeBytes": 99999,
    "baseModel": "pvc://models/tiny",
    "adapterDigest": DIGEST,
    "dtype": "bfloat16",
}


def finished(merged: dict[str, Any]) -> dict[str, Any]:
    world = running_world()
    message = json.dumps({"ok": True, "reason": "Completed", "message": "", "adapter": ADAPTER, "merged": merged})
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=message))
    plan = world.step(LATER)
    assert plan.phase == "Succeeded"
    return plan.status


def test_merged_defaults_to_bf16_five_gigabyte_shards() -> None:
    spec = LoRAJobSpec.model_validate(merge(SPEC, {"output": {"uri": "pvc://adapters/bot", "merged": {}}}))
    assert spec.output.merged is not None
    assert (spec.output.merged.dtype, spec.output.merged.max_shard_size) == ("bfloat16", "5GB")
    assert LoRAJobSpec.model_validate(SPEC).output.merged is None


@pytest.mark.parametrize("bad", [{"dtype": "int4"}, {"maxShardSize": "lots"}], ids=["4-bit", "shard-size"])
def test_merged_refuses_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LoRAJobSpec.model_validate(merge(SPEC, {"output": {"uri": "pvc://adapters/bot", "merged": bad}}))


def test_the_merged_model_reported_reaches_status() -> None:
    assert finished(MERGED)["merged"] == MERGED


def test_a_merged_model_outside_the_output_is_not_published() -> None:
    status = finished({**MERGED, "uri": "s3://elsewhere/model"})
    assert "merged" not in status and status["adapter"] == ADAPTER


def test_the_adapter_digest_leaves_the_merged_folder_out() -> None:
    """Asking for a merged copy must not change (or break the verification of) the adapter beside it."""
    assert MERGED_DIR in EXCLUDED_DIRS


def test_a_new_revision_drops_the_previous_merged_model() -> None:
    """status.merged describes this revision: a retrain must not leave the old merged model there as if new."""
    world = running_world()
    message = json.dumps({"ok": True, "reason": "Completed", "message": "", "adapter": ADAPTER, "merged": MERGED})
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=message))
    world.step(LATER)
    assert world.status is not None and world.status["merged"] == MERGED
    world.run_config = config()
    plan = world.edit(training={"maxSteps": 30}).step(LATER)
    assert plan.status["revision"] == 2 and "merged" not in plan.status
