"""PyTorch distributed for multi-GPU and multi-node runs: the torchrun launch, this process's rank, and the
few collectives the trainer needs around the Trainer (which does the gradient all-reduce or FSDP itself).

A pod runs ``kubelora-train``; when the run needs more than one process it becomes the torchrun launcher
(``torch.distributed.run``, c10d rendezvous) for ``--nproc-per-node`` workers, each of which runs
``python -m kubelora_trainer`` again as a worker. Several nodes are the pods of an Indexed Job: the node rank
is ``JOB_COMPLETION_INDEX`` and the rendezvous endpoint is pod 0's stable name
``<job>-0.<service>:29400`` (the operator sets :data:`RDZV_ENDPOINT_ENV`). Workers never restart on their
own (``--max-restarts=0``): a lost peer fails every pod, and the Job restarts the group, which resumes from
the newest checkpoint. No torch import at module level: the planning helpers are unit-tested without it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubelora.api.lorajob import LoRAJobSpec

log = logging.getLogger(__name__)

RDZV_ENDPOINT_ENV = "KUBELORA_RDZV_ENDPOINT"
"""host:port of node 0's rendezvous (set by the operator on multi-node Jobs)."""
RDZV_ID_ENV = "KUBELORA_RDZV_ID"
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"
"""Set by the Job controller on the pods of an Indexed Job."""
RESULT_DIR_ENV = "KUBELORA_RESULT_DIR"
"""Where workers leave their TrainerResult (rank-<n>.json) for the launcher."""
RDZV_PORT = 29400
RESOLVE_TIMEOUT_ENV = "KUBELORA_RDZV_RESOLVE_TIMEOUT"
DEFAULT_RESOLVE_TIMEOUT = 600.0


@dataclass(frozen=True)
class WorldPlan:
    """How many processes a run has: ``nproc_per_node`` on each of ``nnodes`` pods."""

    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def world_plan(spec: LoRAJobSpec) -> WorldPlan:
    """One process per GPU; one per node on CPU (``gpus: 0``)."""
    return WorldPlan(spec.resources.nodes, max(1, spec.resources.gpus))


def torchrun_argv(plan: WorldPlan, worker_args: list[str], *, node_rank: int = 0, endpoint: str = "",
                  run_id: str = "kubelora") -> list[str]:
    """The ``torchrun`` arguments for this node (what ``torch.distributed.run.parse_args`` takes)."""
    if plan.nnodes == 1:
        rdzv = ["--standalone"]
    else:
        if not endpoint:
            raise ValueError(f"{plan.nnodes} nodes need a rendezvous endpoint (${RDZV_ENDPOINT_ENV})")
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
                f"--node-rank={node_rank}"]
    return [f"--nnodes={plan.nnodes}", f"--nproc-per-node={plan.nproc_per_node}", *rdzv, "--max-restarts=0",
            "--module", "kubelora_trainer", *worker_args]


@dataclass(frozen=True)
class Rank:
    """This process in the world (torchrun's RANK, LOCAL_RANK, WORLD_SIZE; 0, 0, 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_rank() -> Rank:
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def is_worker() -> bool:
    """True inside a process torchrun started (it sets TORCHELASTIC_RUN_ID and LOCAL_RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def init(rank: Rank, cuda: bool) -> None:
    """Join the process group early: the trainer needs collectives before the Trainer starts."""
    import torch
    import torch.distributed as dist

    if not rank.distributed or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group(backend(cuda))
    log.info("rank %d/%d (local %d) joined the %s process group", rank.rank, rank.world_size, rank.local_rank,
             backend(cuda))


def broadcast(value: Any, rank: Rank) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); ``value`` itself without distribution."""
    if not rank.distributed:
        return value
    import torch.distributed as dist

    box = [value if rank.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, rank: Rank) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks take the same branch)."""
    if not rank.distributed:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(rank: Rank) -> None:
    if rank.distributed:
        import torch.distributed as dist

        dist.barrier()


def wait_for_endpoint(endpoint: str, timeout: float | None = None) -> None:
    """Wait until the rendezvous host resolves: peers' pods may start before node 0's DNS record exists."""
    host = endpoint.rsplit(":", 1)[0]
    limit = float(os.environ.get(RESOLVE_TIMEOUT_ENV, DEFAULT_RESOLVE_TIMEOUT)) if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rendezvous host {host} did not resolve within {limit:.0f}s: {exc}") from exc
            time.sleep(0.5)


def write_result(result_json: str, rank: Rank) -> None:
    folder = os.environ.get(RESULT_DIR_ENV)
    if folder:
        Path(folder, f"rank-{rank.rank}.json").write_text(result_json, encoding="utf-8")


def read_results(folder: str) -> dict[int, dict[str, Any]]:
    """The results the workers of this node left, by global rank."""
    out: dict[int, dict[str, Any]] = {}
    for path in Path(folder).glob("rank-*.json"):
        try:
            out[int(path.stem.split("-", 1)[1])] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return out


def pick_result(results: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The result that explains this node: the first failure with a reason, else the lowest rank's."""
    failed = [results[r] for r in sorted(results) if not results[r].get("ok")]
    if failed:
        return next((f for f in failed if f.get("reason")), failed[0])
    return results[min(results)] if results else None


def exit_code(worker_code: int) -> int:
    """A worker's exit code as the pod's: negative (killed by a signal) becomes 1, a failure that retries."""
    return worker_code if worker_code > 0 else (1 if worker_code < 0 else 0)


def enable_cpu_fsdp() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), as it does on GPUs.

    accelerate turns an FSDP plugin on only for accelerator backends and silently trains a CPU world with
    DDP instead; FSDP2 itself shards over gloo on CPU. This is what lets the FSDP path (sharded training,
    sharded checkpoints, the gathered adapter) run in CPU tests and on local clusters. Idempotent.
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "_kubelora_cpu_fsdp", False):
        return

    def patched(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    patched._kubelora_cpu_fsdp = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = patched


def full_state_dict(model: Any) -> dict[str, Any]:
    """The unsharded state dict of an FSDP-sharded model on rank 0 (empty elsewhere); a collective.

    Tensors are cloned: the gathered ones share storage that FSDP frees when it reshards, which peft's
    ``save_pretrained`` would then read.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in full.items() if isinstance(v, torch.Tensor)}
