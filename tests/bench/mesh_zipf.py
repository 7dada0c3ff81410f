#!/usr/bin/env python3
"""The mesh's model cache under Zipf traffic, beside one node with the same total memory.

Zipf (s=1.0) traffic over 120 generated GGUF models; three agents in a mesh (a real etcd on
loopback), each with memory for 4 copies, every request sent to a node picked at random; then
one agent alone with memory for 12 copies, the same trace. Printed: hit ratio (requests that
did not wait for a load), loads, forwarded requests, p50/p99 latency, beside the LRU
simulation and the Belady optimum for 12 copies.

    python3 tests/bench/mesh_zipf.py [--requests 1500] [--models 120] [--per-node 4]

Uses `target/release/flatmesh` (and `make-fixtures`) when built, else the debug builds.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release" / "flatmesh"
if "FLATMESH_BIN" not in os.environ and RELEASE.exists():
    os.environ["FLATMESH_BIN"] = str(RELEASE)
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
from cache import belady_hits, lru_hits, sum_metric, zipf_trace  # noqa: E402
from conftest import BIN, Agent, Etcd  # noqa: E402


def models_config(d, n):
    return "".join(f'[[models]]\nid = "m{i}"\npath = "{d}/model-{i:03d}.gguf"\nmax_concurrency = 1\n'
                   for i in range(n))


def run(agents, trace, seed):
    rng = random.Random(seed)
    lat = []
    with httpx.Client(timeout=60) as c:
        for m in trace:
            a = agents[rng.randrange(len(agents))]
            t = time.perf_counter()
            r = c.post(a.url + "/v1/completions", json={"model": f"m{m}", "prompt": "hi", "max_tokens": 1})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
    loads = sum(sum_metric(a.url, "flatmesh_model_load_seconds_count") for a in agents)
    forwarded = sum(sum_metric(a.url, 'flatmesh_mesh_forwarded_total') for a in agents)
    lat.sort()
    return loads, forwarded, lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--models", type=int, default=120)
    ap.add_argument("--per-node", type=int, default=4)
    args = ap.parse_args()
    nodes = 3
    with tempfile.TemporaryDirectory() as d:
        maker = BIN.parent / "make-fixtures"
        subprocess.run([str(maker), d, str(args.models), "small"], check=True, stdout=subprocess.DEVNULL)
        probe = Agent(config=f'[[models]]\nid = "probe"\npath = "{d}/model-000.gguf"\n[cache]\npreload = false\n')
        size = httpx.get(probe.url + "/admin/models/probe").json()["bytes"]
        probe.stop()
        trace = zipf_trace(args.models, args.requests, 1.0, seed=42)
        base = "[cache]\npreload = false\nkeep_alive = -1\nmin_residency = 0\n"
        results = {}

        etcd = Etcd()
        agents = []
        try:
            cap = size * args.per_node + size // 2
            for i in range(nodes):
                agents.append(Agent(config=base + f'[[cache.devices]]\nname = "host0"\ncapacity = {cap}\n'
                                    + f'[mesh]\netcd = ["{etcd.endpoint}"]\nnode = "n{i}"\nlease_ttl = "5s"\ntoken = "bench-mesh-secret"\n'
                                    + '[server]\nadmin_token = "bench-secret"\n'
                                    + models_config(d, args.models), extra_args=["--log-level", "warn"]))
            deadline = time.time() + 30
            while time.time() < deadline and any(
                    len(httpx.get(a.url + "/admin/mesh", headers={"authorization": "Bearer bench-secret"}).json()["nodes"]) < nodes for a in agents):
                time.sleep(0.2)
            results[f"mesh, {nodes} nodes x {args.per_node} copies"] = run(agents, trace, seed=7)
        finally:
            for a in agents:
                a.stop()
            etcd.close()

        total = args.per_node * nodes
        alone = Agent(config=base + f'[[cache.devices]]\nname = "host0"\ncapacity = {size * total + size // 2}\n'
                      + models_config(d, args.models), extra_args=["--log-level", "warn"])
        try:
            results[f"one node x {total} copies"] = run([alone], trace, seed=7)
        finally:
            alone.stop()

    n = len(trace)
    print(f"Zipf s=1.0: {n} requests over {args.models} models ({size} bytes a copy), one client, "
          f"{BIN.name} ({'release' if 'release' in str(BIN) else 'debug'})")
    for name, (loads, forwarded, lat) in results.items():
        print(f"  {name:28s} hit ratio {1 - loads / n:6.3f}  loads {int(loads):5d}  forwarded {int(forwarded):5d}  "
              f"p50 {lat[n // 2] * 1e3:6.2f} ms  p99 {lat[int(n * 0.99)] * 1e3:7.2f} ms")
    print(f"  {'LRU, 12 copies (simulated)':28s} hit ratio {lru_hits(trace, total) / n:6.3f}")
    print(f"  {'Belady optimum, 12 copies':28s} hit ratio {belady_hits(trace, total) / n:6.3f}")


if __name__ == "__main__":
    main()
