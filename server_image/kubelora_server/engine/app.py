"""The engine's HTTP routes, with vLLM's paths, shapes and errors.

A request becomes one sequence per choice (prompts x ``n``), all submitted to the scheduler thread at once;
their deltas come back through a queue on the event loop, so the same code path serves ``stream: true``
(SSE ``data:`` chunks, the last one with the last token's text and the finish reason, then ``data:
[DONE]``) and plain responses. A client that disconnects mid-stream sets a cancel flag that the scheduler
checks before every step, so its rows leave the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubelora_server.engine.host import ModelHost
from kubelora_server.engine.protocol import (
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    EngineError,
    FinishReason,
    LoadLoRAAdapterRequest,
    SamplingFields,
    UnloadLoRAAdapterRequest,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    model_card,
    model_not_found,
    new_id,
    now,
    prompt_logprobs_json,
    usage,
    usage_chunk,
)
from kubelora_server.engine.sampling import SamplingParams, TokenLogprob
from kubelora_server.engine.scheduler import Delta
from kubelora_server.openai_api import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    HEALTH_PATH,
    LOAD_LORA_PATH,
    MODELS_PATH,
    UNLOAD_LORA_PATH,
    error_body,
    runtime_lora_updating_allowed,
)

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class LoraInfoCollector(Collector):
    """vLLM's ``vllm:lora_requests_info``: a gauge (value: the time of the scrape) whose labels carry the
    adapters with running and waiting requests, comma-separated, and ``max_lora``. Inference gateways read
    the labels for LoRA affinity; like vLLM it appears only after the first adapter request."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        host = self.host
        base = host.args.served_model_name
        running = sorted(n for n in dict(host.running) if n != base)
        waiting = sorted(n for n in dict(host.waiting) if n != base)
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests holding the model.",
                                value=sum(dict(host.running).values()))
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued for the model.",
                                value=sum(dict(host.waiting).values()))
        if host.adapter_requests_seen:
            info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                     labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"])
            info.add_metric([",".join(running), str(host.args.max_loras), ",".join(waiting)], time.time())
            yield info


class EngineMetrics:
    """vLLM's metric names (``vllm:`` prefix, ``model_name`` label) so dashboards and gateways built for vLLM
    read the CPU engine too; plus the engine's own adapter gauge."""

    def __init__(self, host: ModelHost | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kubelora_engine_requests_total", "Completion requests by model and endpoint",
                                ["model", "endpoint"], registry=self.registry)
        self.tokens = Counter("kubelora_engine_generation_tokens_total", "Generated tokens by model", ["model"],
                              registry=self.registry)
        self.adapters = Gauge("kubelora_engine_lora_adapters", "Loaded LoRA adapters", registry=self.registry)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ["model_name"],
                                     registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         ["model_name"], registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)
        if host is not None:
            self.registry.register(LoraInfoCollector(host))

    def finished(self, model: str, reasons: list[FinishReason], prompt_tokens: int, produced: int,
                 started: float, first_token: float | None) -> None:
        for reason in reasons:
            self.success.labels(model, reason or "abort").inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(produced)
        self.e2e.labels(model).observe(time.monotonic() - started)
        if first_token is not None:
            self.ttft.labels(model).observe(first_token - started)


async def generate_many(host: ModelHost, model: str | None,
                        jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
    """Submit every job at once (so they share batches) and yield ``(job index, delta)`` as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()
    cancel = threading.Event()

    def emitter(index: int) -> Callable[[Delta | BaseException | None], None]:
        def put(item: Delta | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, item))
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                cancel.set()
        return put

    for index, job in enumerate(jobs):
        host.submit(model, job.prompt, job.params, emitter(index), cancel)
    left = len(jobs)
    try:
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        cancel.set()  # a client that went away (or an error) stops the other choices too


@dataclass(frozen=True)
class Job:
    """One choice to generate: prompts x ``n``, indexed as vLLM indexes them (prompt * n + i)."""

    prompt: list[int]
    params: SamplingParams
    echo: str = ""
    echo_logprobs: bool = False


def expand(req: SamplingFields, prompts: list[list[int]], limits: list[int], echo: list[str],
           echo_logprobs: bool = False) -> list[Job]:
    jobs = []
    for prompt, limit, echoed in zip(prompts, limits, echo, strict=True):
        req.check_min_tokens(limit)
        for i in range(req.n):
            # vLLM gives the i-th of n sequences seed + i, so n > 1 with a seed is not n copies
            seed = None if req.seed is None else req.seed + i
            prompt_logprobs = req.prompt_logprobs
            if prompt_logprobs is None and echo_logprobs:
                prompt_logprobs = req.sample_logprobs()
            jobs.append(Job(prompt, sampling_params(req, limit, seed, prompt_logprobs), echoed, echo_logprobs))
    return jobs


def sampling_params(req: SamplingFields, max_tokens: int, seed: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1, seed=seed,
        stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=req.sample_logprobs(), prompt_logprobs=prompt_logprobs,
    )


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class ChoiceBuilder:
    """Turns one choice's deltas into response pieces: text, vLLM's logprobs JSON, the echo in front."""

    def __init__(self, job: Job, chat: bool, token_text: Callable[[int], str]) -> None:
        self.job, self.chat, self.token_text = job, chat, token_text
        self.choice = Choice()
        self.entries: list[TokenLogprob | None] = []
        self.ids: list[int] = []
        self.offset = 0
        self.started = False
        self.prompt_logprobs: list[dict[str, Any] | None] | None = None

    def piece(self, delta: Delta) -> tuple[str, list[TokenLogprob | None], list[int]]:
        text, entries = delta.text, list[TokenLogprob | None](delta.logprobs)
        ids = [e.token_id for e in delta.logprobs]
        if not self.started:
            self.started = True
            self.prompt_logprobs = prompt_logprobs_json(delta.prompt_logprobs, self.token_text)
            text = self.job.echo + text
            if self.job.echo_logprobs and delta.prompt_logprobs is not None:
                entries, ids = [*delta.prompt_logprobs, *entries], [*self.job.prompt, *ids]
        c = self.choice
        c.text += text
        c.finish, c.stop_reason, c.tokens = delta.finish, delta.stop_reason, delta.completion_tokens
        self.entries += entries
        self.ids += ids
        return text, entries, ids

    def logprobs(self, entries: list[TokenLogprob | None], ids: list[int], offset: int) -> dict[str, Any] | None:
        top = self.job.params.logprobs
        if top is None:
            return None
        if self.chat:
            return chat_logprobs([e for e in entries if e is not None], top, self.token_text)
        return completion_logprobs(entries, ids, top, self.token_text, offset)

    def whole(self) -> Choice:
        self.choice.logprobs = self.logprobs(self.entries, self.ids, 0)
        return self.choice

    def chunk_logprobs(self, text: str, entries: list[TokenLogprob | None], ids: list[int]) -> dict[str, Any] | None:
        out = self.logprobs(entries, ids, self.offset)
        self.offset += len(text)
        return out


def create_app(host: ModelHost, *, allow_runtime_lora: bool | None = None) -> FastAPI:
    """The FastAPI app; ``allow_runtime_lora`` defaults to ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``."""
    app = FastAPI(title="kubelora-cpu-engine", docs_url=None, redoc_url=None)
    metrics = EngineMetrics(host)
    served = host.args.served_model_name

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()), "BadRequestError", 400), status_code=400)

    @app.get(HEALTH_PATH)
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": "kubelora-cpu-engine"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.adapters.set(len(host.adapters()))
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get(MODELS_PATH)
    async def models() -> dict[str, Any]:
        cards = [model_card(served, host.args.model, None, host.max_model_len, host.created)]
        cards += [model_card(a.name, a.path, served, None, a.created) for a in host.adapters()]
        return {"object": "list", "data": cards}

    @app.get(MODELS_PATH + "/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        """One card by id (OpenAI's retrieve-model route), 404 in vLLM's error shape for an unknown id."""
        if model_id == served:
            return model_card(served, host.args.model, None, host.max_model_len, host.created)
        for a in host.adapters():
            if a.name == model_id:
                return model_card(a.name, a.path, served, None, a.created)
        raise model_not_found(model_id)

    def check_common(req: SamplingFields) -> str:
        host.resolve(req.model)
        req.check(host.args.max_logprobs, host.vocab_size)
        return req.model or served

    async def respond(req: SamplingFields, jobs: list[Job], prompt_tokens: int, chat: bool) -> Response:
        model_name = req.model or served
        endpoint, obj = ("chat", "chat.completion.chunk") if chat else ("completions", "text_completion")
        metrics.requests.labels(model_name, endpoint).inc()
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        started = time.monotonic()
        collectors = [ChoiceBuilder(job, chat, host.token_text) for job in jobs]

        def done(first_token: float | None) -> None:
            produced = sum(c.choice.tokens for c in collectors)
            metrics.tokens.labels(model_name).inc(produced)
            metrics.finished(model_name, [c.choice.finish for c in collectors], prompt_tokens, produced, started,
                             first_token)

        if not req.stream:
            first_token: float | None = None
            async for index, delta in generate_many(host, req.model, jobs):
                first_token = first_token or time.monotonic()
                collectors[index].piece(delta)
            done(first_token)
            choices = [c.whole() for c in collectors]
            if chat:
                return JSONResponse(chat_response(rid, model_name, created, choices, prompt_tokens,
                                                  collectors[0].prompt_logprobs))
            return JSONResponse(completion_response(rid, model_name, created, choices, prompt_tokens,
                                                    [c.prompt_logprobs for c in collectors]))

        options = req.stream_options
        continuous = bool(options and options.continuous_usage_stats)

        def with_usage(chunk: dict[str, Any], index: int, tokens: int) -> dict[str, Any]:
            if continuous:
                chunk["usage"] = usage(len(jobs[index].prompt), tokens)
            return chunk

        async def events() -> AsyncIterator[str]:
            first_token: float | None = None
            try:
                if chat:
                    for index in range(len(jobs)):
                        yield _sse(with_usage(chat_chunk(rid, model_name, created,
                                                         {"role": "assistant", "content": ""}, None, index),
                                              index, 0))
                async for index, delta in generate_many(host, req.model, jobs):
                    first_token = first_token or time.monotonic()
                    col = collectors[index]
                    text, entries, ids = col.piece(delta)
                    logprobs = col.chunk_logprobs(text, entries, ids)
                    if chat:
                        body = chat_chunk(rid, model_name, created, {"content": text} if text else {},
                                          delta.finish, index, logprobs, delta.stop_reason)
                    else:
                        body = completion_chunk(rid, model_name, created, text, delta.finish, index, logprobs,
                                                delta.stop_reason)
                    yield _sse(with_usage(body, index, delta.completion_tokens))
                if options is not None and options.include_usage:
                    yield _sse(usage_chunk(rid, obj, model_name, created, prompt_tokens,
                                           sum(c.choice.tokens for c in collectors)))
            except EngineError as exc:
                yield _sse(exc.body())
            except Exception as exc:
                log.exception("generation failed")
                yield _sse(error_body(str(exc), "InternalServerError", 500))
            done(first_token)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post(CHAT_PATH)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        check_common(req)
        prompt = host.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        limit = host.max_tokens_for(len(prompt), req.requested_max_tokens())
        return await respond(req, expand(req, [prompt], [limit], [""]), len(prompt), chat=True)

    @app.post(COMPLETIONS_PATH)
    async def completions(req: CompletionRequest) -> Response:
        check_common(req)
        raw: list[str | list[int]]
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            raw = [[int(t) for t in req.prompt]]
        elif isinstance(req.prompt, list):
            raw = [str(p) for p in req.prompt]
        else:
            raw = [req.prompt]
        if not raw:
            raise EngineError(400, "BadRequestError", "prompt must not be empty")
        prompts = [host.text_prompt(p) for p in raw]
        limits = [host.max_tokens_for(len(p), req.requested_max_tokens()) for p in prompts]
        echo = [(p if isinstance(p, str) else host.decode(p)) if req.echo else "" for p in raw]
        jobs = expand(req, prompts, limits, echo, echo_logprobs=req.echo and req.logprobs is not None)
        return await respond(req, jobs, sum(len(p) for p in prompts), chat=False)

    if runtime_lora_updating_allowed() if allow_runtime_lora is None else allow_runtime_lora:
        log.warning("LoRA dynamic loading & unloading is enabled in the API server (%s)", LOAD_LORA_PATH)

        @app.post(LOAD_LORA_PATH)
        async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
            await asyncio.to_thread(host.load_adapter, req.lora_name, req.lora_path, req.load_inplace)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

        @app.post(UNLOAD_LORA_PATH)
        async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
            await asyncio.to_thread(host.unload_adapter, req.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return app
