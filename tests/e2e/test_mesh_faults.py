"""The mesh under network faults between separate hosts (network namespaces, `netns.py`).

Three agents: "a" and "b" on this host, "p" on a host of its own; one etcd. Faults:
- p cut from its peers but not from etcd: forwarding to p fails over (a and b serve the model
  themselves), p's own clients are still served by p, and forwarding to p returns once healed;
- p's host gone without a word mid-stream (its link down, the agent killed): the stream that a
  forwarded to p ends with the documented retryable error (`peer_gone`) within a bound, new
  requests at a are served, p leaves the views within its lease;
- p's link flapping (down and up every 2 s; `FLATMESH_FLAP_SECONDS`, default 20; 60 for the issue's minute): no crash;
  afterwards every node sees every node and etcd holds one lease and one record per node and
  no load claim;
- 200 ms added to every round trip between p and its peers (a relay that delays each chunk) and
  5% of their packets dropped each way (nftables): every request forwarded to p is answered,
  with the added latency measured.
Skipped where network namespaces cannot be made (no root).
"""
import base64
import json
import os
import threading
import time

import httpx
import pytest

from conftest import EMBED, LLM
from netns import ADMIN, three_hosts, wait_until

TTL = 2.0
PREFIX = "/faults"
# A stream from a vanished peer fails this long after its last byte at most (TCP keepalive
# after 5 s, 3 probes 2 s apart), plus the test's own polling.
GONE_WITHIN = 16.0
FLAP_SECONDS = float(os.environ.get("FLATMESH_FLAP_SECONDS", "20"))


@pytest.fixture
def hosts():
    yield from three_hosts(PREFIX, TTL)


def etcd_range(etcd, prefix: str) -> dict:
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    end = prefix.encode()[:-1] + bytes([prefix.encode()[-1] + 1])
    r = httpx.post(etcd.endpoint + "/v3/kv/range", timeout=5,
                   json={"key": enc(prefix.encode()), "range_end": enc(end)})
    r.raise_for_status()
    return {base64.b64decode(kv["key"]).decode(): kv.get("lease")
            for kv in r.json().get("kvs", [])}


def etcd_leases(etcd) -> set:
    r = httpx.post(etcd.endpoint + "/v3/lease/leases", timeout=5, json={})
    r.raise_for_status()
    return {lease["ID"] for lease in r.json().get("leases", [])}


def load_on(node, model: str):
    r = node.http.post(node.url + f"/admin/models/{model}/load", headers=ADMIN, timeout=180)
    assert r.status_code == 200, r.text


def test_a_node_cut_from_its_peers_is_passed_over_and_still_serves_its_own_clients(hosts):
    net, _, nodes = hosts
    a, b, p = nodes["a"], nodes["b"], nodes["p"]
    load_on(p, EMBED)
    wait_until(lambda: a.holders(EMBED) == b.holders(EMBED) == {"p"}, 10, lambda: a.holders(EMBED))
    r = a.embed(EMBED, "before")
    assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text

    net.cut("peers")
    answers, took = [], []
    for i in range(6):
        start = time.monotonic()
        answers.append((a, b)[i % 2].embed(EMBED, f"cut {i}"))
        took.append(time.monotonic() - start)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    served = [r.headers["x-flatmesh-node"] for r in answers]
    assert "p" not in served, served
    print(f"requests at a and b while p was cut from them: {[round(t, 2) for t in took]} s")
    # p is still in the mesh (it reaches etcd) and serves its own clients.
    assert {"a", "b", "p"} == a.sees() == b.sees() == p.sees()
    for i in range(3):
        r = p.embed(EMBED, f"p's own client {i}")
        assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text

    net.heal()
    # Each of a and b has its own copy now and serves here; a new model only p holds is
    # forwarded to p again.
    load_on(p, LLM)
    wait_until(lambda: "p" in a.holders(LLM), 10, lambda: a.holders(LLM))
    r = a.http.post(a.url + "/v1/chat/completions", timeout=120, json={
        "model": LLM, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text


class Stream(threading.Thread):
    """A streamed chat at `node` for `model`: its data lines with their arrival times."""

    def __init__(self, node, model: str):
        super().__init__(daemon=True)
        self.node, self.model, self.events, self.status, self.served = node, model, [], None, None
        self.failure = None

    def run(self):
        body = {"model": self.model, "stream": True, "max_tokens": 2000, "ignore_eos": True,
                "temperature": 0, "messages": [{"role": "user", "content": "Count to a thousand."}]}
        try:
            with self.node.http.stream("POST", self.node.url + "/v1/chat/completions", json=body,
                                       timeout=120) as r:
                self.status, self.served = r.status_code, r.headers.get("x-flatmesh-node")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: "):]))
        except httpx.HTTPError as e:
            self.failure = e


def test_a_host_gone_mid_stream_ends_the_stream_with_a_retryable_error_within_a_bound(hosts):
    net, _, nodes = hosts
    a, b, p = nodes["a"], nodes["b"], nodes["p"]
    load_on(p, LLM)
    wait_until(lambda: a.holders(LLM) == {"p"}, 10, lambda: a.holders(LLM))
    stream = Stream(a, LLM)
    stream.start()
    wait_until(lambda: len(stream.events) >= 5, 60, lambda: (stream.status, stream.events[-3:]))
    assert stream.served == "p", stream.served

    net.down()          # nothing reaches p's host or leaves it: no FIN, no reset ...
    p.proc.kill()       # ... and its agent is gone with it
    gone = time.monotonic()
    stream.join(GONE_WITHIN + 10)
    assert not stream.is_alive(), f"the stream still runs {time.monotonic() - gone:.1f} s after p went"
    assert stream.failure is None, stream.failure
    last_token = max(t for t, data in stream.events if '"delta"' in data)
    errors = [(t, json.loads(data)) for t, data in stream.events if '"error"' in data]
    assert errors, stream.events[-3:]
    at, error = errors[0]
    assert error["error"]["code"] == "peer_gone", error
    print(f"the stream forwarded to p ended with peer_gone {at - gone:.2f} s after p's host went "
          f"({at - last_token:.2f} s after its last token)")
    assert at - last_token <= GONE_WITHIN, at - last_token
    assert stream.events[-1][1] == "[DONE]", stream.events[-3:]

    # New requests at a are served by a live node; p leaves the views within its lease.
    r = a.http.post(a.url + "/v1/chat/completions", timeout=120, json={
        "model": LLM, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.headers["x-flatmesh-node"] in {"a", "b"}, r.text
    wait_until(lambda: "p" not in a.sees() and "p" not in b.sees(), 3 * TTL,
               lambda: (a.sees(), b.sees()))


def test_a_flapping_link_crashes_nothing_and_leaks_no_lease_claim_or_copy(hosts):
    net, etcd, nodes = hosts
    a, b, p = nodes["a"], nodes["b"], nodes["p"]
    load_on(p, EMBED)
    wait_until(lambda: a.holders(EMBED) == {"p"}, 10, lambda: a.holders(EMBED))
    results, stop = [], threading.Event()

    def traffic(node):
        while not stop.is_set():
            try:
                r = node.embed(EMBED, "flap", timeout=60)
                results.append((r.status_code, r.headers.get("x-flatmesh-node"), r.text[:200]))
            except httpx.HTTPError as e:
                results.append((None, None, repr(e)))
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic, args=(n,), daemon=True) for n in (a, b)]
    for t in threads:
        t.start()
    flaps, start = 0, time.monotonic()
    while time.monotonic() - start < FLAP_SECONDS:
        net.down()
        time.sleep(2)
        net.up()
        flaps += 1
        time.sleep(2)
    stop.set()
    for t in threads:
        t.join(90)
    for name, n in nodes.items():
        assert n.proc.poll() is None, f"{name} exited:\n{n.logs()[-3000:]}"
    failed = [r for r in results if r[0] != 200]
    print(f"{flaps} flaps in {FLAP_SECONDS:.0f} s: {len(results)} requests at a and b, "
          f"{len(failed)} failed, served by {sorted({r[1] for r in results if r[1]})}")
    assert results and not failed, failed[:5]

    # State converges: every node sees every node, p is connected to etcd again, and etcd
    # holds one record and one lease per node and no load claim.
    back = wait_until(lambda: all(n.sees() == set(nodes) for n in nodes.values())
                      and p.view()["etcd_connected"], 3 * TTL + 5,
                      lambda: {k: sorted(n.sees()) for k, n in nodes.items()})
    print(f"every node saw every node {back:.2f} s after the last flap")

    def settled():
        records = etcd_range(etcd, f"{PREFIX}/nodes/")
        return (sorted(records) == [f"{PREFIX}/nodes/{n}" for n in sorted(nodes)]
                and etcd_leases(etcd) == {lease for lease in records.values()}
                and not etcd_range(etcd, f"{PREFIX}/loading/"))
    wait_until(settled, 3 * TTL, lambda: (etcd_range(etcd, f"{PREFIX}/nodes/"), etcd_leases(etcd),
                                          etcd_range(etcd, f"{PREFIX}/loading/")))
    # At most one copy of the model per node.
    for name, n in nodes.items():
        models = n.http.get(n.url + "/admin/models", headers=ADMIN, timeout=10).json()["models"]
        copies = [m for m in models if m["id"] == EMBED]
        assert len(copies) == 1 and len(copies[0]["copies"]) <= 1, (name, copies)


DELAY = 0.1   # each way: 200 ms added to every round trip between p and its peers
LOSS = 5      # percent of the packets between p and its peers, each way
RELAY_PORT = None


@pytest.fixture
def slow_hosts():
    """p advertises a relay on this host that delays what passes it (p's peers reach p only
    through it); the relay is started once p is up."""
    from netns import PEER_IP, Delay
    global RELAY_PORT
    RELAY_PORT = Delay.free_port("127.0.0.1")  # PEER_IP is not up yet; its ports are as free
    for net, etcd, nodes in three_hosts("/slow", TTL, p_extra=f'advertise = "http://{PEER_IP}:{RELAY_PORT}"\n'):
        p = nodes["p"]
        host, port = p.url.removeprefix("http://").rsplit(":", 1)
        relay = Delay((PEER_IP, RELAY_PORT), (host, int(port)), 0.0)
        try:
            yield net, relay, nodes
        finally:
            relay.close()


def test_delay_and_loss_between_nodes_slow_forwarded_requests_but_fail_none(slow_hosts):
    import statistics
    net, relay, nodes = slow_hosts
    a, p = nodes["a"], nodes["p"]
    load_on(p, EMBED)
    wait_until(lambda: a.holders(EMBED) == {"p"}, 10, lambda: a.holders(EMBED))

    def forwarded(n):
        took = []
        for i in range(n):
            start = time.monotonic()
            r = a.embed(EMBED, f"forwarded {i}")
            took.append(time.monotonic() - start)
            assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "p", r.text
        return took

    clean = forwarded(20)
    relay.seconds = DELAY
    net.lossy(LOSS)
    try:
        slow = forwarded(40)
        dropped = net.dropped()
    finally:
        net.lossless()
        relay.seconds = 0.0
    p50 = statistics.median(slow) - statistics.median(clean)
    p99 = sorted(slow)[int(0.99 * (len(slow) - 1))] - sorted(clean)[int(0.99 * (len(clean) - 1))]
    print(f"forwarded embeddings a -> p: clean p50 {statistics.median(clean) * 1e3:.0f} ms; with "
          f"{2 * DELAY * 1e3:.0f} ms added to each round trip and {LOSS}% loss each way: p50 "
          f"{statistics.median(slow) * 1e3:.0f} ms (+{p50 * 1e3:.0f}), p99 +{p99 * 1e3:.0f} ms, "
          f"max {max(slow) * 1e3:.0f} ms; {dropped} packets dropped")
    assert dropped > 0, "the link lost nothing: the test did not test loss"
    # Every one answered by p: one round trip more at the median, and a lost packet's
    # retransmission (200 ms at least, doubling) bounds the tail.
    assert 2 * DELAY * 0.9 <= p50 <= 2 * DELAY * 3, p50
    assert max(slow) < 5.0, max(slow)
