"""`make demo`'s LoRAJob lines read well in a plain 80-column log: every line ASCII and at most 80 columns,
the checkpoint whole, the digest whole on its own line, and the evaluation as base vs adapter."""

from __future__ import annotations

from typing import Any

from kubelora.api.evaluation import EvalMetrics, EvalSample, EvaluationResult
from kubelora_local.demo_summary import WIDTH, progress_line, summary

DIGEST = "sha256:" + "0123456789abcdef" * 4
LONG = "x" * 300


def job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "tiny-chat"}, "status": status}


def evaluation() -> dict[str, Any]:
    return EvaluationResult(
        eval_rows=10, references=2, improvement=0.9984,
        adapter=EvalMetrics(loss=0.0149, perplexity=1.015, token_accuracy=1.0, similarity=1.0),
        base=EvalMetrics(loss=9.187, perplexity=9769.3, token_accuracy=0.0, similarity=-0.0161),
        samples=[EvalSample(prompt="What colour is the sky?", reference="The sky is blue.", answer="The sky is blue.",
                            base_answer="ngerstem\x11 with\ufffd6( pr" + LONG)],
        gate_passed=True, gate_message="every bound of spec.evaluation.gate is met").wire()


def succeeded() -> dict[str, Any]:
    return job(
        phase="Succeeded",
        adapter={"uri": "pvc://adapters/tiny-chat/rev-1", "digest": DIGEST, "sizeBytes": 74213, "rank": 8,
                 "baseModel": "pvc://models/tiny-llama"},
        evaluation=evaluation(),
        conditions=[{"type": "Promoted", "status": "True", "reason": "GatePassed",
                     "message": "pvc://adapters/tiny-chat/rev-1 passed spec.evaluation.gate: every bound of "
                                "spec.evaluation.gate is met"}])


def plain(lines: list[str]) -> None:
    for line in lines:
        assert len(line) <= WIDTH, line
        line.encode("ascii")


def test_the_progress_line_keeps_the_checkpoint_whole() -> None:
    line = progress_line(job(phase="Running", progress={
        "step": 40, "totalSteps": 60, "percent": 66, "loss": 0.01234, "evalLoss": 0.0149, "tokensPerSecond": 3637.2,
        "lastCheckpoint": "pvc://adapters/tiny-chat/checkpoints/rev-1/checkpoint-40"}))
    plain([line])
    assert line == "Running     step 40/60 66%  loss 0.012  eval 0.015  3637 tok/s  checkpoint-40"
    assert progress_line(job()).startswith("Pending     step 0/? 0%  loss -  eval -")


def test_the_summary_shows_base_vs_adapter_in_80_plain_columns() -> None:
    lines = summary(succeeded())
    plain(lines)
    assert lines[:2] == ["adapter pvc://adapters/tiny-chat/rev-1 (74213 bytes)", f"  {DIGEST}"]
    text = "\n".join(lines)
    assert "                       adapter        base" in text
    assert "  eval loss             0.0149      9.1870" in text
    assert "  token accuracy         1.000       0.000" in text
    assert "  similarity             1.000      -0.016" in text
    assert "the adapter lowers the base's eval loss by 99.8%" in text
    assert "promoted (GatePassed)" in text and "Q: What colour is the sky?" in text
    assert any(line.startswith("     base:    ngerstem with?6( pr") and line.endswith("...") for line in lines)


def test_a_missed_gate_and_a_job_without_evaluation() -> None:
    missed = succeeded()
    missed["status"]["conditions"] = [{"type": "Promoted", "status": "False", "reason": "GateFailed",
                                       "message": "revision 2 missed spec.evaluation.gate: " + LONG}]
    lines = summary(missed)
    plain(lines)
    assert any(line.startswith("  NOT promoted (GateFailed): revision 2 missed") for line in lines)
    bare = summary(job(phase="Succeeded", adapter={"uri": "pvc://a/rev-1", "digest": DIGEST, "sizeBytes": 1}))
    assert bare[-1] == "evaluation: none (no eval set)"
