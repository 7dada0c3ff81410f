"""Node pools: three real agents in three pools (on-premises, rented, spot) with a cost weight
each, and tiers held to a pool or a label. A held tier is served only inside its pools, wherever
its request arrives; a load goes to the cheapest node with room and overflows to dearer ones;
with no node of its pools left, the request is refused with a 503 that says why."""
import subprocess

import httpx
import pytest

from conftest import BIN, Agent, Etcd
from test_mesh import ADMIN, holders, mesh_config, sees, served_by, wait_until

# own: reserved machines, cheapest, room for two of the fixture models; rent: a rented machine
# abroad; spot: spot capacity at home, dearest.
NODES = {
    "own": 'pool = "onprem"\ncost = 1.0\nlabels = { region = "dk" }\n',
    "rent": 'pool = "rented"\ncost = 2.0\nlabels = { region = "de" }\n',
    "spot": 'pool = "spot"\ncost = 3.0\nlabels = { region = "dk", kind = "spot" }\n',
}
TIERS = """
[[tenancy.tiers]]
name = "gdpr"
pools = ["onprem"]
[[tenancy.tiers]]
name = "home"
labels = { region = "dk" }
[[tenancy.tiers]]
name = "any"
[[tenancy.tenants]]
id = "social-services"
tier = "gdpr"
[[tenancy.tenants]]
id = "library"
tier = "home"
[[tenancy.tenants]]
id = "parks"
tier = "any"
"""


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    models = tmp_path_factory.mktemp("fixtures")
    subprocess.run([str(BIN.parent / "make-fixtures"), str(models), "6", "small"], check=True,
                   capture_output=True)
    registered = "".join(f'[[models]]\nid = "m{i}"\npath = "{models}/model-{i:03}.gguf"\n'
                         f'kv_cache_tokens = 64\n' for i in range(6))
    etcd = Etcd()
    agents = {}
    try:
        for name, where in NODES.items():
            room = 'capacity = 1000000' if name == "own" else 'capacity = 100000000'
            config = mesh_config(etcd, name, "/flatmesh-pools").replace(
                "[cache]\npreload = false", "[cache]\npreload = false\nkeep_alive = -1\n"
                f"[[cache.devices]]\nname = \"host0\"\n{room}")
            config = config.replace("[mesh]\n", "[mesh]\n" + where) + TIERS + registered
            agents[name] = Agent(config=config)
        wait_until(lambda: all(sees(a) == set(agents) for a in agents.values()), 30, "the nodes never met")
        keys = {}
        for tenant in ("social-services", "library", "parks"):
            r = httpx.post(agents["own"].url + f"/admin/tenants/{tenant}/keys", headers=ADMIN)
            assert r.status_code == 201, r.text
            keys[tenant] = r.json()["key"]
        yield agents, keys
    finally:
        for a in agents.values():
            a.stop()
        etcd.close()


def complete(agent, key, model):
    return httpx.post(agent.url + "/v1/completions", timeout=120, headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "prompt": "hi", "max_tokens": 1})


def seen_everywhere(agents, model, node):
    """Wait until every node sees `model` ready on `node` (its record, with the bytes it uses)."""
    wait_until(lambda: all(node in holders(a, model) for a in agents.values()), 5,
               lambda: {n: holders(a, model) for n, a in agents.items()})


def models_on(agent, node):
    """The models `agent` sees ready on `node`."""
    return {m for m in ("m0", "m1", "m2", "m3", "m4", "m5") if node in holders(agent, m)}


def test_tiers_held_to_pools_run_only_there_loads_go_cheapest_first_and_none_left_is_a_503(pools):
    agents, keys = pools
    own, rent, spot = agents["own"], agents["rent"], agents["spot"]
    gdpr, home, anyone = keys["social-services"], keys["library"], keys["parks"]
    # The keys were made on `own`: every node knows them within a second.
    def known_everywhere():
        return all(httpx.get(a.url + "/v1/models", headers={"authorization": f"Bearer {k}"}).status_code == 200
                   for a in agents.values() for k in keys.values())
    wait_until(known_everywhere, 10, "a key made on one node was not accepted by all")

    # A tier held to on-premises nodes is served there, wherever its request arrives.
    for i, at in ((0, spot), (1, rent)):
        r = complete(at, gdpr, f"m{i}")
        assert r.status_code == 200 and served_by(r) == "own", (r.status_code, served_by(r), r.text)
        seen_everywhere(agents, f"m{i}", "own")
    # `own` is full now (two models): a load for the Danish tier overflows to the next node
    # with the label that has room — spot, not the cheaper rented node abroad.
    r = complete(rent, home, "m2")
    assert r.status_code == 200 and served_by(r) == "spot", (served_by(r), r.text)
    seen_everywhere(agents, "m2", "spot")
    # Any tier: the cheapest node with room, the rented one.
    r = complete(spot, anyone, "m3")
    assert r.status_code == 200 and served_by(r) == "rent", (served_by(r), r.text)
    seen_everywhere(agents, "m3", "rent")
    # The held tier asking for a model only spot holds gets its own copy on-premises (which
    # makes room for it), never spot's.
    r = complete(spot, gdpr, "m2")
    assert r.status_code == 200 and served_by(r) == "own", (served_by(r), r.text)
    wait_until(lambda: holders(spot, "m2") == {"own", "spot"}, 5, lambda: holders(spot, "m2"))

    # Room comes back on-premises: the next cold load goes there again, not to spot.
    # (It made room by evicting m0 or m1, whichever it chose.)
    for model in ("m0", "m1"):
        r = httpx.post(own.url + f"/admin/models/{model}/unload", headers=ADMIN)
        assert r.status_code == 200, r.text
    wait_until(lambda: all(not {"m0", "m1"} & models_on(a, "own") for a in agents.values()), 5,
               "m0 or m1 still listed on own")
    r = complete(spot, home, "m4")
    assert r.status_code == 200 and served_by(r) == "own", (served_by(r), r.text)

    # The pool and labels are in each node's record.
    mesh = httpx.get(spot.url + "/admin/mesh", headers=ADMIN).json()
    seen = {n["node"]: (n["pool"], n["cost"], n.get("labels", {})) for n in mesh["nodes"]}
    assert seen["own"] == ("onprem", 1.0, {"region": "dk"}), seen
    assert seen["spot"] == ("spot", 3.0, {"region": "dk", "kind": "spot"}), seen

    # No on-premises node left: the held tier is refused with a 503 naming its pools, even for
    # a model other nodes hold; the other tiers go on.
    own.proc.kill()
    own.proc.wait()
    # Within its lease the others still list it: forwarding to it fails, and the held tier is
    # refused rather than served where it arrived.
    r = complete(spot, gdpr, "m4")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_node_in_pools", \
        (r.status_code, served_by(r), r.text)
    wait_until(lambda: sees(spot) == {"rent", "spot"} and sees(rent) == {"rent", "spot"}, 10,
               lambda: (sees(spot), sees(rent)))
    for at, model in ((spot, "m2"), (rent, "m3"), (spot, "m0")):
        r = complete(at, gdpr, model)
        assert r.status_code == 503, (r.status_code, served_by(r), r.text)
        error = r.json()["error"]
        assert error["code"] == "no_node_in_pools", error
        assert "gdpr" in error["message"] and "pools [onprem]" in error["message"], error
        assert r.headers.get("retry-after"), r.headers
    r = complete(rent, home, "m2")
    assert r.status_code == 200 and served_by(r) == "spot", (served_by(r), r.text)
    r = complete(spot, anyone, "m3")
    assert r.status_code == 200 and served_by(r) == "rent", (served_by(r), r.text)
