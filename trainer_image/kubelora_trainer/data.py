"""Reading and checking the training data, so that bad rows fail in pre-flight with their file and line.

A LoRAJob that fails after an hour of GPU time because row 48,213 has a typo is the failure this module
exists to prevent: every row is parsed and checked before any model weights are loaded, and every problem
names the file, the line (JSON Lines), the item (JSON array, with its line) or the row (Parquet), and the fix.

Supported shapes (``spec.dataset.format``; ``auto`` looks at the first row's keys):

- ``messages``: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- ``prompt-completion``: ``{"prompt": "...", "completion": "..."}`` (strings, or both lists of messages)
- ``text``: ``{"text": "..."}``

Nothing here imports torch or transformers: the checks are pure Python and unit-testable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubelora.api.digest import digest_of
from kubelora.api.lorajob import DatasetSource
from kubelora.api.uris import ArtifactURI
from kubelora_trainer.errors import InvalidDatasetError
from kubelora_trainer.storage import Location, locate

log = logging.getLogger(__name__)

FORMATS = ("messages", "prompt-completion", "text")
ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
MAX_LISTED_PROBLEMS = 5
"""How many problems one error message lists (the termination message is limited to 4 KiB)."""

_FORMAT_HELP = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "prompt-completion": '{"prompt": "Translate: chat", "completion": "cat"}',
    "text": '{"text": "One training document."}',
}


@dataclass(frozen=True)
class Record:
    """One row, reduced to the keys its format uses, and where it came from (for error messages)."""

    row: dict[str, Any]
    source: str
    """The file, as a URI the user recognises."""
    where: str
    """"line 7" (JSON Lines), "item 3 (line 12)" (JSON array) or "row 5" (Parquet)."""

    @property
    def location(self) -> str:
        return f"{self.source} {self.where}"


@dataclass
class DatasetSplits:
    """The checked rows, split into train and eval, and their format."""

    format: str
    train: list[Record]
    eval: list[Record] = field(default_factory=list)
    digest: str = ""
    """sha256 (the adapter digest's algorithm) over the bytes of every data file read; evalUri files are
    listed under ``eval/``. It goes into the model card, so a published adapter names the exact data."""


class _Problems:
    """Collects row problems so one message can name several at once (fix them all in one go)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED_PROBLEMS:
            self.items.append(text)

    def raise_if_any(self, fix: str = "") -> None:
        if not self.count:
            return
        more = f" (and {self.count - len(self.items)} more)" if self.count > len(self.items) else ""
        msg = "; ".join(self.items) + more
        raise InvalidDatasetError(f"{msg}. {fix}".strip() if fix else msg)


# ---------------------------------------------------------------------------------------------- reading


def list_data_files(loc: Location) -> list[str]:
    """The data files at ``loc``: the file itself, or every supported file below a directory (sorted)."""
    fs = loc.fs
    try:
        is_dir = fs.isdir(loc.path)
        exists = is_dir or fs.exists(loc.path)
    except Exception as exc:  # network, permissions, bad credentials
        raise InvalidDatasetError(f"dataset {loc.display()} cannot be read: {exc}. Fix: check the URI and, for "
                                  "s3://, the credentialsSecretRef keys") from exc
    if not exists:
        raise InvalidDatasetError(f"dataset {loc.display()} does not exist. Fix: check spec.dataset.uri "
                                  "(pvc:// paths are relative to the claim's root)")
    if not is_dir:
        return [loc.path]
    files = sorted(
        p for p in fs.find(loc.path)
        if p.lower().endswith(SUFFIXES) and not posixpath.basename(p).startswith(".")
    )
    if not files:
        raise InvalidDatasetError(f"dataset directory {loc.display()} holds no {', '.join(SUFFIXES)} files. "
                                  "Fix: point spec.dataset.uri at a data file or a folder of them")
    return files


def _display(loc: Location, path: str) -> str:
    if path == loc.path:
        return loc.display()
    return loc.display(posixpath.relpath(path, loc.path))


def _iter_jsonl(text: str, source: str, problems: _Problems) -> Iterator[tuple[Any, str]]:
    # split on "\n" only: str.splitlines() would also split on U+2028, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"line {lineno}"
        except json.JSONDecodeError as exc:
            problems.add(f"{source} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(text: str, source: str) -> Iterator[tuple[Any, str]]:
    """Items of a top-level JSON array, each with its 1-based index and the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InvalidDatasetError(f"{source} line {exc.lineno}: invalid JSON ({exc.msg} at column "
                                      f"{exc.colno}). Fix: the file must be one JSON array of row objects") from exc
        n += 1
        yield obj, f"item {n} (line {line})"


def _data_key(loc: Location, path: str) -> str:
    """A data file's name in the dataset digest: its path below the dataset folder, or its own name."""
    return posixpath.basename(path) if path == loc.path else posixpath.relpath(path, loc.path)


def _iter_file(loc: Location, path: str, problems: _Problems,
               hashes: dict[str, str] | None = None) -> Iterator[tuple[Any, str]]:
    source = _display(loc, path)
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with loc.fs.open(path, "rb") as fh:
                blob = fh.read()
            if hashes is not None:
                hashes[_data_key(loc, path)] = hashlib.sha256(blob).hexdigest()
            table = pq.read_table(io.BytesIO(blob))
        except Exception as exc:
            raise InvalidDatasetError(f"{source}: not a readable Parquet file ({exc}). Fix: rewrite it with "
                                      "pyarrow/pandas, or use JSON Lines") from exc
        if table.num_rows == 0:
            raise InvalidDatasetError(f"{source} is empty (0 rows). Fix: add rows or remove the file")
        for i, row in enumerate(table.to_pylist(), start=1):
            yield row, f"row {i}"
        return
    try:
        with loc.fs.open(path, "rb") as fh:
            raw = fh.read()
    except Exception as exc:
        raise InvalidDatasetError(f"{source} cannot be read: {exc}") from exc
    if hashes is not None:
        hashes[_data_key(loc, path)] = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidDatasetError(f"{source} line {line}: not valid UTF-8 (byte {exc.start}). Fix: save the "
                                  "file as UTF-8") from exc
    if not text.strip():
        raise InvalidDatasetError(f"{source} is empty. Fix: add one JSON object per line, e.g. "
                                  f"{_FORMAT_HELP['messages']}")
    if lower.endswith(".json") and text.lstrip().startswith("["):
        yield from _iter_json_array(text, source)
        return
    if lower.endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several objects: JSON Lines under a .json name, handled below
        if isinstance(whole, dict) and detect_format(whole) is not None:
            yield whole, "item 1 (line 1)"  # a single row, possibly pretty-printed over several lines
            return
        if isinstance(whole, dict):
            lists = [k for k, v in whole.items() if isinstance(v, list)]
            hint = f' (the rows seem to be under "{lists[0]}": make that list the whole file)' if lists else ""
            raise InvalidDatasetError(f"{source}: one JSON object that is not a row{hint}. Fix: a .json file must "
                                      "be a JSON array of row objects, or use JSON Lines (one row per line)")
    yield from _iter_jsonl(text, source, problems)  # .jsonl, .ndjson, and .json files holding JSON Lines


def read_rows(uri: str | ArtifactURI,
              hashes: dict[str, str] | None = None) -> list[tuple[dict[str, Any], str, str]]:
    """Every row at ``uri`` as ``(row, source, where)``; raises on unreadable files and non-object rows.

    ``hashes``: filled with each data file's sha256 (from the bytes parsed, so the digest is of what was read).
    """
    loc = locate(uri)
    problems = _Problems()
    rows: list[tuple[dict[str, Any], str, str]] = []
    for path in list_data_files(loc):
        source = _display(loc, path)
        for obj, where in _iter_file(loc, path, problems, hashes):
            if not isinstance(obj, dict):
                problems.add(f"{source} {where}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append((obj, source, where))
    problems.raise_if_any("Fix: JSON Lines files hold one complete JSON object per line (a .json file may instead "
                          f"be one JSON array of objects), e.g. {_FORMAT_HELP['messages']}")
    if not rows:
        raise InvalidDatasetError(f"dataset {loc.display()} has no rows. Fix: add rows such as "
                                  f"{_FORMAT_HELP['messages']}")
    return rows


# ---------------------------------------------------------------------------------------------- checking


def detect_format(row: dict[str, Any]) -> str | None:
    """The format a row's keys imply, or None when they match none."""
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "text" in row:
        return "text"
    return None


def _check_messages(messages: Any, what: str = "messages") -> str | None:
    if not isinstance(messages, list) or not messages:
        return f'"{what}" must be a non-empty list of {{"role", "content"}} objects'
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            return f"{what}[{i}] is a {type(msg).__name__}, not an object with role and content"
        role = msg.get("role")
        if not isinstance(role, str):
            return f'{what}[{i}] has no "role"'
        if role not in ROLES:
            return f"{what}[{i}] has unknown role {role!r}; allowed roles are {', '.join(ROLES)}"
        if not isinstance(msg.get("content"), str):
            return f'{what}[{i}] ({role}) has no string "content"'
    return None


def _normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    # Only role and content reach the tokenizer: extra keys would make Arrow schemas differ between rows.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_row(row: dict[str, Any], fmt: str) -> tuple[dict[str, Any] | None, str | None]:
    """Check one row against ``fmt``; return (the row reduced to its format's keys, None) or (None, problem)."""
    if fmt == "messages":
        if "messages" not in row:
            return None, f'missing key "messages" (row keys: {sorted(row)})'
        problem = _check_messages(row["messages"])
        if problem:
            return None, problem
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            return None, "no assistant message with content: there is nothing to learn from this row"
        return {"messages": _normalise_messages(row["messages"])}, None
    if fmt == "prompt-completion":
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            return None, f"missing key(s) {', '.join(repr(k) for k in missing)} (row keys: {sorted(row)})"
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                return None, '"completion" is empty: there is nothing to learn from this row'
            return {"prompt": prompt, "completion": completion}, None
        if isinstance(prompt, list) and isinstance(completion, list):
            problem = _check_messages(prompt, "prompt") or _check_messages(completion, "completion")
            if problem:
                return None, problem
            return {"prompt": _normalise_messages(prompt), "completion": _normalise_messages(completion)}, None
        return None, '"prompt" and "completion" must both be strings or both be lists of messages'
    if fmt == "text":
        if "text" not in row:
            return None, f'missing key "text" (row keys: {sorted(row)})'
        if not isinstance(row["text"], str) or not row["text"].strip():
            return None, '"text" must be a non-empty string'
        return {"text": row["text"]}, None
    raise ValueError(f"unknown format {fmt!r}")


def check_rows(rows: list[tuple[dict[str, Any], str, str]], fmt: str) -> tuple[str, list[Record]]:
    """Detect (for ``auto``) and enforce one format on every row; raise with all problems found."""
    if fmt == "auto":
        first, source, where = rows[0]
        detected = detect_format(first)
        if detected is None:
            raise InvalidDatasetError(
                f"{source} {where}: cannot tell the data format from keys {sorted(first)}. Fix: use one of "
                + "; ".join(f"{name}: {example}" for name, example in _FORMAT_HELP.items())
                + " (or set spec.dataset.format)")
        fmt = detected
    problems = _Problems()
    records: list[Record] = []
    for row, source, where in rows:
        clean, problem = check_row(row, fmt)
        if problem:
            problems.add(f"{source} {where}: {problem}")
        else:
            assert clean is not None
            records.append(Record(clean, source, where))
    problems.raise_if_any(f"Fix: every row must have the {fmt} shape, e.g. {_FORMAT_HELP[fmt]}")
    return fmt, records


# ---------------------------------------------------------------------------------------------- splitting


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the rows for evaluation, chosen by ``seed`` (same seed, same split).

    At least one row stays in each part when the fraction is positive and there are two rows or more;
    the train part keeps the file order (the trainer shuffles it anyway).
    """
    n = len(records)
    if fraction <= 0 or n < 2:
        if fraction > 0:
            log.warning("only %d row(s): no evaluation split is held out", n)
        return list(records), []
    k = min(max(1, round(n * fraction)), n - 1)
    chosen = set(random.Random(seed).sample(range(n), k))
    train = [r for i, r in enumerate(records) if i not in chosen]
    evals = [r for i, r in enumerate(records) if i in chosen]
    return train, evals


def load_splits(dataset: DatasetSource, seed: int) -> DatasetSplits:
    """Read, check and split the dataset of a LoRAJob (and its evalUri, which must have the same format)."""
    hashes: dict[str, str] = {}
    fmt, records = check_rows(read_rows(dataset.uri, hashes), dataset.format)
    if dataset.eval_uri:
        eval_hashes: dict[str, str] = {}
        eval_fmt, eval_records = check_rows(read_rows(dataset.eval_uri, eval_hashes), dataset.format)
        if eval_fmt != fmt:
            raise InvalidDatasetError(
                f"evalUri {dataset.eval_uri} is in the {eval_fmt} format but the training data is {fmt}. "
                "Fix: use the same row shape in both")
        hashes.update({f"eval/{k}": v for k, v in eval_hashes.items()})
        return DatasetSplits(fmt, records, eval_records, digest_of(hashes))
    train, evals = split_records(records, dataset.effective_eval_split, seed)
    return DatasetSplits(fmt, train, evals, digest_of(hashes))
