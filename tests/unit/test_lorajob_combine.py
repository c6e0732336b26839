"""spec.combine: the API's rules, loraJobRef inputs resolved and pinned by the operator, the pods' mounts, and
the trainer's check that the inputs can be combined. Plain dicts and models, no torch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.runtime import TrainerRunConfig
from kubelora.reconcile.lorajob import reconcile
from kubelora.reconcile.lorajob_inputs import published_adapter
from kubelora.reconcile.lorajob_object import parse_lorajob
from kubelora.resources.lorajob_config import CONFIG_KEY
from kubelora_trainer.combine import FetchedInput, check_combinable
from kubelora_trainer.errors import InvalidSpecError

from .test_lorajob_world import DIGEST, NOW, SETTINGS, World, cond, observe

OTHER = "sha256:" + "cd" * 32
COMBINE: dict[str, Any] = {
    "baseModel": {"uri": "pvc://models/tiny"},
    "output": {"uri": "pvc://adapters/mix"},
    "resources": {"gpus": 0},
    "combine": {"method": "ties", "density": 0.4, "inputs": [
        {"loraJobRef": {"name": "math"}, "weight": 0.7},
        {"uri": "pvc://shared/style/rev-3", "digest": OTHER, "weight": 0.3},
    ]},
}


def spec(**changes: Any) -> dict[str, Any]:
    return {**COMBINE, **changes}


def test_a_combine_spec_needs_no_dataset_and_defaults_to_ties() -> None:
    parsed = LoRAJobSpec.model_validate(spec(combine={"inputs": [{"uri": "pvc://a/x"}, {"uri": "pvc://a/y"}]}))
    assert parsed.dataset is None and parsed.combine is not None
    assert (parsed.combine.method, parsed.combine.density, parsed.combine.inputs[0].weight) == ("ties", 0.5, 1.0)


@pytest.mark.parametrize(("changes", "words"), [
    pytest.param({"dataset": {"uri": "pvc://data/train.jsonl"}}, "not both", id="dataset-and-combine"),
    pytest.param({"combine": None}, "either dataset", id="neither"),
    pytest.param({"combine": {"inputs": [{"uri": "pvc://a/x"}]}}, "at least two", id="one-input"),
    pytest.param({"combine": {"inputs": [{"uri": "pvc://a/x", "loraJobRef": {"name": "j"}}, {"uri": "pvc://a/y"}]}},
                 "exactly one of loraJobRef or uri", id="both-sources"),
    pytest.param({"combine": {"inputs": [{"loraJobRef": {"name": "j"}, "digest": DIGEST}, {"uri": "pvc://a/y"}]}},
                 "digest pins a uri input", id="pinned-ref"),
    pytest.param({"combine": {"method": "svd", "inputs": [{"uri": "pvc://a/x"}, {"uri": "pvc://a/y"}]}},
                 "method", id="unknown-method"),
    pytest.param({"combine": {"density": 0, "inputs": [{"uri": "pvc://a/x"}, {"uri": "pvc://a/y"}]}},
                 "density", id="zero-density"),
])
def test_combine_rules(changes: dict[str, Any], words: str) -> None:
    body = {k: v for k, v in spec(**changes).items() if v is not None}
    with pytest.raises(ValidationError, match=words):
        LoRAJobSpec.model_validate(body)


def world() -> World:
    return World(spec=spec())


def plan_with(published: dict[str, tuple[str, str]]) -> Any:
    w = world()
    observed = observe(w.jobs, w.pods)
    observed = type(observed)(jobs=observed.jobs, pods=observed.pods, inputs=published)
    return reconcile(parse_lorajob(w.body), observed, None, SETTINGS, NOW)


def test_preflight_waits_until_every_referenced_job_has_published() -> None:
    plan = plan_with({})
    assert plan.actions == () or list(plan.actions) == []
    validated = cond(plan, "Validated")
    assert (validated["status"], validated["reason"]) == ("Unknown", "WaitingForInputs")
    assert "waiting for LoRAJob math to publish" in validated["message"]


def test_resolved_inputs_are_pinned_in_the_run_config_and_mounted() -> None:
    plan = plan_with({"math": ("pvc://adapters/math/rev-2", DIGEST)})
    creates = {a.kind: a.manifest for a in plan.actions}
    config = TrainerRunConfig.model_validate_json(creates["ConfigMap"]["data"][CONFIG_KEY])
    assert [(i.uri, i.digest, i.weight, i.source) for i in config.combine_inputs] == [
        ("pvc://adapters/math/rev-2", DIGEST, 0.7, "ml/math"), ("pvc://shared/style/rev-3", OTHER, 0.3, "")]
    pod = creates["Job"]["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {"models", "adapters", "shared"} <= claims


@pytest.mark.parametrize(("status", "expected"), [
    pytest.param({"phase": "Succeeded", "adapter": {"uri": "pvc://a/rev-1", "digest": DIGEST}},
                 ("pvc://a/rev-1", DIGEST), id="succeeded"),
    pytest.param({"phase": "Running", "adapter": {"uri": "pvc://a/rev-2", "digest": DIGEST}}, None, id="running"),
    pytest.param({"phase": "Running", "promotedAdapter": {"uri": "pvc://a/rev-1", "digest": OTHER}},
                 ("pvc://a/rev-1", OTHER), id="promoted-while-retraining"),
    pytest.param({}, None, id="no-status"),
])
def test_what_a_referenced_job_offers(status: dict[str, Any], expected: tuple[str, str] | None) -> None:
    assert published_adapter({"status": status}) == expected


def fetched(tmp_path: Path, name: str, *, base: str = "pvc://models/tiny", r: int = 8, peft_type: str = "LORA",
            manifest: bool = True, **config: Any) -> FetchedInput:
    from kubelora.api.combine import ResolvedInput
    from kubelora.api.runtime import AdapterManifest

    cfg = {"peft_type": peft_type, "r": r, "target_modules": ["q_proj"], "base_model_name_or_path": base, **config}
    (tmp_path / name).mkdir()
    (tmp_path / name / "adapter_config.json").write_text(json.dumps(cfg))
    man = AdapterManifest(digest=DIGEST, files={}, size_bytes=0, base_model=base, rank=r, lora_alpha=16,
                          target_modules=["q_proj"], method="lora", created_at=NOW) if manifest else None
    return FetchedInput(ResolvedInput(uri=f"pvc://a/{name}", weight=1.0), tmp_path / name, cfg, man, DIGEST)


def combine_spec(method: str) -> LoRAJobSpec:
    return LoRAJobSpec.model_validate(spec(combine={"method": method, "inputs": [{"uri": "pvc://a/x"},
                                                                                  {"uri": "pvc://a/y"}]}))


def test_inputs_of_one_base_and_rank_combine(tmp_path: Path) -> None:
    check_combinable(combine_spec("ties"), [fetched(tmp_path, "a"), fetched(tmp_path, "b", manifest=False,
                                                                            base="/mnt/pvc/models/tiny")])


@pytest.mark.parametrize(("second", "method", "words"), [
    pytest.param({"base": "pvc://models/other"}, "ties", "was trained on pvc://models/other, not spec.baseModel.uri",
                 id="other-base"),
    pytest.param({"r": 16}, "dare_ties", "ranks differ (8, 16)", id="rank-mismatch"),
    pytest.param({"peft_type": "IA3"}, "linear", "not LORA", id="not-lora"),
    pytest.param({"use_dora": True}, "ties", "DoRA", id="dora"),
    pytest.param({"target_modules": "q_proj|v_proj"}, "cat", "pattern string", id="mixed-target-kinds"),
])
def test_incompatible_inputs_fail_preflight_naming_the_input(tmp_path: Path, second: dict[str, Any], method: str,
                                                              words: str) -> None:
    with pytest.raises(InvalidSpecError, match=re.escape(words)) as info:
        check_combinable(combine_spec(method), [fetched(tmp_path, "a"), fetched(tmp_path, "b", **second)])
    assert "spec.combine.inputs cannot be combined" in str(info.value)


def test_cat_combines_different_ranks(tmp_path: Path) -> None:
    check_combinable(combine_spec("cat"), [fetched(tmp_path, "a"), fetched(tmp_path, "b", r=16)])


def test_the_runner_reads_referenced_jobs_and_starts_once_they_published(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from kubelora.handlers import lorajob_runner
    from kubelora.handlers.kube import path
    from kubelora.handlers.lorajob_runner import Reconciler
    from kubelora.reconcile.lorajob_observed import Observed
    from kubelora.settings import Settings

    from .test_lorajob_runner import FakeApi

    mix = path("kubelora.io/v1alpha1", "LoRAJob", "ml", "mix")
    math = path("kubelora.io/v1alpha1", "LoRAJob", "ml", "math")
    body = {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "spec": COMBINE,
            "metadata": {"name": "mix", "namespace": "ml", "uid": "u2", "generation": 1}}
    api = FakeApi({mix: body, math: {"status": {"phase": "Running"}}})
    retries: list[float] = []
    monkeypatch.setattr(Reconciler, "_retry", lambda self, key, observe, delay: retries.append(delay))
    rec = Reconciler(api, Settings())
    asyncio.run(rec.kick(("ml", "mix"), lambda _: Observed()))
    assert ("GET", math) in api.calls
    assert not any(m == "POST" for m, _ in api.calls), "nothing starts before the input is published"
    assert any(c["reason"] == "WaitingForInputs" for c in api.objects[mix]["status"]["conditions"])
    assert retries == [lorajob_runner.INPUT_POLL_SECONDS]

    api.objects[math] = {"status": {"phase": "Succeeded", "adapter": {"uri": "pvc://adapters/math/rev-1",
                                                                       "digest": DIGEST}}}
    retries.clear()
    asyncio.run(rec.kick(("ml", "mix"), lambda _: Observed()))
    config = api.objects["/api/v1/namespaces/ml/configmaps/mix-trainer-1"]["data"][CONFIG_KEY]
    assert json.loads(config)["combineInputs"][0] == {"uri": "pvc://adapters/math/rev-1", "digest": DIGEST,
                                                       "weight": 0.7, "source": "ml/math"}
    assert retries == []
