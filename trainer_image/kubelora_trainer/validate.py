"""Pre-flight with the tokenizer: token lengths, the loss mask the chat template allows, ValidationStats.

Runs in the validation Job (``--validate-only``: tokenizer files only, no weights, no GPU) and again at the
start of training, so a sample longer than ``maxSeqLength`` is reported with its line instead of being
silently truncated (or, with padding-free batches, silently blowing up memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from kubelora.api.runtime import ValidationStats
from kubelora_trainer.data import MAX_LISTED_PROBLEMS, DatasetSplits, Record
from kubelora_trainer.errors import InvalidDatasetError

log = logging.getLogger(__name__)

_BATCH = 256


@dataclass(frozen=True)
class LossPlan:
    """Which tokens carry the loss, given the data format and the tokenizer's chat template."""

    assistant_only_loss: bool
    """messages data: only assistant turns are supervised (needs {% generation %} markers)."""
    convert_to_prompt_completion: bool = False
    """The template cannot mark assistant turns: train on the last assistant turn as a completion instead."""
    chat_template: str | None = None
    """A training variant of the template that TRL patches in (None: the tokenizer's own)."""
    note: str = ""


def plan_loss(tokenizer: Any, fmt: str) -> LossPlan:
    """Decide how to keep the loss on assistant/completion tokens for this tokenizer."""
    if fmt == "prompt-completion":
        return LossPlan(assistant_only_loss=False, note="loss on completions only")
    if fmt == "text":
        return LossPlan(assistant_only_loss=False, note="text data: loss on every token")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidDatasetError(
            "the dataset is in the messages format but the base model's tokenizer has no chat template. Fix: "
            "use a chat/instruct base model, or convert the rows to prompt-completion or text")
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError as exc:
        note = (f"the chat template cannot mark assistant turns ({str(exc).splitlines()[0][:160]}); each row "
                "is trained as prompt = the turns before its last assistant message, completion = that message")
        return LossPlan(assistant_only_loss=False, convert_to_prompt_completion=True, note=note)
    return LossPlan(assistant_only_loss=True, chat_template=patched, note="loss on assistant turns only")


def to_prompt_completion(records: list[Record]) -> list[Record]:
    """messages rows -> conversational prompt/completion rows split at the last assistant message."""
    out = []
    for rec in records:
        msgs = rec.row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append(replace(rec, row={"prompt": msgs[:last], "completion": [msgs[last]]}))
    return out


def _ids(encoded: Any) -> list[Any]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _render_lengths(tokenizer: Any, rows: list[dict[str, Any]], chat_template: str | None) -> list[int]:
    """Token counts, computed the way TRL tokenizes each format (template + EOS rules included)."""
    first = rows[0]
    if "messages" in first:
        convs = [r["messages"] for r in rows]
        return [len(x) for x in _ids(tokenizer.apply_chat_template(
            convs, tokenize=True, return_dict=True, chat_template=chat_template))]
    if "prompt" in first and isinstance(first["prompt"], list):
        convs = [r["prompt"] + r["completion"] for r in rows]
        return [len(x) for x in _ids(tokenizer.apply_chat_template(
            convs, tokenize=True, return_dict=True, chat_template=chat_template))]
    eos = tokenizer.eos_token or ""
    if "prompt" in first:
        texts = [r["prompt"] + (r["completion"] if r["completion"].endswith(eos) else r["completion"] + eos)
                 for r in rows]
    else:
        texts = [r["text"] if r["text"].endswith(eos) else r["text"] + eos for r in rows]
    return [len(x) for x in _ids(tokenizer(texts))]


def token_lengths(tokenizer: Any, records: list[Record], chat_template: str | None = None) -> list[int]:
    """Token count of every record; a row the template cannot render is reported with its location."""
    lengths: list[int] = []
    for start in range(0, len(records), _BATCH):
        chunk = records[start:start + _BATCH]
        try:
            lengths += _render_lengths(tokenizer, [r.row for r in chunk], chat_template)
        except Exception:
            for rec in chunk:  # find the row that breaks, so the message can name it
                try:
                    lengths += _render_lengths(tokenizer, [rec.row], chat_template)
                except Exception as exc:
                    raise InvalidDatasetError(
                        f"{rec.location}: the base model's chat template cannot render this row "
                        f"({type(exc).__name__}: {str(exc)[:200]}). Fix: check the roles and their order "
                        "(many templates require alternating user/assistant turns)") from exc
    return lengths


def check_lengths(records: list[Record], lengths: list[int], max_seq_length: int) -> None:
    """Raise naming every row longer than ``max_seq_length`` tokens (up to a few, then a count)."""
    too_long = [(rec, n) for rec, n in zip(records, lengths, strict=True) if n > max_seq_length]
    if not too_long:
        return
    listed = "; ".join(f"{rec.location}: {n} tokens" for rec, n in too_long[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(too_long) - MAX_LISTED_PROBLEMS} more)" if len(too_long) > MAX_LISTED_PROBLEMS else ""
    raise InvalidDatasetError(
        f"{listed}{more}: longer than spec.training.maxSeqLength ({max_seq_length} tokens). Fix: shorten or "
        "split these rows, or raise spec.training.maxSeqLength")


def validate_splits(tokenizer: Any, splits: DatasetSplits, max_seq_length: int,
                    loss: LossPlan | None = None) -> tuple[ValidationStats, DatasetSplits]:
    """Check every row's token length; return the stats and the rows as the trainer will feed them."""
    loss = loss or plan_loss(tokenizer, splits.format)
    if loss.convert_to_prompt_completion:
        splits = DatasetSplits(splits.format, to_prompt_completion(splits.train), to_prompt_completion(splits.eval),
                               splits.digest)
    records = splits.train + splits.eval
    lengths = token_lengths(tokenizer, records, loss.chat_template)
    check_lengths(records, lengths, max_seq_length)
    stats = ValidationStats(
        train_rows=len(splits.train),
        eval_rows=len(splits.eval),
        format=splits.format,
        max_tokens=max(lengths),
        mean_tokens=round(sum(lengths) / len(lengths), 2),
        total_tokens=sum(lengths[: len(splits.train)]),
    )
    return stats, splits
