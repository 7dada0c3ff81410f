"""Fair sharing between tiers, and the limits of a tier, against the real agent."""
import threading
import time

import httpx
import pytest

from conftest import EMBED, LLM, Agent

ADMIN = {"authorization": "Bearer admin-secret"}
CONFIG = """
[server]
admin_token = "admin-secret"
[scheduler]
slots = 1
[tenancy]
[[tenancy.tiers]]
name = "gold"
weight = 3
[[tenancy.tiers]]
name = "basic"
weight = 1
[[tenancy.tiers]]
name = "rpm"
requests_per_minute = 3
[[tenancy.tiers]]
name = "tpm"
tokens_per_minute = 20
[[tenancy.tiers]]
name = "budget"
token_budget = 12
[[tenancy.tiers]]
name = "single"
max_concurrency = 1
""" + "".join(f'[[tenancy.tenants]]\nid = "{t}"\ntier = "{t}"\n' for t in ["gold", "basic", "rpm", "tpm", "budget", "single"])


@pytest.fixture(scope="module")
def agent2():
    a = Agent(config=CONFIG)
    a.keys = {t: httpx.post(f"{a.url}/admin/tenants/{t}/keys", headers=ADMIN).json()["key"]
              for t in ["gold", "basic", "rpm", "tpm", "budget", "single"]}
    yield a
    a.stop()


def hammer(agent, tenant, seconds, counts, threads=6):
    headers = {"authorization": f"Bearer {agent.keys[tenant]}"}
    deadline = time.time() + seconds

    def run():
        with httpx.Client(timeout=60) as c:
            while time.time() < deadline:
                r = c.post(f"{agent.url}/v1/embeddings", headers=headers, json={"model": EMBED, "input": "fair share"})
                if r.status_code == 200 and time.time() < deadline:
                    counts[tenant] = counts.get(tenant, 0) + 1

    return [threading.Thread(target=run) for _ in range(threads)]


# The same tiers with plenty of node slots, but a model that runs one request at a time: the
# copy's own gate (its batch) is what binds, and it must give places out by weight too.
GATE_CONFIG = CONFIG.replace("slots = 1", "slots = 16") + f"""
[[models]]
id = "{EMBED}"
path = "all-minilm-l6-v2"
max_concurrency = 1
"""


@pytest.fixture(scope="module")
def gated():
    a = Agent(config=GATE_CONFIG)
    a.keys = {t: httpx.post(f"{a.url}/admin/tenants/{t}/keys", headers=ADMIN).json()["key"]
              for t in ["gold", "basic"]}
    yield a
    a.stop()


@pytest.mark.parametrize("where", ["node slots", "copy gate"])
def test_weights_3_to_1_share_the_pool_within_10_percent_and_a_lone_tier_gets_it_all(where, request):
    agent2 = request.getfixturevalue("agent2" if where == "node slots" else "gated")
    counts = {}
    ts = hammer(agent2, "gold", 8, counts) + hammer(agent2, "basic", 8, counts)
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ratio = counts["gold"] / counts["basic"]
    assert 2.7 <= ratio <= 3.3, counts
    both = counts["gold"] + counts["basic"]
    alone = {}
    ts = hammer(agent2, "basic", 8, alone)
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert alone["basic"] > 0.75 * both, (alone, both)


def post(agent, tenant, **body):
    return httpx.post(f"{agent.url}/v1/completions", timeout=60,
                      headers={"authorization": f"Bearer {agent.keys[tenant]}"},
                      json={"model": LLM, "prompt": "Hi", "max_tokens": 4, **body})


def test_requests_per_minute(agent2):
    assert [post(agent2, "rpm").status_code for _ in range(3)] == [200] * 3
    r = post(agent2, "rpm")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert "3 requests per minute" in r.json()["error"]["message"]


def test_tokens_per_minute(agent2):
    codes = [post(agent2, "tpm").status_code for _ in range(6)]
    assert codes[0] == 200 and 429 in codes
    r = post(agent2, "tpm")
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-tokens"] == "20"


def test_token_budget(agent2):
    codes = [post(agent2, "budget").status_code for _ in range(6)]
    assert codes[0] == 200 and codes[-1] == 429
    assert "budget" in post(agent2, "budget").json()["error"]["message"]


def test_concurrency_cap(agent2):
    got = {}

    def long():  # a large embedding batch keeps the tenant's one slot busy for seconds
        got["first"] = httpx.post(f"{agent2.url}/v1/embeddings", timeout=120,
                                  headers={"authorization": f"Bearer {agent2.keys['single']}"},
                                  json={"model": EMBED, "input": [f"sentence {i}" for i in range(1000)]}).status_code

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.5)
    second = post(agent2, "single")
    t.join()
    assert got["first"] == 200
    assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
