"""``--log-format json``: one JSON object per line with the object the line is about, the reason when the
code knows it, and the traceback of an exception -- for kopf's per-object loggers and the operator's own."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kopf._core.actions.loggers import ObjectLogger

from kubelora.__main__ import _JsonFormatter
from kubelora.handlers.lorajob_runner import _ref_extra

BODY = {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob",
        "metadata": {"name": "bot", "namespace": "ml", "uid": "u-1"}}


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_kopf_object_logger_lines_carry_the_object(lines: io.StringIO) -> None:
    logger = ObjectLogger(body=kopf.Body(BODY), settings=kopf.OperatorSettings())  # type: ignore[arg-type]
    logger.info("Handler 'x' succeeded.")
    [line] = [entry for entry in parsed(lines) if entry["message"] == "Handler 'x' succeeded."]
    assert line["object"] == {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "name": "bot",
                              "namespace": "ml", "uid": "u-1"}
    assert line["level"] == "INFO" and line["logger"] == "kopf.objects"
    assert "settings" not in line


def test_reason_and_traceback(lines: io.StringIO) -> None:
    log = logging.getLogger("kubelora.test")
    try:
        raise RuntimeError("agent unreachable")
    except RuntimeError:
        log.exception("tick failed", extra=_ref_extra(("ml", "bot"), "Forbidden"))
    [line] = parsed(lines)
    assert line["message"] == "tick failed" and line["level"] == "ERROR"
    assert line["object"] == {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "namespace": "ml",
                              "name": "bot"}
    assert line["reason"] == "Forbidden"
    assert line["traceback"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: agent unreachable" in line["traceback"]


def test_plain_lines_stay_small(lines: io.StringIO) -> None:
    logging.getLogger("kubelora.test").warning("hello %s", "world")
    [line] = parsed(lines)
    assert set(line) == {"time", "level", "logger", "message"} and line["message"] == "hello world"
