"""Planning a distributed run as plain data: world size, the torchrun command line, DDP/FSDP arguments,
FSDP-QLoRA storage dtype, and which worker result a pod reports."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec, QuantizationSpec
from kubelora_trainer import distributed, mapping
from kubelora_trainer.mapping import Device

CPU = Device("cpu")
GPU = Device("cuda", bf16=True, flash_attention=True)


def spec(**over: Any) -> LoRAJobSpec:
    body: dict[str, Any] = {"baseModel": {"uri": "pvc://models/llama"}, "dataset": {"uri": "pvc://data/t.jsonl"},
                            "output": {"uri": "pvc://out/x"}, **over}
    return LoRAJobSpec.model_validate(body)


@pytest.mark.parametrize(("resources", "plan"), [
    ({}, (1, 1)), ({"gpus": 0}, (1, 1)), ({"gpus": 8}, (1, 8)), ({"gpus": 0, "nodes": 2}, (2, 1)),
    ({"gpus": 4, "nodes": 3}, (3, 4)),
])
def test_one_process_per_gpu_and_one_per_cpu_node(resources: dict[str, Any], plan: tuple[int, int]) -> None:
    got = distributed.world_plan(spec(resources=resources))
    assert (got.nnodes, got.nproc_per_node) == plan and got.world_size == plan[0] * plan[1]


def test_torchrun_on_several_nodes_uses_c10d_at_node_0() -> None:
    argv = distributed.torchrun_argv(distributed.WorldPlan(2, 4), ["--config", "/etc/kubelora/job.json"],
                                     node_rank=1, endpoint="bot-train-3-0.bot-train-3:29400", run_id="bot-train-3")
    assert argv == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=bot-train-3-0.bot-train-3:29400", "--rdzv-id=bot-train-3", "--node-rank=1",
                    "--max-restarts=0", "--module", "kubelora_trainer", "--config", "/etc/kubelora/job.json"]
    # torchrun itself accepts it (the launcher passes this list to torch.distributed.run.parse_args).
    from torch.distributed.run import parse_args

    parsed = parse_args(argv)
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank, parsed.max_restarts) == ("2", "4", 1, 0)
    assert parsed.module and parsed.training_script == "kubelora_trainer"


def test_torchrun_on_one_node_is_standalone_and_several_need_an_endpoint() -> None:
    argv = distributed.torchrun_argv(distributed.WorldPlan(1, 2), [])
    assert "--standalone" in argv and not any(a.startswith("--rdzv") for a in argv)
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        distributed.torchrun_argv(distributed.WorldPlan(2, 1), [])


@pytest.mark.parametrize(("strategy", "world", "fits", "want"), [
    ("auto", 1, True, "single"), ("fsdp", 1, True, "single"), ("auto", 2, True, "ddp"), ("auto", 2, False, "fsdp"),
    ("ddp", 2, False, "ddp"), ("fsdp", 2, True, "fsdp"),
])
def test_strategy(strategy: str, world: int, fits: bool, want: str) -> None:
    s = spec(distributed={"strategy": strategy}, resources={"gpus": 0, "nodes": 2})
    assert mapping.plan_strategy(s, world, fits) == want


def test_ddp_and_fsdp_trainer_arguments() -> None:
    kw = {"output_dir": "/o", "data_format": "messages", "has_eval": False, "train_rows": 64}
    ddp = mapping.sft_kwargs(spec(resources={"gpus": 2}), device=GPU, world_size=2, **kw)
    assert ddp["ddp_backend"] == "nccl" and ddp["ddp_find_unused_parameters"] is False and "fsdp" not in ddp
    cpu = mapping.sft_kwargs(spec(resources={"gpus": 0, "nodes": 2}), device=CPU, world_size=2, **kw)
    assert cpu["ddp_backend"] == "gloo"
    fsdp = mapping.sft_kwargs(spec(resources={"gpus": 8}, distributed={"strategy": "fsdp"}), device=GPU,
                              world_size=8, **kw)
    assert fsdp["fsdp"] == "full_shard auto_wrap"
    assert fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    # Checkpointing moves into FSDP's config; the Trainer's own flag would wrap the layers twice.
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True and fsdp["activation_checkpointing"] is False
    single = mapping.sft_kwargs(spec(), device=GPU, **kw)
    assert "ddp_backend" not in single and "fsdp" not in single


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype() -> None:
    q = QuantizationSpec(compute_dtype="bfloat16")
    precision = mapping.plan_precision("qlora", q, GPU)
    assert "bnb_4bit_quant_storage" not in mapping.bnb_kwargs(q, precision)
    assert mapping.bnb_kwargs(q, precision, fsdp=True)["bnb_4bit_quant_storage"] == "bfloat16"


def test_total_steps_count_the_global_batch() -> None:
    t = spec(training={"batchSize": 4, "gradientAccumulationSteps": 2, "epochs": 1}).training
    assert mapping.estimate_total_steps(64, t) == 8
    assert mapping.estimate_total_steps(64, t, world_size=2) == 4


def test_the_pod_reports_the_failure_that_explains_it() -> None:
    ok = {"ok": True, "reason": "Completed"}
    bad = {"ok": False, "reason": "InvalidDataset", "message": "line 3"}
    killed = {"ok": False, "reason": "", "message": "interrupted"}
    assert distributed.pick_result({0: ok, 1: ok}) == ok
    assert distributed.pick_result({0: killed, 1: bad, 2: ok}) == bad
    assert distributed.pick_result({1: killed}) == killed
    assert distributed.pick_result({}) is None
    assert [distributed.exit_code(c) for c in (0, 2, 143, -9)] == [0, 2, 143, 1]
