"""The one serve path: operator-only repository changes, free bad requests, and a client that
leaves frees its lease and slot at once, on every protocol."""
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EMBED, LLM, Agent, key_for

ADMIN = {"authorization": "Bearer admin-secret"}
CONFIG = """
[server]
admin_token = "admin-secret"
grpc_max_message_bytes = 1048576
[scheduler]
slots = 1
[tenancy]
[[tenancy.tiers]]
name = "gold"
[[tenancy.tiers]]
name = "rpm"
requests_per_minute = 2
[[tenancy.tiers]]
name = "embed-only"
models = ["all-minilm-*"]
[[tenancy.tenants]]
id = "gold"
tier = "gold"
[[tenancy.tenants]]
id = "rpm"
tier = "rpm"
[[tenancy.tenants]]
id = "embed-only"
tier = "embed-only"
"""


@pytest.fixture(scope="module")
def mesh():
    a = Agent(config=CONFIG)
    a.keys = {t: key_for(a, t) for t in ["gold", "rpm", "embed-only"]}
    yield a
    a.stop()


def bearer(key):
    return {"authorization": f"Bearer {key}"}


# --- repository load/unload are operator actions -------------------------------------------

def test_grpc_repository_calls_need_the_admin_token(mesh):
    c = grpcclient.InferenceServerClient(url=mesh.grpc)
    for call in (c.unload_model, c.load_model):
        with pytest.raises(InferenceServerException) as e:
            call(EMBED)
        assert "UNAUTHENTICATED" in e.value.status(), e.value
        with pytest.raises(InferenceServerException) as e:
            call(EMBED, headers=bearer(mesh.keys["embed-only"]))
        assert "PERMISSION_DENIED" in e.value.status(), e.value
        assert "operator" in e.value.message()
    c.load_model(EMBED, headers=ADMIN)
    assert c.is_model_ready(EMBED, headers=ADMIN | bearer(mesh.keys["gold"])) or True
    c.unload_model(EMBED, headers=ADMIN)


def test_grpc_calls_without_a_key_are_unauthenticated_but_health_stays_open(mesh):
    c = grpcclient.InferenceServerClient(url=mesh.grpc)
    assert c.is_server_live() and c.is_server_ready()
    assert c.get_server_metadata().name == "flatmesh"
    for call in (lambda: c.get_model_repository_index(), lambda: c.get_model_metadata(EMBED),
                 lambda: c.is_model_ready(EMBED)):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert "UNAUTHENTICATED" in e.value.status()


def test_rest_repository_unload_is_refused_to_a_tenant_that_may_use_the_model(mesh):
    url = f"{mesh.url}/v2/repository/models/{EMBED}"
    r = httpx.post(url + "/unload", headers=bearer(mesh.keys["embed-only"]))
    assert r.status_code == 403 and "operator" in r.json()["error"]
    r = httpx.post(url + "/unload")
    assert r.status_code == 401
    assert httpx.post(url + "/load", headers=ADMIN, timeout=120).status_code == 200
    assert httpx.post(url + "/unload", headers=ADMIN).status_code == 200


def test_tenants_only_see_the_models_of_their_tier(mesh):
    r = httpx.get(f"{mesh.url}/v1/models", headers=bearer(mesh.keys["embed-only"]))
    assert [m["id"] for m in r.json()["data"]] == [EMBED]
    r = httpx.post(f"{mesh.url}/v2/repository/index", headers=bearer(mesh.keys["embed-only"]))
    assert [m["name"] for m in r.json()] == [EMBED]


def test_a_grpc_message_over_the_limit_is_resource_exhausted(mesh):
    c = grpcclient.InferenceServerClient(url=mesh.grpc)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x" * 2_000_000], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        c.infer(EMBED, [inp], headers=bearer(mesh.keys["gold"]))
    assert "RESOURCE_EXHAUSTED" in e.value.status(), e.value


# --- a request that gets a 400 costs nothing ------------------------------------------------

def usage(agent, key):
    r = httpx.get(f"{agent.url}/v1/usage", headers=bearer(key))
    return sum(u["requests"] for u in r.json()["usage"])


def test_bad_requests_cost_no_quota_and_leave_no_record(mesh):
    # (What is refused only once admitted — a prompt over the context, a `dimensions` the copy
    # does not have — counts against the rate: test_hardening.py.)
    key = mesh.keys["rpm"]
    before = usage(mesh, key)
    bad = [
        ("/v1/chat/completions", {"model": LLM, "messages": []}),
        ("/v1/chat/completions", {"model": LLM, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
        ("/v1/embeddings", {"model": LLM, "input": "an LLM cannot embed"}),
        (f"/v2/models/{LLM}/generate", {"text_input": "hi", "parameters": {"top_k": -5}}),
        (f"/v2/models/{LLM}/generate", {"text_input": "hi", "parameters": {"seed": -1}}),
        (f"/v2/models/{LLM}/generate", {"text_input": "hi", "parameters": {"stop": "[not json"}}),
        (f"/v2/models/{EMBED}/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3000],
                                                    "data": ["x"] * 3000}]}),
    ]
    for path, body in bad:
        r = httpx.post(mesh.url + path, json=body, headers=bearer(key), timeout=120)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
    # The tier allows two requests a minute: both still go through.
    for _ in range(2):
        r = httpx.post(f"{mesh.url}/v1/embeddings", json={"model": EMBED, "input": "ok"},
                       headers=bearer(key), timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{mesh.url}/v1/embeddings", json={"model": EMBED, "input": "third"},
                   headers=bearer(key), timeout=120)
    assert r.status_code == 429 and "retry-after" in r.headers
    assert usage(mesh, key) == before + 2


def test_v2_rate_limits_answer_with_retry_after_and_ratelimit_headers(mesh):
    key = mesh.keys["rpm"]
    r = httpx.post(f"{mesh.url}/v2/models/{EMBED}/infer", headers=bearer(key), timeout=60,
                   json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]})
    assert r.status_code == 429
    assert "retry-after" in r.headers and "x-ratelimit-limit-requests" in r.headers
    c = grpcclient.InferenceServerClient(url=mesh.grpc)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        c.infer(EMBED, [inp], headers=bearer(key))
    assert "RESOURCE_EXHAUSTED" in e.value.status()


def test_the_ledger_keeps_its_own_id_beside_the_clients(mesh):
    key = mesh.keys["gold"]
    body = {"id": "same-id", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    for _ in range(2):
        r = httpx.post(f"{mesh.url}/v2/models/{EMBED}/infer", json=body, headers=bearer(key), timeout=120)
        assert r.status_code == 200 and r.json()["id"] == "same-id"
    r = httpx.post(f"{mesh.url}/v2/models/{EMBED}/infer", headers=bearer(key), timeout=60,
                   json=body | {"id": "x" * 1_000_000})
    assert r.status_code == 400 and "id" in r.json()["error"]
    import sqlite3
    from pathlib import Path
    db = sqlite3.connect(f"file:{Path(mesh.dir.name) / 'state' / 'ledger.sqlite3'}?mode=ro", uri=True)
    recs = db.execute("SELECT id, client_id FROM records WHERE client_id = 'same-id'").fetchall()
    longest = db.execute("SELECT max(length(id) + length(coalesce(client_id, ''))) FROM records").fetchone()[0]
    db.close()
    assert len(recs) == 2 and len({r[0] for r in recs}) == 2
    assert all(r[0] != "same-id" for r in recs)
    assert longest < 2000


# --- a client that leaves frees its lease and slot at once ----------------------------------

def leases(agent, model=LLM):
    return httpx.get(f"{agent.url}/admin/models/{model}", headers=ADMIN).json()["leases"]


def wait_running(agent, model=LLM, timeout=120):
    deadline = time.time() + timeout
    while leases(agent, model) == 0:
        assert time.time() < deadline, "the request never started"
        time.sleep(0.02)


def assert_freed_at_once(what, took):
    """Freed within 100 ms (best of three tries: the test's own client shares the two cores
    with the engine), and never later than a second (the generation itself runs far longer)."""
    assert min(took) < 0.1 and max(took) < 1.0, f"{what}: freed after {[round(t, 3) for t in took]} s"


def freed_within(agent, started_leaving, model=LLM):
    """Seconds from the client leaving until the model has no lease left."""
    while leases(agent, model) > 0:
        assert time.time() - started_leaving < 10, "the lease was never given back"
        time.sleep(0.005)
    return time.time() - started_leaving


LONG = "Write a very long story about a lighthouse keeper, chapter by chapter."
# Raw text (no chat template) that a model goes on with for a long time.
COUNT = "The numbers from 1 to 1000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8,"


def leave_http(agent, path, body, stream):
    """Send a request on a raw socket, wait until it runs, then close the connection."""
    host, port = agent.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
              f"authorization: Bearer {agent.keys['gold']}\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
    if stream:
        assert s.recv(1024)  # the first bytes of the stream: the prompt is prefilled
    else:
        wait_running(agent)
        time.sleep(0.5)  # past the prefill, which runs to its end before a token can stop it
    assert leases(agent) > 0, "the generation must still be running when the client leaves"
    t = time.time()
    s.close()
    return freed_within(agent, t)


@pytest.mark.parametrize("path,body,stream", [
    ("/v1/chat/completions", {"model": LLM, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4000, "temperature": 0, "stream": True}, True),
    ("/v1/chat/completions", {"model": LLM, "messages": [{"role": "user", "content": LONG}], "max_tokens": 4000, "temperature": 0}, False),
    (f"/v2/models/{LLM}/generate_stream", {"text_input": COUNT, "parameters": {"max_tokens": 4000, "temperature": 0}}, True),
    (f"/v2/models/{LLM}/generate", {"text_input": COUNT, "parameters": {"max_tokens": 4000, "temperature": 0}}, False),
    (f"/v2/models/{LLM}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [COUNT]}],
                                 "parameters": {"max_tokens": 4000, "temperature": 0}}, False),
])
def test_a_client_that_leaves_over_http_frees_the_slot_at_once(mesh, path, body, stream):
    assert_freed_at_once(path, [leave_http(mesh, path, body, stream) for _ in range(3)])


def test_a_client_that_cancels_a_grpc_call_frees_the_slot_at_once(mesh):
    c = grpcclient.InferenceServerClient(url=mesh.grpc)
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([COUNT.encode()], dtype=np.object_))

    def once():
        ctx = c.async_infer(LLM, [inp], callback=lambda *a, **k: None, parameters={"max_tokens": 4000, "temperature": 0},
                            headers=bearer(mesh.keys["gold"]))
        wait_running(mesh)
        time.sleep(0.5)  # past the prefill
        assert leases(mesh) > 0, "the generation must still be running when the client leaves"
        t = time.time()
        ctx.cancel()
        return freed_within(mesh, t)

    assert_freed_at_once("gRPC ModelInfer", [once() for _ in range(3)])


def test_a_client_that_closes_a_grpc_stream_frees_the_slot_at_once(mesh):
    def once():
        c = grpcclient.InferenceServerClient(url=mesh.grpc)
        got = threading.Event()
        c.start_stream(callback=lambda result, error: got.set(), headers=bearer(mesh.keys["gold"]))
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([COUNT.encode()], dtype=np.object_))
        c.async_stream_infer(LLM, [inp], parameters={"max_tokens": 4000, "temperature": 0})
        assert got.wait(120)
        assert leases(mesh) > 0, "the generation must still be running when the client leaves"
        t = time.time()
        c.stop_stream(cancel_requests=True)
        return freed_within(mesh, t)

    assert_freed_at_once("gRPC ModelStreamInfer", [once() for _ in range(3)])
    # And the node serves the next request at once.
    r = httpx.post(f"{mesh.url}/v1/embeddings", json={"model": EMBED, "input": "next"},
                   headers=bearer(mesh.keys["gold"]), timeout=60)
    assert r.status_code == 200
