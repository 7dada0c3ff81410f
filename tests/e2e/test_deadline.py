"""Client deadlines: `x-request-timeout` (HTTP, seconds) and gRPC's own `grpc-timeout`.

Past the deadline a request fails as timed out wherever it is (waiting for a slot, generating,
on a peer), and in a mesh the peer serving it is given what is left, so it stops by itself
(its own metrics count the timeout) rather than only when the arriving node hangs up.
"""
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from conftest import EMBED, LLM, Agent
from test_mesh import ADMIN, holders, mesh_config, mesh_of, served_by, wait_until

LONG = {"max_tokens": 2000, "temperature": 0}
# The demo LLM writes all 2000 tokens for this (~15 s): far longer than any deadline below.
CHAT = [{"role": "user", "content": "Write the numbers from 1 to 500 separated by commas."}]


def requests_with_status(agent, model, status) -> float:
    """`flatmesh_requests_total` of `model` answered with `status`, over every endpoint."""
    total = 0.0
    for line in httpx.get(agent.url + "/metrics").text.splitlines():
        if (line.startswith("flatmesh_requests_total{") and f'model="{model}"' in line
                and f'status="{status}"' in line):
            total += float(line.split()[-1])
    return total


@pytest.fixture(scope="module")
def one_slot():
    """An agent with one execution slot: a second request waits while a first generates."""
    a = Agent(config="[scheduler]\nslots = 1\n")
    yield a
    a.stop()


def client(agent, timeout=None):
    headers = {"x-request-timeout": str(timeout)} if timeout else {}
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                         default_headers=headers)


def test_a_bad_timeout_header_is_a_400_that_names_it(one_slot):
    for value in ("soon", "0", "-2"):
        r = httpx.post(one_slot.url + "/v1/chat/completions", headers={"x-request-timeout": value},
                       json={"model": LLM, "messages": CHAT, "max_tokens": 1})
        assert r.status_code == 400, r.text
        assert "x-request-timeout" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{one_slot.url}/v2/models/{LLM}/generate", headers={"x-request-timeout": value},
                       json={"text_input": "Hi", "parameters": {"max_tokens": 1}})
        assert r.status_code == 400 and "x-request-timeout" in r.json()["error"], r.text


def test_a_generation_past_the_deadline_ends_with_a_timeout_and_is_recorded(one_slot):
    before = requests_with_status(one_slot, LLM, 504)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client(one_slot, 0.5).chat.completions.create(model=LLM, messages=CHAT, extra_body=LONG)
    took = time.monotonic() - started
    assert e.value.status_code == 504, e.value
    assert 0.4 < took < 3, took
    # The client is told at once; the request is counted when the engine stops and its record
    # is written.
    wait_until(lambda: requests_with_status(one_slot, LLM, 504) == before + 1, 10, "no timeout counted")
    # The tokens it computed are on the record.
    wait_until(lambda: 0 < records(one_slot)[-1]["output_tokens"] < 2000, 10, lambda: records(one_slot)[-1])
    assert records(one_slot)[-1]["model"] == LLM


def records(agent, headers=None):
    return httpx.get(agent.url + "/admin/ledger/records", headers=headers).json()["records"]


def test_a_deadline_that_passes_during_the_prompt_is_answered_at_once_and_the_prompt_recorded(one_slot):
    before, timeouts = len(records(one_slot)), requests_with_status(one_slot, LLM, 504)
    prompt = " ".join(f"word{i}" for i in range(300))   # ~1500 tokens: seconds of prefill
    started = time.monotonic()
    r = httpx.post(one_slot.url + "/v1/completions", headers={"x-request-timeout": "0.2"}, timeout=60,
                   json={"model": LLM, "prompt": prompt, "max_tokens": 8})
    took = time.monotonic() - started
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert took < 1.5, f"answered after {took:.2f} s: the client waited for the prefill"
    # The engine finishes the prompt (it cannot stop halfway); then it is on the record.
    wait_until(lambda: len(records(one_slot)) == before + 1, 60, "the prefilled prompt was never recorded")
    record = records(one_slot)[-1]
    assert record["input_tokens"] > 900 and record["output_tokens"] == 0, record
    wait_until(lambda: requests_with_status(one_slot, LLM, 504) == timeouts + 1, 5, "no timeout counted")


def test_embeddings_past_the_deadline_are_answered_at_once_and_recorded(one_slot):
    before = len(records(one_slot))
    texts = [" ".join(f"text{j} of input {i}" for j in range(60)) for i in range(16)]
    started = time.monotonic()
    r = httpx.post(one_slot.url + "/v1/embeddings", headers={"x-request-timeout": "0.05"}, timeout=60,
                   json={"model": EMBED, "input": texts})
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert took < 1.0, took
    wait_until(lambda: len(records(one_slot)) == before + 1, 60, "the embeddings were never recorded")
    record = records(one_slot)[-1]
    assert record["model"] == EMBED and record["input_tokens"] > 16 * 60, record


def test_a_request_whose_deadline_passes_while_it_waits_for_a_slot_is_told_so(one_slot):
    # The first generation holds the only slot...
    first_token = threading.Event()
    stop = threading.Event()

    def hold():
        body = {"model": LLM, "messages": CHAT, "stream": True, **LONG}
        with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
                if stop.is_set():
                    return

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert first_token.wait(60), "the first generation never started"
        # ... so the second waits for it, until its deadline.
        started = time.monotonic()
        r = httpx.post(one_slot.url + "/v1/chat/completions", headers={"x-request-timeout": "0.3"},
                       json={"model": LLM, "messages": CHAT, "max_tokens": 4}, timeout=30)
        took = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert took < 2, took
    finally:
        stop.set()
        holder.join(60)
    # The slot it waited for was not lost: the next request is served.
    r = httpx.post(one_slot.url + "/v1/chat/completions", timeout=120,
                   json={"model": LLM, "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def pair():
    """Two nodes of a mesh; the demo LLM loaded on "far" only."""
    with mesh_of(("near", "far"), lambda etcd, n: mesh_config(etcd, n, "/flatmesh-deadline")) as agents:
        near, far = agents["near"], agents["far"]
        r = httpx.post(f"{far.url}/admin/models/{LLM}/load", headers=ADMIN, timeout=180)
        assert r.status_code == 200, r.text
        wait_until(lambda: holders(near, LLM) == {"far"}, 30, lambda: f"near sees {holders(near, LLM)}")
        yield near, far


def test_the_peer_is_given_what_is_left_of_the_deadline_and_stops_by_itself(pair):
    near, far = pair
    before = requests_with_status(far, LLM, 504)
    started = time.monotonic()
    r = httpx.post(near.url + "/v1/chat/completions", headers={"x-request-timeout": "0.8"}, timeout=30,
                   json={"model": LLM, "messages": CHAT, **LONG})
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert served_by(r) == "far", r.headers
    assert 0.7 < took < 3, took
    # The peer ended it on its own deadline (a hang-up by the arriving node would count 499).
    wait_until(lambda: requests_with_status(far, LLM, 504) == before + 1, 5,
               lambda: httpx.get(far.url + "/metrics").text)
    assert holders(near, LLM) == {"far"}


def test_a_grpc_deadline_reaches_the_peer_too(pair):
    near, far = pair
    before = requests_with_status(far, LLM, 504)
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"Count from 1 to 1000: 1, 2, 3,"], dtype=np.object_))
    params = {"max_tokens": 2000, "temperature": 0}
    started = time.monotonic()
    with grpcclient.InferenceServerClient(near.grpc) as c:
        with pytest.raises(Exception) as e:
            c.infer(LLM, [inp], parameters=params, client_timeout=0.8)
    took = time.monotonic() - started
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED", e.value
    assert took < 3, took
    # The peer ended the generation on its own deadline (a hang-up by near would count 499).
    wait_until(lambda: requests_with_status(far, LLM, 504) == before + 1, 5,
               lambda: httpx.get(far.url + "/metrics").text)


def test_a_prompt_whose_client_left_during_the_prefill_is_recorded(one_slot):
    before, gone = len(records(one_slot)), requests_with_status(one_slot, LLM, 499)
    # Not the prompt of the test above: the prefix cache would make its prefill instant.
    prompt = " ".join(f"item{i}" for i in range(300))
    with pytest.raises(httpx.ReadTimeout):
        # The client gives up (and closes the connection) while the prompt is prefilled.
        httpx.post(one_slot.url + "/v1/completions", timeout=httpx.Timeout(5, read=0.2),
                   json={"model": LLM, "prompt": prompt, "max_tokens": 8})
    wait_until(lambda: len(records(one_slot)) == before + 1, 60, "the prompt was never recorded")
    record = records(one_slot)[-1]
    assert record["input_tokens"] > 900 and record["output_tokens"] == 0, record
    wait_until(lambda: requests_with_status(one_slot, LLM, 499) == gone + 1, 5, "no cancellation counted")


def test_a_stream_past_its_deadline_ends_with_an_error_chunk_not_a_clean_end(one_slot):
    body = {"model": LLM, "messages": CHAT, "stream": True, **LONG}
    with httpx.stream("POST", one_slot.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"x-request-timeout": "0.5"}) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last.get("error", {}).get("code") == "deadline_exceeded", last
    assert len(data) > 3, "some text came before the deadline"
