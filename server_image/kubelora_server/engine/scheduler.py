"""Continuous batching: one thread runs decode steps for every active sequence, mixed adapters in one batch.

vLLM's scheduler in miniature. Requests join a waiting queue; between two steps the thread applies queued
adapter loads and unloads, admits waiting sequences (at most ``--max-num-seqs`` in the batch and at most
``--max-loras`` distinct adapters, the constraint vLLM's scheduler applies, later requests that fit going
ahead of one that does not) and runs one forward pass for the whole batch, each row through its own adapter
(peft's mixed-batch ``adapter_names``; ``"__base__"`` is the base model). A load therefore waits for one
decode step, never for a whole generation, and nothing else touches the model, so there is no lock.

peft's own ``adapter_names`` argument registers and removes a pre-forward hook on every LoRA layer and walks
the module tree twice per call, which cost more than the tiny model's forward pass; :class:`AdapterRouting`
keeps one persistent hook per layer that hands it the batch's names instead, and a batch whose rows all use
one adapter takes peft's plain path (``set_adapter`` once, when the adapter changes).

The KV cache is kept while the batch stays the same and a finished row is cut out of it; a new row makes the
next step recompute the batch from its tokens (left padded, explicit positions): one prefill, which is what
a CPU can afford without paged attention.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from kubelora_server.engine.protocol import EngineError, FinishReason
from kubelora_server.engine.sampling import SamplingParams, TextAssembler, TokenLogprob, choose_token, token_logprob

if TYPE_CHECKING:
    from kubelora_server.engine.host import ModelHost

log = logging.getLogger(__name__)
T = TypeVar("T")
BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed batch."""


@dataclass(frozen=True)
class Delta:
    """New text of one sequence; ``finish`` is set on the last one, which carries the last token's text."""

    text: str
    finish: FinishReason = None
    completion_tokens: int = 0
    """Tokens generated so far (all of them on the last delta)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token generated since the previous delta, when the request asked for logprobs."""
    stop_reason: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """On the first delta when asked for: ``None`` for the first prompt token, then one per token."""


Emit = Callable[[Delta | BaseException | None], None]


@dataclass(eq=False)
class Sequence:
    """One completion in flight (a request with ``n`` > 1 is ``n`` of them)."""

    key: str
    """The model name clients used (metrics)."""
    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    emit: Emit
    cancel: threading.Event
    text: TextAssembler
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    peft_name: str | None = None
    pending: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    sent_prompt_logprobs: bool = False


class AdapterRouting:
    """Which adapter each batch row goes through, by hooks that stay registered on every LoRA layer.

    A mixed batch could hand peft ``adapter_names`` (its mixed-batch inference), which runs each adapter's
    sub-batch separately: per layer, per adapter, an index, two matmuls and a scatter. For plain LoRA linear
    layers the hooks do what vLLM's punica kernels do instead: the batch's adapters are stacked once (zero-
    padded to the largest rank, a zero slot for base rows, the scaling folded into B) and the delta is two
    batched matmuls over rows gathered by adapter, whatever the number of adapters; peft then computes only the
    base layer (every row ``"__base__"``). Other layer kinds get peft's own ``adapter_names`` path.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self._base_names: list[str] = []
        self._adapters: tuple[str, ...] = ()
        self._index = torch.zeros(0, dtype=torch.long)
        self._hooked: set[int] = set()
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def attach(self, peft_model: Any) -> None:
        """Hook LoRA layers not hooked yet (a new adapter may wrap modules the others did not target)."""
        from peft.tuners.lora import LoraLayer

        self._stacks.clear()
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                layer = cast(torch.nn.Module, module)
                layer.register_forward_pre_hook(self._inject, with_kwargs=True)
                layer.register_forward_hook(self._add_delta, with_kwargs=True)
                self._hooked.add(id(module))

    def forget(self) -> None:
        """An adapter's weights were deleted: drop the stacks that hold them."""
        self._stacks.clear()

    def detach_all(self) -> None:
        """The peft wrapper is gone (``unload``): its layers, hooks included, went with it."""
        self._hooked.clear()
        self._stacks.clear()

    def _stack(self, module: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A [n+1, r, in], B^T * scaling [n+1, r, out])`` for the batch's adapters; ``None``: not plain LoRA."""
        key = (id(module), self._adapters)
        if key in self._stacks:
            return self._stacks[key]
        from peft.tuners.lora import Linear

        stack = None
        lora: Any = module  # peft's attribute types are loose (Tensor | Module); read them as Any
        if isinstance(module, Linear) and not any(n in lora.lora_variant for n in self._adapters):
            present = [n for n in self._adapters if n in lora.lora_A]
            weight = lora.get_base_layer().weight
            rank = max([lora.lora_A[n].weight.shape[0] for n in present], default=1)
            a = torch.zeros(len(self._adapters) + 1, rank, lora.in_features, dtype=weight.dtype)
            b = torch.zeros(len(self._adapters) + 1, rank, lora.out_features, dtype=weight.dtype)
            for slot, name in enumerate(self._adapters, 1):
                if name in lora.lora_A:
                    r = lora.lora_A[name].weight.shape[0]
                    a[slot, :r] = lora.lora_A[name].weight
                    b[slot, :r] = lora.lora_B[name].weight.T * lora.scaling[name]
            stack = (a, b)
        if len(self._stacks) > 4096:  # many adapter combinations over time: start again
            self._stacks.clear()
        self._stacks[key] = stack
        return stack

    def _gathered(self, module: Any, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() == 3 and self._stack(module) is not None

    def _inject(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.names is not None:
            x = args[0] if args else kwargs.get("x")
            kwargs["adapter_names"] = self._base_names if self._gathered(module, x) else self.names
        return args, kwargs

    def _add_delta(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        if self.names is None:
            return None
        x: Any = args[0] if args else kwargs.get("x")
        if not self._gathered(module, x):
            return None
        stack = self._stack(module)
        assert stack is not None
        a, b = stack
        hidden = torch.bmm(x.to(a.dtype), a[self._index].transpose(1, 2))
        return output + torch.bmm(hidden, b[self._index]).to(output.dtype)

    def forward(self, peft_model: Any, rows: list[str | None], **kwargs: Any) -> Any:
        """One forward pass with row ``i`` through adapter ``rows[i]`` (``None``: the base model)."""
        if len(set(rows)) == 1 and rows[0] is not None:
            if peft_model.active_adapter != rows[0]:
                peft_model.set_adapter(rows[0], inference_mode=True)
            return peft_model(**kwargs)
        self._adapters = tuple(sorted({r for r in rows if r is not None}))
        self._index = torch.tensor([0 if r is None else self._adapters.index(r) + 1 for r in rows])
        self._base_names = [BASE_ADAPTER] * len(rows)
        self.names = [r or BASE_ADAPTER for r in rows]
        try:
            return peft_model(**kwargs)
        finally:
            self.names = None


class Scheduler:
    def __init__(self, host: ModelHost, max_num_seqs: int) -> None:
        self.host = host
        self.max_num_seqs = max_num_seqs
        self._cond = threading.Condition()
        self._incoming: list[Sequence] = []
        self._ops: list[tuple[Callable[[], Any], Future[Any]]] = []
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cached: list[Sequence] = []
        """The rows the KV cache holds, in order; a batch that differs is recomputed."""
        self._past: Any = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._pos = torch.zeros(0, dtype=torch.long)
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()

    # ---- called from other threads ---------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            self._incoming.append(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the scheduler thread between two decode steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        with self._cond:
            self._ops.append((fn, future))
            self._cond.notify()
        return future.result()

    def in_use(self) -> set[str]:
        """peft adapter names rows of the batch are using (never evicted or deleted under them)."""
        return {s.peft_name for s in self.running if s.peft_name}

    # ---- the scheduler thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._ops or self._incoming or self.waiting or self.running):
                    self._cond.wait()
                ops, self._ops = self._ops, []
                self.waiting.extend(self._incoming)
                self._incoming = []
            for fn, future in ops:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            self._admit()
            if self.running:
                try:
                    self._step()
                except Exception as exc:
                    log.exception("decode step failed")
                    self._fail_all(exc)
            self.host.collect_retired(self.in_use())

    def _admit(self) -> None:
        skipped: deque[Sequence] = deque()
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.cancel.is_set():
                self._done(seq, None, waiting=True)
                continue
            if seq.adapter is not None:
                active = {s.adapter for s in self.running if s.adapter is not None}
                if seq.adapter not in active and len(active) >= self.host.args.max_loras:
                    skipped.append(seq)
                    continue
                try:
                    seq.peft_name = self.host.activate(seq.adapter, self.in_use())
                except EngineError as exc:
                    self._done(seq, exc, waiting=True)
                    continue
            self.host.count(self.host.waiting, seq.key, -1)
            self.host.count(self.host.running, seq.key, 1)
            self.running.append(seq)
        skipped.extend(self.waiting)
        self.waiting = skipped

    def _done(self, seq: Sequence, last: BaseException | None, waiting: bool = False) -> None:
        self.host.count(self.host.waiting if waiting else self.host.running, seq.key, -1)
        if last is not None:
            seq.emit(last)
        seq.emit(None)

    def _fail_all(self, exc: Exception) -> None:
        for seq in self.running:
            self._done(seq, exc)
        self.running, self._cached, self._past = [], [], None

    def _forward(self, batch: list[Sequence], **kwargs: Any) -> Any:
        peft_model = self.host.peft_model
        if peft_model is None:
            return self.host.base_model(**kwargs)
        return self.host.routing.forward(peft_model, [s.peft_name for s in batch], **kwargs)

    def _step(self) -> None:
        batch = [s for s in self.running if not s.cancel.is_set()]
        for seq in self.running:
            if seq.cancel.is_set():
                self._done(seq, None)
        self.running = batch
        if not batch:
            return
        with torch.inference_mode():
            logits = self._decode(batch) if batch == self._cached and self._past is not None else self._prefill(batch)
        keep = [i for i, seq in enumerate(batch) if not self._advance(seq, logits[i])]
        self.running = [batch[i] for i in keep]
        if len(keep) == len(batch):
            self._cached = list(batch)
        elif keep:
            index = torch.tensor(keep, dtype=torch.long)
            self._past.batch_select_indices(index)
            self._mask, self._pos = self._mask[index], self._pos[index]
            self._cached = list(self.running)
        else:
            self._cached, self._past = [], None

    def _prefill(self, batch: list[Sequence]) -> torch.Tensor:
        rows = [s.prompt + s.output for s in batch]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt = [s.params.prompt_logprobs is not None and s.prompt_logprobs is None for s in batch]
        out = self._forward(batch, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            logits_to_keep=0 if any(want_prompt) else 1)
        for i, seq in enumerate(batch):
            if want_prompt[i]:
                start = width - len(rows[i])
                k = seq.params.prompt_logprobs or 0
                seq.prompt_logprobs = (None, *(token_logprob(out.logits[i, start + j - 1], seq.prompt[j], k)
                                               for j in range(1, len(seq.prompt))))
        self._past, self._mask, self._pos = out.past_key_values, mask, pos[:, -1]
        return out.logits[:, -1]  # type: ignore[no-any-return]

    def _decode(self, batch: list[Sequence]) -> torch.Tensor:
        ids = torch.tensor([[s.output[-1]] for s in batch], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones(len(batch), 1, dtype=torch.long)], dim=1)
        self._pos = self._pos + 1
        out = self._forward(batch, input_ids=ids, attention_mask=self._mask, position_ids=self._pos[:, None],
                            past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return out.logits[:, -1]  # type: ignore[no-any-return]

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Choose ``seq``'s next token and emit what it makes visible; ``True`` when ``seq`` is finished."""
        params = seq.params
        early = len(seq.output) < params.min_tokens
        banned = sorted(self.host.eos_ids) if early and not params.ignore_eos else ()
        token = choose_token(logits, params, seq.generator, banned)
        seq.output.append(token)
        if params.logprobs is not None:
            seq.pending.append(token_logprob(logits, token, params.logprobs))
        finish: FinishReason = None
        if token in self.host.eos_ids and not params.ignore_eos and not early:
            finish, text = "stop", seq.text.finish()
        else:
            text = seq.text.add(token, may_stop=len(seq.output) > params.min_tokens)
            if seq.text.stopped:
                finish = "stop"
            elif len(seq.output) >= params.max_tokens:
                finish, text = "length", text + seq.text.finish()
        if text or finish:
            delta = Delta(text, finish, len(seq.output), tuple(seq.pending), seq.text.stop_reason,
                          seq.prompt_logprobs if not seq.sent_prompt_logprobs else None)
            seq.pending, seq.sent_prompt_logprobs = [], True
            seq.emit(delta)
        if finish:
            self._done(seq, None)
        return finish is not None
