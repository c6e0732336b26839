"""objective: dpo end to end: the real operator and trainer align the tiny model on preference pairs (the reward
margin in status.progress and the adapter's manifest), and a malformed preference row fails pre-flight with its
line, before any training Job."""

from __future__ import annotations

import json

import pytest

from .test_lorajob import Env, adapter_dir, env, spec  # noqa: F401 - env is a fixture

pytestmark = pytest.mark.e2e


def preference_lines(n: int) -> list[str]:
    questions = ["What colour is the sky?", "Say hello.", "Name a fruit.", "Count to three."]
    return [json.dumps({"prompt": [{"role": "user", "content": questions[i % 4]}],
                        "chosen": [{"role": "assistant", "content": "A clear, friendly answer."}],
                        "rejected": [{"role": "assistant", "content": "No."}]}) for i in range(n)]


def test_dpo_run_raises_the_margin_and_a_bad_row_fails_preflight(env: Env) -> None:  # noqa: F811
    data = env.cluster.pvc_dir(env.ns, "data")
    (data / "prefs.jsonl").write_text("\n".join(preference_lines(32)) + "\n")
    bad = preference_lines(5)
    bad[3] = json.dumps({"prompt": "Hi", "chosen": " Same.", "rejected": " Same."})
    (data / "bad-prefs.jsonl").write_text("\n".join(bad) + "\n")

    env.create("align", spec("align", max_steps=10, objective="dpo", dpo={"beta": 0.1},
                             dataset={"uri": "pvc://data/prefs.jsonl", "evalSplit": 0.25}))
    env.create("broken", spec("broken", objective="dpo", dataset={"uri": "pvc://data/bad-prefs.jsonl"}))

    failed = env.wait_phase("broken", "Failed")
    validated = {c["type"]: c for c in failed["conditions"]}["Validated"]
    assert validated["reason"] == "InvalidDataset"
    assert "bad-prefs.jsonl line 4" in validated["message"] and "identical" in validated["message"]
    assert [j["metadata"]["name"] for j in env.children("jobs", "broken")] == ["broken-validate-1"]

    status = env.wait_phase("align", "Succeeded")
    assert status["progress"]["rewardMargin"] > 0 and status["progress"]["rewardAccuracy"] > 0.5, status["progress"]
    metrics = json.loads((adapter_dir(env, status) / "kubelora-manifest.json").read_text())["metrics"]
    assert metrics["reward_margin"] > metrics["first_reward_margin"], metrics
