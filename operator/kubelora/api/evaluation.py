"""LoRAJob evaluation: what the trainer measures after training, and the gate that decides promotion.

The seed workflow is "evaluation -> identify gaps -> specific fine-tune -> measure improvement": the
adapter is measured on the held-out set (``dataset.evalSplit`` or ``dataset.evalUri``) next to the base
model with the adapter disabled, so the improvement is a number, and optionally on reference answers
(generated answers scored by embedding cosine similarity). A gate turns those numbers into a decision:
an adapter that misses it is still published (it is evidence), but an AdapterDeployment following the
LoRAJob keeps serving the last adapter that passed (``status.promotedAdapter``).

:func:`gate_failures` is pure and shared: the trainer records the verdict it computed in its result,
the operator's unit tests and docs use the same words.
"""

from __future__ import annotations

import math

from pydantic import ConfigDict, Field, model_validator

from kubelora.api.cel import Rule, cel
from kubelora.api.common import AnyUri, ApiModel, UriField

DEFAULT_EMBEDDING_MODEL = "hf://sentence-transformers/all-MiniLM-L6-v2"
MAX_REFERENCES = 256
MAX_SAMPLES = 5
SAMPLE_TEXT_LIMIT = 240
"""Characters of a prompt/answer kept in status: the whole result must fit a 4 KiB termination message."""
GATE_NEEDS_A_BOUND = Rule(
    "has(self.maxEvalLoss) || has(self.minImprovement) || has(self.minSimilarity)",
    "evaluation.gate: set at least one of maxEvalLoss, minImprovement or minSimilarity")
SIMILARITY_NEEDS_REFERENCES = Rule(
    "!has(self.gate) || !has(self.gate.minSimilarity) || "
    "(has(self.references) && size(self.references) > 0) || has(self.referencesUri)",
    "evaluation.gate.minSimilarity needs reference answers: set evaluation.references or evaluation.referencesUri",
    field_path=".gate.minSimilarity")


class ReferenceAnswer(ApiModel):
    """A prompt and the answer the fine-tuned model should give (scored by embedding similarity)."""

    prompt: str = Field(min_length=1, max_length=8192)
    """The user turn sent to the model (rendered with the tokenizer's chat template)."""
    reference: str = Field(min_length=1, max_length=8192)
    """The expected answer."""


class EvaluationGate(ApiModel):
    """Bounds the adapter must meet to be promoted (served by AdapterDeployments that follow the LoRAJob)."""

    model_config = ConfigDict(json_schema_extra=cel(GATE_NEEDS_A_BOUND))

    max_eval_loss: float | None = Field(default=None, gt=0.0)
    """The adapter's eval loss must be at most this."""
    min_improvement: float | None = Field(default=None, ge=-1.0, le=1.0)
    """The adapter must lower the base model's eval loss by at least this fraction (0.05: 5% lower)."""
    min_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)
    """Mean cosine similarity of generated answers to the references must be at least this (recipes: 0.85)."""

    @model_validator(mode="after")
    def _needs_a_bound(self) -> EvaluationGate:
        if self.max_eval_loss is None and self.min_improvement is None and self.min_similarity is None:
            raise ValueError(GATE_NEEDS_A_BOUND.message)
        return self


class EarlyStopping(ApiModel):
    """Stop when the eval loss has not improved for ``patience`` evaluations (every training.evalSteps)."""

    patience: int = Field(default=3, ge=1, le=1000)
    """Evaluations in a row without improvement before training stops. The best checkpoint is published when
    training.saveSteps is a multiple of training.evalSteps (load_best_model_at_end), else the last weights."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest decrease of the eval loss that counts as an improvement."""


class LossSpike(ApiModel):
    """A logged training loss far above the ones before it (status.progress.lossSpike, written by the trainer)."""

    step: int = Field(ge=0)
    """The optimizer step whose loss spiked (the first spike of the revision)."""
    loss: float
    """That step's training loss."""
    median: float
    """Median of the logged losses before it."""
    count: int = Field(default=1, ge=1)
    """Logged losses that spiked so far in this revision."""


class EvaluationSpec(ApiModel):
    """What to measure on the held-out set after training, and what the adapter must reach to be promoted."""

    model_config = ConfigDict(json_schema_extra=cel(SIMILARITY_NEEDS_REFERENCES))

    compare_base: bool = True
    """Also evaluate the base model with the adapter disabled (peft disable_adapter), so the improvement shows."""
    references: list[ReferenceAnswer] = Field(default_factory=list, max_length=MAX_REFERENCES)
    """Prompts with reference answers: the adapter (and the base) answer each, scored by embedding similarity."""
    references_uri: UriField("pvc", "s3", "https", "file") | None = None  # type: ignore[valid-type]
    """JSON Lines of {"prompt", "reference"} rows, instead of or besides ``references`` (pvc://, s3://, file://)."""
    embedding_model: AnyUri = DEFAULT_EMBEDDING_MODEL
    """sentence-transformers model that embeds answers and references."""
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    """Longest generated answer (greedy decoding)."""
    samples: int = Field(default=3, ge=0, le=MAX_SAMPLES)
    """Generated answers kept in status.evaluation.samples and the model card."""
    early_stopping: EarlyStopping | None = None
    """Stop training once the eval loss stops improving (needs an eval set)."""
    loss_spike_factor: float = Field(default=3.0, ge=1.1, le=1000.0)
    """A logged training loss above this multiple of the median of the previous ones (at least 5, at most the last
    20) sets the LossSpike condition and a Warning Event: often a learning rate that is too high."""
    gate: EvaluationGate | None = None
    """Bounds for promotion; without a gate every published adapter is promoted."""

    @model_validator(mode="after")
    def _similarity_needs_references(self) -> EvaluationSpec:
        if self.gate and self.gate.min_similarity is not None and not self.references and not self.references_uri:
            raise ValueError(SIMILARITY_NEEDS_REFERENCES.message)
        return self


class EvalMetrics(ApiModel):
    """One model's scores on the held-out set."""

    loss: float | None = None
    """Mean token cross-entropy on the supervised tokens."""
    perplexity: float | None = None
    """exp(loss)."""
    token_accuracy: float | None = None
    """Fraction of supervised tokens predicted exactly (argmax)."""
    similarity: float | None = None
    """Mean cosine similarity of generated answers to the references (when references are given)."""


class EvalSample(ApiModel):
    """One prompt with the reference and what the adapter (and the base) answered."""

    prompt: str
    """The user turn (cut to 240 characters, like every text here)."""
    reference: str = ""
    """The expected answer."""
    answer: str = ""
    """The adapter's answer."""
    base_answer: str | None = None
    """The base model's answer (compareBase)."""
    similarity: float | None = None
    """Cosine similarity of the adapter's answer to the reference."""


class EvaluationResult(ApiModel):
    """What evaluation measured for one revision (status.evaluation, the manifest's metrics, the model card)."""

    eval_rows: int = 0
    """Held-out rows scored."""
    references: int = 0
    """Reference answers generated and scored."""
    adapter: EvalMetrics = Field(default_factory=EvalMetrics)
    base: EvalMetrics | None = None
    """The base model with the adapter disabled (compareBase)."""
    improvement: float | None = None
    """Relative eval-loss reduction against the base: (base - adapter) / base."""
    samples: list[EvalSample] = Field(default_factory=list)
    """A few generated answers (spec.evaluation.samples), from the references or the first eval rows."""
    gate_passed: bool | None = None
    """The gate's verdict; None without a gate."""
    gate_message: str = ""
    """Which bound was missed (or that every bound was met)."""
    stopped_early: bool = False
    """Early stopping ended training before the planned steps."""
    message: str = ""
    """What could not be measured, and why (no eval set, an embedding model that did not load)."""


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped so a diverged run still serialises (JSON has no infinity)."""
    if loss is None or not math.isfinite(loss):
        return None
    return rounded(math.exp(min(loss, 80.0)))


def rounded(value: float | None) -> float | None:
    """Four decimals: what a status reader can use, without float noise such as a similarity of 1.0000001."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def improvement(adapter_loss: float | None, base_loss: float | None) -> float | None:
    if adapter_loss is None or base_loss is None or base_loss <= 0:
        return None
    return rounded((base_loss - adapter_loss) / base_loss)


def gate_failures(gate: EvaluationGate, result: EvaluationResult) -> list[str]:
    """Every bound ``result`` misses, in words; empty when it passes. A bound with no measurement fails."""
    out: list[str] = []
    loss = result.adapter.loss
    if gate.max_eval_loss is not None:
        if loss is None:
            out.append("no eval loss was measured (no eval set) but maxEvalLoss is set")
        elif loss > gate.max_eval_loss:
            out.append(f"eval loss {loss:.4f} > maxEvalLoss {gate.max_eval_loss:g}")
    if gate.min_improvement is not None:
        if result.improvement is None:
            out.append("no base-model comparison was measured but minImprovement is set (compareBase, eval set)")
        elif result.improvement < gate.min_improvement:
            base = result.base.loss if result.base else None
            out.append(f"improvement {result.improvement:.1%} over the base (eval loss {base:.4f} -> {loss:.4f}) "
                       f"< minImprovement {gate.min_improvement:.1%}")
    if gate.min_similarity is not None:
        sim = result.adapter.similarity
        if sim is None:
            out.append("no reference similarity was measured but minSimilarity is set")
        elif sim < gate.min_similarity:
            out.append(f"reference similarity {sim:.3f} < minSimilarity {gate.min_similarity:g}")
    return out


def with_gate(gate: EvaluationGate | None, result: EvaluationResult) -> EvaluationResult:
    """``result`` with the gate's verdict filled in."""
    if gate is None:
        return result.model_copy(update={"gate_passed": None, "gate_message": ""})
    failures = gate_failures(gate, result)
    message = "; ".join(failures) if failures else "every bound of spec.evaluation.gate is met"
    return result.model_copy(update={"gate_passed": not failures, "gate_message": message})


def clip_sample_text(text: str) -> str:
    """One line for status and logs: whitespace folded, control characters dropped, undecodable bytes as ?."""
    text = "".join(c for c in text.replace("\ufffd", "?") if c.isprintable() or c.isspace())
    text = " ".join(text.split())
    return text if len(text) <= SAMPLE_TEXT_LIMIT else text[: SAMPLE_TEXT_LIMIT - 1] + "…"


def metrics_of(result: EvaluationResult) -> dict[str, float]:
    """Flat numbers for the manifest's ``metrics`` (and the model card)."""
    out: dict[str, float] = {}
    for prefix, m in (("eval", result.adapter), ("base_eval", result.base)):
        if m is None:
            continue
        for key, value in (("loss", m.loss), ("perplexity", m.perplexity), ("token_accuracy", m.token_accuracy),
                           ("similarity", m.similarity)):
            if value is not None:
                out[f"{prefix}_{key}"] = float(value)
    if result.improvement is not None:
        out["eval_improvement"] = float(result.improvement)
    if result.gate_passed is not None:
        out["gate_passed"] = 1.0 if result.gate_passed else 0.0
    return out


def from_metrics(metrics: dict[str, float]) -> EvaluationResult | None:
    """Rebuild the numbers of a result from a manifest's metrics (a retried pod whose adapter is published)."""
    if "eval_loss" not in metrics and "eval_similarity" not in metrics:
        return None

    def pick(prefix: str) -> EvalMetrics:
        return EvalMetrics(loss=metrics.get(f"{prefix}_loss"), perplexity=metrics.get(f"{prefix}_perplexity"),
                           token_accuracy=metrics.get(f"{prefix}_token_accuracy"),
                           similarity=metrics.get(f"{prefix}_similarity"))

    base = pick("base_eval") if "base_eval_loss" in metrics else None
    return EvaluationResult(adapter=pick("eval"), base=base, improvement=metrics.get("eval_improvement"))


def spike_message(spike: LossSpike) -> str:
    """The LossSpike condition's message (also the trainer's log line)."""
    ratio = spike.loss / spike.median if spike.median > 0 else float("inf")
    return (f"training loss {spike.loss:g} at step {spike.step} is {ratio:.1f}x the median {spike.median:g} of the "
            f"steps before it ({spike.count} spike(s) so far); a learning rate that is too high is the usual cause: "
            "lower spec.training.learningRate or raise warmupRatio")
