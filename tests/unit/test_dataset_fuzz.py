"""Fuzzing the dataset reader (hypothesis): whatever bytes a user's file holds, reading and checking it either
yields rows or raises InvalidDatasetError naming the file, never another exception, and never hangs (each
example runs under hypothesis' deadline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubelora_trainer.data import check_rows, read_rows
from kubelora_trainer.errors import InvalidDatasetError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "prompt", "completion", "text", "x"]), inner, max_size=4),
    max_leaves=12,
)
ROW = st.one_of(
    JSON,
    st.builds(lambda msgs: {"messages": msgs}, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "", 3]),
         "content": st.one_of(st.text(max_size=30), st.none(), st.integers())}), max_size=4)),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, st.text(max_size=20), st.text(max_size=20)),
)
LINE = st.one_of(ROW.map(json.dumps), st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
FUZZ = settings(max_examples=300, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read(path: Path) -> None:
    try:
        rows = read_rows(f"file://{path}")
        check_rows(rows, "auto")
    except InvalidDatasetError as exc:
        assert path.name in str(exc) or "no rows" in str(exc), str(exc)


@FUZZ
@given(st.lists(LINE, max_size=8), st.sampled_from(["data.jsonl", "data.json", "data.ndjson"]))
def test_any_lines_read_or_refuse_cleanly(
        tmp_path_factory: pytest.TempPathFactory, lines: list[str], name: str) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / name
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    _read(path)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_read_or_refuse_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "data.jsonl"
    path.write_bytes(data)
    _read(path)
