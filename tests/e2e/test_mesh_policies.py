"""Policies in the mesh: routing and the response cache run on the node where a request
arrives; the node that serves it only admits, schedules, runs and records it (real etcd, two
real agents with the real router and cache plugins)."""
import httpx
import pytest

from conftest import EMBED, ROOT, Etcd
from test_policies import ROUTED
from test_mesh import ADMIN, MESH_TOKEN, holders, mesh_config, mesh_of, served_by, wait_until

PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
PROMPT = [{"role": "user", "content": "Hi!"}]


def config(etcd: Etcd, node: str) -> str:
    return mesh_config(etcd, node, "/flatmesh-policies") + ROUTED


@pytest.fixture(scope="module")
def pair():
    for name in ("cost_router", "semantic_cache"):
        assert (PLUGINS / f"{name}.wasm").exists(), "run plugins/build first"
    with mesh_of(("front", "back"), config) as agents:
        yield agents


def records(agent, model):
    r = httpx.get(agent.url + "/admin/ledger/records", headers=ADMIN, timeout=30)
    return [x for x in r.json()["records"] if x["model"] == model]


def requests_counted(agent, **labels) -> float:
    """flatmesh_requests_total summed over the series with these labels."""
    total = 0.0
    for line in httpx.get(agent.url + "/metrics").text.splitlines():
        if not line.startswith("flatmesh_requests_total{"):
            continue
        inside, value = line[len("flatmesh_requests_total{"):].rsplit("} ", 1)
        have = dict(kv.split("=", 1) for kv in inside.split(","))
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def ask(agent):
    return httpx.post(agent.url + "/v1/chat/completions", timeout=180, json={
        "model": "auto", "messages": PROMPT, "max_tokens": 6, "temperature": 0})


def test_an_alias_is_routed_where_it_arrives_and_served_where_the_model_is(pair):
    front, back = pair["front"], pair["back"]
    r = httpx.post(back.url + "/admin/models/small/load", headers=ADMIN, timeout=180)
    assert r.status_code == 200, r.text
    wait_until(lambda: holders(front, "small") == {"back"}, 10, "front never saw back's copy of small")

    first = ask(front)
    assert first.status_code == 200, first.text
    # Routed on front (the alias is no model), then placed where `small` is: back.
    assert first.json()["model"] == "small"
    assert "cheapest" in first.headers["x-flatmesh-route"]
    assert first.headers["x-flatmesh-cache"] == "miss"
    assert served_by(first) == "back"
    assert len(records(back, "small")) == 1 and not records(front, "small"), "recorded where it ran"

    # The same prompt again: front's response cache answers, nothing reaches back.
    again = ask(front)
    assert again.status_code == 200, again.text
    assert again.headers["x-flatmesh-cache"] == "hit" and served_by(again) == "front"
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert len(records(back, "small")) == 1
    hits = [x for x in records(front, "small") if x.get("cache_hit")]
    assert len(hits) == 1, records(front, "small")
    # Each request counted once in the mesh, where it was served, under the model it became
    # (not the alias): the forwarded one on back, the cache hit on front.
    for node, expected in ((front, 1), (back, 1)):
        assert requests_counted(node, model="small", endpoint="chat_completions") == expected
        assert requests_counted(node, model="unknown", endpoint="chat_completions") == 0
    # front never loaded an LLM of its own for either request.
    view = httpx.get(front.url + "/admin/models", headers=ADMIN).json()
    assert all(m["state"] != "ready" for m in view["models"] if m["id"] in ("small", "large"))


def test_the_peer_endpoint_is_for_the_nodes_of_the_mesh_only(pair, agent):
    import json
    front = pair["front"]
    wire = {"model": EMBED, "endpoint": "embeddings",
            "work": {"embed": {"inputs": ["from a peer"], "dimensions": None}}}
    # A client cannot use it to skip routing, the cache or the front doors' checks.
    r = httpx.post(front.url + "/internal/v1/serve", json=wire, timeout=60)
    assert r.status_code == 403 and "nodes of the mesh" in r.text, r.text
    r = httpx.post(front.url + "/internal/v1/serve", json=wire, timeout=60,
                   headers={"x-flatmesh-mesh-token": "wrong"})
    assert r.status_code == 403
    # The admin token is no mesh token.
    for headers in ({"x-flatmesh-mesh-token": "admin-secret"}, ADMIN):
        r = httpx.post(front.url + "/internal/v1/serve", json=wire, timeout=60, headers=headers)
        assert r.status_code == 403 and "nodes of the mesh" in r.text, r.text
    # A node (the mesh token) gets the answer as JSON lines.
    r = httpx.post(front.url + "/internal/v1/serve", json=wire, timeout=120,
                   headers={"x-flatmesh-mesh-token": MESH_TOKEN})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson", r.text
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0]["served"]["node"] == "front" and len(lines[1]["embeddings"]["vectors"][0]) == 384
    # A bad line is a clear 400, not a crash.
    r = httpx.post(front.url + "/internal/v1/serve", content=b"{not json", timeout=60,
                   headers={"x-flatmesh-mesh-token": MESH_TOKEN, "content-type": "application/json"})
    assert r.status_code == 400 and "forwarded request" in r.text
    # What no front door takes, a node does not take from a peer either: the answer is the
    # serve path's 400, named, in the wire format.
    generate = {"prompt": {"text": "hi"}, "max_tokens": 2, "stop": [],
                "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
                             "presence_penalty": 0.0, "frequency_penalty": 0.0}}
    sampling = generate["sampling"]
    for field, value, work in [
        ("temperature", 99.0, {"generate": {**generate, "sampling": {**sampling, "temperature": 99.0}}}),
        ("top_p", 7.0, {"generate": {**generate, "sampling": {**sampling, "top_p": 7.0}}}),
        ("presence_penalty", -1e30, {"generate": {**generate, "sampling": {**sampling, "presence_penalty": -1e30}}}),
        ("inputs", 3000, {"embed": {"inputs": ["x"] * 3000, "dimensions": None}}),
    ]:
        model = EMBED if "embed" in work else "small"  # the LLM of this pair (ROUTED)
        r = httpx.post(front.url + "/internal/v1/serve", timeout=60, headers={"x-flatmesh-mesh-token": MESH_TOKEN},
                       json={"model": model, "endpoint": "embeddings" if "embed" in work else "completions",
                             "work": work})
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert len(lines) == 1 and "error" in lines[0], (field, "was served", lines[0])
        line = lines[0]
        assert line["error"]["kind"] == "invalid_request" and field in line["error"]["message"], (field, line)
    # Without a mesh there is no such endpoint.
    assert httpx.post(agent.url + "/internal/v1/serve", json=wire, timeout=30).status_code == 404
