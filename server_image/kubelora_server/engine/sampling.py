"""Choosing the next token, its log-probabilities, and turning token ids into text deltas (no model, no I/O).

Streaming must never emit text it may have to take back: the start of a stop string (``"\\n\\nUser"`` arrives
as ``"\\n"``, ``"\\n"``, ``"User"``) or half of a multi-byte character that the byte-level tokenizer split
across tokens. :class:`TextAssembler` holds such tails back until they are resolved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5
"""vLLM treats temperatures below this as greedy."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    """vLLM's: neither end-of-sequence nor a stop string ends the completion before this many tokens."""
    logprobs: int | None = None
    """Top log-probs per generated token (``-1``: the whole vocabulary); ``None``: none."""
    prompt_logprobs: int | None = None
    """Top log-probs per prompt token, as for ``logprobs``."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 banned: Sequence[int] = ()) -> int:
    """Greedy, or temperature + top-k + top-p sampling over a 1-D logits vector; ``banned`` ids never win
    (end-of-sequence ids while ``min_tokens`` is not reached)."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float() / params.temperature
    if params.top_k and 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities, as vLLM's logprobs processor builds them: the chosen token first
    (with its rank in the distribution), then the ``k`` most likely tokens (ranks 1..k)."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()

    def ranked(self) -> list[tuple[int, float, int]]:
        """``(token id, log-prob, rank)``: the chosen token, then the top ones not already listed."""
        out = [(self.token_id, self.logprob, self.rank)]
        out += [(t, lp, r) for r, (t, lp) in enumerate(self.top, 1) if t != self.token_id]
        return out


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The raw log-probs (before temperature or any other processing, vLLM's default ``raw_logprobs``)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum().item()) + 1
    k = logprobs.numel() if k < 0 else min(k, logprobs.numel())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = torch.topk(logprobs, k)
        top = tuple(zip((int(i) for i in ids.tolist()), (float(v) for v in values.tolist()), strict=True))
    return TokenLogprob(token_id, float(chosen.item()), rank, top)


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


class TextAssembler:
    """Accumulates token ids; :meth:`add` returns the text that is now safe to emit."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self._emitted = 0
        self._floor = 0
        """Text before this offset was produced before ``min_tokens``; a stop string must end after it."""
        self.stopped = False
        self.stop_reason: str | None = None

    def add(self, token_id: int, may_stop: bool = True) -> str:
        """Append one token; ``may_stop=False`` (before ``min_tokens``) looks for no stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        full = self._decode(self.ids)
        if not may_stop:
            self.text = full
            self._floor = len(full)
            return self._emit(len(full.rstrip("\ufffd")))
        found = [(i, s) for s in self._stops if (i := full.find(s, max(0, self._floor - len(s) + 1))) >= 0]
        if found:
            cut, stop = min(found)
            self.stopped, self.stop_reason = True, stop
            self.text = full[:cut]
            return self._emit(len(self.text))
        self.text = full
        safe = len(full.rstrip("\ufffd"))
        safe -= _held_suffix(full[:safe], self._stops)
        return self._emit(safe)

    def finish(self) -> str:
        """Everything not yet emitted (held-back tails included): call once generation has ended."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
