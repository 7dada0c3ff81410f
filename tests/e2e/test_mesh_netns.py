"""A node cut off from etcd but not from its peers or its clients, as a separate network host.

Node "p" runs in a Linux network namespace of its own, joined to this host by a veth pair; etcd
and nodes "a" and "b" run on this host. The partition is a blackhole route in p's namespace to
etcd's address alone (packets to etcd vanish; p still reaches a and b, and they and the clients
reach p). Then: p keeps serving what it holds; a and b stop routing to p within its lease TTL
and load the model once between them; once the route is back p joins again, once, and every
node sees every node. Made with `ip` from Debian's iproute2 and torn down even on failure;
skipped where namespaces cannot be made (no root).
"""
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import EMBED
from netns import ADMIN, three_hosts, wait_until

TTL = 2.0


@pytest.fixture
def hosts():
    for net, _, nodes in three_hosts("/netns", TTL):
        yield net, nodes


def test_a_node_cut_off_from_etcd_serves_on_leaves_the_routing_and_joins_again_once(hosts):
    net, nodes = hosts
    a, b, p = nodes["a"], nodes["b"], nodes["p"]
    r = p.http.post(p.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    wait_until(lambda: a.holders(EMBED) == b.holders(EMBED) == {"p"}, 10, lambda: a.holders(EMBED))
    r = a.embed(EMBED, "before")
    assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text

    net.cut("etcd")
    cut = time.monotonic()
    left = alone = None
    while left is None or alone is None:
        now = time.monotonic() - cut
        assert now < TTL + 10, f"after {now:.1f} s: a sees {a.sees()}, b sees {b.sees()}, p: {p.view()}"
        r = p.embed(EMBED, "p serves what it holds")  # its clients still reach it
        assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text
        if left is None and "p" not in a.sees() and "p" not in b.sees():
            left = time.monotonic() - cut
        if alone is None and not p.view()["etcd_connected"]:
            alone = time.monotonic() - cut
        time.sleep(0.1)
    print(f"p left a's and b's views {left:.2f} s after it lost etcd (lease TTL {TTL} s); "
          f"p took etcd as lost after {alone:.2f} s")
    assert left <= TTL + 2.0, left
    r = p.http.post(p.url + "/admin/models", headers=ADMIN, timeout=30,
                    json={"id": "while-cut-off", "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "mesh_unavailable", r.text

    # Requests at a and b no longer go to p; the two load the model once between them (p's
    # own copy, out of reach of the mesh's claims, is the one beyond that).
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: (a, b)[i % 2].embed(EMBED, f"after {i}"), range(8)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    served = {r.headers["x-flatmesh-node"] for r in answers}
    assert "p" not in served, served
    held = (a.holders(EMBED), b.holders(EMBED))
    assert len(held[0]) == 1 and held[0] == held[1] == served, (held, served)

    mark = len(p.logs())
    net.heal()
    healed = time.monotonic()
    back = wait_until(lambda: all(n.sees() == set(nodes) for n in nodes.values())
                      and p.view()["etcd_connected"], 15,
                      lambda: {k: sorted(n.sees()) for k, n in nodes.items()})
    print(f"p was back in every view {back:.2f} s after the route to etcd returned")
    time.sleep(max(0.0, 3 * TTL - (time.monotonic() - healed)))
    after = p.logs()[mark:]
    assert after.count("Joined the mesh") == 1, after
    assert "Lost etcd" not in after.split("Joined the mesh", 1)[1], after
    assert all(n.sees() == set(nodes) for n in nodes.values())
    r = p.http.post(p.url + "/admin/models", headers=ADMIN, timeout=30,
                    json={"id": "after-heal", "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code == 201, r.text
    listed = lambda: {m["id"] for m in httpx.get(a.url + "/admin/models", headers=ADMIN).json()["models"]}  # noqa: E731
    wait_until(lambda: "after-heal" in listed(), 2, lambda: sorted(listed()))


BUDGET = 300  # tokens a month for tier "metered"
METERED = f"""
[tenancy]
[[tenancy.tiers]]
name = "metered"
token_budget = {BUDGET}
[[tenancy.tenants]]
id = "city"
tier = "metered"
"""
SENTENCE = "The council meets on Tuesday to discuss the budget."


@pytest.fixture
def metered():
    for net, _, nodes in three_hosts("/netns-budget", TTL, extra=METERED):
        yield net, nodes


def spend(node, key, limit=200):
    """Embedding requests at `node` until one is refused: (tokens of the answered ones, the
    refusal)."""
    tokens = 0
    for _ in range(limit):
        r = node.http.post(node.url + "/v1/embeddings", headers={"authorization": f"Bearer {key}"},
                           json={"model": EMBED, "input": SENTENCE})
        if r.status_code != 200:
            return tokens, r
        tokens += r.json()["usage"]["total_tokens"]
    raise AssertionError(f"{node.name} never refused within {limit} requests")


def test_a_budget_across_a_partition_is_overshot_by_at_most_the_cut_nodes_share(metered):
    net, nodes = metered
    a, b, p = nodes["a"], nodes["b"], nodes["p"]
    r = a.http.post(a.url + "/admin/tenants/city/keys", headers=ADMIN)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    auth = {"authorization": f"Bearer {key}"}
    wait_until(lambda: p.http.get(p.url + "/v1/models", headers=auth).status_code == 200, 10,
               "p never learnt the key")

    # p and a each serve from a copy of their own (p's requests are not forwarded to a).
    for node in (p, a):
        r = node.http.post(node.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=120)
        assert r.status_code == 200, r.text

    def ask(node):
        r = node.http.post(node.url + "/v1/embeddings", headers=auth, json={"model": EMBED, "input": SENTENCE})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["total_tokens"]
    before = sum(ask(a) for _ in range(4)) + sum(ask(p) for _ in range(3))
    per_request = ask(b)
    before += per_request
    time.sleep(1.0)  # published: every node counts the others' tokens

    net.cut("etcd")
    wait_until(lambda: not p.view()["etcd_connected"], TTL + 10, "p never took etcd as lost")
    share = (BUDGET - before) // 3
    on_p, refused = spend(p, key)
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"]
    assert "1/3" in message and "cannot see the rest of the mesh" in message, message
    # Its share, no more (admission comes before the tokens are counted: one request over at
    # most), and not much less.
    assert share - per_request < on_p < share + per_request, (on_p, share, per_request)

    # The other side, not knowing what p spent, spends what it thinks is left (p's tokens
    # from before the cut still counted, though p's record has left with its lease).
    wait_until(lambda: "p" not in a.sees(), TTL + 5, "p never left a's view")
    on_ab, refused = spend(a, key)
    assert refused.status_code == 429 and "is spent" in refused.json()["error"]["message"], refused.text
    total = before + on_p + on_ab
    print(f"budget {BUDGET}: {before} before the cut, {on_p} on the cut-off node (share {share}), "
          f"{on_ab} on the other side: {total} in all, {total - BUDGET} over")
    assert total <= BUDGET + share + 2 * per_request, (before, on_p, on_ab)
    assert on_ab >= BUDGET - before - on_p - 2 * per_request, "the other side was held back"

    # Back in the mesh, p counts the whole budget again: spent.
    net.heal()
    wait_until(lambda: all(n.sees() == set(nodes) for n in nodes.values()), 15, "p never came back")
    time.sleep(1.0)
    r = p.http.post(p.url + "/v1/embeddings", headers=auth, json={"model": EMBED, "input": SENTENCE})
    assert r.status_code == 429 and "is spent" in r.json()["error"]["message"], r.text
