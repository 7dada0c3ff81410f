#!/usr/bin/env python3
"""The added latency of one forwarding hop in the mesh, on loopback.

A real etcd and two agents (`a`, `b`); the models are warmed on `b` only, so a request to `a`
is forwarded to `b`. Interleaved, the same request goes to `b` directly and through `a`:

  embedding   a one-sentence `/v1/embeddings` request: whole response time, p50 and p99
  TTFT        a streamed chat (`max_tokens` 1 token after the first): time to the first
              content chunk, p50 and p99

Then `b` is killed (SIGKILL) while `a` keeps sending embedding requests, and the time from the
kill to the first request served by a new copy (on `a`) is printed; no request may fail.

    python3 tests/bench/mesh.py [--requests 200] [--bin target/release/flatmesh]

Uses `target/release/flatmesh` when it exists (build it: `cargo build --release -p flatmesh`),
else the debug build.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "target" / "release" / "flatmesh"
if "FLATMESH_BIN" not in os.environ and RELEASE.exists():
    os.environ["FLATMESH_BIN"] = str(RELEASE)
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import BIN, EMBED, LLM, Agent, Etcd  # noqa: E402


ADMIN = {"authorization": "Bearer bench-secret"}   # a mesh needs an admin token


def config(etcd, name):
    return (f'[server]\nadmin_token = "bench-secret"\n[cache]\npreload = false\n'
            f'[mesh]\netcd = ["{etcd.endpoint}"]\nnode = "{name}"\nlease_ttl = "5s"\ntoken = "bench-mesh-secret"\n')


def embed(client, url):
    t = time.perf_counter()
    r = client.post(url + "/v1/embeddings", json={"model": EMBED, "input": "a short sentence"})
    r.raise_for_status()
    return time.perf_counter() - t, r.headers.get("x-flatmesh-node")


def ttft(client, url):
    body = {"model": LLM, "stream": True, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    t = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - t
    return first, r.headers.get("x-flatmesh-node")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    etcd = Etcd()
    a = b = None
    try:
        a, b = Agent(config=config(etcd, "a")), Agent(config=config(etcd, "b"))
        with httpx.Client(timeout=120) as c:
            # Load both models on b (an operator load acts on that node alone), then wait
            # until a sees them there.
            for m in (EMBED, LLM):
                c.post(b.url + f"/admin/models/{m}/load", headers=ADMIN).raise_for_status()
            deadline = time.time() + 15
            while time.time() < deadline:
                nodes = {n["node"]: n for n in c.get(a.url + "/admin/mesh", headers=ADMIN).json()["nodes"]}
                ready = {m["id"] for m in nodes.get("b", {}).get("models", []) if m["ready"]}
                if {EMBED, LLM} <= ready:
                    break
                time.sleep(0.1)
            else:
                sys.exit("a never saw the models ready on b")
            rows = {}
            for name, fn in (("embedding", embed), ("TTFT", ttft)):
                direct, hop = [], []
                for _ in range(args.requests):
                    d, node = fn(c, b.url)
                    h, via = fn(c, a.url)
                    assert node == "b" and via == "b", (node, via)
                    direct.append(d)
                    hop.append(h)
                rows[name] = (direct, hop)
            # Kill b, the one holder; a keeps asking.
            failed, t = 0, time.perf_counter()
            b.proc.kill()
            b.proc.wait()
            while True:
                try:
                    took, node = embed(c, a.url)
                except httpx.HTTPError:
                    failed += 1
                    continue
                if node == "a":
                    recovered = time.perf_counter() - t
                    break
        print(f"one forwarding hop on loopback, {args.requests} interleaved requests each, {BIN.name} "
              f"({'release' if 'release' in str(BIN) else 'debug'}), {os.cpu_count()} cores")
        print(f"  {'':10s} {'direct p50':>11s} {'via a p50':>10s} {'added p50':>10s} "
              f"{'direct p99':>11s} {'via a p99':>10s} {'added p99':>10s}")
        for name, (direct, hop) in rows.items():
            d50, h50, d99, h99 = (statistics.median(direct), statistics.median(hop),
                                  pct(direct, 99), pct(hop, 99))
            print(f"  {name:10s} {d50 * 1e3:9.2f}ms {h50 * 1e3:8.2f}ms {(h50 - d50) * 1e3:8.2f}ms "
                  f"{d99 * 1e3:9.2f}ms {h99 * 1e3:8.2f}ms {(h99 - d99) * 1e3:8.2f}ms")
        print(f"  kill -9 of the holder -> first request served by a new copy: {recovered * 1e3:.0f} ms "
              f"({failed} failed requests)")
    finally:
        for agent in (a, b):
            if agent:
                agent.stop()
        etcd.close()


if __name__ == "__main__":
    main()
