"""Preference data for ``objective: dpo``: read and check every row in pre-flight, naming file and line.

Accepted shapes (TRL's preference formats):

- standard: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (three strings)
- conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, the answers
  holding the assistant turn(s)
- conversational with the prompt implicit: ``{"chosen": [messages], "rejected": [messages]}``, both
  conversations sharing the turns before their last assistant message (TRL extracts the prompt)

A row that breaks these rules (a missing or empty answer, a chosen equal to its rejected, a mix of strings
and message lists, answers without an assistant turn) fails pre-flight with its location, before any weights
are loaded. Token lengths are checked like SFT rows: prompt + the longer answer within maxSeqLength.

Pure Python apart from the tokenizer passed in; unit-testable.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kubelora.api.digest import digest_of
from kubelora.api.lorajob import DatasetSource
from kubelora.api.runtime import ValidationStats
from kubelora_trainer.data import (
    DatasetSplits,
    Record,
    _check_messages,
    _normalise_messages,
    _Problems,
    read_rows,
    split_records,
)
from kubelora_trainer.errors import InvalidDatasetError
from kubelora_trainer.validate import LossPlan, check_lengths

FORMAT = "preference"
EXAMPLE = '{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."}'
CONVERSATIONAL_EXAMPLE = ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", '
                          '"content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}')
LOSS_PLAN = LossPlan(assistant_only_loss=False, note="DPO: the loss compares the chosen and rejected answers")
ANSWERS = ("chosen", "rejected")


def _answer_problem(value: Any, key: str) -> str | None:
    problem = _check_messages(value, key)
    if problem:
        return problem
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return f'"{key}" has no assistant message with content'
    return None


def _implicit_prompt(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> str | None:
    """The problem with a row whose prompt is the shared start of chosen and rejected, or None."""
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return 'without "prompt", "chosen" and "rejected" must each end with the assistant answer'
    if chosen[:-1] != rejected[:-1]:
        return ('without "prompt", "chosen" and "rejected" must share every turn before their last assistant '
                'message (the implicit prompt); add a "prompt" key instead')
    if not chosen[:-1]:
        return 'without "prompt", the conversations need at least one turn before the answer'
    return None


def check_preference_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Check one row; return (the row reduced to prompt/chosen/rejected, None) or (None, problem)."""
    missing = [k for k in ANSWERS if k not in row]
    if missing:
        return None, f"missing key(s) {', '.join(repr(k) for k in missing)} (row keys: {sorted(row)})"
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return None, 'missing key "prompt" (only conversational rows may leave the prompt implicit)'
        problem = _answer_problem(chosen, "chosen") or _answer_problem(rejected, "rejected")
        if problem is None:
            problem = _implicit_prompt(chosen, rejected)
        if problem:
            return None, problem
        if chosen == rejected:
            return None, '"chosen" and "rejected" are identical: there is no preference to learn'
        return {"chosen": _normalise_messages(chosen), "rejected": _normalise_messages(rejected)}, None
    prompt = row["prompt"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if not prompt.strip():
            return None, '"prompt" is empty'
        empty = [k for k in ANSWERS if not row[k].strip()]
        if empty:
            return None, f'"{empty[0]}" is empty'
        if chosen.strip() == rejected.strip():
            return None, '"chosen" and "rejected" are identical: there is no preference to learn'
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        problem = (_check_messages(prompt, "prompt") or _answer_problem(chosen, "chosen")
                   or _answer_problem(rejected, "rejected"))
        if problem:
            return None, problem
        if chosen == rejected:
            return None, '"chosen" and "rejected" are identical: there is no preference to learn'
        return {"prompt": _normalise_messages(prompt), "chosen": _normalise_messages(chosen),
                "rejected": _normalise_messages(rejected)}, None
    kinds = ", ".join(f"{k} is a {type(row[k]).__name__}" for k in ("prompt", *ANSWERS))
    return None, f'"prompt", "chosen" and "rejected" must all be strings or all be lists of messages ({kinds})'


def check_preference_rows(rows: list[tuple[dict[str, Any], str, str]]) -> list[Record]:
    """Every row checked; raises once with every problem found (file and line each)."""
    problems = _Problems()
    records: list[Record] = []
    for row, source, where in rows:
        clean, problem = check_preference_row(row)
        if problem:
            problems.add(f"{source} {where}: {problem}")
        else:
            assert clean is not None
            records.append(Record(clean, source, where))
    problems.raise_if_any(f"Fix: objective dpo needs preference rows, e.g. {EXAMPLE} or {CONVERSATIONAL_EXAMPLE}")
    kinds = {isinstance(r.row["chosen"], list) for r in records}
    if len(kinds) > 1:
        first = next(r for r in records if isinstance(r.row["chosen"], list) != isinstance(records[0].row["chosen"],
                                                                                               list))
        raise InvalidDatasetError(f"{first.location}: mixes string rows and conversational rows (the first row is "
                                  f"{'conversational' if isinstance(records[0].row['chosen'], list) else 'strings'})."
                                  " Fix: use one shape in the whole dataset")
    return records


def load_preference_splits(dataset: DatasetSource, seed: int) -> DatasetSplits:
    """Read, check and split a preference dataset (and its evalUri)."""
    if dataset.format != "auto":
        raise InvalidDatasetError(f"spec.dataset.format {dataset.format} does not apply to objective dpo, whose rows "
                                  "are prompt/chosen/rejected. Fix: leave dataset.format at auto")
    hashes: dict[str, str] = {}
    records = check_preference_rows(read_rows(dataset.uri, hashes))
    if dataset.eval_uri:
        eval_hashes: dict[str, str] = {}
        evals = check_preference_rows(read_rows(dataset.eval_uri, eval_hashes))
        hashes.update({f"eval/{k}": v for k, v in eval_hashes.items()})
        return DatasetSplits(FORMAT, records, evals, digest_of(hashes))
    train, evals = split_records(records, dataset.effective_eval_split, seed)
    return DatasetSplits(FORMAT, train, evals, digest_of(hashes))


def _lengths(tokenizer: Any, row: dict[str, Any]) -> int:
    """Tokens of the prompt with the longer of the two answers, rendered as TRL renders them."""
    def count(prompt: Any, answer: Any) -> int:
        if isinstance(answer, list):
            enc = tokenizer.apply_chat_template([*(prompt or []), *answer], tokenize=True, return_dict=True)
            return len(enc["input_ids"])
        return len(tokenizer(prompt + answer)["input_ids"]) + 1  # + EOS

    return max(count(row.get("prompt"), row[k]) for k in ANSWERS)


def validate_preference_splits(tokenizer: Any, splits: DatasetSplits,
                               max_seq_length: int) -> tuple[ValidationStats, DatasetSplits]:
    records = splits.train + splits.eval
    lengths: list[int] = []
    for rec in records:
        try:
            lengths.append(_lengths(tokenizer, rec.row))
        except Exception as exc:
            raise InvalidDatasetError(f"{rec.location}: the base model's chat template cannot render this row "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    check_lengths(records, lengths, max_seq_length)
    stats = ValidationStats(train_rows=len(splits.train), eval_rows=len(splits.eval), format=FORMAT,
                            max_tokens=max(lengths), mean_tokens=round(sum(lengths) / len(lengths), 2),
                            total_tokens=sum(lengths[: len(splits.train)]))
    return stats, replace(splits)
