"""`phiedge serve`: the OpenAI API over one loaded model (FastAPI), for clients, agents and editors unchanged.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions and /v1/completions, each streamed as server-sent
events with `stream: true`. Errors have OpenAI's shape and never carry a traceback: 400 for a request the model
cannot answer as asked (a prompt over the context cap, tools for a format without them, n above 1, a forced tool
choice or response_format where this onnxruntime-genai build cannot constrain decoding), 401 for a
missing or wrong API key, 404 for another model's name, 429 with Retry-After when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from phiedge.errors import ServerBusy, ServeRequestError
from phiedge.serve.chat import (
    TOOL_CALL,
    TOOL_CALL_END,
    Format,
    Splitter,
    call_schema,
    compact,
    forced_tools,
    template_messages,
)
from phiedge.serve.engine import Engine, Job
from phiedge.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Reply,
    Sampling,
    Usage,
    error_body,
    now,
    response_id,
)


@dataclass(frozen=True)
class Served:
    engine: Engine
    name: str  # the model name clients ask for
    fmt: Format
    api_key: str | None = None


def error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None):
    return JSONResponse(error_body(message, kind, code), status_code=status, headers=headers)


def guidance_of(request: ChatRequest, engine: Engine, forced) -> tuple[str, str] | None:
    fmt = request.response_format
    constrained = fmt is not None and fmt.type != "text"
    if constrained and forced:
        raise ServeRequestError("response_format and a forced tool_choice cannot be combined: the reply is the calls")
    if (constrained or forced) and not engine.guidance:
        what = "response_format" if constrained else "tool_choice other than 'auto' or 'none'"
        raise ServeRequestError(f"{what} needs constrained decoding, which this onnxruntime-genai build lacks")
    if forced:
        one = request.tool_choice != "required" or request.parallel_tool_calls is False
        return "json_schema", compact(call_schema(forced, one))
    if not constrained:
        return None
    if fmt.type == "json_object":
        return "json_schema", compact({"type": "object"})
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise ServeRequestError("response_format json_schema needs json_schema.schema")
    return "json_schema", compact(fmt.json_schema.schema_)


async def parse(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, whatever Content-Type the client sent (curl -d sends a form type)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ServeRequestError("the body is not valid JSON") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ServeRequestError(f"{where + ': ' if where else ''}{first['msg']}") from None


def model_ids(served: Served) -> list[str]:
    """The base model's name, and `base:NAME` for each of its LoRA adapters."""
    return [served.name] + [f"{served.name}:{a}" for a in served.engine.adapter_names]


def adapter_of(model: str, served: Served) -> str | None:
    """The LoRA adapter a request's model names (`base:NAME`), None for the base; LookupError for another model."""
    if model not in model_ids(served):
        names = ", ".join(map(repr, model_ids(served)))
        raise LookupError(f"model {model!r} is not served here (this server has {names})")
    return model.split(":", 1)[1] if model != served.name else None


def check_sampling(request: Sampling, served: Served) -> None:
    adapter_of(request.model, served)
    if request.n != 1:
        raise ServeRequestError(f"n={request.n}: one choice per request is served")
    if request.logprobs:
        raise ServeRequestError("logprobs are not served")


async def watch(http: Request, job: Job) -> None:
    """Cancels the job when its client goes away. Starlette's streamed response listens for that itself; a
    non-streamed one reads nothing until the reply is written, so this task waits on the connection's next message
    (http.disconnect) for both."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


async def generation(served: Served, http: Request, prompt_ids: list[int], request: Sampling,
                     max_tokens: int | None, guidance: tuple[str, str] | None,
                     in_tool: bool = False) -> AsyncIterator[tuple[str, str] | Reply]:
    """(kind, text) events as the model writes them, then the Reply; a client gone stops the model. in_tool: the
    prompt ends in `<|tool_call|>`, so the reply starts inside a call."""
    engine, cap = served.engine, served.engine.max_length
    if len(prompt_ids) >= cap:
        raise ServeRequestError(f"the prompt is {len(prompt_ids)} tokens and this model's context cap is {cap} tokens "
                           "(prompt and reply together): shorten the prompt")
    if engine.window is not None and len(prompt_ids) > engine.window:
        raise ServeRequestError(f"the prompt is {len(prompt_ids)} tokens and this NPU model takes at most "
                                f"{engine.window} (its static window): shorten the prompt")
    room = cap - len(prompt_ids)
    job = Job(prompt_ids, min(max_tokens or room, room), request.temperature, request.top_p, request.seed, guidance,
              adapter_of(request.model, served), loop=asyncio.get_running_loop())
    engine.submit(job)
    watcher = asyncio.create_task(watch(http, job))
    decoder, splitter = engine.tokenizer.create_stream(), Splitter(request.stops(), served.fmt, in_tool=in_tool)
    finish, count = "length", 0
    try:
        async with contextlib.aclosing(engine.tokens(job)) as tokens:
            async for token in tokens:
                if token in engine.eos:
                    finish = "stop"
                    break
                count += 1
                for event in splitter.feed(decoder.decode(token)):
                    yield event
                if splitter.stopped:
                    finish = "stop"
                    break
    finally:
        watcher.cancel()
    for event in splitter.finish():
        yield event
    try:
        calls = splitter.tool_calls()
    except ServeRequestError:  # not a call a client could make: the text goes back as the model wrote it
        calls = []
        yield "content", "".join(f"{TOOL_CALL}{text}{TOOL_CALL_END}" for text in splitter.calls)
    yield Reply(content="", tool_calls=calls or None, finish_reason="tool_calls" if calls else finish,
                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=count,
                            total_tokens=len(prompt_ids) + count))


async def collect(events: AsyncIterator) -> Reply:
    parts: dict[str, list[str]] = {"content": [], "reasoning": []}
    async for event in events:
        if isinstance(event, Reply):
            return event.model_copy(update={"content": "".join(parts["content"]),
                                            "reasoning": "".join(parts["reasoning"]) or None})
        parts[event[0]].append(event[1])
    raise RuntimeError("the generation ended without a reply")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_message(reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else "")}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [c.model_dump() for c in reply.tool_calls]
    return message


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="phiedge serve", docs_url=None, redoc_url=None, openapi_url=None)

    if served.api_key:
        app.add_middleware(Authorize, key=served.api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    def failure(exc: Exception) -> JSONResponse:
        if isinstance(exc, ServeRequestError):
            return error(400, str(exc), "invalid_request_error")
        if isinstance(exc, LookupError):
            return error(404, str(exc), "invalid_request_error", "model_not_found")
        if isinstance(exc, ServerBusy):
            return error(429, f"busy: {exc}", "rate_limit_error", headers={"Retry-After": "1"})
        raise exc

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "queued": served.engine.waiting,
                "generated_tokens": served.engine.generated, "cancelled": served.engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now(), "owned_by": "phiedge"}
                                           for name in model_ids(served)]}

    async def answer(http: Request, request: Sampling, prompt_ids: list[int], max_tokens, guidance, shape,
                     in_tool: bool = False):
        """The non-streamed response, or the stream; errors before the first token are plain responses."""
        events = generation(served, http, prompt_ids, request, max_tokens, guidance, in_tool)
        if not request.stream:
            return shape(await collect(events))
        first = await anext(events)  # the queue and the context cap answer before any byte is streamed
        return StreamingResponse(shape.stream(first, events), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        try:
            request = await parse(http, ChatRequest)
            check_sampling(request, served)
            if not request.messages:
                raise ServeRequestError("messages is empty")
            tools = None if request.tool_choice == "none" else request.tools
            forced = forced_tools(tools, request.tool_choice)
            prompt = served.engine.render(template_messages(request.messages, tools, served.fmt))
            return await answer(http, request, served.engine.encode(prompt + (TOOL_CALL if forced else "")),
                                request.max_completion_tokens or request.max_tokens,
                                guidance_of(request, served.engine, forced),
                                ChatShape(request.model, request.usage_chunk()), in_tool=bool(forced))
        except (ServeRequestError, LookupError, ServerBusy) as exc:
            return failure(exc)

    @app.post("/v1/completions")
    async def completions(http: Request):
        try:
            request = await parse(http, CompletionRequest)
            check_sampling(request, served)
            prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            if len(prompts) != 1:
                raise ServeRequestError("one prompt per request is served")
            return await answer(http, request, served.engine.encode(prompts[0]), request.max_tokens, None,
                                CompletionShape(request.model, prompts[0] if request.echo else "",
                                                request.usage_chunk()))
        except (ServeRequestError, LookupError, ServerBusy) as exc:
            return failure(exc)

    return app


@dataclass
class Authorize:
    """Requires `Authorization: Bearer KEY` on /v1/ routes. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware wraps the connection's messages and would hide a client's disconnect from `watch`."""

    app: ASGIApp
    key: str

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.key}".encode()):
                response = error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                 "invalid_request_error", "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


@dataclass
class ChatShape:
    model: str
    usage_chunk: bool = False  # stream_options.include_usage: every chunk says usage null, a last one carries it

    def __post_init__(self):
        self.id, self.created = response_id("chatcmpl"), now()

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def __call__(self, reply: Reply) -> dict:
        return {**self.head(), "object": "chat.completion", "usage": reply.usage.model_dump(),
                "choices": [{"index": 0, "message": chat_message(reply), "finish_reason": reply.finish_reason}]}

    def chunk(self, delta: dict | None, finish: str | None = None, usage: Usage | None = None) -> dict:
        """A stream chunk; with no delta, the usage chunk (no choices)."""
        out = {**self.head(), "object": "chat.completion.chunk",
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**out, "usage": usage and usage.model_dump()} if self.usage_chunk else out

    async def stream(self, first, events: AsyncIterator) -> AsyncIterator[str]:
        yield sse(self.chunk({"role": "assistant", "content": ""}))
        async with contextlib.aclosing(events):
            event = first
            while True:
                if isinstance(event, Reply):
                    if event.tool_calls:
                        yield sse(self.chunk({"tool_calls": [{"index": i, **c.model_dump()}
                                                             for i, c in enumerate(event.tool_calls)]}))
                    yield sse(self.chunk({}, event.finish_reason))
                    if self.usage_chunk:
                        yield sse(self.chunk(None, usage=event.usage))
                    break
                kind, text = event
                yield sse(self.chunk({"reasoning_content" if kind == "reasoning" else "content": text}))
                event = await anext(events)
        yield sse("[DONE]")


@dataclass
class CompletionShape:
    model: str
    echo: str = ""
    usage_chunk: bool = False  # as ChatShape's

    def __post_init__(self):
        self.id, self.created = response_id("cmpl"), now()

    def body(self, text: str | None, finish: str | None, usage: Usage | None = None) -> dict:
        """A response or a stream chunk; with no text, the usage chunk (no choices)."""
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [] if text is None else [{"index": 0, "text": text, "finish_reason": finish,
                                                     "logprobs": None}]}
        return {**out, "usage": usage and usage.model_dump()} if usage or self.usage_chunk else out

    def __call__(self, reply: Reply) -> dict:
        return self.body(self.echo + reply.content, reply.finish_reason, reply.usage)

    async def stream(self, first, events: AsyncIterator) -> AsyncIterator[str]:
        async with contextlib.aclosing(events):
            if self.echo:
                yield sse(self.body(self.echo, None))
            event = first
            while not isinstance(event, Reply):
                yield sse(self.body(event[1], None))
                event = await anext(events)
            yield sse(self.body("", event.finish_reason))
            if self.usage_chunk:
                yield sse(self.body(None, None, event.usage))
        yield sse("[DONE]")
