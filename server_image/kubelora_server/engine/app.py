"""The engine's HTTP routes, with vLLM's paths, shapes and errors.

Generation runs in a worker thread (it holds the model lock and would otherwise block the event loop) and
hands text deltas back through a queue, so the same code path serves ``stream: true`` (SSE ``data:`` chunks
then ``data: [DONE]``) and plain responses. A client that disconnects mid-stream sets a cancel flag that
the worker checks after every token, so the lock is not held for tokens nobody reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubelora_server.engine.host import Delta, ModelHost
from kubelora_server.engine.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EngineError,
    FinishReason,
    LoadLoRAAdapterRequest,
    SamplingFields,
    UnloadLoRAAdapterRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    model_not_found,
    new_id,
    now,
    usage_chunk,
)
from kubelora_server.engine.sampling import SamplingParams
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


async def generate_deltas(host: ModelHost, model: str | None, prompt: list[int],
                          params: SamplingParams) -> AsyncIterator[Delta]:
    """Run :meth:`ModelHost.generate` in a worker thread and yield its deltas on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Delta | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            cancel.set()

    def work() -> None:
        try:
            for delta in host.generate(model, prompt, params, cancel):
                put(delta)
        except BaseException as exc:
            put(exc)
        finally:
            put(None)

    loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()


def sampling_params(req: SamplingFields, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1, seed=req.seed,
        stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos,
    )


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


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
        if req.n != 1:
            raise EngineError(400, "BadRequestError", "The CPU engine supports n=1 only.")
        return req.model or served

    async def respond(req: SamplingFields, prompts: list[list[int]], max_tokens: list[int], endpoint: str,
                      whole: Callable[[str, str, int, list[tuple[str, FinishReason]], int, int], dict[str, Any]],
                      chunk: Callable[..., dict[str, Any]], first: Callable[[str, str, int, int], str | None],
                      obj: str, echo: list[str]) -> Response:
        model_name = req.model or served
        metrics.requests.labels(model_name, endpoint).inc()
        rid, created = new_id("chatcmpl" if endpoint == "chat" else "cmpl"), now()
        prompt_tokens = sum(len(p) for p in prompts)
        started = time.monotonic()
        if not req.stream:
            outs: list[tuple[str, FinishReason]] = []
            produced = 0
            first_token: float | None = None
            for i, prompt in enumerate(prompts):
                text, finish = echo[i], None
                async for delta in generate_deltas(host, req.model, prompt, sampling_params(req, max_tokens[i])):
                    first_token = first_token or time.monotonic()
                    text += delta.text
                    if delta.finish:
                        finish, produced = delta.finish, produced + delta.completion_tokens
                outs.append((text, finish))
            metrics.tokens.labels(model_name).inc(produced)
            metrics.finished(model_name, [f for _, f in outs], prompt_tokens, produced, started, first_token)
            return JSONResponse(whole(rid, model_name, created, outs, prompt_tokens, produced))

        async def events() -> AsyncIterator[str]:
            produced = 0
            first_token: float | None = None
            finishes: list[FinishReason] = []
            try:
                for i, prompt in enumerate(prompts):
                    opening = first(rid, model_name, created, i)
                    if opening:
                        yield opening
                    if echo[i]:
                        yield _sse(chunk(rid, model_name, created, echo[i], index=i))
                    async for delta in generate_deltas(host, req.model, prompt,
                                                       sampling_params(req, max_tokens[i])):
                        first_token = first_token or time.monotonic()
                        if delta.finish:
                            produced += delta.completion_tokens
                            finishes.append(delta.finish)
                        if delta.text or delta.finish:
                            yield _sse(chunk(rid, model_name, created, delta.text, delta.finish, index=i))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse(usage_chunk(rid, obj, model_name, created, prompt_tokens, produced))
            except EngineError as exc:
                yield _sse(exc.body())
            except Exception as exc:
                log.exception("generation failed")
                yield _sse(error_body(str(exc), "InternalServerError", 500))
            metrics.tokens.labels(model_name).inc(produced)
            metrics.finished(model_name, finishes, prompt_tokens, produced, started, first_token)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post(CHAT_PATH)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        check_common(req)
        prompt = host.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        limit = host.max_tokens_for(len(prompt), req.requested_max_tokens())

        def chat_delta(rid: str, model: str, created: int, text: str, finish: FinishReason = None,
                       index: int = 0) -> dict[str, Any]:
            return chat_chunk(rid, model, created, {"content": text} if text else {}, finish, index)

        def opening(rid: str, model: str, created: int, index: int) -> str:
            return _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, index))

        return await respond(req, [prompt], [limit], "chat", chat_response, chat_delta, opening,
                             "chat.completion.chunk", [""])

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
        return await respond(req, prompts, limits, "completions", completion_response, completion_chunk,
                             lambda *_: None, "text_completion", echo)

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
