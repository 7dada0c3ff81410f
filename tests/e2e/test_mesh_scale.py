"""The mesh at eight nodes, the suite's small version of tests/bench/scale.py (fifty): a
registration, a vmodel switch and a key revocation made on one node reach every node within
two seconds; an idle node writes to etcd at most once a second beyond its lease keep-alive;
the record each node publishes does not grow with the models registered; forty cold models asked
for at once at random nodes load once each in the mesh, no node more than twice the mean."""
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale  # noqa: E402
from conftest import LLM, Etcd  # noqa: E402

NODES = 8
COLD = 40
WITHIN = 2.0


def test_changes_reach_eight_nodes_and_an_idle_node_costs_etcd_little():
    etcd = Etcd()
    agents = []
    try:
        agents = scale.start(etcd, NODES)
        names = {f"n{i:02d}" for i in range(NODES)}
        scale.finish(*scale.spread(agents, lambda c, a: scale.sees(c, a) == names, timeout=30)[1:], "join")
        zero, c = agents[0], httpx.Client(timeout=60)

        def listed(cl, a):
            return "fresh" in {m["id"] for m in cl.get(a.url + "/admin/models", headers=scale.ADMIN).json()["models"]}

        took = scale.propagation(agents, lambda: c.post(
            zero.url + "/admin/models", headers=scale.ADMIN,
            json={"id": "fresh", "path": "smollm2-135m-instruct/model.gguf"}).raise_for_status(), listed, "registration")
        assert max(took) < WITHIN, took

        def chat_is(target):
            return lambda cl, a: any(v["name"] == "chat" and v["target"] == target
                                     for v in cl.get(a.url + "/admin/models", headers=scale.ADMIN).json()["vmodels"])

        c.put(zero.url + "/admin/vmodels/chat", headers=scale.ADMIN, json={"target": LLM}).raise_for_status()
        scale.finish(*scale.spread(agents, chat_is(LLM))[1:], "vmodel")
        took = scale.propagation(agents, lambda: c.put(
            zero.url + "/admin/vmodels/chat", headers=scale.ADMIN, json={"target": "fresh"}).raise_for_status(),
            chat_is("fresh"), "vmodel switch")
        assert max(took) < WITHIN, took
        # No node but the one switched loads the new target: the others reach it through the mesh.
        loaded = [a for a in agents[1:] if any(m["id"] == "fresh" and m["state"] == "loaded" for m in
                                               c.get(a.url + "/admin/models", headers=scale.ADMIN).json()["models"])]
        assert not loaded, "a vmodel switch loaded its target on other nodes"

        c.post(zero.url + "/admin/tenants", headers=scale.ADMIN, json={"id": "city", "tier": "basic"}).raise_for_status()
        key = c.post(zero.url + "/admin/tenants/city/keys", headers=scale.ADMIN).json()["key"]

        def status(cl, a):
            return cl.get(a.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

        scale.finish(*scale.spread(agents, lambda cl, a: status(cl, a) == 200)[1:], "key")
        took = scale.propagation(agents, lambda: c.post(
            zero.url + "/admin/keys/revoke", headers=scale.ADMIN, json={"key": key}).raise_for_status(),
            lambda cl, a: status(cl, a) == 401, "revocation")
        assert max(took) < WITHIN, took

        before = scale.everything(etcd)   # records list models with copies, not the registry
        for i in range(20):
            c.post(zero.url + "/admin/models", headers=scale.ADMIN,
                   json={"id": f"m{i:02d}", "path": "all-minilm-l6-v2"}).raise_for_status()
        first = scale.etcd_counters(etcd)
        time.sleep(5)
        last = scale.etcd_counters(etcd)
        puts = (last.get(("handled", "Put"), 0) - first.get(("handled", "Put"), 0)) / 5 / NODES
        assert puts <= 1.0, f"{puts:.2f} writes/s per idle node"
        after = scale.everything(etcd)
        grew = {k: (before[k], after[k]) for k in before if "/nodes/" in k and k in after and after[k] > before[k] + 64}
        assert not grew, f"node records grew with the registry: {grew}"

        took, statuses, loads, copies = scale.cold_burst(agents, COLD, threads=16)
        print(f"{COLD} cold models at once over {NODES} nodes: {took:.1f} s, loads per node {sorted(loads.values())}")
        assert statuses == [200] * COLD, statuses
        assert set(copies.values()) == {1}, {m: n for m, n in copies.items() if n != 1}
        assert max(loads.values()) <= 2 * COLD / NODES, loads
    finally:
        for a in agents:
            a.stop()
        etcd.close()
