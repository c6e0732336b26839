"""``kubelora-train``: the trainer container's entry point.

    kubelora-train --config /etc/kubelora/job.json [--validate-only] [--termination-log PATH]

Reads a ``TrainerRunConfig`` (written by the operator into a ConfigMap), runs pre-flight or training, and
reports one ``TrainerResult`` JSON object on stdout and in the termination message, which is how the
operator learns the outcome. Exit codes: 0 ok, 2 bad input (dataset, spec, base model: retrying cannot
help), 1 anything else. Logs go to stderr. Heavy libraries are imported only once work starts, so
``--help`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback

from kubelora.api.reasons import Reason
from kubelora.api.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    TRAINER_CONFIG_PATH,
    TrainerResult,
    TrainerRunConfig,
)
from kubelora_trainer import distributed
from kubelora_trainer.errors import InvalidSpecError, TrainerError

log = logging.getLogger("kubelora_trainer")

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096
"""Kubernetes keeps at most 4096 bytes of a termination message."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubelora-train",
        description="Fine-tune a LoRA/QLoRA adapter for a LoRAJob and publish it with a verifiable manifest.",
        epilog="Exit codes: 0 ok, 2 bad input (dataset/spec/base model), 1 other failure.",
    )
    p.add_argument("--config", default=TRAINER_CONFIG_PATH,
                   help=f"TrainerRunConfig JSON written by the operator (default {TRAINER_CONFIG_PATH})")
    p.add_argument("--validate-only", action="store_true",
                   help="pre-flight only: check the dataset and token lengths with the tokenizer; no weights, no GPU")
    p.add_argument("--termination-log", default=DEFAULT_TERMINATION_LOG,
                   help="where the result JSON goes for the operator (skipped if not writable; "
                        f"default {DEFAULT_TERMINATION_LOG})")
    return p.parse_args(argv)


def load_config(path: str) -> TrainerRunConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InvalidSpecError(f"cannot read the run config {path}: {exc}") from exc
    try:
        return TrainerRunConfig.model_validate_json(raw)
    except ValueError as exc:
        raise InvalidSpecError(f"{path} is not a valid TrainerRunConfig: {exc}") from exc


def result_json(result: TrainerResult) -> str:
    """One JSON line that fits in a termination message (the message is shortened, never the structure)."""
    text = json.dumps(result.wire(), separators=(",", ":"), sort_keys=True)
    # Generated samples are the least needed part (they are in the model card too): drop them first.
    while len(text.encode()) > TERMINATION_LIMIT and result.evaluation is not None and result.evaluation.samples:
        fewer = result.evaluation.model_copy(update={"samples": result.evaluation.samples[:-1]})
        result = result.model_copy(update={"evaluation": fewer})
        text = json.dumps(result.wire(), separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > TERMINATION_LIMIT:
        over = len(text.encode()) - TERMINATION_LIMIT + 20
        short = result.model_copy(update={"message": result.message[: max(0, len(result.message) - over)] + " [...]"})
        text = json.dumps(short.wire(), separators=(",", ":"), sort_keys=True)
    return text


def write_termination_log(path: str, text: str) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        log.info("termination log %s not writable (%s); the result is on stdout only", path, exc)


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("KUBELORA_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Progress bars and per-module chatter of the ML libraries drown the trainer's own lines in pod logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "fsspec", "s3fs", "botocore",
                 "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except ImportError:
        pass


def run(args: argparse.Namespace) -> tuple[int, TrainerResult]:
    """Run the requested mode; map every failure to a result and an exit code."""
    try:
        config = load_config(args.config)
        log.info("lorajob %s/%s revision %d: %s", config.namespace, config.name, config.revision,
                 "validate only" if args.validate_only else f"train ({config.spec.method})")
        _quiet_libraries()
        if config.spec.combine is not None:  # no training: one process, whatever spec.resources says
            from kubelora_trainer import combine

            return EXIT_OK, combine.validate_only(config) if args.validate_only else combine.combine(config)
        plan = distributed.world_plan(config.spec)
        if not args.validate_only and plan.world_size > 1 and not distributed.is_worker():
            return launch(args, config, plan)
        from kubelora_trainer import train

        result = train.validate_only(config) if args.validate_only else train.train(config)
        return EXIT_OK, result
    except TrainerError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        return exc.exit_code, TrainerResult(ok=False, reason=exc.reason, message=exc.message)
    except KeyboardInterrupt:
        return EXIT_FAILED, TrainerResult(ok=False, reason=Reason.TRAINING_FAILED.value, message="interrupted")
    except Exception as exc:
        log.error("unexpected failure:\n%s", traceback.format_exc())
        return EXIT_FAILED, TrainerResult(ok=False, reason=Reason.TRAINING_FAILED.value,
                                          message=f"{type(exc).__name__}: {str(exc)[:1500]}")


def launch(args: argparse.Namespace, config: TrainerRunConfig,
           plan: distributed.WorldPlan) -> tuple[int, TrainerResult]:
    """Run this node's share of the world under torchrun and report for the pod.

    Workers leave their results in a private folder; the pod reports the one that explains it (a failure
    before a success) with the exit code of the first worker that failed, so the Job's podFailurePolicy
    sees 2 (bad input) or 143 (stopped) exactly as from a single process.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_parse_args
    from torch.distributed.run import run as torchrun

    endpoint = os.environ.get(distributed.RDZV_ENDPOINT_ENV, "")
    node_rank = int(os.environ.get(distributed.NODE_RANK_ENV) or 0)
    if plan.nnodes > 1:
        distributed.wait_for_endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="kubelora-ranks-") as folder:
        os.environ[distributed.RESULT_DIR_ENV] = folder
        argv = distributed.torchrun_argv(plan, ["--config", args.config, "--termination-log", ""],
                                         node_rank=node_rank, endpoint=endpoint,
                                         run_id=os.environ.get(distributed.RDZV_ID_ENV) or config.name)
        log.info("torchrun %s", " ".join(argv))
        code = EXIT_OK
        try:
            torchrun(torchrun_parse_args(argv))
        except ChildFailedError as exc:
            _, failure = exc.get_first_failure()
            code = distributed.exit_code(failure.exitcode)
        except SignalException:
            code = EXIT_STOPPED
        picked = distributed.pick_result(distributed.read_results(folder))
    if picked is None:
        return code or EXIT_FAILED, TrainerResult(
            ok=False, reason=Reason.TRAINING_FAILED.value,
            message=f"torchrun workers on node {node_rank} ended (exit {code}) without a result")
    result = TrainerResult.model_validate(picked)
    if code == EXIT_OK and not result.ok:
        code = EXIT_FAILED
    return code, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    code, result = run(args)
    text = result_json(result)
    if distributed.is_worker():
        distributed.write_result(text, distributed.current_rank())
    write_termination_log(args.termination_log, text)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
