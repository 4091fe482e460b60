"""The OpenAI API's request and response shapes that `phiedge serve` speaks (chat completions, completions,
models), as pydantic models. Requests ignore fields the server does not act on (`user`, `metadata`, ...),
as OpenAI's own server does for fields it does not know; fields that would change the answer and are not
supported are refused by the server with a 400 (`n` above 1, logprobs)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Function(Loose):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Loose):
    type: Literal["function"] = "function"
    function: Function


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: CalledFunction


class ContentPart(Loose):
    type: str
    text: str | None = None


class Message(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class JsonSchema(Loose):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None


class StreamOptions(Loose):
    include_usage: bool = False  # a last chunk, with no choices, carries the usage


class Sampling(Loose):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    def usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: OpenAI's default, true
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Reply(BaseModel):
    """What one generation produced, before it is shaped as a chat or a completion response."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage


def response_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
