"""Structured output and tool calling through the real openai client, sampling the embedded Shakespeare model
(which writes no JSON of its own: the grammar has to force every valid answer)."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")

from fastxlstm.checkpoint import load_model_and_tokenizer  # noqa: E402
from fastxlstm.serving.app import build_app  # noqa: E402
from fastxlstm.serving.runtime import ServeConfig  # noqa: E402
from fastxlstm.serving.testing import ServerThread  # noqa: E402
from fastxlstm.serving.tools import parse_answer  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "xlstm-shakespeare-10m"


class Mood(str, Enum):
    merry = "merry"
    sad = "sad"
    wroth = "wroth"


class Person(BaseModel):
    name: Annotated[str, Field(max_length=12)]
    age: Annotated[int, Field(ge=0, le=120)]
    mood: Mood


class Scene(BaseModel):  # nested objects, arrays of objects and of enums, booleans
    title: Annotated[str, Field(max_length=16)]
    people: Annotated[list[Person], Field(min_length=1, max_length=3)]
    moods: Annotated[list[Mood], Field(max_length=4)]
    night: bool


class Weather(BaseModel):
    city: Annotated[str, Field(max_length=10)]
    unit: Annotated[str, Field(pattern="^(celsius|fahrenheit)$")]


@pytest.fixture(scope="module")
def server():
    model, tok = load_model_and_tokenizer(str(MODEL))
    with ServerThread(build_app(model, tok, ServeConfig(model_name="bard", max_slots=8))) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


MESSAGES = [{"role": "user", "content": "Describe the scene."}]


@pytest.mark.parametrize("schema", [Person, Scene])
def test_json_schema_answers_parse_and_validate_under_sampling(client, schema):
    """openai's ``chat.completions.parse`` (a strict json_schema response_format) parses every sampled choice."""
    r = client.chat.completions.parse(model="bard", messages=MESSAGES, response_format=schema, temperature=1.0,
                                      n=3, seed=7, max_tokens=300)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, schema)
        assert schema.model_validate_json(choice.message.content) == choice.message.parsed
    # the completions endpoint and vLLM's guided_json give the same kind of answers
    c = client.completions.create(model="bard", prompt="KING HENRY:", max_tokens=300, temperature=1.0, n=2, seed=3,
                                  extra_body={"guided_json": schema.model_json_schema()})
    for choice in c.choices:
        schema.model_validate_json(choice.text)


def test_json_object_choice_regex_and_grammar(client):
    r = client.chat.completions.create(model="bard", messages=MESSAGES, response_format={"type": "json_object"},
                                       max_tokens=200, temperature=0.8, seed=1)
    if r.choices[0].finish_reason == "stop":  # a free JSON object can be longer than max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].message.content.startswith("{")
    choices = ["to be", "not to be", "perchance to dream"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        c = client.completions.create(model="bard", prompt="HAMLET:", max_tokens=20, temperature=1.0, n=4, seed=5,
                                      extra_body=extra)
        assert {x.text for x in c.choices} <= set(choices) and all(x.finish_reason == "stop" for x in c.choices)
    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}(, [a-z]{3})?"
    c = client.completions.create(model="bard", prompt="ROMEO:", max_tokens=20, temperature=1.0, n=3, seed=2,
                                  extra_body={"guided_regex": pattern})
    assert all(re.fullmatch(pattern, x.text) for x in c.choices), [x.text for x in c.choices]
    ebnf = 'root ::= "Act " [1-5] ", scene " [1-9]'
    c = client.completions.create(model="bard", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"guided_grammar": ebnf})
    assert re.fullmatch(r"Act [1-5], scene [1-9]", c.choices[0].text)
    # streamed, greedy, through the same grammar
    s = client.completions.create(model="bard", prompt="HAMLET:", max_tokens=20, temperature=0, stream=True,
                                  extra_body={"guided_choice": choices})
    assert "".join(ch.choices[0].text for ch in s) in choices


def test_tool_call_round_trip(client):
    """required / named tool choices give calls whose arguments validate; the conversation continues with
    the call and its result; streamed calls accumulate to the same kind of arguments; openai's
    ``pydantic_function_tool`` + ``parse`` parse the arguments."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": Weather.model_json_schema()}},
             {"type": "function", "function": {"name": "get_person", "parameters": Person.model_json_schema()}}]
    messages = [{"role": "user", "content": "What is the weather in Verona?"}]
    r = client.chat.completions.create(model="bard", messages=messages, tools=tools, tool_choice="required",
                                       temperature=1.0, seed=4, max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    {"get_weather": Weather, "get_person": Person}[call.function.name].model_validate_json(call.function.arguments)
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = client.chat.completions.create(model="bard", messages=messages, tools=tools, tool_choice="none",
                                        max_tokens=8, temperature=0)
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)
    r1 = client.chat.completions.create(model="bard", messages=messages[:1], tools=tools, tool_choice="none",
                                        max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + 20  # the call and its result are in the prompt

    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model="bard", messages=messages[:1], tools=tools, tool_choice=named,
                                            temperature=1.0, seed=9, max_tokens=200, stream=True)
    args, finish, heads = "", None, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or ():
            if tc.id:
                heads.append((tc.id, tc.function.name))
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [name for _, name in heads] == ["get_weather"]
    Weather.model_validate_json(args)

    parsed = client.chat.completions.parse(model="bard", messages=messages[:1], temperature=1.0, seed=11,
                                           max_tokens=200, tools=[openai.pydantic_function_tool(Weather)],
                                           tool_choice="required")
    (tc,) = parsed.choices[0].message.tool_calls
    assert isinstance(tc.function.parsed_arguments, Weather)


def test_auto_tool_calls_are_read_from_the_answer():
    class Body:
        tool_choice = "auto"
        tools = [type("T", (), {"function": type("F", (), {"name": "f"})()})()]

    content, calls = parse_answer(' <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', Body)
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert parse_answer("The answer is 4.", Body) == ("The answer is 4.", None)
    assert parse_answer('<tool_call>{"name": "g", "arguments": {}}</tool_call>', Body)[1] is None  # no such tool


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "array", "items": 1}}} | {
        "x": json.loads("[" * 40 + "]" * 40)}}, "guided_json"),
    ({"guided_grammar": "root ::= " + '"a" | ' * 20_000 + '"b"'}, "guided_grammar"),
    ({"guided_choice": [str(i) for i in range(300)]}, "guided_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param):
    body = {"model": "bard", "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"], err
