#!/usr/bin/env python3
"""The mesh at many nodes: how fast a change reaches every node, what an idle node costs etcd,
and how big the record each node publishes is.

N agents (processes on loopback, default 50) join one etcd, then:

  join          time from the last agent's start until every node lists all N
  registration  a model registered on node 0: time until each node lists it (p50, p99, max)
  vmodel        a vmodel pointed at another target on node 0: time until each node shows it
  revocation    a tenant key revoked on node 0: time until each node refuses it (401)
  idle etcd     requests per second the whole idle mesh sends etcd, by method, per node
  record        the size of each node's published record (bytes), with M models registered

    python3 tests/bench/scale.py [--nodes 50] [--models 500] [--idle-seconds 20]

Each agent is started with `[cache] preload = false` and no model loaded: this measures the
control plane, not inference. Memory: about 60 MB per debug agent. The suite runs a small
version (tests/e2e/test_mesh_scale.py).
"""
import argparse
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release" / "flatmesh"
if "FLATMESH_BIN" not in os.environ and RELEASE.exists():
    os.environ["FLATMESH_BIN"] = str(RELEASE)
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import BIN, EMBED, LLM, Agent, Etcd  # noqa: E402

ADMIN = {"authorization": "Bearer bench-secret"}
TIERS = '[tenancy]\n[[tenancy.tiers]]\nname = "basic"\n'


def config(etcd, name):
    return (f'[server]\nadmin_token = "bench-secret"\n[cache]\npreload = false\n'
            f'[mesh]\netcd = ["{etcd.endpoint}"]\nnode = "{name}"\nlease_ttl = "5s"\n'
            f'token = "bench-mesh-secret"\n' + TIERS)


def start(etcd, n):
    """N agents, started 8 at a time."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: Agent(config=config(etcd, f"n{i:02d}")), range(n)))


def sees(client, agent):
    r = client.get(agent.url + "/admin/mesh", headers=ADMIN, timeout=10)
    return {n["node"] for n in r.json()["nodes"]}


def spread(agents, check, timeout=30.0):
    """Seconds until `check(client, agent)` holds on each agent, polled every 5 ms per agent."""
    t0 = time.perf_counter()
    took = [None] * len(agents)

    def watch(i):
        with httpx.Client(timeout=10) as c:
            while time.perf_counter() - t0 < timeout:
                if check(c, agents[i]):
                    took[i] = time.perf_counter() - t0
                    return
                time.sleep(0.005)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    return t0, threads, took


def finish(threads, took, what):
    for t in threads:
        t.join()
    missing = [i for i, x in enumerate(took) if x is None]
    if missing:
        sys.exit(f"{what}: nodes {missing} never saw the change")
    return took


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


ACKED = {}


def propagation(agents, change, check, what):
    """Start watching every node, make the change on node 0, and return each node's delay
    from the change's acknowledgement (0 for a node that saw it first); the acknowledgement's
    own latency is kept in ACKED."""
    t0, threads, took = spread(agents, check)
    t_change = time.perf_counter()
    change()
    t_acked = time.perf_counter()
    ACKED[what] = t_acked - t_change
    took = finish(threads, took, what)
    return [max(0.0, t - (t_acked - t0)) for t in took]


def etcd_counters(etcd):
    """etcd's gRPC calls handled and messages received, by method."""
    text = httpx.get(etcd.endpoint + "/metrics", timeout=10).text
    out = {}
    for name in ("grpc_server_handled_total", "grpc_server_msg_received_total"):
        for m in re.finditer(name + r'\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)', text):
            key = (name.split("_")[2], m.group(1))
            out[key] = out.get(key, 0) + float(m.group(2))
    return out


def everything(etcd):
    """Every key in etcd and its value's size in bytes."""
    import base64
    r = httpx.post(etcd.endpoint + "/v3/kv/range", timeout=30,
                   json={"key": base64.b64encode(b"\0").decode(), "range_end": base64.b64encode(b"\0").decode()})
    r.raise_for_status()
    return {base64.b64decode(kv["key"]).decode(): len(base64.b64decode(kv.get("value", "")))
            for kv in r.json().get("kvs", [])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--models", type=int, default=500, help="models registered before the record is measured")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    args = ap.parse_args()
    etcd = Etcd()
    agents = []
    try:
        t = time.perf_counter()
        agents = start(etcd, args.nodes)
        started = time.perf_counter() - t
        names = {f"n{i:02d}" for i in range(args.nodes)}
        t0, threads, took = spread(agents, lambda c, a: sees(c, a) == names, timeout=60)
        joined = max(finish(threads, took, "join"))
        zero = agents[0]
        c = httpx.Client(timeout=60)
        rows = {}

        def listed(model):
            return lambda cl, a: model in {m["id"] for m in cl.get(a.url + "/admin/models", headers=ADMIN).json()["models"]}

        rows["registration"] = propagation(
            agents,
            lambda: c.post(zero.url + "/admin/models", headers=ADMIN,
                           json={"id": "fresh", "path": "smollm2-135m-instruct/model.gguf"}).raise_for_status(),
            listed("fresh"), "registration")

        def target_of(name, target):
            def check(cl, a):
                vms = cl.get(a.url + "/admin/models", headers=ADMIN).json()["vmodels"]
                return any(v.get("name") == name and v.get("target") == target for v in vms)
            return check

        c.put(zero.url + "/admin/vmodels/chat", headers=ADMIN, json={"target": LLM}).raise_for_status()
        finish(*spread(agents, target_of("chat", LLM))[1:], "vmodel create")
        rows["vmodel switch"] = propagation(
            agents,
            lambda: c.put(zero.url + "/admin/vmodels/chat", headers=ADMIN, json={"target": "fresh"}).raise_for_status(),
            target_of("chat", "fresh"), "vmodel switch")

        c.post(zero.url + "/admin/tenants", headers=ADMIN, json={"id": "city", "tier": "basic"}).raise_for_status()
        key = c.post(zero.url + "/admin/tenants/city/keys", headers=ADMIN).json()["key"]

        def status(cl, a):
            return cl.get(a.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

        finish(*spread(agents, lambda cl, a: status(cl, a) == 200)[1:], "key")
        rows["revocation"] = propagation(
            agents,
            lambda: c.post(zero.url + "/admin/keys/revoke", headers=ADMIN, json={"key": key}).raise_for_status(),
            lambda cl, a: status(cl, a) == 401, "revocation")

        time.sleep(2)
        before = etcd_counters(etcd)
        time.sleep(args.idle_seconds)
        after = etcd_counters(etcd)
        idle = {k: (after.get(k, 0) - before.get(k, 0)) / args.idle_seconds / args.nodes
                for k in after if after.get(k, 0) != before.get(k, 0)}

        # One registration after another from one client; a refusal (etcd slower than the
        # admin API waits) is counted and made again.
        refused, took = [], []
        for i in range(args.models):
            while True:
                t = time.perf_counter()
                r = c.post(zero.url + "/admin/models", headers=ADMIN,
                           json={"id": f"m{i:04d}", "path": "all-minilm-l6-v2"})
                took.append(time.perf_counter() - t)
                if r.status_code == 201 or (r.status_code == 409 and refused and refused[-1][0] == i):
                    break   # 409 after a 503: the earlier try stood (the 503 says so)
                refused.append((i, r.status_code, r.json()["error"]["message"]))
                if r.status_code != 503 or len(refused) > 20:
                    sys.exit(f"registration {i} refused: {r.status_code} {r.text}")
                time.sleep(1)
        time.sleep(2)
        records = everything(etcd)
        node_records = {k: v for k, v in records.items() if "/nodes/" in k}

        print(f"{args.nodes} agents on loopback, one etcd, {BIN.name} "
              f"({'release' if 'release' in str(BIN) else 'debug'}), {os.cpu_count()} cores")
        print(f"  started in {started:.1f} s; every node listed all {args.nodes} {joined:.2f} s after")
        print(f"  {'after the acknowledgement':26s} {'p50':>8s} {'p99':>8s} {'max':>8s} {'(ack took)':>11s}")
        for name, xs in rows.items():
            print(f"  {name:26s} {statistics.median(xs) * 1e3:6.0f}ms {pct(xs, 99) * 1e3:6.0f}ms "
                  f"{max(xs) * 1e3:6.0f}ms {ACKED[name] * 1e3:9.0f}ms")
        print(f"  load average: {os.getloadavg()[0]:.1f}")
        print(f"  idle etcd traffic per node over {args.idle_seconds:.0f} s (calls or messages per second):")
        for (kind, method), rate in sorted(idle.items()):
            print(f"    {kind:8s} {method:20s} {rate:8.3f}/s")
        print(f"  {args.models} registrations on node 0, one at a time: p50 {statistics.median(took) * 1e3:.0f} ms, "
              f"p99 {pct(took, 99) * 1e3:.0f} ms, {len(refused)} refused (503) and made again"
              + (f": {refused[0][2]}" if refused else ""))
        if node_records:
            sizes = sorted(node_records.values())
            print(f"  node records with {args.models} models registered: {len(sizes)} keys, "
                  f"{min(sizes)}-{max(sizes)} bytes each")
        total = sum(records.values())
        print(f"  etcd holds {len(records)} keys, {total} bytes of values")
    finally:
        for a in agents:
            a.stop()
        etcd.close()


if __name__ == "__main__":
    main()
