"""URI parsing shared by the operator, trainer and agent."""

from __future__ import annotations

import pytest

from kubelora.api.uris import S3URI, FileURI, HfURI, HttpsURI, PvcURI, URIError, is_within, parse_uri


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("pvc://models/qwen2.5-7b", PvcURI("models", "qwen2.5-7b"), id="pvc"),
        pytest.param("pvc://models", PvcURI("models", ""), id="pvc-root"),
        pytest.param("pvc://data/a//b/./c.jsonl", PvcURI("data", "a/b/c.jsonl"), id="pvc-normalised"),
        pytest.param("s3://bucket/adapters/legal-v2", S3URI("bucket", "adapters/legal-v2"), id="s3"),
        pytest.param("https://example.com/a.jsonl", HttpsURI("https://example.com/a.jsonl"), id="https"),
        pytest.param("hf://Qwen/Qwen2.5-7B-Instruct", HfURI("Qwen/Qwen2.5-7B-Instruct"), id="hf"),
        pytest.param("hf://Qwen/Qwen2.5-7B-Instruct@v1.0", HfURI("Qwen/Qwen2.5-7B-Instruct", "v1.0"), id="hf-rev"),
        pytest.param("file:///data/model", FileURI("/data/model"), id="file"),
    ],
)
def test_parse(raw: str, expected: object) -> None:
    assert parse_uri(raw) == expected


def test_round_trip_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = parse_uri("pvc://adapters/job")
    assert isinstance(uri, PvcURI)
    assert str(uri.join("rev-3")) == "pvc://adapters/job/rev-3"
    assert uri.local_path() == "/mnt/pvc/adapters/job"
    monkeypatch.setenv("KUBELORA_PVC_ROOT", "/tmp/pvcs")
    assert uri.local_path() == "/tmp/pvcs/adapters/job"
    assert str(parse_uri("s3://bkt/k").join("rev-1")) == "s3://bkt/k/rev-1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "allowed", "message"),
    [
        pytest.param("", ("pvc",), "non-empty", id="empty"),
        pytest.param("models/qwen", ("pvc",), "has no scheme", id="no-scheme"),
        pytest.param("s3://bkt/k", ("pvc", "file"), "use one of pvc://, file://", id="scheme-not-allowed"),
        pytest.param("s3://B_/k", ("s3",), "not a valid S3 bucket", id="bucket"),
        pytest.param("file://x/y", ("file",), "absolute path", id="file-relative"),
    ],
)
def test_errors(raw: str, allowed: tuple[str, ...], message: str) -> None:
    with pytest.raises(URIError, match=message):
        parse_uri(raw, allowed)  # type: ignore[arg-type]


@pytest.mark.parametrize(("uri", "root", "inside"), [
    ("pvc://adapters/bot/rev-1", "pvc://adapters/bot", True),
    ("pvc://adapters/bot/rev-1/", "pvc://adapters/bot/", True),
    ("pvc://adapters/bot", "pvc://adapters/bot", False),
    ("pvc://adapters/bot-evil/rev-1", "pvc://adapters/bot", False),
    ("pvc://adapters/bot/../x/rev-1", "pvc://adapters/bot", False),
    ("s3://adapters/bot/rev-1", "pvc://adapters/bot", False),
])
def test_is_within(uri: str, root: str, inside: bool) -> None:
    assert is_within(uri, root) is inside
