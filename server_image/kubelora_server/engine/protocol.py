"""Request models and response builders, shaped like vLLM's OpenAI server (which extends OpenAI's).

Unknown request fields are accepted and ignored, as vLLM does, so OpenAI client libraries that send extra
fields keep working. Errors carry vLLM's ``type`` names (``NotFoundError``, ``BadRequestError``,
``InvalidUserInput``) and its messages, because clients and the agent match on them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubelora_server.openai_api import error_body

if TYPE_CHECKING:
    from kubelora_server.engine.sampling import TokenLogprob


class EngineError(Exception):
    """An error answer: HTTP status, vLLM error type and message."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


def bad_request(message: str, param: str | None = None, value: Any = None) -> EngineError:
    """vLLM's ``VLLMValidationError`` as its server answers it: 400, the message with ``(parameter=...,
    value=...)`` appended, ``param`` set."""
    extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
    return EngineError(400, "BadRequestError", f"{message} ({', '.join(extras)})" if extras else message, param)


def model_not_found(name: str) -> EngineError:
    return EngineError(404, "NotFoundError", f"The model `{name}` does not exist.", "model")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False
    """vLLM extension: every chunk carries the usage so far."""


class SamplingFields(_Request):
    """The sampling knobs both completion endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    """vLLM extension: keep generating past the end-of-sequence token."""
    min_tokens: int = 0
    """vLLM extension: no end-of-sequence or stop string before this many tokens."""
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    """vLLM extension: log-probs of the prompt's tokens."""

    def sample_logprobs(self) -> int | None:
        """How many top log-probs per generated token; ``None``: none."""
        raise NotImplementedError

    def check(self, max_logprobs: int, vocab_size: int) -> None:
        """vLLM's request validators, its ``SamplingParams`` checks and its engine's log-prob limits, in
        that order, with its messages; what the CPU engine cannot do is refused, never ignored."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        if (prompt := self.prompt_logprobs) is not None:
            if self.stream and (prompt > 0 or prompt == -1):
                raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
            if prompt < 0 and prompt != -1:
                raise bad_request("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs", prompt)
        self._check_logprobs()
        if self.n < 1:
            raise bad_request(f"n must be at least 1, got {self.n}.")
        if self.min_tokens < 0:
            raise bad_request(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.use_beam_search:
            raise bad_request("The CPU engine does not implement beam search; send `use_beam_search: false`.",
                              "use_beam_search")
        limit = vocab_size if max_logprobs == -1 else max_logprobs
        for kind, param, asked in (("sample", "logprobs", self.sample_logprobs()),
                                   ("prompt", "prompt_logprobs", self.prompt_logprobs)):
            count = vocab_size if asked == -1 else asked
            if count and count > limit:
                raise bad_request(f"Requested {kind} logprobs of {count}, which is greater than max allowed: "
                                  f"{limit}", param, count)

    def _check_logprobs(self) -> None:
        raise NotImplementedError

    def check_min_tokens(self, max_tokens: int) -> None:
        if self.min_tokens > max_tokens:
            raise bad_request(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                              f"got {self.min_tokens}.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ContentPart(_Request):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    logprobs: bool | None = False
    top_logprobs: int | None = 0

    def sample_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _check_logprobs(self) -> None:
        if (top := self.top_logprobs) is not None:
            if top < 0 and top != -1:
                raise bad_request("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
            if (top == -1 or top > 0) and not self.logprobs:
                raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None

    def sample_logprobs(self) -> int | None:
        return self.logprobs

    def _check_logprobs(self) -> None:
        if self.logprobs is not None and self.logprobs < 0:
            raise bad_request("`logprobs` must be a positive value.", "logprobs", self.logprobs)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = ""
    lora_int_id: int | None = None


FinishReason = Literal["stop", "length"] | None


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None,
               created: int) -> dict[str, Any]:
    """One ``/v1/models`` entry; adapters have ``parent`` = the base model and ``root`` = their path."""
    return {
        "id": model_id, "object": "model", "created": created, "owned_by": "vllm", "root": root,
        "parent": parent, "max_model_len": max_model_len,
        "permission": [{
            "id": new_id("modelperm"), "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }


@dataclass
class Choice:
    """One choice as it accumulates from deltas."""

    text: str = ""
    finish: FinishReason = None
    stop_reason: str | None = None
    tokens: int = 0
    logprobs: dict[str, Any] | None = None


TokenText = Callable[[int], str]


def _floor(logprob: float) -> float:
    return max(logprob, -9999.0)


def chat_logprobs(entries: Sequence[TokenLogprob], top: int, token_text: TokenText) -> dict[str, Any]:
    """vLLM's ``ChatCompletionLogProbs``: per token its text, log-prob, UTF-8 bytes and the first ``top``
    entries of its log-prob dict (the chosen token first, then the most likely ones)."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    content = []
    for entry in entries:
        ranked = entry.ranked()
        limit = len(ranked) if top == -1 else top
        content.append({**one(entry.token_id, entry.logprob),
                        "top_logprobs": [one(t, lp) for t, lp, _ in ranked[:limit]]})
    return {"content": content}


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], top: int,
                        token_text: TokenText, offset: int) -> dict[str, Any]:
    """vLLM's ``CompletionLogProbs``: tokens, their log-probs, the top ``top`` + 1 entries (the chosen token
    and the most likely ones) and each token's offset in the text; ``None`` for the first prompt token."""
    out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = token_text(token_id)
        out["text_offset"].append(offset)
        offset += len(text)
        out["tokens"].append(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_floor(entry.logprob))
        ranked = entry.ranked()
        limit = len(ranked) if top == -1 else top + 1
        out["top_logprobs"].append({token_text(t): _floor(lp) for t, lp, _ in ranked[:limit]})
    return out


def prompt_logprobs_json(entries: Sequence[TokenLogprob | None] | None,
                         token_text: TokenText) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: ``None`` for the first token, then ``{token id: {logprob, rank,
    decoded_token}}`` with the prompt's own token first."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": _floor(lp), "rank": r, "decoded_token": token_text(t)}
                                    for t, lp, r in e.ranked()} for e in entries]


def chat_response(rid: str, model: str, created: int, choices: list[Choice], prompt_tokens: int,
                  prompt_logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "tool_calls": []},
                     "logprobs": c.logprobs, "finish_reason": c.finish, "stop_reason": c.stop_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
        "prompt_logprobs": prompt_logprobs,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: FinishReason = None,
               index: int = 0, logprobs: dict[str, Any] | None = None,
               stop_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                         "stop_reason": stop_reason}]}


def completion_response(rid: str, model: str, created: int, choices: list[Choice], prompt_tokens: int,
                        prompt_logprobs: list[list[dict[str, Any] | None] | None]) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish,
                     "stop_reason": c.stop_reason, "prompt_logprobs": prompt_logprobs[i]}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: FinishReason = None,
                     index: int = 0, logprobs: dict[str, Any] | None = None,
                     stop_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                         "stop_reason": stop_reason}]}


def usage_chunk(rid: str, obj: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
