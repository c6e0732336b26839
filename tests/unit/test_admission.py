"""The admission webhook's checks: plain (old, new) dicts in, a message or None out."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from kubelora.handlers.webhook_server import build_server, self_signed_certificate
from kubelora.reconcile.admission import (
    adapterdeployment_spec_error,
    lorajob_change_error,
    lorajob_spec_error,
)
from kubelora.settings import Settings

JOB: dict[str, Any] = {
    "apiVersion": "kubelora.io/v1alpha1",
    "kind": "LoRAJob",
    "metadata": {"name": "bot", "generation": 1},
    "spec": {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"},
        "dataset": {"uri": "pvc://data/a.jsonl"},
        "output": {"uri": "pvc://adapters/bot"},
    },
}
AD: dict[str, Any] = {
    "apiVersion": "kubelora.io/v1alpha1",
    "kind": "AdapterDeployment",
    "metadata": {"name": "srv"},
    "spec": {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen"},
        "adapters": [{"name": "support", "loraJobRef": {"name": "bot"}}],
    },
}


def edit(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return doc


def in_phase(phase: str, **status: Any) -> dict[str, Any]:
    return edit(JOB, "status", {"phase": phase, "revision": 1, **status})


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        pytest.param(JOB, None, id="valid"),
        pytest.param(
            edit(JOB, "spec.lora.r", 0),
            "invalid spec: spec.lora.r: Input should be greater than or equal to 1",
            id="bad-rank",
        ),
        pytest.param(
            edit(edit(JOB, "spec.method", "lora"), "spec.quantization", {"quantType": "nf4"}),
            "invalid spec: spec: quantization is only used with method: qlora",
            id="lora-with-quantization",
        ),
        pytest.param(edit(JOB, "spec.dataset.evalUri", "pvc://data/b.jsonl"), None, id="eval-uri-alone"),
    ],
)
def test_lorajob_spec_on_create(new: dict[str, Any], expected: str | None) -> None:
    error = lorajob_spec_error(new)
    if expected is None:
        assert error is None
    else:
        assert error is not None and error.startswith(expected), error


@pytest.mark.parametrize(
    ("spec_path", "value", "expected"),
    [
        pytest.param(
            "spec.adapters",
            AD["spec"]["adapters"] * 2,
            "adapter name 'support' is listed twice",
            id="duplicate-adapter-names",
        ),
        pytest.param(
            "spec.adapters",
            [{"name": "a", "loraJobRef": {"name": "bot"}, "uri": "pvc://x/y"}],
            "set exactly one of loraJobRef or uri",
            id="ref-and-uri",
        ),
        pytest.param(
            "spec.adapters", [{"name": "a"}], "set exactly one of loraJobRef or uri", id="neither-ref-nor-uri"
        ),
        pytest.param("spec.adapters", [{"name": "a", "uri": "pvc://x/y"}], None, id="uri-only"),
    ],
)
def test_adapterdeployment_spec(spec_path: str, value: Any, expected: str | None) -> None:
    error = adapterdeployment_spec_error(edit(AD, spec_path, value))
    if expected is None:
        assert error is None
    else:
        assert error is not None and error.startswith("invalid spec: spec.adapters") and expected in error, error


def test_unchanged_invalid_spec_is_admitted() -> None:
    """An object stored before the webhook existed keeps accepting status and metadata writes."""
    bad = edit(JOB, "spec.lora.r", 0)
    assert lorajob_spec_error(edit(bad, "metadata.labels", {"a": "b"}), old=bad) is None
    assert lorajob_spec_error(edit(bad, "spec.lora.r", 1024), old=bad) is not None


@pytest.mark.parametrize(
    ("old", "new", "rejected"),
    [
        pytest.param(
            in_phase("Running"), edit(in_phase("Running"), "spec.lora.r", 32), ["spec.lora.r"], id="rank-while-running"
        ),
        pytest.param(
            in_phase("Validating"),
            edit(in_phase("Validating"), "spec.training.learningRate", 1e-4),
            ["spec.training.learningRate"],
            id="lr-while-validating",
        ),
        pytest.param(
            in_phase("Suspended"),
            edit(edit(in_phase("Suspended"), "spec.lora.r", 8), "spec.method", "lora"),
            ["spec.lora.r", "spec.method"],
            id="two-fields-while-suspended",
        ),
        pytest.param(
            in_phase("Succeeded"), edit(in_phase("Succeeded"), "spec.lora.r", 32), None, id="rank-after-succeeded"
        ),
        pytest.param(in_phase("Failed"), edit(in_phase("Failed"), "spec.lora.r", 32), None, id="rank-after-failed"),
        pytest.param(in_phase("Pending"), edit(in_phase("Pending"), "spec.lora.r", 32), None, id="rank-while-pending"),
        pytest.param(
            in_phase("Running"), edit(in_phase("Running"), "spec.suspend", True), None, id="suspend-while-running"
        ),
        pytest.param(
            in_phase("Running"),
            edit(in_phase("Running"), "spec.resources", {"gpu": 2}),
            None,
            id="resources-while-running",
        ),
        pytest.param(
            in_phase("Running"), edit(in_phase("Running"), "status.progress", {"step": 3}), None, id="status-only"
        ),
        pytest.param(
            in_phase("Running"),
            edit(in_phase("Running"), "spec.lora.r", 0),
            None,
            id="invalid-new-spec-left-to-spec-check",
        ),
        pytest.param(
            in_phase("Running", conditions=[{"type": "Validated", "status": "False", "reason": "SpecImmutable"}]),
            edit(in_phase("Running"), "spec.lora.r", 32),
            None,
            id="revert-of-earlier-drift",
        ),
        pytest.param(None, in_phase("Running"), None, id="create"),
    ],
)
def test_training_fields_while_in_progress(
    old: dict[str, Any] | None, new: dict[str, Any], rejected: list[str] | None
) -> None:
    error = lorajob_change_error(old, new)
    if rejected is None:
        assert error is None
    else:
        assert error is not None, "expected a rejection"
        assert error.startswith(", ".join(rejected) + " cannot change while revision 1 is "), error
        assert "Revert the change" in error


def test_self_signed_certificate_names_hosts() -> None:
    from cryptography import x509

    cert_pem, key_pem = self_signed_certificate(["127.0.0.1", "svc.ns.svc", "0.0.0.0"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["svc.ns.svc"]
    assert b"PRIVATE KEY" in key_pem


def test_build_server() -> None:
    local = build_server(Settings(webhook="self-signed", webhook_port=9555))
    assert (local.addr, local.port, local.host) == ("127.0.0.1", 9555, "127.0.0.1")
    cluster = build_server(Settings(webhook="cluster", webhook_service="kubelora-system/kl-webhook"))
    assert (cluster.addr, cluster.host) == ("0.0.0.0", "kl-webhook.kubelora-system.svc")
    with pytest.raises(ValueError, match="<namespace>/<name>"):
        build_server(Settings(webhook="cluster"))


def test_settings_from_env() -> None:
    settings = Settings.from_env({"KUBELORA_WEBHOOK": "cluster", "KUBELORA_WEBHOOK_PORT": "8443"})
    assert (settings.webhook, settings.webhook_port) == ("cluster", 8443)
    assert Settings.from_env({}).webhook == ""


def test_cluster_server_reports_the_service() -> None:
    async def first_config() -> dict[str, Any]:
        server = build_server(Settings(webhook="cluster", webhook_service="ns/kl-webhook", webhook_port=0))
        configs = server(lambda *_, **__: None)
        try:
            return dict(await anext(configs))
        finally:
            await configs.aclose()

    config = asyncio.run(first_config())
    assert config["service"] == {"namespace": "ns", "name": "kl-webhook", "port": 443, "path": ""}
    assert "url" not in config and config["caBundle"]
