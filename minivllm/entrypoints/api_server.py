"""The OpenAI-compatible HTTP server: a FastAPI app over one AsyncLLM (never the scheduler).

Every request is read (bounded), parsed and checked before any work; errors answer with OpenAI's error body.
Streams are server-sent events, one chunk per engine output (the outputs that came while a client lagged, merged
into one). A client that disconnects has its requests aborted at once; a full queue answers 503; an engine
failure answers 500 and /health fails from then on.
"""

import asyncio
import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from minivllm.async_llm import AsyncLLM
from minivllm.entrypoints import protocol as p
from minivllm.entrypoints.serving import (
    Collector,
    RequestError,
    bad_request,
    chat_prompt,
    parse_json,
    prepare_chat,
    prepare_completion,
    prompt_index,
    refused,
    validate_request,
)
from minivllm.outputs import RequestOutput

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key
# seconds; TTFT and TPOT buckets as vLLM's, end-to-end up to 20 minutes
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1200.0)


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    model: str  # as given on the command line
    api_key: str | None = None
    max_pending_requests: int = 1024  # requests in flight (running or waiting) before new ones get 503
    max_request_bytes: int = 8 << 20
    chat_template: str | None = None


class EngineMetrics:
    """/metrics: the engine's gauges and token totals read at each scrape, latency histograms per request."""

    def __init__(self, engine: AsyncLLM):
        self.engine = engine
        # the time each histogram was made, as a series of its own: not one of vLLM's metrics, so none here (the
        # switch is prometheus-client's, for the whole process: a server's)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.ttft = Histogram("minivllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("minivllm:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("minivllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, registry=self.registry)

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("minivllm:num_requests_running", "Sequences in the running batch.",
                                value=engine.num_running_seqs)
        yield GaugeMetricFamily("minivllm:num_requests_waiting", "Sequences waiting to be scheduled.",
                                value=engine.num_waiting_seqs)
        yield GaugeMetricFamily("minivllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                                value=engine.kv_cache_usage)
        yield CounterMetricFamily("minivllm:prompt_tokens", "Prompt tokens computed.", value=stats.prompt_tokens)
        yield CounterMetricFamily("minivllm:generation_tokens", "Tokens generated.", value=stats.generation_tokens)

    def observe(self, output: RequestOutput, num_tokens: int) -> None:
        """A finished request's latencies."""
        times = output.metrics
        if times is None or times.first_token_time is None or times.finished_time is None:
            return
        self.ttft.observe(times.first_token_time - times.arrival_time)
        self.e2e.observe(times.finished_time - times.arrival_time)
        if num_tokens > 1:
            self.tpot.observe((times.finished_time - times.first_token_time) / (num_tokens - 1))


class Server:
    """The app's state: the engine, its settings, the requests in flight and the metrics."""

    def __init__(self, engine: AsyncLLM, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = EngineMetrics(engine)
        self.in_flight = 0

    # ----- reading requests --------------------------------------------------------------------------------------
    async def read(self, request: Request, model: type[pydantic.BaseModel]):
        """The body, bounded in size, parsed and validated, and naming the field at fault when it is not."""
        limit = self.settings.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise RequestError(413, f"the request body is over the limit of {limit} bytes",
                                   code="request_too_large")
        return validate_request(parse_json(bytes(body)), model, self.settings.served_model_name)

    # ----- generating ------------------------------------------------------------------------------------------
    async def run(self, request: Request, prompts: list, params, collector: Collector, stream: bool) -> Response:
        if self.in_flight >= self.settings.max_pending_requests:
            raise RequestError(503, f"the server has {self.in_flight} requests in flight, its limit; retry later",
                               type="server_error", code="overloaded")
        self.in_flight += 1
        outputs = self.engine_outputs(collector.id, prompts, params)
        try:
            first = await anext(outputs)  # a bad request fails here, before any response is started
        except BaseException as e:
            self.in_flight -= 1
            await outputs.aclose()
            if isinstance(e, (ValueError, TypeError)):
                raise refused(e) from e
            raise
        if stream:
            options = collector.stream_options or p.StreamOptions()
            return StreamingResponse(self.stream(first, outputs, collector, options), media_type="text/event-stream")
        try:
            return JSONResponse((await until_disconnected(request, self.collect(first, outputs, collector))
                                 ).model_dump())
        finally:
            self.in_flight -= 1

    def engine_outputs(self, base_id: str, prompts: list, params) -> AsyncGenerator[RequestOutput, None]:
        """Every prompt's outputs as they arrive, prompt i's under the request id f"{base_id}-{i}" (prompt_index
        reads i back); closing it aborts them all."""
        if len(prompts) == 1:  # most requests: the engine's own generator, no layer, task or queue in between
            return self.engine.generate(prompts[0], params, f"{base_id}-0")
        return self.merged_outputs(base_id, prompts, params)

    async def merged_outputs(self, base_id: str, prompts: list, params) -> AsyncGenerator[RequestOutput, None]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt) -> None:
            try:
                async for output in self.engine.generate(prompt, params, f"{base_id}-{index}"):
                    queue.put_nowait(output)
                queue.put_nowait(None)
            except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i, prompt)) for i, prompt in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    remaining -= 1
                    continue
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def observe(self, collector: Collector, index: int, output: RequestOutput) -> None:
        """A finished output's latencies, once the collector has counted its tokens."""
        if output.finished:
            self.metrics.observe(output, collector.completion_tokens(index))

    async def collect(self, first: RequestOutput, outputs, collector: Collector):
        output = first
        while output is not None:
            index = prompt_index(output.request_id)
            collector.add(index, output)
            self.observe(collector, index, output)
            output = await anext(outputs, None)
        return collector.response()

    async def stream(self, first: RequestOutput, outputs, collector: Collector, options: p.StreamOptions
                     ) -> AsyncIterator[str]:
        try:
            output = first
            while output is not None:
                index = prompt_index(output.request_id)
                choices = collector.chunk_choices(index, output)
                self.observe(collector, index, output)
                if choices:
                    usage = collector.usage() if options.continuous_usage_stats else None
                    yield f"data: {collector.chunk(choices, usage)}\n\n"
                output = await anext(outputs, None)
            if options.include_usage:
                yield f"data: {collector.chunk([], collector.usage())}\n\n"
        except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: the 200 is sent, so say it in the stream
            yield f"data: {json.dumps(engine_failed(self.engine, e).body())}\n\n"
        finally:
            self.in_flight -= 1
            await outputs.aclose()
        yield "data: [DONE]\n\n"


def engine_failed(engine: AsyncLLM, error: BaseException) -> RequestError:
    what = "the engine has stopped" if not engine.is_running else "internal error"
    return RequestError(500, f"{what}: {error!r}", type="server_error", code="engine_dead")


async def until_disconnected(request: Request, work):
    """work's result, or its cancellation (which aborts its requests) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


class Authorization:
    """`Authorization: Bearer KEY` on every route but OPEN_PATHS, as a plain ASGI middleware: starlette's
    BaseHTTPMiddleware (@app.middleware) passes every chunk of every stream through a memory stream of its own,
    which took half the server's time per chunk in a profile of the serving benchmark."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = RequestError(401, "Invalid or missing API key (Authorization: Bearer KEY)",
                                     code="invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    server = Server(engine, settings)
    app = FastAPI(title="minivllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    tokenizer = engine.tokenizer

    if settings.api_key:
        app.add_middleware(Authorization, key=settings.api_key)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return error_response(error)

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception):
        return error_response(engine_failed(engine, error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return error_response(RequestError(error.status_code, str(error.detail)))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_response(RequestError(500, "the engine has stopped", type="server_error",
                                               code="engine_dead"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = p.ModelCard(id=settings.served_model_name, root=settings.model, max_model_len=engine.max_model_len)
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await server.read(request, p.CompletionRequest)
        prompts, params, collector = prepare_completion(body, tokenizer, engine.max_model_len,
                                                        settings.served_model_name)
        return await server.run(request, prompts, params, collector, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await server.read(request, p.ChatCompletionRequest)
        prompts, params, collector = prepare_chat(body, tokenizer, engine.max_model_len, settings.served_model_name,
                                                  settings.chat_template)
        return await server.run(request, prompts, params, collector, body.stream)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await server.read(request, p.TokenizeRequest)
        if tokenizer is None:
            raise RequestError(400, "this model has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise RequestError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            chat_body = p.ChatCompletionRequest(messages=body.messages, chat_template_kwargs=body.chat_template_kwargs,
                                                add_generation_prompt=body.add_generation_prompt)
            ids = chat_prompt(chat_body, tokenizer, settings.chat_template)["prompt_token_ids"]
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return p.TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await server.read(request, p.DetokenizeRequest)
        if tokenizer is None:
            raise RequestError(400, "this model has no tokenizer")
        try:
            return p.DetokenizeResponse(prompt=tokenizer.decode(body.tokens)).model_dump()
        except (ValueError, TypeError, OverflowError) as e:
            raise bad_request(e, "tokens") from e

    return app


def error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
