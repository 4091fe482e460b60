"""`phiedge serve` as a client sees it: the real server in its own process on a free loopback port, the official
`openai` package unchanged as the client, and the text routing (tool calls, reasoning) on recorded model output."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving import KEY, NAME, client, rss_kb, serving

from phiedge.errors import ServeRequestError
from phiedge.serve.chat import Format, Splitter, template_messages
from phiedge.serve.protocol import Message, Tool


@pytest.fixture(scope="module")
def server(builds, tmp_path_factory):
    """The int4 Phi-4-mini-shaped build, served."""
    yield from serving(builds("phi-4-mini", "int4"), tmp_path_factory.mktemp("serve") / "server.log")


@pytest.fixture(scope="module")
def thinking_server(thinking, tmp_path_factory):
    """A reasoning variant whose weights script a <think> block and an answer (tests/scripted.py), served."""
    yield from serving(thinking, tmp_path_factory.mktemp("serve") / "server.log")


def prompt_tokens(model_dir: Path, messages: list[dict]) -> int:
    from phiedge.bundle.model_safety import load

    _, tokenizer = load(model_dir)
    return len(tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)))


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]


def test_chat_completion_streamed_and_not_and_its_usage(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == prompt_tokens(server["model"], MESSAGES)
    assert reply.usage.completion_tokens == (12 if reply.choices[0].finish_reason == "length" else
                                             reply.usage.completion_tokens) and reply.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    again = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text  # greedy: the same every time
    done = c.completions.create(model=NAME, prompt="def main():", max_tokens=6, temperature=0)
    assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
    streamed = list(c.completions.create(model=NAME, prompt="def main():", max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == done.choices[0].text
    stopped = c.completions.create(model=NAME, prompt="def main():", max_tokens=6, temperature=0,
                                   stop=[done.choices[0].text[2:4]])
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) <= 2


def test_a_tool_round_trip_is_accepted_by_the_server(server):
    """The client's side of a tool round trip, through the real server: tools offered, the model's call in the
    history, the tool's result sent back (the model's own call is parsed in the recorded-output tests below)."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    reply = client(server).chat.completions.create(model=NAME, messages=history, max_tokens=4, temperature=0,
                                                   tools=[t.model_dump() for t in TOOLS])
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = template_messages([Message.model_validate(m) for m in history], TOOLS, Format(tools=True))
    assert reply.usage.prompt_tokens == prompt_tokens(server["model"], rendered)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city for some days",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                            "additionalProperties": False}}}


def test_a_forced_tool_call_comes_back_to_the_client_as_tool_calls(server):
    """tool_choice naming a function (or `required`) makes the model write the call: the reply starts inside
    `<|tool_call|>`, decoding constrained to that tool's arguments, and the client receives tool_calls; the call
    and the tool's result then go back as the next turn."""
    c = client(server)
    messages = [{"role": "user", "content": "Weather in Paris for three days?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = c.chat.completions.create(model=NAME, messages=messages, max_tokens=160, temperature=0,
                                      tools=[WEATHER, CLOCK], tool_choice=named)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Oslo")
    assert 1 <= arguments["days"] <= 7 and set(arguments) == {"city", "days"}
    streamed = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=160, temperature=0,
                                              tools=[WEATHER, CLOCK], tool_choice=named, stream=True))
    [delta] = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert (delta.function.name, delta.function.arguments) == (call.function.name, call.function.arguments)
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    required = c.chat.completions.create(model=NAME, messages=messages, max_tokens=160, temperature=0,
                                         tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    assert [t.function.name in ("get_weather", "get_time") for t in required.choices[0].message.tool_calls] == [True]
    history = [*messages, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    after = c.chat.completions.create(model=NAME, messages=history, max_tokens=4, temperature=0, tools=[WEATHER])
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="'get_news', which is not among the request's tools"):
        c.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "get_news"}})
    unit = {"type": "function", "function": {"name": "set_unit", "parameters": {  # as pydantic writes a schema
        "$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}},
        "required": ["unit"], "additionalProperties": False}}}
    answer = c.chat.completions.create(model=NAME, messages=messages, max_tokens=160, temperature=0, tools=[unit],
                                       tool_choice="required", parallel_tool_calls=False).choices[0].message
    assert answer.tool_calls, answer.content
    assert json.loads(answer.tool_calls[0].function.arguments)["unit"] in ("C", "F")
    dangling = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/Missing"}}}
    with pytest.raises(openai.BadRequestError, match="the schema cannot constrain decoding"):
        c.chat.completions.create(model=NAME, messages=messages, tools=[dangling], tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        c.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="required",
                                  response_format={"type": "json_object"})


def test_a_stream_carries_usage_only_when_asked(server):
    """OpenAI's stream_options.include_usage: every chunk says usage null, and a last chunk with no choices has it."""
    c = client(server)
    plain = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0)
    chunks = list(c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(ch.usage is None and ch.choices for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    bare = list(c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0, stream=True))
    assert all(ch.usage is None and ch.choices for ch in bare)
    done = list(c.completions.create(model=NAME, prompt="def main():", max_tokens=5, temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
    assert done[-1].choices == [] and done[-1].usage.completion_tokens == 5
    assert all(ch.usage is None and ch.choices for ch in done[:-1])


def test_a_reasoning_models_think_block_is_its_reasoning_content(thinking_server):
    """The model writes `<think>return</think>import` (its weights script it): the client gets the block as
    reasoning_content and the rest as content, streamed or not; the usage counts every token the model wrote."""
    c = client(thinking_server)
    messages = [{"role": "user", "content": "What comes next?"}]
    reply = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    message = reply.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("return", "import")
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "return"
    assert "".join(d.content or "" for d in deltas) == "import"
    short = c.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0)
    thought = short.choices[0].message
    assert thought.model_extra["reasoning_content"] == "return" and not thought.content


def test_json_output_is_constrained(server):
    """Constrained decoding on a model with random weights: the reply is JSON of the schema asked for."""
    c = client(server)
    reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0,
                                      response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer",
              "minimum": 0, "maximum": 99}}, "required": ["answer", "n"], "additionalProperties": False}
    reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=32, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    data = json.loads(reply.choices[0].message.content)
    assert data["answer"] in ("yes", "no") and 0 <= data["n"] <= 99 and set(data) == {"answer", "n"}
    assert reply.choices[0].finish_reason == "stop"


def test_bad_requests_get_their_status_and_openais_error_shape(server):
    url, c = server["url"], client(server)
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "the body is not valid JSON"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="messages is empty"):
        c.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens and this model's context cap is"):
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 20000}])
    with pytest.raises(openai.BadRequestError, match="n=2"):
        c.chat.completions.create(model=NAME, messages=MESSAGES, n=2)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        client(server, api_key="sk-wrong").models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # the health check needs no key


def test_a_client_that_goes_away_mid_stream_stops_its_generation(server):
    """3000 tokens take this model over 10 s here (500 in 1.85 s); a client gone after the first chunk frees the
    model at the next token: the server's token count stops far short of 3000, however fast the machine."""
    url = server["url"]
    before = httpx.get(f"{url}/health").json()["generated_tokens"]
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    gone = time.perf_counter()
    while (health := httpx.get(f"{url}/health").json())["queued"] and time.perf_counter() - gone < 30:
        time.sleep(0.05)
    assert not health["queued"]
    assert health["generated_tokens"] - before < 300
    assert client(server).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).usage


def test_a_client_that_gives_up_on_a_plain_reply_stops_its_generation(server):
    """Not streamed, nothing is written until the reply is done: the server still sees the client leave, and stops
    that generation (counted as cancelled) short of the 3800 tokens asked for, which take this model about 14 s here.
    How soon varies with the machine's load: on a busy 2-core CI machine it saw the client go after 1538 tokens."""
    url = server["url"]
    before, cancelled = (httpx.get(f"{url}/health").json()[k] for k in ("generated_tokens", "cancelled"))
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 3800, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    gone = time.perf_counter()
    while (health := httpx.get(f"{url}/health").json())["queued"] and time.perf_counter() - gone < 30:
        time.sleep(0.05)
    assert not health["queued"]
    assert health["cancelled"] == cancelled + 1 and health["generated_tokens"] - before < 3800
    assert client(server).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).usage


def test_sixteen_clients_at_once_complete_or_are_told_to_wait(server):
    c, pid = client(server, timeout=120), server["proc"].pid
    client(server).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4)  # warm
    before = rss_kb(pid)
    outcomes, lock = [], threading.Lock()

    def one_client(i: int) -> None:
        for _ in range(8):
            try:
                reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0.7, seed=i)
                result = reply.choices[0].finish_reason
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                result = 429
            with lock:
                outcomes.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one_client, range(16)))
    assert time.perf_counter() - start < 300
    assert len(outcomes) == 128 and set(outcomes) <= {"length", "stop", 429}
    assert 429 in outcomes and "length" in outcomes  # a queue of 4 turns some away, and serves others
    assert rss_kb(pid) < before * 1.25 + 50_000
    assert client(server).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2).usage


# --- the text routing, on recorded output (random weights would not write a tool call) --------------------------

TOOLS = [Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})]
RECORDED = 'Let me check.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'


def pieces(text: str, cuts: list[int]) -> list[str]:
    at = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(at, at[1:])]


def route(text: str, cuts: list[int], fmt: Format, stops=()) -> tuple[dict, Splitter]:
    splitter, got = Splitter(list(stops), fmt), {"content": "", "reasoning": ""}
    for piece in pieces(text, cuts):
        for kind, t in splitter.feed(piece):
            got[kind] += t
        if splitter.stopped:
            break
    for kind, t in splitter.finish():
        got[kind] += t
    return got, splitter


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=12))
def test_a_tool_call_is_parsed_however_the_text_arrives(cuts):
    got, splitter = route(RECORDED, cuts, Format(tools=True))
    assert got == {"content": "Let me check.", "reasoning": ""}
    [call] = splitter.tool_calls()
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=12))
def test_reasoning_is_split_from_the_answer_however_the_text_arrives(cuts):
    text = "<think>2 and 2 make 4.</think>The answer is 4. STOP and more"
    got, _ = route(text, cuts, Format(thinks=True), stops=["STOP"])
    assert got == {"reasoning": "2 and 2 make 4.", "content": "The answer is 4. "}
    plain, _ = route(text, cuts, Format())  # a model that does not think keeps the tags as text
    assert plain["content"] == text and not plain["reasoning"]


def test_tools_are_rendered_into_phi_4_minis_format_and_refused_elsewhere(server):
    from phiedge.bundle.model_safety import load

    _, tokenizer = load(server["model"])
    history = [Message(role="user", content="Weather in Paris?"),
               Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
               Message(role="tool", content='{"temp": 21}', tool_call_id="call_1")]
    rendered = tokenizer.apply_chat_template(json.dumps(template_messages(history, TOOLS, Format(tools=True))),
                                             add_generation_prompt=True)
    assert rendered.startswith('<|system|><|tool|>[{"name": "get_weather", "description": "Weather of a city"')
    assert '<|assistant|><|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|><|end|>' \
        in rendered
    assert rendered.endswith('<|tool_response|>{"temp": 21}<|end|><|assistant|>')
    with pytest.raises(ServeRequestError, match="has no tool calls"):
        template_messages(history, TOOLS, Format())
    from phiedge.serve.chat import parse_tool_calls

    with pytest.raises(ServeRequestError, match="not JSON"):  # then the server answers with the text as written
        parse_tool_calls("[{name: oops")
