"""spec.combine end to end: the real operator holds a combining LoRAJob until the LoRAJob it names has published,
pins that adapter's digest in the run config, and the real trainer publishes a combination listing its inputs."""

from __future__ import annotations

import json

import pytest

from kubelora.resources.lorajob_config import CONFIG_KEY

from .test_lorajob import Env, adapter_dir, env, spec  # noqa: F401 - env is a fixture

pytestmark = pytest.mark.e2e


def test_combination_waits_for_its_input_job_then_publishes(env: Env) -> None:  # noqa: F811
    from kubelora_server.testing import make_adapter

    models = env.cluster.pvc_dir(env.ns, "models") / "tiny"
    hand = make_adapter(models, env.cluster.pvc_dir(env.ns, "adapters") / "hand", rank=8, seed=3,
                        base_model="pvc://models/tiny")
    combo = {
        "baseModel": {"uri": "pvc://models/tiny"},
        "output": {"uri": "pvc://adapters/combo"},
        "resources": {"gpus": 0},
        "combine": {"method": "ties", "density": 0.5, "inputs": [
            {"loraJobRef": {"name": "math"}, "weight": 0.6},
            {"uri": "pvc://adapters/hand", "weight": 0.4},
        ]},
    }
    env.create("combo", combo)

    def waiting() -> dict | None:  # type: ignore[type-arg]
        conds = {c["type"]: c for c in env.status("combo").get("conditions") or []}
        return conds.get("Validated") if conds.get("Validated", {}).get("reason") == "WaitingForInputs" else None

    validated = env.cluster.wait_for(waiting, 60, "combo waiting for its input")
    assert "waiting for LoRAJob math" in validated["message"]
    assert env.children("jobs", "combo") == [], "nothing runs before the input is published"

    env.create("math", spec("math", max_steps=5, lora={"r": 8, "alpha": 16, "targetModules": ["all-linear"]}))
    math = env.wait_phase("math", "Succeeded")
    status = env.wait_phase("combo", "Succeeded")

    cm = env.cluster.kube.get(f"/api/v1/namespaces/{env.ns}/configmaps/combo-trainer-1")
    pinned = json.loads(cm["data"][CONFIG_KEY])["combineInputs"]
    assert pinned[0] == {"uri": math["adapter"]["uri"], "digest": math["adapter"]["digest"], "weight": 0.6,
                         "source": f"{env.ns}/math"}
    manifest = json.loads((adapter_dir(env, status) / "kubelora-manifest.json").read_text())
    hand_digest = json.loads((hand / "kubelora-manifest.json").read_text())["digest"]
    assert manifest["method"] == "combine" and manifest["combineMethod"] == "ties"
    assert [i["digest"] for i in manifest["inputs"]] == [math["adapter"]["digest"], hand_digest]
    assert manifest["digest"] == status["adapter"]["digest"]
