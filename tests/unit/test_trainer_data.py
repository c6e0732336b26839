"""Dataset reading, format detection, row checks with file/line, and the deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubelora.api.lorajob import DatasetSource
from kubelora_trainer.data import check_row, check_rows, detect_format, load_splits, read_rows, split_records
from kubelora_trainer.errors import EXIT_BAD_INPUT, InvalidDatasetError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"file://{path}"


def load(uri: str, **kw: object) -> object:
    return load_splits(DatasetSource(uri=uri, **kw), seed=42)


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (CHAT, "messages"),
        ({"prompt": "a", "completion": "b"}, "prompt-completion"),
        ({"text": "t", "id": 3}, "text"),
        ({"question": "q"}, None),
    ],
)
def test_detect_format(row: dict[str, object], fmt: str | None) -> None:
    assert detect_format(row) == fmt


def test_reads_jsonl_json_parquet_and_directories(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    d.mkdir()
    write_lines(d / "a.jsonl", [json.dumps(CHAT)] * 3)
    (d / "b.json").write_text(json.dumps([CHAT, CHAT]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT["messages"]}] * 4), d / "c.parquet")
    (d / "notes.txt").write_text("ignored")
    rows = read_rows(f"file://{d}")
    assert len(rows) == 9
    wheres = [(src.rsplit("/", 1)[1], where) for _, src, where in rows]
    assert wheres[0] == ("a.jsonl", "line 1")
    assert ("b.json", "item 2 (line 1)") in wheres
    assert wheres[-1] == ("c.parquet", "row 4")


def test_json_file_holding_json_lines_is_accepted(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "x.json", [json.dumps(CHAT), json.dumps(CHAT)])
    assert len(read_rows(uri)) == 2


def test_json_object_wrapping_rows_is_explained(tmp_path: Path) -> None:
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": [CHAT, CHAT]}))
    with pytest.raises(
        InvalidDatasetError,
        match=r"wrapped\.json: one JSON object that is not a row \(the rows "
        r'seem to be under "data"',
    ):
        load(f"file://{p}")
    single = tmp_path / "single.json"
    single.write_text(json.dumps(CHAT, indent=2))  # one row, pretty-printed over several lines
    assert len(read_rows(f"file://{single}")) == 1


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "x.jsonl", [json.dumps(CHAT), "", json.dumps({"messages": []})])
    with pytest.raises(InvalidDatasetError, match=r"x\.jsonl line 3: .*non-empty list"):
        load(uri)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(InvalidDatasetError, match=r"empty\.jsonl is empty\. Fix:") as exc:
        load(f"file://{p}")
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert exc.value.reason == "InvalidDataset"


def test_invalid_json_names_file_line_and_fix(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "train.jsonl", [json.dumps(CHAT), json.dumps(CHAT), '{"messages": [}'])
    with pytest.raises(InvalidDatasetError) as exc:
        load(uri)
    msg = exc.value.message
    assert f"{uri} line 3: invalid JSON" in msg
    assert "Fix:" in msg


def test_invalid_json_in_array_file_names_its_line(tmp_path: Path) -> None:
    p = tmp_path / "rows.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(InvalidDatasetError, match=r"rows\.json line 3: invalid JSON"):
        load(f"file://{p}")


def test_missing_keys_and_unknown_roles_are_all_listed(tmp_path: Path) -> None:
    bad_role = {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]}
    uri = write_lines(
        tmp_path / "t.jsonl", [json.dumps(CHAT), json.dumps({"text": "no messages"}), json.dumps(bad_role)]
    )
    with pytest.raises(InvalidDatasetError) as exc:
        load(uri)
    msg = exc.value.message
    assert 't.jsonl line 2: missing key "messages"' in msg
    assert "t.jsonl line 3: messages[1] has unknown role 'human'; allowed roles are system, user, assistant" in msg
    assert "Fix: every row must have the messages shape" in msg


def test_unknown_first_row_shape(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(InvalidDatasetError, match=r"q\.jsonl line 1: cannot tell the data format"):
        load(uri)


def test_row_without_assistant_turn_is_rejected() -> None:
    _, problem = check_row({"messages": [{"role": "user", "content": "hi"}]}, "messages")
    assert problem is not None and "no assistant message" in problem


def test_prompt_completion_shapes() -> None:
    assert check_row({"prompt": "a", "completion": "b", "x": 1}, "prompt-completion") == (
        {"prompt": "a", "completion": "b"},
        None,
    )
    conv = {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}
    assert check_row(conv, "prompt-completion")[1] is None
    assert "both be strings" in (check_row({"prompt": "a", "completion": ["b"]}, "prompt-completion")[1] or "")


def test_forced_format_applies_to_every_row(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "a"}), json.dumps(CHAT)])
    with pytest.raises(InvalidDatasetError, match="line 1"):
        load(uri, format="messages")


def test_missing_dataset_and_non_object_rows(tmp_path: Path) -> None:
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        load(f"file://{tmp_path}/nope.jsonl")
    uri = write_lines(tmp_path / "l.jsonl", ["[1, 2]"])
    with pytest.raises(InvalidDatasetError, match=r"l\.jsonl line 1: expected a JSON object, got list"):
        load(uri)


def test_messages_keep_only_role_and_content() -> None:
    row = {"messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}]}
    _, records = check_rows([(row, "f", "line 1")], "auto")
    assert records[0].row == {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def test_split_is_deterministic_and_keeps_both_sides() -> None:
    _, records = check_rows([({"text": str(i)}, "f", f"line {i}") for i in range(50)], "text")
    a = split_records(records, 0.1, seed=7)
    b = split_records(records, 0.1, seed=7)
    c = split_records(records, 0.1, seed=8)
    assert a == b
    assert a != c
    assert len(a[0]) == 45 and len(a[1]) == 5
    assert {r.where for r in a[0]} | {r.where for r in a[1]} == {r.where for r in records}
    assert split_records(records[:2], 0.01, seed=1)[1].__len__() == 1  # at least one eval row
    assert split_records(records[:1], 0.5, seed=1) == (records[:1], [])
    assert split_records(records, 0.0, seed=1) == (records, [])


def test_eval_uri_replaces_split_and_must_match_format(tmp_path: Path) -> None:
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(CHAT)] * 10)
    evals = write_lines(tmp_path / "eval.jsonl", [json.dumps(CHAT)] * 3)
    splits = load(train, eval_uri=evals)
    assert (len(splits.train), len(splits.eval)) == (10, 3)  # type: ignore[attr-defined]
    other = write_lines(tmp_path / "other.jsonl", [json.dumps({"text": "x"})])
    with pytest.raises(InvalidDatasetError, match="same row shape"):
        load(train, eval_uri=other)


def test_default_split_is_ten_percent(tmp_path: Path) -> None:
    uri = write_lines(tmp_path / "t.jsonl", [json.dumps(CHAT)] * 40)
    splits = load(uri)
    assert (len(splits.train), len(splits.eval)) == (36, 4)  # type: ignore[attr-defined]


def test_reads_over_http(tmp_path: Path) -> None:
    """https:// goes through fsspec's HTTP filesystem (served here over plain http on localhost)."""
    import functools
    import http.server
    import threading

    from kubelora.api.uris import HttpsURI

    write_lines(tmp_path / "chat.jsonl", [json.dumps(CHAT)] * 2 + ['{"messages": oops}'])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/chat.jsonl"
        with pytest.raises(InvalidDatasetError, match=rf"{url} line 3: invalid JSON"):
            read_rows(HttpsURI(url))
        (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
        assert read_rows(HttpsURI(url)) == [(CHAT, url, "line 1")]
    finally:
        server.shutdown()


def test_dataset_digest_is_sha256sum_of_the_files_read(tmp_path: Path) -> None:
    import hashlib

    from kubelora.api.digest import digest_of

    folder = tmp_path / "data"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [json.dumps(CHAT)] * 3)
    write_lines(folder / "b.jsonl", [json.dumps(CHAT)] * 2)
    evals = tmp_path / "eval.jsonl"
    write_lines(evals, [json.dumps(CHAT)])
    splits = load_splits(DatasetSource(uri=f"file://{folder}", eval_uri=f"file://{evals}"), seed=42)
    sha = {p: hashlib.sha256(p_path.read_bytes()).hexdigest()
           for p, p_path in {"a.jsonl": folder / "a.jsonl", "b.jsonl": folder / "b.jsonl",
                             "eval/eval.jsonl": evals}.items()}
    assert splits.digest == digest_of(sha)
    # one changed byte in the data is a different digest
    write_lines(folder / "b.jsonl", [json.dumps(CHAT)] * 2 + [json.dumps(CHAT).replace("Hi", "Ho")])
    again = load_splits(DatasetSource(uri=f"file://{folder}", eval_uri=f"file://{evals}"), seed=42)
    assert again.digest != splits.digest
