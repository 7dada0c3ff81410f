"""The mesh: three real agents ("a", "b", "c") joined through one real etcd.

They list each other in `/admin/mesh`, share registrations and vmodels within a second,
forward a request for a model that only another node holds to that node (one hop, the
response naming the node in `x-flatmesh-node`), and drop a node killed with SIGKILL within
its lease, serving its models themselves from then on.
"""
import contextlib
import json
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import BIN, EMBED, LLM, Agent, Etcd

ADMIN = {"authorization": "Bearer admin-secret"}
MESH_TOKEN = "mesh-secret"  # mesh.token of every node: the internal endpoints only
NODES = ("a", "b", "c")
TTL = 2.0               # mesh.lease_ttl of every node
PROPAGATION = 1.0       # a registration or vmodel made on one node is listed on the others by then
LLM_B = "llm-b"         # a second id for the demo LLM's file, registered through node a
CHAT = [{"role": "user", "content": "Name three colours."}]
# The demo LLM writes to any max_tokens up to 2000 for this (~150 tokens a second): a stream
# that is still running whenever a test acts on it.
COUNTING = [{"role": "user", "content": "Write the numbers from 1 to 500 separated by commas."}]


def mesh_config(etcd: Etcd, node: str, prefix: str = "/flatmesh-e2e") -> str:
    # The demo models, nothing loaded at start (which node holds what is up to the tests),
    # the open single-tenant demo (no keys), the admin API behind a token, the nodes' own
    # mesh token.
    return f"""
[server]
admin_token = "admin-secret"

[cache]
preload = false

[mesh]
etcd = ["{etcd.endpoint}"]
node = "{node}"
prefix = "{prefix}"
lease_ttl = "2s"
token = "{MESH_TOKEN}"
"""


@contextlib.contextmanager
def mesh_of(names, config):
    """A real etcd of its own and one agent per name, started with `config(etcd, name)`;
    every process stopped afterwards."""
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    etcd = Etcd()
    agents = {}
    try:
        for name in names:
            agents[name] = Agent(config=config(etcd, name))
        yield agents
    finally:
        for a in agents.values():
            a.stop()
        etcd.close()


def wait_until(pred, timeout: float, what) -> float:
    """Poll `pred` until it holds; the seconds that took, or an AssertionError after `timeout`."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(0.05)


def view(agent) -> dict:
    """The agent's `/admin/mesh`."""
    r = httpx.get(agent.url + "/admin/mesh", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def nodes(agent) -> dict:
    """The live nodes `agent` sees, by name."""
    return {n["node"]: n for n in view(agent)["nodes"]}


def holders(agent, model: str) -> set:
    """The nodes `agent` sees with a ready copy of `model`."""
    return {name for name, n in nodes(agent).items()
            if any(m["id"] == model and m["ready"] > 0 for m in n["models"])}


def listing(agent) -> dict:
    """The agent's `GET /admin/models`."""
    r = httpx.get(agent.url + "/admin/models", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def served_by(r) -> str:
    return r.headers.get("x-flatmesh-node")


def embed(agent, texts, **extra):
    return httpx.post(agent.url + "/v1/embeddings", timeout=180,
                      json={"model": EMBED, "input": texts, **extra})


def chat(agent, model, max_tokens=8, **extra):
    return httpx.post(agent.url + "/v1/chat/completions", timeout=180, json={
        "model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, **extra})


def sees(agent) -> set:
    """The node names in `agent`'s view; none while it cannot answer (still joining)."""
    try:
        return set(nodes(agent))
    except (AssertionError, httpx.HTTPError, ValueError, KeyError):
        return set()


@pytest.fixture(scope="module")
def etcd():
    e = Etcd()
    yield e
    e.close()


@pytest.fixture(scope="module")
def mesh(etcd):
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    agents = {}
    try:
        for name in NODES:
            agents[name] = Agent(config=mesh_config(etcd, name))
            agents[name].node = name
        try:
            wait_until(lambda: all(sees(a) == set(NODES) for a in agents.values()), 30,
                       lambda: {n: sorted(sees(a)) for n, a in agents.items()})
        except AssertionError as e:
            raise AssertionError(f"the nodes never saw each other: {e}\n"
                                 + "\n".join(f"--- {n}\n{a.logs()}" for n, a in agents.items())) from None
        yield agents
    finally:
        for a in agents.values():
            a.stop()


def only_on_c(mesh, model, warm=None):
    """Make `c` the one node with a ready copy of `model` (loaded there by the operator
    call, which acts on that node alone), and wait until `a` sees that."""
    a, c = mesh["a"], mesh["c"]
    if holders(a, model) != {"c"}:
        assert not holders(a, model), f"{model} is already ready on {holders(a, model)}; the test needs it on c only"
        r = httpx.post(c.url + f"/admin/models/{model}/load", headers=ADMIN, timeout=180)
        assert r.status_code == 200, r.text
    wait_until(lambda: holders(a, model) == {"c"}, 10, lambda: f"a sees {model} on {holders(a, model)}: {view(a)}")


def llm_b_only_on_c(mesh):
    a, c = mesh["a"], mesh["c"]
    r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=60,
                   json={"id": LLM_B, "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code in (201, 409), r.text
    wait_until(lambda: LLM_B in {m["id"] for m in listing(c)["models"]}, 10, f"c never listed {LLM_B}")
    only_on_c(mesh, LLM_B, lambda node: chat(node, LLM_B, max_tokens=1, keep_alive=-1))


# --- without [mesh] ---------------------------------------------------------------------------

def test_without_a_mesh_table_the_agent_is_a_single_node():
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    single = Agent(config='[server]\nadmin_token = "admin-secret"\n[cache]\npreload = false\n')
    try:
        r = httpx.get(single.url + "/admin/mesh", headers=ADMIN)
        assert r.status_code == 404, r.text
        for path in ("/healthz", "/v1/models"):
            r = httpx.get(single.url + path)
            assert r.status_code == 200
            assert "x-flatmesh-node" not in r.headers
    finally:
        single.stop()


# --- membership --------------------------------------------------------------------------------

def test_a_mesh_without_a_mesh_token_is_refused_at_start(tmp_path):
    import subprocess
    cfg = tmp_path / "flatmesh.toml"
    cfg.write_text('[mesh]\netcd = ["http://127.0.0.1:2379"]\n')
    run = lambda *args: subprocess.run([str(BIN), "config", "--config", str(cfg), *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=30)
    out = run()
    assert out.returncode == 2 and "mesh.token (FLATMESH_MESH_TOKEN) must be set" in out.stderr, out.stderr
    # The admin token is no mesh token: not enough alone, and refused as the same value.
    out = run("--admin-token", "s3cret-value")
    assert out.returncode == 2 and "mesh.token" in out.stderr, out.stderr
    out = run("--admin-token", "s3cret-value", "--mesh-token", "s3cret-value")
    assert out.returncode == 2 and "must differ from server.admin_token" in out.stderr, out.stderr
    # With one, `flatmesh config` shows that the tokens are set, never the tokens themselves;
    # no admin token is needed to form a mesh.
    out = run("--mesh-token", "m3sh-value")
    assert out.returncode == 0 and 'token = "<set>"' in out.stdout and "m3sh-value" not in out.stdout, out.stderr
    out = run("--admin-token", "s3cret-value", "--mesh-token", "m3sh-value")
    assert out.returncode == 0 and 'admin_token = "<set>"' in out.stdout
    assert "s3cret-value" not in out.stdout and "m3sh-value" not in out.stdout


def test_every_node_lists_all_three_including_itself(mesh):
    for name, agent in mesh.items():
        r = httpx.get(agent.url + "/admin/mesh", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert served_by(r) == name
        v = r.json()
        assert v["node"] == name
        seen = {n["node"]: n for n in v["nodes"]}
        assert set(seen) == set(NODES)
        for other, record in seen.items():
            assert record["http"].rstrip("/") == mesh[other].url, record
            assert record["draining"] is False
            assert isinstance(record["models"], list)


def test_the_mesh_view_needs_the_admin_token(mesh):
    r = httpx.get(mesh["a"].url + "/admin/mesh")
    assert r.status_code == 401, r.text
    r = httpx.get(mesh["a"].url + "/admin/mesh", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401, r.text


def test_the_mesh_token_opens_the_internal_endpoints_and_nothing_else(mesh):
    a = mesh["a"]
    peer = {"x-flatmesh-mesh-token": MESH_TOKEN}
    r = httpx.get(a.url + "/internal/v1/ledger/records", headers=peer, timeout=10)
    assert r.status_code == 200 and isinstance(r.json()["records"], list), r.text
    # The admin token is no mesh token: neither as a bearer nor in the mesh's header.
    for headers in ({}, ADMIN, {"x-flatmesh-mesh-token": "admin-secret"}):
        r = httpx.get(a.url + "/internal/v1/ledger/records", headers=headers, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_a_peer", (headers, r.text)
    # The mesh token opens nothing of the admin API, the status page or readiness details.
    for headers in ({"authorization": f"Bearer {MESH_TOKEN}"}, peer):
        for path in ("/admin/mesh", "/admin/models", "/admin/ledger/records", "/admin/usage", "/status"):
            r = httpx.get(a.url + path, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.text)
        r = httpx.post(a.url + f"/admin/models/{EMBED}/unload", headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert "models" not in httpx.get(a.url + "/readyz", headers=headers, timeout=10).json()


def test_every_response_names_the_node_that_served_it(mesh):
    for name, agent in mesh.items():
        assert served_by(httpx.get(agent.url + "/healthz")) == name
        assert served_by(httpx.get(agent.url + "/v1/models")) == name
        r = chat(agent, "gpt-9")
        assert r.status_code == 404, r.text
        assert served_by(r) == name


# --- the shared registry ----------------------------------------------------------------------

def test_a_model_registered_on_a_is_listed_on_b_and_c_within_a_second(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=60,
                   json={"id": LLM_B, "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code == 201, r.text
    took = wait_until(lambda: all(LLM_B in {m["id"] for m in listing(n)["models"]} for n in (b, c)),
                      PROPAGATION, lambda: {n.node: [m["id"] for m in listing(n)["models"]] for n in (b, c)})
    print(f"registration listed on b and c after {took:.3f} s")
    # Registered, not loaded: no node holds it yet.
    assert LLM_B not in {m["id"] for n in nodes(a).values() for m in n["models"]}


def test_a_vmodel_set_on_a_resolves_on_b_within_a_second(mesh):
    a, b = mesh["a"], mesh["b"]
    r = httpx.put(a.url + "/admin/vmodels/chat-e2e", headers=ADMIN, json={"target": LLM}, timeout=180)
    assert r.is_success, r.text
    took = wait_until(lambda: any(v["name"] == "chat-e2e" and v["target"] == LLM for v in listing(b)["vmodels"]),
                      PROPAGATION, lambda: listing(b)["vmodels"])
    print(f"vmodel listed on b after {took:.3f} s")
    r = chat(b, "chat-e2e", max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == LLM
    assert served_by(r) in NODES


# --- forwarding to the node that holds the model ----------------------------------------------

def test_embeddings_on_a_are_forwarded_to_c_which_holds_the_model(mesh):
    a, c = mesh["a"], mesh["c"]
    only_on_c(mesh, EMBED, lambda node: embed(node, "warm up", keep_alive=-1))
    texts = ["first text", "second text"]
    r = embed(a, texts)
    assert r.status_code == 200, r.text
    assert served_by(r) == "c"
    got = [d["embedding"] for d in r.json()["data"]]
    assert len(got) == 2 and all(len(e) == 384 for e in got)
    direct = embed(c, texts)
    assert served_by(direct) == "c"
    np.testing.assert_allclose(got, [d["embedding"] for d in direct.json()["data"]], atol=1e-6)
    # Forwarded, not loaded on a as well.
    assert holders(a, EMBED) == {"c"}


def test_v2_infer_on_a_is_forwarded_to_c_json_and_binary(mesh):
    a, c = mesh["a"], mesh["c"]
    only_on_c(mesh, EMBED, lambda node: embed(node, "warm up", keep_alive=-1))
    texts = ["A man plays guitar.", "Taxes are due."]
    r = httpx.post(f"{a.url}/v2/models/{EMBED}/infer", timeout=120, json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]})
    assert r.status_code == 200, r.text
    assert served_by(r) == "c"
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [2, 384]
    from_json = np.array(out["data"], dtype=np.float32).reshape(2, 384)

    # The binary tensor data extension, encoded and decoded by tritonclient, through a to c.
    inp = httpclient.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=True)])
    headers = {"content-type": "application/octet-stream"}
    if json_size is not None:
        headers["inference-header-content-length"] = str(json_size)
    r = httpx.post(f"{a.url}/v2/models/{EMBED}/infer", content=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert served_by(r) == "c"
    length = r.headers.get("inference-header-content-length")
    result = httpclient.InferenceServerClient.parse_response_body(
        r.content, header_length=int(length) if length else None)
    np.testing.assert_allclose(result.as_numpy("embedding"), from_json, atol=1e-6)
    assert holders(a, EMBED) == {"c"}


def own_records(agent, model):
    r = httpx.get(agent.url + "/admin/ledger/records", headers=ADMIN, timeout=30)
    return [x for x in r.json()["records"] if x["model"] == model]


def test_grpc_infer_on_a_is_forwarded_to_c(mesh):
    import grpc
    import tritonclient.grpc.service_pb2 as pb
    import tritonclient.grpc.service_pb2_grpc as svc
    a, c = mesh["a"], mesh["c"]
    only_on_c(mesh, EMBED, lambda node: embed(node, "warm up", keep_alive=-1))
    req = pb.ModelInferRequest(model_name=EMBED, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"A man plays guitar."]))])
    with grpc.insecure_channel(a.grpc) as ch:
        answer, call = svc.GRPCInferenceServiceStub(ch).ModelInfer.with_call(req, timeout=120)
    assert dict(call.initial_metadata()).get("x-flatmesh-node") == "c"
    assert list(answer.outputs[0].shape) == [1, 384]
    assert holders(a, EMBED) == {"c"}


def test_grpc_stream_on_a_is_forwarded_to_c(mesh):
    import queue
    import tritonclient.grpc as grpcclient
    a, c = mesh["a"], mesh["c"]
    llm_b_only_on_c(mesh)
    before_a, before_c = len(own_records(a, LLM_B)), len(own_records(c, LLM_B))
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"The capital of France is"], dtype=np.object_))
    client = grpcclient.InferenceServerClient(a.grpc)
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(LLM_B, [inp], parameters={"max_tokens": 8, "temperature": 0})
    parts = []
    while True:
        result, error = got.get(timeout=120)
        assert error is None, error
        parts.append(result.as_numpy("text_output")[0].decode())
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    client.stop_stream()
    assert "".join(parts).startswith(" Paris")
    # Served, and recorded, by c: a only relayed it.
    wait_until(lambda: len(own_records(c, LLM_B)) == before_c + 1, 5, "c never recorded the stream")
    assert len(own_records(a, LLM_B)) == before_a
    assert holders(a, LLM_B) == {"c"}


def test_chat_on_a_is_forwarded_to_c(mesh):
    a = mesh["a"]
    llm_b_only_on_c(mesh)
    r = chat(a, LLM_B, max_tokens=8)
    assert r.status_code == 200, r.text
    assert served_by(r) == "c"
    body = r.json()
    assert body["model"] == LLM_B
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1


def test_streamed_chat_on_a_is_forwarded_to_c(mesh):
    a = mesh["a"]
    llm_b_only_on_c(mesh)
    with httpx.stream("POST", a.url + "/v1/chat/completions", timeout=180, json={
            "model": LLM_B, "messages": CHAT, "max_tokens": 16, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert served_by(r) == "c"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("error" not in ch for ch in chunks), chunks
    assert len(chunks) > 2
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert holders(a, LLM_B) == {"c"}


def test_streamed_chat_through_a_with_the_openai_client_keeps_the_node_and_every_chunk(mesh):
    from openai import OpenAI
    llm_b_only_on_c(mesh)

    def stream(agent):
        client = OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        with client.chat.completions.with_streaming_response.create(
                model=LLM_B, messages=CHAT, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True}) as resp:
            return served_by(resp), list(resp.parse())

    node, chunks = stream(mesh["a"])
    assert node == "c"
    direct_node, direct = stream(mesh["c"])
    assert direct_node == "c"

    def text(cs):
        return "".join(ch.choices[0].delta.content or "" for ch in cs if ch.choices)

    # The same copy, greedy: the forwarded stream is the direct one, chunk for chunk.
    assert text(chunks) and text(chunks) == text(direct)
    assert len(chunks) == len(direct)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.completion_tokens == direct[-1].usage.completion_tokens


# --- shared tenancy: two more nodes with tiers, on their own prefix -----------------------------

TIERS = """
[tenancy]
[[tenancy.tiers]]
name = "basic"
[[tenancy.tiers]]
name = "metered"
token_budget = 30
"""


ONLY_ON_T1 = """
[[tenancy.tiers]]
name = "lookup"
weight = 2
models = ["all-minilm-*"]
"""


@pytest.fixture(scope="module")
def tenanted_pair():
    etcd = Etcd()
    agents = {"etcd": etcd}
    try:
        # t1 alone defines the tier `lookup` (embeddings only): t2 learns it from the mesh.
        agents["t1"] = Agent(config=mesh_config(etcd, "t1") + TIERS + ONLY_ON_T1)
        agents["t2"] = Agent(config=mesh_config(etcd, "t2") + TIERS)
        pair = [agents["t1"], agents["t2"]]
        wait_until(lambda: all(sees(a) == {"t1", "t2"} for a in pair), 30,
                   lambda: {n: sorted(sees(a)) for n, a in zip(("t1", "t2"), pair)})
        yield agents
    finally:
        for name, a in agents.items():
            if name != "etcd":
                a.stop()
        etcd.close()


def tenant_key(agent, tenant, tier):
    r = httpx.post(agent.url + "/admin/tenants", headers=ADMIN, json={"id": tenant, "tier": tier})
    assert r.status_code == 201, r.text
    return httpx.post(agent.url + f"/admin/tenants/{tenant}/keys", headers=ADMIN).json()["key"]


def embed_as(agent, key, text="budget words"):
    return httpx.post(agent.url + "/v1/embeddings", timeout=120, headers={"authorization": f"Bearer {key}"},
                      json={"model": EMBED, "input": text})


def test_choices_and_logprobs_cross_a_forwarding_hop_whole_and_streamed(mesh):
    from openai import OpenAI
    llm_b_only_on_c(mesh)
    kw = dict(model=LLM_B, messages=CHAT, max_tokens=8, temperature=0.7, seed=4, n=2,
              logprobs=True, top_logprobs=2)

    def ask(agent, **more):
        client = OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        return client.chat.completions.create(**kw, **more)

    forwarded, direct = ask(mesh["a"]), ask(mesh["c"])
    assert [c.message.content for c in forwarded.choices] == [c.message.content for c in direct.choices]
    assert [c.logprobs.content for c in forwarded.choices] == [c.logprobs.content for c in direct.choices]
    assert forwarded.usage.completion_tokens == direct.usage.completion_tokens
    texts, tokens = ["", ""], [[], []]
    for ch in ask(mesh["a"], stream=True):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            tokens[c.index] += [t.token for t in (c.logprobs.content if c.logprobs else [])]
    assert texts == [c.message.content for c in direct.choices]
    assert tokens == [[t.token for t in c.logprobs.content] for c in direct.choices]


def test_a_tier_one_node_defines_is_shared_with_the_mesh(tenanted_pair):
    one, two = tenanted_pair["t1"], tenanted_pair["t2"]
    key = tenant_key(one, "library", "lookup")
    wait_until(lambda: embed_as(two, key).status_code == 200, PROPAGATION + 1,
               lambda: f"t2 answered {embed_as(two, key).status_code}")
    # t2 applies the tier it learnt: embeddings only, so the LLM is refused, not open.
    r = httpx.post(two.url + "/v1/chat/completions", timeout=60, headers={"authorization": f"Bearer {key}"},
                   json={"model": LLM, "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 403 and "lookup" in r.text, r.text
    tiers = {t["name"]: t for t in httpx.get(two.url + "/admin/tenants", headers=ADMIN).json()["tiers"]}
    assert tiers["lookup"]["weight"] == 2


def served_on_both(one, two, tenant):
    """A basic-tier key of `tenant` that both nodes have served (twice on `one`, once on `two`,
    each from its own copy), and each node's own ledger records of it."""
    for agent in (one, two):  # a copy on each node: each serves its own requests
        assert httpx.post(agent.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120).status_code == 200
    key = tenant_key(one, tenant, "basic")
    wait_until(lambda: embed_as(two, key).status_code == 200, 2, "the key never worked on t2")
    for agent in (one, one, two):
        assert embed_as(agent, key).status_code == 200
    own = {n: httpx.get(a.url + "/admin/ledger/records", headers=ADMIN, params={"tenant": tenant}).json()["records"]
           for n, a in (("t1", one), ("t2", two))}
    assert own["t1"] and own["t2"], "both nodes served some of it"
    return key, own


def test_usage_and_invoices_on_any_node_sum_every_nodes_ledger(tenanted_pair):
    one, two = tenanted_pair["t1"], tenanted_pair["t2"]
    _, own = served_on_both(one, two, "city-sum")
    expected = sum(r["input_tokens"] + r["output_tokens"] for rs in own.values() for r in rs)
    for agent in (one, two):
        usage = httpx.get(agent.url + "/admin/usage", headers=ADMIN, params={"tenant": "city-sum"}).json()
        # Without a shared ledger the sums are gathered from every node's own ledger.
        assert usage["mesh"] == {"nodes": usage["mesh"]["nodes"], "unreachable": [], "ledger": "nodes"}
        assert sorted(usage["mesh"]["nodes"]) == ["t1", "t2"]
        [line] = usage["usage"]
        assert line["input_tokens"] + line["output_tokens"] == expected
        assert line["requests"] == len(own["t1"]) + len(own["t2"])
    a, b = (httpx.get(x.url + "/admin/invoice", headers=ADMIN).json() for x in (one, two))
    assert a["total"] == b["total"] and a["lines"] == b["lines"]


def test_a_tenants_own_usage_on_any_node_is_the_meshs(tenanted_pair):
    one, two = tenanted_pair["t1"], tenanted_pair["t2"]
    key, own = served_on_both(one, two, "city-own")
    for agent in (one, two):
        r = httpx.get(agent.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tenant"] == "city-own"
        assert sorted(body["mesh"]["nodes"]) == ["t1", "t2"] and body["mesh"]["unreachable"] == []
        [line] = body["usage"]
        assert line["requests"] == len(own["t1"]) + len(own["t2"]), (line, {n: len(r) for n, r in own.items()})
        # Its own usage only, whatever it asks for.
        other = httpx.get(agent.url + "/v1/usage", params={"tenant": "city-sum"}, timeout=30,
                          headers={"authorization": f"Bearer {key}"}).json()
        assert other["tenant"] == "city-own" and other["usage"] == body["usage"]


def test_an_invoice_names_a_node_it_could_not_reach(tenanted_pair):
    import base64
    etcd, one = tenanted_pair["etcd"], tenanted_pair["t1"]
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    ghost = json.dumps({"node": "ghost", "http": "http://127.0.0.1:9", "draining": False,
                        "models": [], "devices": []})
    key = "/flatmesh-e2e/nodes/ghost"
    assert httpx.post(etcd.endpoint + "/v3/kv/put", json={"key": b64(key), "value": b64(ghost)}).status_code == 200
    try:
        wait_until(lambda: "ghost" in nodes(one), 5, "t1 never saw the ghost node")
        inv = httpx.get(one.url + "/admin/invoice", headers=ADMIN).json()
        assert inv["mesh"]["unreachable"] == ["ghost"]
        csv = httpx.get(one.url + "/admin/invoice", headers=ADMIN, params={"format": "csv"})
        assert csv.headers["x-flatmesh-unreachable"] == "ghost"
    finally:
        httpx.post(etcd.endpoint + "/v3/kv/deleterange", json={"key": b64(key)})


def test_a_token_budget_holds_across_the_mesh(tenanted_pair):
    one, two = tenanted_pair["t1"], tenanted_pair["t2"]
    for agent in (one, two):
        assert httpx.post(agent.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120).status_code == 200
    key = tenant_key(one, "city-budget", "metered")
    wait_until(lambda: embed_as(two, key, "x").status_code == 200, 2, "the key never worked on t2")
    spent = 0
    for _ in range(40):  # spend the budget on t1 alone
        r = embed_as(one, key)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        spent += r.json()["usage"]["total_tokens"]
    else:
        raise AssertionError("t1 never refused")
    time.sleep(1.0)  # one publish interval and then some
    r = embed_as(two, key)
    assert r.status_code == 429, "t2 refuses too: its own ledger is under the budget, the mesh's is not"
    assert "budget" in r.json()["error"]["message"]
    mine = httpx.get(two.url + "/admin/ledger/records", headers=ADMIN, params={"tenant": "city-budget"}).json()
    assert sum(x["input_tokens"] + x["output_tokens"] for x in mine["records"]) < 30


def test_a_tenant_and_key_made_on_one_node_work_on_the_other_and_a_revocation_too(tenanted_pair):
    one, two = tenanted_pair["t1"], tenanted_pair["t2"]
    # The model is loaded on two first, so the second below measures the key, not a load.
    assert httpx.post(two.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120).status_code == 200
    assert httpx.post(one.url + "/admin/tenants", headers=ADMIN, json={"id": "city-x", "tier": "basic"}).status_code == 201
    key = httpx.post(one.url + "/admin/tenants/city-x/keys", headers=ADMIN).json()["key"]

    def status_on_two():
        return httpx.post(two.url + "/v1/embeddings", timeout=120, headers={"authorization": f"Bearer {key}"},
                          json={"model": EMBED, "input": "shared key"}).status_code

    took = wait_until(lambda: status_on_two() == 200, 1.0, lambda: f"two answers {status_on_two()}")
    print(f"a key made on t1 worked on t2 after {took:.2f} s")
    assert ("city-x", "basic") in {(t["id"], t["tier"]) for t in
                                   httpx.get(two.url + "/admin/tenants", headers=ADMIN).json()["tenants"]}
    assert httpx.post(one.url + "/admin/keys/revoke", headers=ADMIN, json={"key": key}).status_code == 204
    wait_until(lambda: status_on_two() == 401, 1.0, lambda: f"two still answers {status_on_two()}")


def test_thirty_concurrent_requests_for_a_cold_model_over_three_nodes_load_it_once(mesh):
    from concurrent.futures import ThreadPoolExecutor
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=60,
                   json={"id": "llm-cold", "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code == 201, r.text
    wait_until(lambda: all("llm-cold" in {m["id"] for m in listing(n)["models"]} for n in (b, c)), 10,
               "b and c never listed llm-cold")
    nodes_in_turn = [a, b, c] * 10
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda n: chat(n, "llm-cold", max_tokens=1, keep_alive=-1), nodes_in_turn))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:3]
    loaded_on = holders(a, "llm-cold")
    assert len(loaded_on) == 1, f"loaded on {loaded_on}"
    assert {served_by(r) for r in answers} == loaded_on, "every request was served by the one copy"


def test_etcd_away_for_ten_seconds_nodes_keep_serving_forwarding_and_rejoin(mesh, etcd):
    a, c = mesh["a"], mesh["c"]
    only_on_c(mesh, EMBED, lambda node: embed(node, "warm up", keep_alive=-1))
    etcd.stop()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = embed(a, "etcd is away")
            assert r.status_code == 200, r.text
            assert served_by(r) == "c", "a forwards to the peer it last saw"
            time.sleep(0.5)
        # Admin writes need etcd in a mesh; they fail clearly and the node stays up.
        r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=30,
                       json={"id": "while-away", "path": "smollm2-135m-instruct/model.gguf"})
        assert r.status_code == 503 and "etcd" in r.text, r.text
        assert r.headers["retry-after"] == "1"
    finally:
        etcd.restart()
    took = wait_until(lambda: all(view(n)["etcd_connected"] and set(nodes(n)) == set(NODES)
                                  for n in mesh.values()), 15, lambda: {k: view(n) for k, n in mesh.items()})
    print(f"all nodes rejoined {took:.2f} s after etcd came back")


# --- where cold models load: six small models, three nodes with room for two each ------------

@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    import subprocess
    models = tmp_path_factory.mktemp("fixtures")
    maker = BIN.parent / "make-fixtures"
    subprocess.run([str(maker), str(models), "6", "small"], check=True, capture_output=True)
    etcd = Etcd()
    agents = {}
    config = "".join(f'[[models]]\nid = "m{i}"\npath = "{models}/model-{i:03}.gguf"\nkv_cache_tokens = 64\n'
                     for i in range(6))
    try:
        for name in ("r1", "r2", "r3"):
            agents[name] = Agent(config=mesh_config(etcd, name).replace(
                "[cache]\npreload = false", "[cache]\npreload = false\nkeep_alive = -1\n"
                "[[cache.devices]]\nname = \"host0\"\ncapacity = 1000000") + config)
        wait_until(lambda: all(sees(a) == set(agents) for a in agents.values()), 30, "the nodes never met")
        yield agents
    finally:
        for a in agents.values():
            a.stop()
        etcd.close()


def test_cold_models_load_where_there_is_room_and_no_device_is_ever_over(roomy):
    import threading
    first = roomy["r1"]
    over, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for n in nodes(first).values():
                for d in n["devices"]:
                    if d["used"] > d["capacity"]:
                        over.append((n["node"], d))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(6):  # all six arrive at r1, one after the other
            r = httpx.post(first.url + "/v1/completions", timeout=120,
                           json={"model": f"m{i}", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 200, r.text
    finally:
        time.sleep(0.5)
        stop.set()
        watcher.join()
    assert not over, over[:3]
    held = {name: sorted(m["id"] for m in n["models"] if m["ready"]) for name, n in nodes(first).items()}
    assert all(len(ms) == 2 for ms in held.values()), held
    assert sorted(sum(held.values(), [])) == [f"m{i}" for i in range(6)], "each model loaded once, nothing evicted"


def test_a_hot_model_gets_a_copy_on_another_node_which_leaves_when_idle(mesh):
    from concurrent.futures import ThreadPoolExecutor
    a, c = mesh["a"], mesh["c"]
    r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=60,
                   json={"id": "hot", "path": "smollm2-135m-instruct/model.gguf", "max_concurrency": 1})
    assert r.status_code == 201, r.text
    wait_until(lambda: "hot" in {m["id"] for m in listing(c)["models"]}, 10, "c never listed hot")
    only_on_c(mesh, "hot")

    def c_leases():
        m = [m for m in nodes(a)["c"]["models"] if m["id"] == "hot"]
        return m[0]["leases"] if m else 0

    with ThreadPoolExecutor(4) as pool:
        # Four long generations through a: c's one copy runs one at a time, three queue.
        busy = [pool.submit(chat, a, "hot", 160) for _ in range(4)]
        wait_until(lambda: c_leases() >= 3, 20, lambda: f"c's leases: {c_leases()}")
        r = chat(a, "hot", 2, keep_alive="3s")
        assert r.status_code == 200, r.text
        assert served_by(r) == "a", "every copy was queueing: a added its own"
        wait_until(lambda: holders(a, "hot") == {"a", "c"}, 2, lambda: f"holders: {holders(a, 'hot')}")
        assert all(f.result().status_code == 200 for f in busy)
    # Idle for its keep_alive, the extra copy leaves; c's stays.
    wait_until(lambda: holders(a, "hot") == {"c"}, 15, lambda: f"holders: {holders(a, 'hot')}")


def test_a_client_that_leaves_a_forwarded_stream_stops_the_generation_on_the_peer(mesh):
    a, c = mesh["a"], mesh["c"]
    llm_b_only_on_c(mesh)
    before = len(own_records(c, LLM_B))
    body = {"model": LLM_B, "messages": COUNTING, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert served_by(r) == "c"
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break  # leave after three chunks: closing the stream drops the connection
    wait_until(lambda: len(own_records(c, LLM_B)) == before + 1, 10, "c never ended the generation")
    record = own_records(c, LLM_B)[-1]
    assert record["output_tokens"] < 200, record


def test_a_node_told_to_stop_drains_first(etcd):
    # Two nodes of their own: d holds the model, e forwards to it until d says it drains.
    agents = {}
    try:
        for name in ("d", "e"):
            agents[name] = Agent(config=mesh_config(etcd, name).replace("/flatmesh-e2e", "/flatmesh-drain"))
        d, e = agents["d"], agents["e"]
        wait_until(lambda: set(nodes(e)) == {"d", "e"}, 30, "d and e never met")
        assert httpx.post(d.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120).status_code == 200
        wait_until(lambda: EMBED in {m["id"] for m in nodes(e)["d"]["models"]}, 10, "e never saw the copy on d")
        assert served_by(embed(e, "before")) == "d"
        body = {"model": LLM, "messages": COUNTING, "max_tokens": 400, "temperature": 0}
        with httpx.Client(timeout=120) as h, h.stream("POST", d.url + "/v1/chat/completions",
                                                       json={**body, "stream": True}) as long:
            lines = long.iter_lines()
            next(lines)  # d is generating
            d.proc.send_signal(__import__("signal").SIGTERM)
            wait_until(lambda: nodes(e).get("d", {}).get("draining", True), 2, "d never said it drains")
            r = embed(e, "while d drains")
            assert r.status_code == 200 and served_by(r) == "e"
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            # The stream d was running went on to its last token while d drained.
            assert len(rest) > 100 and rest[-1]["choices"][0]["finish_reason"] == "length", rest[-1:]
        assert d.proc.wait(timeout=60) == 0
    finally:
        for x in agents.values():
            x.stop()


def test_mesh_status_on_the_command_line(mesh):
    import subprocess
    out = subprocess.run([str(BIN), "mesh", "--url", mesh["b"].url, "--admin-token", "admin-secret", "status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["node"] == "b" and status["etcd_connected"] is True
    assert {n["node"] for n in status["nodes"]} == set(NODES)


# --- a node that dies -------------------------------------------------------------------------
# Last in the module: it kills c.

def test_a_vmodel_switch_on_a_moves_traffic_on_every_node_with_no_failed_request(mesh):
    import threading
    a = mesh["a"]
    # Two ids of the demo embedding model (EMBED itself stays where other tests put it).
    for id in ("embed-one", "embed-two"):
        r = httpx.post(a.url + "/admin/models", headers=ADMIN, timeout=60, json={"id": id, "path": EMBED})
        assert r.status_code in (201, 409), r.text
    wait_until(lambda: all("embed-two" in {m["id"] for m in listing(n)["models"]} for n in mesh.values()),
               PROPAGATION + 1, "embed-two was not listed everywhere")
    r = httpx.put(a.url + "/admin/vmodels/lookup-e2e", headers=ADMIN, json={"target": "embed-one"}, timeout=180)
    assert r.is_success, r.text
    wait_until(lambda: all(embed(n, "x", model="lookup-e2e").json().get("model") == "embed-one" for n in mesh.values()),
               PROPAGATION + 5, "the vmodel did not resolve everywhere")
    seen, stop = {name: [] for name in mesh}, threading.Event()

    def traffic(name):
        with httpx.Client(timeout=120) as h:
            while not stop.is_set():
                r = h.post(mesh[name].url + "/v1/embeddings", json={"model": "lookup-e2e", "input": "switch"})
                seen[name].append((r.status_code, r.json().get("model") if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=traffic, args=(name,)) for name in mesh]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        r = httpx.put(a.url + "/admin/vmodels/lookup-e2e", headers=ADMIN, json={"target": "embed-two"}, timeout=180)
        assert r.is_success, r.text
        wait_until(lambda: all(v and v[-1][1] == "embed-two" for v in seen.values()), 30,
                   lambda: {n: v[-1:] for n, v in seen.items()})
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    for name, results in seen.items():
        assert results and all(code == 200 for code, _ in results), (name, [x for x in results if x[0] != 200][:3])
        models = [m for _, m in results]
        assert models[0] == "embed-one" and models[-1] == "embed-two", (name, models[:2], models[-2:])
        # Once moved, traffic stays on the new target.
        first_new = models.index("embed-two")
        assert set(models[first_new:]) == {"embed-two"}, (name, models)


def test_a_killed_node_leaves_the_mesh_within_its_lease_and_no_request_fails(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    only_on_c(mesh, EMBED, lambda node: embed(node, "warm up", keep_alive=-1))
    llm_b_only_on_c(mesh)
    assert "c" in nodes(b)

    # Steady non-streaming traffic on a for c's model while c dies: none of it may fail
    # (a peer that cannot be reached is skipped and the request served on a).
    import threading
    results, stop = [], threading.Event()

    def traffic():
        with httpx.Client(timeout=60) as h:
            while not stop.is_set():
                r = h.post(a.url + "/v1/embeddings", json={"model": EMBED, "input": "steady"})
                results.append((r.status_code, served_by(r)))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c.proc.kill()
    c.proc.wait()
    took = wait_until(lambda: "c" not in nodes(a) and "c" not in nodes(b), 2 * TTL + 1,
                      lambda: {"a": sorted(nodes(a)), "b": sorted(nodes(b))})
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    print(f"c left the views of a and b {took:.2f} s after SIGKILL")
    assert set(nodes(a)) == {"a", "b"} and set(nodes(b)) == {"a", "b"}
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:5]
    served = [node for _, node in results]
    assert served[0] == "c" and served[-1] in {"a", "b"}, "served by c before the kill, by a live node after"

    # c's models load again on a live node (the best one by room, warm tier and loads).
    r = embed(a, "after c died")
    assert r.status_code == 200, r.text
    assert served_by(r) in {"a", "b"}
    r = chat(b, LLM_B, max_tokens=2)
    assert r.status_code == 200, r.text
    assert served_by(r) in {"a", "b"}
