"""From OpenAI messages to the model's prompt, and from the model's text back to content, reasoning and tool calls.

The prompt is the model's own chat template, from the bundle's tokenizer files (onnxruntime-genai renders it, as
the bundled generate.py does). What a format can do comes from the catalog (variants/chat_formats): tools where
its special tokens have Phi-4-mini's `<|tool_call|>`, whose template puts the tool list in the system turn
between `<|tool|>` and `<|/tool|>` and whose model answers `<|tool_call|>[{"name": ..., "arguments": {...}}]
<|/tool_call|>`; tool results go back as `<|tool_response|>` turns (the template writes a message's role as
`<|role|>`). Reasoning where the variant thinks aloud (`thinks` in variants/*.yaml): the text between `<think>`
and `</think>` is the reply's reasoning_content. A forced tool choice (`required`, or one named function) starts
the reply inside `<|tool_call|>` and constrains it to the JSON of calls to the allowed tools (`call_schema`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from phiedge import catalog
from phiedge.errors import ServeRequestError
from phiedge.serve.protocol import CalledFunction, Message, Tool, ToolCall

TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"
THINK, THINK_END = "<think>", "</think>"
# llguidance's options for a JSON schema: spaced as json.dumps spaces it (as the history's calls are rendered), with
# no free whitespace, which a model could otherwise write until max_tokens. A schema's own x-guidance wins.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_ROLE = "tool_response"  # the Phi-4-mini turn a tool's result goes back in


@dataclass(frozen=True)
class Format:
    tools: bool = False
    thinks: bool = False

    @staticmethod
    def of(variant: str | None) -> Format:
        if variant is None:
            return Format()
        fmt = catalog.chat_format_of(variant)
        return Format(tools=bool(fmt and TOOL_CALL in fmt.special_tokens), thinks=catalog.find_variant(variant).thinks)


def template_messages(messages: list[Message], tools: list[Tool] | None, fmt: Format) -> list[dict]:
    """The messages as the chat template reads them: text content, tool calls written out, the tool list on the
    system turn."""
    if tools and not fmt.tools:
        raise ServeRequestError("this model's chat format has no tool calls: leave out 'tools'")
    out = []
    for m in messages:
        role = {"developer": "system", "tool": TOOL_ROLE}.get(m.role, m.role)
        if m.role == "tool" and not fmt.tools:
            raise ServeRequestError("this model's chat format has no tool turns: 'tool' messages cannot be sent")
        text = m.text()
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments or "{}")}
                     for c in m.tool_calls]
            text += f"{TOOL_CALL}{json.dumps(calls)}{TOOL_CALL_END}"
        out.append({"role": role, "content": text})
    if tools:
        listed = json.dumps([t.function.model_dump(exclude_none=True) for t in tools])
        if not out or out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["tools"] = listed
    return out


def forced_tools(tools: list[Tool] | None, choice: str | dict | None) -> list[Tool] | None:
    """The tools the reply must call (tool_choice `required`, or {"type": "function", "function": {"name": ...}}),
    or None where the model may answer in text."""
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise ServeRequestError("tool_choice other than 'auto' or 'none' needs tools")
    if choice == "required":
        return tools
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ServeRequestError(f"tool_choice {choice!r} is not 'none', 'auto', 'required' or a named function")
    named = [t for t in tools if t.function.name == name]
    if not named:
        raise ServeRequestError(f"tool_choice names {name!r}, which is not among the request's tools")
    return named


def call_schema(tools: list[Tool], one: bool) -> dict:
    """The JSON schema of what Phi-4-mini writes inside `<|tool_call|>`: a list of {name, arguments}, each name one of
    the tools' and its arguments that tool's parameters; one call when a single function was named or parallel calls
    are off."""
    calls, defs = [], {}
    for i, t in enumerate(tools):
        parameters, own = hoisted(t.function.parameters or {"type": "object"}, f"tool{i}_")
        defs.update(own)
        calls.append({"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
            **({"maxItems": 1} if one else {}), **({"$defs": defs} if defs else {})}


def hoisted(schema: dict, prefix: str) -> tuple[dict, dict]:
    """A tool's parameters schema without its own `$defs` (or `definitions`), which move to the top of the calls'
    schema under prefixed names, its `$ref`s rewritten to them: a `#/...` reference is read from the top."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def rewrite(node):
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions") or node is not schema}
            ref = out.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root) and ref[len(root):] in defs:
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(root):]}"
            return out
        return [rewrite(v) for v in node] if isinstance(node, list) else node

    return rewrite(schema), {f"{prefix}{name}": rewrite(d) for name, d in defs.items()}


def compact(schema: dict) -> str:
    """The schema as onnxruntime-genai's guidance takes it, with COMPACT under any x-guidance options of its own."""
    return json.dumps({**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}})


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in the text of one `<|tool_call|>...<|/tool_call|>`: a JSON list of {name, arguments}, or one."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ServeRequestError(f"the model's tool call is not JSON: {text[:200]!r}") from None
    calls = data if isinstance(data, list) else [data]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ServeRequestError(f"the model's tool call names no function: {text[:200]!r}")
        arguments = call.get("arguments", call.get("parameters", {}))
        out.append(ToolCall(function=CalledFunction(
            name=call["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))))
    return out


@dataclass
class Splitter:
    """Routes the model's text, piece by piece, to content, reasoning or a tool call, and sees the stop strings.

    A piece is held back while its end could still be the start of a marker, so that no marker's first characters
    reach the client as content."""

    stops: list[str]
    fmt: Format
    in_reasoning: bool = False
    in_tool: bool = False
    stopped: bool = False
    pending: str = ""
    tool_text: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def markers(self) -> list[str]:
        if self.in_tool:
            return [TOOL_CALL_END]
        found = list(self.stops)
        if self.fmt.tools:
            found.append(TOOL_CALL)
        if self.fmt.thinks:
            found.append(THINK_END if self.in_reasoning else THINK)
        return found

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """(kind, text) events: kind is "content" or "reasoning"; tool calls are collected in `calls`."""
        self.pending += piece
        events: list[tuple[str, str]] = []
        while self.pending and not self.stopped:
            hits = [(self.pending.find(m), m) for m in self.markers() if m in self.pending]
            if not hits:
                keep = max((k for m in self.markers() for k in range(1, len(m)) if self.pending.endswith(m[:k])),
                           default=0)
                self.emit(self.pending[:len(self.pending) - keep], events)
                self.pending = self.pending[len(self.pending) - keep:]
                break
            at, marker = min(hits)
            self.emit(self.pending[:at], events)
            self.pending = self.pending[at + len(marker):]
            self.switch(marker)
        return events

    def emit(self, text: str, events: list[tuple[str, str]]) -> None:
        if not text:
            return
        if self.in_tool:
            self.tool_text.append(text)
        else:
            events.append(("reasoning" if self.in_reasoning else "content", text))

    def switch(self, marker: str) -> None:
        if marker == TOOL_CALL:
            self.in_tool, self.tool_text = True, []
        elif marker == TOOL_CALL_END:
            self.in_tool = False
            self.calls.append("".join(self.tool_text))
        elif marker == THINK:
            self.in_reasoning = True
        elif marker == THINK_END:
            self.in_reasoning = False
        else:  # a stop string
            self.stopped = True

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, at the end of generation (an unclosed tool call counts as one)."""
        events: list[tuple[str, str]] = []
        if not self.stopped:
            self.emit(self.pending, events)
        self.pending = ""
        if self.in_tool:
            self.in_tool = False
            self.calls.append("".join(self.tool_text))
        return events

    def tool_calls(self) -> list[ToolCall]:
        return [call for text in self.calls for call in parse_tool_calls(text.strip())]
