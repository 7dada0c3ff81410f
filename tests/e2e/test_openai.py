"""The OpenAI-compatible API, driven by the official `openai` client against the real agent."""
import base64
import struct

import httpx
import numpy as np
import openai
import pytest

from conftest import EMBED, LLM


def test_lists_both_models(client):
    ids = {m.id for m in client.models.list().data}
    assert {LLM, EMBED} <= ids


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == LLM
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10  # the chat template adds a system prompt
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(model=LLM, messages=[{"role": "user", "content": "Name three colors."}],
              max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens <= 20
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])


def test_streaming_without_include_usage_has_no_usage(client):
    chunks = list(client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)


def test_greedy_completion_knows_paris(client):
    r = client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    assert r.usage.prompt_tokens == 5


def test_completion_streaming_and_stop(client):
    stream = client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=8,
                                       temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text.startswith(" Paris")
    r = client.completions.create(model=LLM, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, stop=["aris"])
    assert r.choices[0].text == " P"
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=LLM, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text


def cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_capture_meaning(client):
    r = client.embeddings.create(model=EMBED, input=[
        "A man is playing a guitar.", "Someone is playing music.", "The invoice is due on Friday."],
        encoding_format="float")
    v = [np.array(d.embedding) for d in r.data]
    assert all(len(x) == 384 for x in v)
    assert abs(np.linalg.norm(v[0]) - 1) < 1e-4
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.2
    assert r.usage.prompt_tokens > 0


def test_embeddings_single_string_and_base64(client, agent):
    f = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float").data[0].embedding
    raw = httpx.post(agent.url + "/v1/embeddings",
                     json={"model": EMBED, "input": "hello world", "encoding_format": "base64"}).json()
    b = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(b) // 4}f", b)
    assert np.allclose(decoded, f, atol=1e-6)
    # The client's default (base64 under the hood) decodes to the same vector.
    assert np.allclose(client.embeddings.create(model=EMBED, input="hello world").data[0].embedding, f, atol=1e-6)


# ---- errors -------------------------------------------------------------------------------

def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in e.value.message


def test_ignore_eos_generates_to_max_tokens(client):
    kw = dict(model=LLM, messages=[{"role": "user", "content": "Say hi."}], max_tokens=48, temperature=0)
    short = client.chat.completions.create(**kw)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 48
    full = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 48
    assert full.choices[0].message.content.startswith(short.choices[0].message.content)


def test_malformed_json_is_400(agent):
    r = httpx.post(agent.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_field_is_400_naming_it(client, agent):
    r = httpx.post(agent.url + "/v1/chat/completions",
                   json={"model": LLM, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert "temperature" in e.value.message
    r = httpx.post(agent.url + "/v1/chat/completions", json={"model": LLM})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LLM, messages=[{"role": "wizard", "content": "x"}])
    assert "messages[0].role" in e.value.message
    for field in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(agent.url + "/v1/chat/completions",
                       json={"model": LLM, "messages": [{"role": "user", "content": "x"}], field: 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_wrong_kind_of_model_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=LLM, input="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED, prompt="x")


def test_prompt_over_context_is_400(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=LLM, prompt="hello " * 9000, max_tokens=4, stream=stream)
        assert "maximum context length" in e.value.message


def test_body_too_large_is_413(agent):
    r = httpx.post(agent.url + "/v1/completions",
                   content=b'{"model": "x", "prompt": "' + b"a" * (5 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_health_and_metrics(agent, client):
    assert httpx.get(agent.url + "/healthz").status_code == 200
    ready = httpx.get(agent.url + "/readyz")
    assert ready.status_code == 200
    # No admin token here, so the models show (with one, only to it: test_hardening.py).
    assert ready.json()["ready"] is True and ready.json()["draining"] is False
    assert {m["state"] for m in ready.json()["models"]} == {"ready"}
    client.completions.create(model=LLM, prompt="Hi", max_tokens=2)
    text = httpx.get(agent.url + "/metrics").text
    for name in ["flatmesh_requests_total", "flatmesh_request_duration_seconds_bucket",
                 "flatmesh_time_to_first_token_seconds_bucket", "flatmesh_input_tokens_total",
                 "flatmesh_output_tokens_total", "flatmesh_model_load_seconds_bucket"]:
        assert name in text, name
    assert f'flatmesh_requests_total{{endpoint="completions",model="{LLM}",status="200"}}' in text
    assert 'status="404"' in text
