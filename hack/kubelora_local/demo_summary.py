"""What `make demo` prints about a LoRAJob: plain ASCII lines of at most 80 columns.

The demo runs in terminals and in CI logs alike; a log is 80 columns of plain text, so nothing here relies
on a wide terminal or on characters a log may not render (no ellipsis, no box drawing). Pure functions of the
LoRAJob object, tested in tests/unit/test_demo_summary.py.
"""

from __future__ import annotations

from typing import Any

WIDTH = 80


def fit(text: str, width: int = WIDTH) -> str:
    """One ASCII line of at most ``width`` columns (cut with "...")."""
    # Columns are aligned with spaces, so spaces stay; line breaks, tabs and control characters do not.
    text = "".join(c if c.isprintable() else " " if c.isspace() else "" for c in text).rstrip()
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= width else text[: width - 3] + "..."


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def checkpoint_name(uri: str | None) -> str:
    """``.../checkpoints/rev-1/checkpoint-20`` -> ``checkpoint-20``: the part that changes."""
    return uri.rstrip("/").rsplit("/", 1)[-1] if uri else "-"


def progress_line(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    p = status.get("progress") or {}
    parts = [
        f"{status.get('phase', 'Pending'):<10}",
        f"step {p.get('step', 0)}/{p.get('totalSteps', '?')} {p.get('percent', 0)}%",
        f"loss {_num(p.get('loss'))}",
        f"eval {_num(p.get('evalLoss'))}",
        f"{_num(p.get('tokensPerSecond'), '.0f')} tok/s",
        checkpoint_name(p.get("lastCheckpoint")),
    ]
    return fit("  ".join(parts))


def _row(label: str, adapter: Any, base: Any, fmt: str) -> str:
    return f"  {label:<16}{_num(adapter, fmt):>12}{_num(base, fmt):>12}"


def evaluation_lines(status: dict[str, Any]) -> list[str]:
    ev = status.get("evaluation")
    if not ev:
        return ["evaluation: none (no eval set)"]
    a, b = ev.get("adapter") or {}, ev.get("base") or {}
    lines = [f"evaluation on {ev.get('evalRows', 0)} held-out rows, {ev.get('references', 0)} reference answers:",
             f"  {'':<16}{'adapter':>12}{'base':>12}",
             _row("eval loss", a.get("loss"), b.get("loss"), ".4f"),
             _row("perplexity", a.get("perplexity"), b.get("perplexity"), ".2f"),
             _row("token accuracy", a.get("tokenAccuracy"), b.get("tokenAccuracy"), ".3f"),
             _row("similarity", a.get("similarity"), b.get("similarity"), ".3f")]
    if isinstance(ev.get("improvement"), int | float):
        lines.append(f"  the adapter lowers the base's eval loss by {ev['improvement']:.1%}")
    promoted = next((c for c in status.get("conditions") or [] if c.get("type") == "Promoted"), None)
    if promoted:
        verdict = "promoted" if promoted.get("status") == "True" else "NOT promoted"
        lines.append(f"  {verdict} ({promoted.get('reason')}): {promoted.get('message', '')}")
    for sample in (ev.get("samples") or [])[:2]:
        lines += [f"  Q: {sample.get('prompt', '')}", f"     adapter: {sample.get('answer', '')}",
                  f"     base:    {sample.get('baseAnswer') or '-'}"]
    return [fit(line) for line in lines]


def summary(job: dict[str, Any]) -> list[str]:
    """The finished LoRAJob: its adapter (digest on a line of its own) and the evaluation, base vs adapter."""
    status = job.get("status") or {}
    adapter = status.get("adapter") or {}
    lines = [f"adapter {adapter.get('uri', '-')} ({adapter.get('sizeBytes', '?')} bytes)",
             f"  {adapter.get('digest', '-')}"]
    return [fit(line) for line in lines] + evaluation_lines(status)
