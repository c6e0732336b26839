"""Memory per GPU of a training plan, before any weights are loaded; and the smallest plan that fits.

A pure function of the base model's shape (its ``config.json``), the LoRAJob spec and the world size, so
pre-flight can refuse a plan that cannot fit in seconds instead of an out-of-memory crash after a
multi-GB download, and say what would fit. The terms (bytes per GPU):

* base weights: 16-bit linear and embedding weights (2 bytes/param); QLoRA stores linear weights in NF4
  with double quantization, 4.127 bits/param (Dettmers et al.; 65B -> 33.5 GB), embeddings and the LM head
  stay 16-bit. FSDP divides them by the number of processes.
* LoRA: weights in fp32 (4 bytes), gradients (4), AdamW moments (8; 2 for 8-bit optimizers); FSDP shards.
* activations per process at ``maxSeqLength x batchSize`` tokens: ~34 bytes x hidden per token and layer
  kept for backward (Korthikanti et al., 16-bit, fused attention so no seq^2 term), or with activation
  checkpointing one 16-bit layer input per layer plus one layer recomputed; fp32 logits and their
  gradient (8 bytes x vocab per token).
* overhead: CUDA context, allocator fragmentation and NCCL buffers: 1.5 GiB + 10%.

These are estimates (real use also depends on kernels and fragmentation); the tests pin them to the
published numbers for 7B and 70B models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

GIB = 1024**3
NF4_BITS = 4.127
OVERHEAD_BYTES = int(1.5 * GIB)
OVERHEAD_FRACTION = 0.10
ACTIVATION_BYTES_PER_HIDDEN = 34
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only transformer's config.json."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelShape:
        heads = int(cfg.get("num_attention_heads", 1))
        return cls(hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
                   intermediate=int(cfg.get("intermediate_size", 4 * int(cfg["hidden_size"]))),
                   vocab=int(cfg["vocab_size"]), heads=heads, kv_heads=int(cfg.get("num_key_value_heads", heads)),
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module in one decoder layer."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        names = LINEAR_NAMES if targets == "all-linear" else [t for t in targets if t in LINEAR_NAMES]
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


@dataclass(frozen=True)
class Plan:
    """The knobs that change memory per GPU."""

    method: str  # "qlora" | "lora"
    r: int
    targets: str | list[str]
    batch_size: int
    seq_len: int
    checkpointing: bool
    optimizer: str
    world_size: int = 1
    strategy: str = "ddp"  # "ddp" (also a single process) | "fsdp"

    def describe(self) -> str:
        where = (f"{self.world_size} GPUs with {self.strategy.upper()}" if self.world_size > 1 else "1 GPU")
        return (f"{self.method} on {where}, batchSize {self.batch_size}, maxSeqLength {self.seq_len}, "
                f"gradientCheckpointing {'on' if self.checkpointing else 'off'}")


@dataclass(frozen=True)
class Estimate:
    base: int
    lora: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.base + self.lora + self.activations + self.overhead

    def describe(self) -> str:
        return (f"{gib(self.total)} per GPU (base weights {gib(self.base)}, LoRA weights+gradients+optimizer "
                f"{gib(self.lora)}, activations {gib(self.activations)}, overhead {gib(self.overhead)})")


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def estimate(model: ModelShape, plan: Plan) -> Estimate:
    shard = plan.world_size if plan.strategy == "fsdp" else 1
    linear_bytes = model.linear_params * (NF4_BITS / 8 if plan.method == "qlora" else 2)
    base = (linear_bytes + model.embedding_params * 2) / shard
    if shard > 1:  # FSDP gathers one layer's full weights at a time
        base += model.linear_params / model.layers * (NF4_BITS / 8 if plan.method == "qlora" else 2)
    optimizer = 2 if plan.optimizer in EIGHT_BIT_OPTIMIZERS else 8
    lora = model.lora_params(plan.r, plan.targets) * (4 + 4 + optimizer) / shard
    tokens = plan.batch_size * plan.seq_len
    per_layer = ACTIVATION_BYTES_PER_HIDDEN * model.hidden * tokens
    # With checkpointing: each layer's 16-bit input, plus one layer recomputed in full during backward.
    kept = model.layers * 2 * model.hidden * tokens + per_layer if plan.checkpointing else model.layers * per_layer
    acts = kept + 8 * model.vocab * tokens
    subtotal = base + lora + acts
    return Estimate(int(base), int(lora), int(acts), int(OVERHEAD_BYTES + OVERHEAD_FRACTION * subtotal))


def fits(model: ModelShape, plan: Plan, gpu_bytes: int) -> bool:
    return estimate(model, plan).total <= gpu_bytes


def smallest_fitting_plan(model: ModelShape, plan: Plan, gpu_bytes: int, gpus_per_node: int = 8,
                          max_nodes: int = 64) -> Plan | None:
    """The least change to ``plan`` that fits, trying in order: activation checkpointing, a smaller
    micro-batch (raise gradientAccumulationSteps to keep the global batch), QLoRA, then more GPUs with
    FSDP (whole nodes beyond one). None when nothing fits."""
    candidates: list[Plan] = []
    current = plan
    if not current.checkpointing:
        current = replace(current, checkpointing=True)
        candidates.append(current)
    batch = current.batch_size
    while batch > 1:
        batch //= 2
        candidates.append(replace(current, batch_size=batch))
    if plan.method != "qlora":
        candidates.append(replace(plan, method="qlora"))
        candidates.append(replace(current, method="qlora"))
    world_sizes = [n for n in (2, 4, 8) if n <= gpus_per_node] + [gpus_per_node * k for k in range(2, max_nodes + 1)]
    for method in dict.fromkeys((plan.method, "qlora")):
        for world in world_sizes:
            if world > plan.world_size:
                candidates.append(replace(plan, checkpointing=True, method=method, world_size=world,
                                          strategy="fsdp"))
    return next((c for c in candidates if fits(model, c, gpu_bytes)), None)


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (80Gi, 40G, 1073741824) in bytes."""
    number = text.rstrip("kMGTi")
    return int(float(number) * _UNITS[text[len(number):]])


def plan_from_spec(spec: Any, world_size: int = 1, strategy: str = "ddp") -> Plan:
    t, lora = spec.training, spec.lora
    return Plan(method=spec.method, r=lora.r, targets=lora.target_modules_value, batch_size=t.batch_size,
                seq_len=t.max_seq_length, checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
                world_size=world_size, strategy=strategy)


def check(model: ModelShape, plan: Plan, gpu_bytes: int) -> str | None:
    """None when ``plan`` fits; otherwise the message that refuses it and names the smallest plan that fits."""
    est = estimate(model, plan)
    if est.total <= gpu_bytes:
        return None
    better = smallest_fitting_plan(model, plan, gpu_bytes)
    fix = (f"the smallest plan that fits is {better.describe()} ({gib(estimate(model, better).total)} per GPU)"
           if better is not None else "no plan with up to 64 nodes fits: use GPUs with more memory")
    return (f"{plan.describe()} needs about {est.describe()}, more than the {gib(gpu_bytes)} of one GPU; {fix}")
