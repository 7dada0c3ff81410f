"""Structured output and tools through the official `openai` client against the real demo model:
every answer under a response format parses (and validates against its schema), however small the
model; tool calls come back in OpenAI's shape."""
import json

import httpx
import jsonschema
import openai
import pytest

from conftest import EMBED, LLM, ROOT, Agent

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"enum": ["Paris", "Berlin", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

ASK = [{"role": "user", "content": "Describe a person who lives in a European capital, as JSON."}]


def schema_format(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


def test_json_mode_parses_whenever_it_finishes(client):
    # JSON mode bounds the shape, not the length: at temperature 0.9 this 135M model sometimes
    # writes one string value until max_tokens (finish "length", as OpenAI answers then).
    finished = 0
    for seed in range(3):
        r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=200, temperature=0.9,
                                           seed=seed, response_format={"type": "json_object"})
        c = r.choices[0]
        if c.finish_reason == "length":
            assert r.usage.completion_tokens == 200 and c.message.content.startswith("{"), c.message.content
            continue
        assert c.finish_reason == "stop", c.finish_reason
        assert isinstance(json.loads(c.message.content), dict), c.message.content
        finished += 1
    assert finished >= 1


def test_strict_schema_validates(client):
    for seed in range(3):
        r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=200, temperature=0.9,
                                           seed=seed, response_format=schema_format(PERSON))
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_strict_schema_streamed_validates_and_matches_whole(client):
    kw = dict(model=LLM, messages=ASK, max_tokens=200, temperature=0, response_format=schema_format(PERSON))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), PERSON)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_completions_take_a_response_format_too(client):
    kw = dict(model=LLM, prompt="A person as JSON:", max_tokens=200, temperature=0,
              extra_body={"response_format": schema_format(PERSON)})
    r = client.completions.create(**kw)
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == r.choices[0].text


def test_max_tokens_inside_the_json_is_length(client):
    r = client.chat.completions.create(model=LLM, messages=ASK, max_tokens=5, temperature=0,
                                       response_format=schema_format(PERSON))
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    with pytest.raises(ValueError):
        json.loads(c.message.content)


@pytest.mark.parametrize("rf, param", [
    (schema_format({"type": "objekt"}), "response_format.json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}},
     "response_format.json_schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_a_schema_that_cannot_be_honoured_is_a_400_naming_it(client, rf, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=ASK, max_tokens=20, response_format=rf)
    assert e.value.body["param"] == param, e.value.body


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": TIME}},
]
WEATHER_Q = [{"role": "user", "content": "What is the weather like in Oslo?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def check_calls(message, names=SCHEMAS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# With parallel calls allowed, this 135M model at temperature 0 goes on alternating get_weather
# and get_time calls until max_tokens (the grammar bounds each call, not how many): the tests that
# need a finished answer ask for one call; `test_parallel_calls_each_validate` allows several.
ONE = dict(parallel_tool_calls=False)


def test_required_tool_call_has_valid_arguments(client):
    r = client.chat.completions.create(model=LLM, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
                                       max_tokens=100, temperature=0, **ONE)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    assert c.message.content is None
    check_calls(c.message)


def test_parallel_calls_each_validate(client):
    # Several calls in one answer, each in its schema, as far as the answer got.
    r = client.chat.completions.create(model=LLM, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        check_calls(c.message)
        return
    assert c.finish_reason == "length" and r.usage.completion_tokens == 120
    body = c.message.content
    assert body.startswith('{"tool_calls": [')
    # The calls written whole before the cut, each a call to a known function in its schema.
    calls = json.loads(body[:body.rindex("}}") + 2] + "]}")["tool_calls"]
    assert len(calls) >= 2
    for call in calls:
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])


def test_named_tool_call_calls_that_function(client):
    r = client.chat.completions.create(model=LLM, messages=WEATHER_Q, tools=TOOLS, max_tokens=100, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert [t.function.name for t in c.message.tool_calls] == ["get_time"]
    check_calls(c.message, names=["get_time"])


def test_streamed_tool_call_is_assembled_by_the_client(client):
    kw = dict(model=LLM, messages=WEATHER_Q, tools=TOOLS, tool_choice="required", max_tokens=100, temperature=0,
              **ONE)
    whole = client.chat.completions.create(**kw).choices[0].message
    calls, finish = {}, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == ["tool_calls"]
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got == [(t.function.name, json.loads(t.function.arguments)) for t in whole.tool_calls]
    for name, args in got:
        jsonschema.validate(args, SCHEMAS[name])


def test_a_tool_result_turn_is_answered(client):
    first = client.chat.completions.create(model=LLM, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
                                           max_tokens=100, temperature=0, **ONE).choices[0].message
    history = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "Sunny, 21 degrees celsius."},
    ]
    r = client.chat.completions.create(model=LLM, messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content
    assert c.finish_reason in ("stop", "length")
    # The earlier call and its result are part of the prompt.
    plain = client.chat.completions.create(model=LLM, messages=WEATHER_Q, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_auto_answers_with_valid_calls_or_text(client):
    r = client.chat.completions.create(model=LLM, messages=WEATHER_Q, tools=TOOLS, max_tokens=100, temperature=0)
    c = r.choices[0]
    if c.finish_reason == "tool_calls":
        check_calls(c.message)
    else:
        assert c.message.tool_calls is None and isinstance(c.message.content, str)


@pytest.mark.parametrize("kw, param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
     "tools[0].function.parameters"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
])
def test_bad_tools_are_a_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=WEATHER_Q, max_tokens=10, **kw)
    assert e.value.body["param"] == param, e.value.body


def test_completions_refuse_tools(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LLM, prompt="Hi", max_tokens=4, extra_body={"tools": TOOLS})
    assert e.value.body["param"] == "tools"


def test_v2_generate_takes_a_response_format_parameter(agent):
    def generate(rf):
        return httpx.post(f"{agent.url}/v2/models/{LLM}/generate", timeout=60, json={
            "text_input": "A person as JSON:", "parameters": {"max_tokens": 200, "temperature": 0, "response_format": rf}})
    as_string = generate(json.dumps(schema_format(PERSON)))
    assert as_string.status_code == 200, as_string.text
    jsonschema.validate(json.loads(as_string.json()["text_output"]), PERSON)
    as_object = generate(schema_format(PERSON))
    assert as_object.status_code == 200 and as_object.json()["text_output"] == as_string.json()["text_output"]
    bad = generate(schema_format({"type": "objekt"}))
    assert bad.status_code == 400 and "parameters.response_format.json_schema" in bad.json()["error"], bad.text


CACHED = f"""
[[models]]
id = "{LLM}"
path = "{LLM}/model.gguf"

[[models]]
id = "{EMBED}"
path = "{EMBED}"

[policy.cache]
plugin = "{ROOT / 'plugins' / 'target' / 'wasm32-wasip2' / 'release' / 'semantic_cache.wasm'}"
config = {{ embedding_model = "{EMBED}", threshold = 0.9 }}
"""


@pytest.fixture(scope="module")
def cached():
    a = Agent(CACHED)
    yield a
    a.stop()


def test_a_cached_answer_is_never_served_for_another_format(cached):
    def ask(rf):
        body = {"model": LLM, "messages": ASK, "max_tokens": 120, "temperature": 0}
        if rf:
            body["response_format"] = rf
        r = httpx.post(f"{cached.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-flatmesh-cache"], r.json()["choices"][0]["message"]["content"]

    city = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
            "additionalProperties": False}
    assert ask(None)[0] == "miss"
    assert ask(None)[0] == "hit"
    # The same prompt under a format: the free answer is not served for it, nor one format's for another.
    state, person = ask(schema_format(PERSON))
    assert state == "miss"
    jsonschema.validate(json.loads(person), PERSON)
    state, place = ask(schema_format(city))
    assert state == "miss"
    jsonschema.validate(json.loads(place), city)
    assert ask(schema_format(PERSON)) == ("hit", person)
    assert ask({"type": "json_object"})[0] == "miss"
