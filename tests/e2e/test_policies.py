"""The four example policy plugins loaded in the real agent, used with the real openai client."""
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import EMBED, LLM, ROOT, Agent

ADMIN = {"authorization": "Bearer admin-secret"}
PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
# Two ids of the demo LLM behind the alias `auto`, the embedding model, the router and the
# semantic cache (also the mesh's policy test, tests/e2e/test_mesh_policies.py).
ROUTED = f"""
[[models]]
id = "small"
path = "{LLM}/model.gguf"

[[models]]
id = "large"
path = "{LLM}/model.gguf"

[[models]]
id = "{EMBED}"
path = "{EMBED}"

[policy.router]
plugin = "{PLUGINS / 'cost_router.wasm'}"
config = {{ alias = "auto", models = ["small", "large"], long_prompt_tokens = 30 }}
on_failure = "closed"

[policy.cache]
plugin = "{PLUGINS / 'semantic_cache.wasm'}"
config = {{ embedding_model = "{EMBED}", threshold = 0.95 }}
"""
CONFIG = f"""
[server]
admin_token = "admin-secret"

[tenancy]
[[tenancy.tiers]]
name = "gold"
price = 1000
weight = 3

[[tenancy.tiers]]
name = "basic"
price = 100
weight = 1

[[tenancy.tiers]]
name = "trial"
price = 0
weight = 1

[[tenancy.tenants]]
id = "city-a"
tier = "gold"

[[tenancy.tenants]]
id = "city-b"
tier = "basic"

[[tenancy.tiers]]
name = "metered"
price = 10
weight = 1

[[tenancy.tenants]]
id = "village"
tier = "trial"

[[tenancy.tenants]]
id = "hamlet"
tier = "metered"

[scheduler]
max_wait = "3s"

{ROUTED}
[policy.pricing]
plugin = "{PLUGINS / 'solidarity_pricing.wasm'}"
config = {{ budgets = {{ trial = 60 }}, tokens_per_minute = {{ metered = 1 }}, pool_cost = 1500.0 }}

[policy.residency]
plugin = "{PLUGINS / 'office_hours.wasm'}"
config = {{ keep = ["small"], from_hour = 0, to_hour = 24 }}
"""


@pytest.fixture(scope="module")
def mesh():
    for name in ("cost_router", "semantic_cache", "solidarity_pricing", "office_hours"):
        assert (PLUGINS / f"{name}.wasm").exists(), "run plugins/build first"
    a = Agent(config=CONFIG)
    keys = {}
    for tenant in ("city-a", "city-b", "village", "hamlet"):
        r = httpx.post(f"{a.url}/admin/tenants/{tenant}/keys", headers=ADMIN)
        assert r.status_code == 201, r.text
        keys[tenant] = r.json()["key"]
    a.keys = keys
    yield a
    a.stop()


def client(mesh, tenant):
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=mesh.keys[tenant], max_retries=0, timeout=120)


def chat(mesh, tenant, text, **kw):
    return client(mesh, tenant).chat.completions.with_raw_response.create(
        model=kw.pop("model", "auto"), messages=[{"role": "user", "content": text}],
        max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw)


def metric(mesh, series):
    for line in httpx.get(mesh.url + "/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_all_four_slots_are_loaded(mesh):
    slots = httpx.get(f"{mesh.url}/admin/policies", headers=ADMIN).json()["slots"]
    assert [(s["slot"], s["loaded"]) for s in slots] == [
        ("router", True), ("cache", True), ("pricing", True), ("residency", True)]
    assert all(len(s["sha256"]) == 64 for s in slots)


def test_the_alias_is_routed_by_prompt(mesh):
    short = chat(mesh, "city-a", "Hi!")
    assert short.parse().model == "small"
    assert "cheapest" in short.headers["x-flatmesh-route"]
    long = chat(mesh, "city-a", "Please explain, step by step and with care, how a municipal "
                "library could share its catalogue with the libraries of three neighbouring towns.")
    assert long.parse().model == "large", long.headers.get("x-flatmesh-route")
    assert "long prompt" in long.headers["x-flatmesh-route"]
    # The router sees what shapes the answer: a schema or tools make a short prompt complex.
    schema = {"type": "json_schema", "json_schema": {"name": "yes", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}
    structured = chat(mesh, "city-a", "Hi!", response_format=schema, max_tokens=8)
    assert structured.parse().model == "large", structured.headers.get("x-flatmesh-route")
    assert "structured output" in structured.headers["x-flatmesh-route"]
    tool = {"type": "function", "function": {"name": "open_case", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer"}}}}}
    with_tools = chat(mesh, "city-a", "Hi!", tools=[tool], max_tokens=8)
    assert with_tools.parse().model == "large", with_tools.headers.get("x-flatmesh-route")
    assert "tools offered (open_case)" in with_tools.headers["x-flatmesh-route"]
    # A model asked for by name is not routed.
    direct = chat(mesh, "city-a", "Hi!", model="large")
    assert direct.parse().model == "large" and "x-flatmesh-route" not in direct.headers


def test_a_repeated_prompt_is_a_cache_hit_for_its_tenant_only(mesh):
    hits = metric(mesh, 'flatmesh_response_cache_total{result="hit"}')
    first = chat(mesh, "city-a", "What is the capital of France?", max_tokens=6)
    assert first.headers["x-flatmesh-cache"] == "miss"
    again = chat(mesh, "city-a", "What is the capital of France?", max_tokens=6)
    assert again.headers["x-flatmesh-cache"] == "hit"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    # Not the same text, the same meaning to the embedding model: a semantic hit.
    similar = chat(mesh, "city-a", "what is the capital of france?", max_tokens=6)
    assert similar.headers["x-flatmesh-cache"] == "hit"
    assert metric(mesh, 'flatmesh_response_cache_total{result="hit"}') == hits + 2
    # Another tenant never sees city-a's answers.
    other = chat(mesh, "city-b", "What is the capital of France?", max_tokens=6)
    assert other.headers["x-flatmesh-cache"] == "miss"
    # Streams are answered from the cache too.
    stream = client(mesh, "city-a").chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == first.parse().choices[0].message.content
    usage = httpx.get(f"{mesh.url}/admin/usage", headers=ADMIN, params={"tenant": "city-a"}).json()
    assert usage["usage"][0]["requests"] >= 3


def test_a_cached_answer_is_never_served_for_logprobs_or_n(mesh):
    q = "Which river runs through Paris?"
    first = chat(mesh, "city-a", q, max_tokens=6)
    assert chat(mesh, "city-a", q, max_tokens=6).headers["x-flatmesh-cache"] == "hit"
    # The cache holds one text: asked for logprobs or for more choices, the model answers.
    scored = chat(mesh, "city-a", q, max_tokens=6, logprobs=True, top_logprobs=2)
    assert "x-flatmesh-cache" not in scored.headers
    content = scored.parse().choices[0].logprobs.content
    assert "".join(t.token for t in content) == first.parse().choices[0].message.content
    several = chat(mesh, "city-a", q, max_tokens=6, n=2)
    assert "x-flatmesh-cache" not in several.headers
    assert len(several.parse().choices) == 2
    # Nor did those answers go into the cache as another request's.
    assert chat(mesh, "city-a", q, max_tokens=6).parse().choices[0].message.content == \
        first.parse().choices[0].message.content


def test_a_spent_budget_is_denied(mesh):
    c = client(mesh, "village")
    denied = None
    for i in range(10):
        try:
            c.chat.completions.create(model="small", messages=[{"role": "user", "content": f"Count to {i}"}],
                                      max_tokens=8, temperature=0)
        except openai.RateLimitError as e:
            denied = e
            break
    assert denied is not None, "the trial budget was never spent"
    assert "budget of 60 tokens" in denied.message
    assert int(denied.response.headers["retry-after"]) > 0
    # The pricing slot guards every endpoint: embeddings, and KServe v2 over REST and gRPC.
    with pytest.raises(openai.RateLimitError):
        c.embeddings.create(model=EMBED, input="hello")
    headers = {"authorization": f"Bearer {mesh.keys['village']}"}
    rest = httpx.post(f"{mesh.url}/v2/models/{EMBED}/infer", headers=headers, json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]})
    assert rest.status_code == 429 and "budget" in rest.json()["error"]
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        grpcclient.InferenceServerClient(url=mesh.grpc).infer(EMBED, [inp], headers=headers)
    assert "RESOURCE_EXHAUSTED" in e.value.status() and "budget" in e.value.message()
    # Other tiers are not affected.
    assert chat(mesh, "city-b", "Hello", model="small").parse().choices


def test_a_tier_over_its_token_rate_is_held_then_refused(mesh):
    c = client(mesh, "hamlet")
    c.chat.completions.create(model="small", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    started = time.time()
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="small", messages=[{"role": "user", "content": "Hi again"}], max_tokens=2)
    # The plugin said `wait` (1 s at a time) until the scheduler's 3 s bound ran out.
    assert time.time() - started >= 2.0
    assert "holds requests" in e.value.message


def test_invoices_share_the_pool_cost_by_weight(mesh):
    inv = httpx.get(f"{mesh.url}/admin/invoice", headers=ADMIN).json()
    assert inv["pricing"] == "plugin"
    fees = {l["tenant"]: l["amount"] for l in inv["lines"] if l["description"].startswith("flat fee")}
    assert fees == {"city-a": 1000, "city-b": 100, "village": 0, "hamlet": 10}
    shares = {l["tenant"]: l["amount"] for l in inv["lines"] if l["description"].startswith("solidarity")}
    rest = 1500.0 - 1110.0
    assert shares == pytest.approx({"city-a": rest * 3 / 6, "city-b": rest / 6, "village": rest / 6,
                                    "hamlet": rest / 6})
    assert inv["total"] == pytest.approx(1500.0)
    csv = httpx.get(f"{mesh.url}/admin/invoice", headers=ADMIN, params={"format": "csv"}).text
    assert "solidarity share" in csv


def test_hot_reload_under_load_drops_nothing(mesh):
    results, stop = [], threading.Event()

    def load():
        # Every request passes all three slots: routed, answered from the cache, admitted and charged.
        while not stop.is_set():
            try:
                results.append(chat(mesh, "city-a", "Are you there?", max_tokens=2).parse().model)
            except Exception as e:  # noqa: BLE001 - every failure counts
                results.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    versions = []
    for slot in ("router", "cache", "pricing") * 4:
        r = httpx.post(f"{mesh.url}/admin/policies/{slot}/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        versions.append(r.json()["version"])
        time.sleep(0.25)
    stop.set()
    for t in threads:
        t.join()
    assert len(results) > 10 and all(r == "small" for r in results), [r for r in results if r != "small"][:3]
    assert versions[-3:] == [v + 3 for v in versions[:3]]
    assert httpx.get(mesh.url + "/healthz").status_code == 200
