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
  cold burst    C tiny generated models, cold, each asked for once, all at once, at random
                nodes: loads per node (max against the mean), copies per model in the mesh,
                and the time until every request was answered
  node killed   the node holding a pinned model killed (SIGKILL) under requests for it: time
                until no request reaches it and until the model is ready on another node

    python3 tests/bench/scale.py [--nodes 50] [--models 500] [--idle-seconds 20] [--cold 200]

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


FIXTURES = Path(os.environ.get("TMPDIR", "/tmp")) / f"flatmesh-scale-fixtures-{os.getpid()}"


def config(etcd, name):
    return (f'[server]\nadmin_token = "bench-secret"\nmodel_roots = ["{FIXTURES}"]\n'
            f'[cache]\npreload = false\n'
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
    for way in ("received", "sent"):
        m = re.search(rf"^etcd_network_client_grpc_{way}_bytes_total (\S+)", text, re.M)
        if m:
            out[("bytes", way)] = float(m.group(1))
    return out


BURST_AUTH = {}   # the key cold_burst made, for the requests after it


COUNTED = {}      # etcd's counters over cold_burst's requests, when it was given etcd


def cold_burst(agents, count, threads=32, seed=7, etcd=None):
    """Register `count` tiny generated models on node 0, wait until every node lists them, then
    ask for each once, all at once, each at a random node. Returns (seconds until every answer,
    HTTP statuses, loads per node, copies per model)."""
    import random
    import shutil
    import subprocess
    shutil.rmtree(FIXTURES, ignore_errors=True)
    FIXTURES.mkdir(parents=True)
    subprocess.run([str(BIN.parent / "make-fixtures"), str(FIXTURES), str(count), "small"], check=True,
                   capture_output=True)
    names = [f"cold{i:03d}" for i in range(count)]
    with httpx.Client(timeout=60) as c:
        c.post(agents[0].url + "/admin/tenants", headers=ADMIN, json={"id": "burst", "tier": "basic"}).raise_for_status()
        auth = {"authorization": "Bearer " + c.post(agents[0].url + "/admin/tenants/burst/keys",
                                                       headers=ADMIN).json()["key"]}
        BURST_AUTH.update(auth)
        for i, name in enumerate(names):
            c.post(agents[0].url + "/admin/models", headers=ADMIN, json={
                "id": name, "path": str(FIXTURES / f"model-{i:03d}.gguf"), "kv_cache_tokens": 64,
                "keep_alive": -1}).raise_for_status()
    last = names[-1]
    finish(*spread(agents, lambda cl, a: last in {m["id"] for m in cl.get(
        a.url + "/admin/models", headers=ADMIN).json()["models"]}
        and cl.get(a.url + "/v1/models", headers=auth).status_code == 200, timeout=60)[1:], "cold registrations")
    rng = random.Random(seed)
    at = [rng.randrange(len(agents)) for _ in names]

    def ask(i):
        with httpx.Client(timeout=120) as cl:
            return cl.post(agents[at[i]].url + "/v1/completions", headers=auth,
                           json={"model": names[i], "prompt": "hi", "max_tokens": 1}).status_code
    before = etcd_counters(etcd) if etcd else {}
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(ask, range(count)))
    took = time.perf_counter() - t
    if etcd:
        after = etcd_counters(etcd)
        COUNTED.update({k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)})
    time.sleep(1.0)  # every record published
    with httpx.Client(timeout=60) as c:
        nodes = c.get(agents[0].url + "/admin/mesh", headers=ADMIN).json()["nodes"]
    loads = {n["node"]: sum(1 for m in n["models"] if m["id"] in set(names)) for n in nodes}
    copies = {name: 0 for name in names}
    for n in nodes:
        for m in n["models"]:
            if m["id"] in copies:
                copies[m["id"]] += m["ready"]
    shutil.rmtree(FIXTURES, ignore_errors=True)
    return took, statuses, loads, copies


def node_killed(agents):
    """A pinned model's holder killed with SIGKILL while four clients ask the other nodes for
    it: (seconds until every other node dropped it from its view — p50, max —, seconds until
    the model was ready on another node, the statuses the clients got)."""
    import random
    first = agents[0]
    with httpx.Client(timeout=60) as c:
        c.post(first.url + "/admin/models", headers=ADMIN,
               json={"id": "pinned", "path": EMBED, "pinned": True}).raise_for_status()

        def holders():
            nodes = c.get(first.url + "/admin/mesh", headers=ADMIN).json()["nodes"]
            return {n["node"] for n in nodes if any(m["id"] == "pinned" and m["ready"] for m in n["models"])}
        deadline = time.time() + 60
        while not holders():
            if time.time() > deadline:
                sys.exit("the pinned model was never loaded")
            time.sleep(0.1)
        (holder,) = holders()
    index = int(holder[1:])
    others = [a for i, a in enumerate(agents) if i != index]
    statuses, stop = [], threading.Event()

    def ask(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as cl:
            while not stop.is_set():
                a = rng.choice(others)
                try:
                    statuses.append(cl.post(a.url + "/v1/embeddings", headers=BURST_AUTH,
                                            json={"model": "pinned", "input": "x"}).status_code)
                except httpx.HTTPError as e:
                    statuses.append(repr(e))
    clients = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    time.sleep(1)
    agents[index].proc.kill()
    t0, threads, took = spread(others, lambda cl, a: holder not in sees(cl, a), timeout=60)
    replaced = None
    with httpx.Client(timeout=60) as c:
        while time.perf_counter() - t0 < 60:
            nodes = c.get(others[0].url + "/admin/mesh", headers=ADMIN).json()["nodes"]
            if any(n["node"] != holder and any(m["id"] == "pinned" and m["ready"] for m in n["models"])
                   for n in nodes):
                replaced = time.perf_counter() - t0
                break
            time.sleep(0.02)
    took = finish(threads, took, "a node killed")
    time.sleep(1)
    stop.set()
    for t in clients:
        t.join()
    return (statistics.median(took), max(took)), replaced, statuses


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
    ap.add_argument("--cold", type=int, default=200, help="cold models asked for at once")
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
        burst = cold_burst(agents, args.cold, etcd=etcd)
        busy_seconds, busy = burst[0], {k: v / burst[0] / args.nodes for k, v in COUNTED.items()}
        killed = node_killed(agents)
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
        print(f"  etcd traffic per node while the cold burst's requests ran ({busy_seconds:.1f} s; "
              f"the loads' claims and the records' changes):")
        for (kind, method), rate in sorted(busy.items()):
            print(f"    {kind:8s} {method:20s} {rate:8.3f}/s")
        took, statuses, loads, copies = burst
        mean = sum(loads.values()) / len(loads)
        print(f"  {args.cold} cold models asked for at once at random nodes: all answered in {took:.1f} s "
              f"({sum(s == 200 for s in statuses)} answered 200); loads per node: mean {mean:.1f}, "
              f"max {max(loads.values())}, min {min(loads.values())}; copies per model: "
              f"{sorted(set(copies.values()))} ({sum(v == 1 for v in copies.values())} models with exactly one)")
        (p50, most), replaced, statuses = killed
        failed = [s for s in statuses if s != 200]
        print(f"  a pinned model's holder killed (SIGKILL, lease TTL 5 s): out of every view after p50 "
              f"{p50:.2f} s, max {most:.2f} s; the model ready on another node after "
              + (f"{replaced:.2f} s" if replaced is not None else "never (60 s)")
              + f"; {len(statuses)} requests at the other nodes meanwhile, {len(failed)} failed"
              + (f" ({failed[:3]})" if failed else ""))
    finally:
        for a in agents:
            a.stop()
        etcd.close()


if __name__ == "__main__":
    main()
