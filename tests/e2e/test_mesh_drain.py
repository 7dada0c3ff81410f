"""Spot preemption: a node told it goes away — SIGTERM with `mesh.drain_notice`, or
`POST /admin/drain` — drains: it reports itself not ready, takes no new work (peers stop
forwarding to it, requests that reach it go to peers), its pinned model is loaded on another
node before it stops, and under steady load not one request fails (real etcd, three real
agents on loopback, a client that stops sending to a node once it says it is draining, as a
load balancer does)."""
import signal
import threading
import time

import httpx
import pytest

from conftest import EMBED
from test_mesh import ADMIN, holders, mesh_config, mesh_of, sees, served_by, wait_until

PINNED = "drain-embed"
NAMES = ("d1", "d2", "d3")
NOTICE = 30  # mesh.drain_notice, seconds


@pytest.fixture(scope="module")
def trio():
    def config(etcd, name):
        return mesh_config(etcd, name, "/flatmesh-drain").replace(
            "[mesh]\n", f'[mesh]\ndrain_notice = "{NOTICE}s"\n')
    with mesh_of(NAMES, config) as agents:
        wait_until(lambda: all(sees(a) == set(NAMES) for a in agents.values()), 30, "the nodes never met")
        r = httpx.post(agents["d1"].url + "/admin/models", headers=ADMIN, timeout=60,
                       json={"id": PINNED, "path": EMBED, "pinned": True})
        assert r.status_code == 201, r.text
        yield agents


class Load:
    """Non-streaming embeddings from three client threads, spread over the nodes that do not say
    they are draining (polled every 50 ms, as a load balancer's readiness probe would)."""

    def __init__(self, agents):
        self.agents = dict(agents)
        self.open = set(agents)
        self.results = []       # (node asked, time, status or the exception's text)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.probe)] + \
            [threading.Thread(target=self.send, args=(i,)) for i in range(3)]

    def probe(self):
        while not self.stop.is_set():
            for name, a in self.agents.items():
                try:
                    draining = httpx.get(a.url + "/readyz", timeout=1).json()["draining"]
                except (httpx.HTTPError, ValueError):
                    draining = True
                (self.open.discard if draining else self.open.add)(name)
            time.sleep(0.05)

    def send(self, i):
        n = 0
        while not self.stop.is_set():
            choices = sorted(self.open)
            if not choices:
                time.sleep(0.01)
                continue
            name = choices[(n + i) % len(choices)]
            n += 1
            try:
                r = httpx.post(self.agents[name].url + "/v1/embeddings", timeout=60,
                               json={"model": PINNED, "input": f"request {i}-{n}"})
                self.results.append((name, time.monotonic(), r.status_code))
            except httpx.HTTPError as e:
                self.results.append((name, time.monotonic(), repr(e)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_node_sent_sigterm_drains_under_load_and_no_request_fails(trio):
    wait_until(lambda: len(holders(trio["d1"], PINNED)) == 1, 20, lambda: holders(trio["d1"], PINNED))
    (going,) = holders(trio["d1"], PINNED)
    staying = [a for name, a in trio.items() if name != going]
    with Load(trio) as load:
        time.sleep(2)
        told = time.monotonic()
        trio[going].proc.send_signal(signal.SIGTERM)
        rc = trio[going].proc.wait(NOTICE + 15)
        gone = time.monotonic()
        # The pinned model was ready elsewhere before the node stopped.
        elsewhere = holders(staying[0], PINNED) - {going}
        time.sleep(2)
    logs = trio[going].logs()
    print(f"drained and stopped {gone - told:.2f} s after SIGTERM; {len(load.results)} requests")
    assert rc == 0, logs[-3000:]
    assert len(elsewhere) == 1, elsewhere
    assert "Drained" in logs, logs[-3000:]
    assert gone - told < NOTICE, "the node waited out its whole notice"
    failed = [r for r in load.results if r[2] != 200]
    assert not failed, failed[:5]
    after = [r for r in load.results if r[1] > told]
    assert len(after) >= 10, f"only {len(after)} requests ran during and after the drain"


def test_an_admin_drain_moves_the_pinned_model_and_forwards_what_still_arrives(trio):
    live = {name: a for name, a in trio.items() if a.proc.poll() is None}
    first = next(iter(live.values()))
    wait_until(lambda: len(holders(first, PINNED)) == 1, 20, lambda: holders(first, PINNED))
    (holder,) = holders(first, PINNED)
    (other,) = set(live) - {holder}
    r = httpx.post(live[holder].url + "/admin/drain", headers=ADMIN)
    assert r.status_code == 202, r.text
    assert r.json()["draining"] is True and r.json()["node"] == holder, r.text
    ready = httpx.get(live[holder].url + "/readyz")
    assert ready.status_code == 503 and ready.json()["draining"] is True, ready.text

    def drained():
        return httpx.get(live[holder].url + "/admin/drain", headers=ADMIN).json()["drained"]
    wait_until(drained, 20, lambda: httpx.get(live[holder].url + "/admin/drain", headers=ADMIN).text)
    assert other in holders(live[other], PINNED)
    # Still running, it takes no work of its own: what reaches it is served by the other node.
    r = httpx.post(live[holder].url + "/v1/embeddings", timeout=60, json={"model": PINNED, "input": "late"})
    assert r.status_code == 200 and served_by(r) == other, (r.status_code, served_by(r), r.text)
    assert live[holder].proc.poll() is None
