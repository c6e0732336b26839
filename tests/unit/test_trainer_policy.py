"""The trainer-status ValidatingAdmissionPolicy is generated from LoRAJobStatus and shipped in the chart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from kubelora.api.lorajob import LoRAJobStatus
from kubelora.api.trainer_policy import frozen_status_fields, policy, unchanged_rule

REPO = Path(__file__).resolve().parents[2]


def test_every_status_field_but_progress_is_frozen_for_the_trainer() -> None:
    wire = {f.alias or n for n, f in LoRAJobStatus.model_fields.items()}
    assert set(frozen_status_fields()) == wire - {"progress"}
    rule = unchanged_rule()
    for field in frozen_status_fields():
        assert f"object.?status.?{field} == oldObject.?status.?{field}" in rule
    assert "progress" not in rule


def test_chart_ships_the_policy_and_binds_it() -> None:
    out = subprocess.run([str(REPO / ".venv/bin/helm"), "template", "kl", str(REPO / "charts/kubelora"),
                          "--show-only", "templates/trainer-status-policy.yaml"],
                         check=True, capture_output=True, text=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    vap, binding = docs["ValidatingAdmissionPolicy"], docs["ValidatingAdmissionPolicyBinding"]
    assert vap["spec"] == policy("kl-operator-trainer-status")["spec"]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
