#!/usr/bin/env python3
"""KServe v2 benchmark: a small embedding infer (one short sentence) with tritonclient over
HTTP and over gRPC, at concurrency 1 and 16. Prints requests/s and p50/p99 latency.

    python3 tests/bench/v2.py [--seconds 10]
"""
import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import conftest  # noqa: E402
from conftest import EMBED, ROOT, Agent  # noqa: E402

TEXT = np.array([b"How do I renew my parking permit?"], dtype=np.object_)


def http_call(url):
    c = httpclient.InferenceServerClient(url=url)
    inp = httpclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(TEXT)
    return lambda: c.infer(EMBED, [inp])


def grpc_call(url):
    c = grpcclient.InferenceServerClient(url=url)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(TEXT)
    return lambda: c.infer(EMBED, [inp])


def run(make, url, concurrency, seconds):
    lat, lock = [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        call = make(url)
        call()  # warm-up and connection
        mine = []
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    n = len(lat)
    return n / wall, lat[n // 2] * 1000, lat[min(n - 1, int(n * 0.99))] * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-p", "flatmesh"], cwd=ROOT, check=True)
    conftest.BIN = ROOT / "target" / "release" / "flatmesh"
    agent = Agent(extra_args=["--log-level", "warn"])
    try:
        print(f"v2 embedding infer ({EMBED}, one sentence), tritonclient, {args.seconds:.0f} s each")
        for proto, make, url in (("HTTP", http_call, agent.url.removeprefix("http://")), ("gRPC", grpc_call, agent.grpc)):
            for conc in (1, 16):
                rps, p50, p99 = run(make, url, conc, args.seconds)
                print(f"  {proto:4s} concurrency {conc:2d}: {rps:7.1f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
