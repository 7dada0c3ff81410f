#!/usr/bin/env python3
"""Model-cache benchmark against the real agent (release build).

1. Zipf (s=1.0) traffic over 120 generated GGUF models with memory for 12 of them, once
   with each residency policy (`lru`, `demand`): hit ratio beside the Belady-optimal hit ratio
   of the same trace (and an LRU simulation), p50/p99 latency, number of loads.
2. Page-in bandwidth of the demo LLM, cold (file dropped from the page cache), with the file
   in the page cache, and from the warm tier (prepared weights in host RAM), beside a plain
   read of the same bytes and a memory copy of the image.

    python3 tests/bench/cache.py [--requests 2000] [--models 120] [--slots 12] [--debug]
"""
import argparse
import bisect
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import conftest  # noqa: E402
from conftest import LLM, MODELS, ROOT, Agent  # noqa: E402


def zipf_trace(n_models, n_requests, s, seed):
    weights = [1 / (k + 1) ** s for k in range(n_models)]
    total = sum(weights)
    cdf, acc = [], 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    rng = random.Random(seed)
    order = list(range(n_models))
    rng.shuffle(order)  # popularity unrelated to the model's name
    return [order[min(bisect.bisect_left(cdf, rng.random()), n_models - 1)] for _ in range(n_requests)]


def belady_hits(trace, slots):
    next_use = [0] * len(trace)
    last = {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = last.get(trace[i], float("inf"))
        last[trace[i]] = i
    cache, hits = {}, 0  # model -> next use
    for i, m in enumerate(trace):
        if m in cache:
            hits += 1
        elif len(cache) >= slots:
            victim = max(cache, key=cache.get)
            del cache[victim]
        cache[m] = next_use[i]
    return hits


def lru_hits(trace, slots):
    cache, hits = OrderedDict(), 0
    for m in trace:
        if m in cache:
            hits += 1
            cache.move_to_end(m)
        else:
            if len(cache) >= slots:
                cache.popitem(last=False)
            cache[m] = True
    return hits


def metric(url, series):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(series):
            return float(line.split()[-1])
    return 0.0


def sum_metric(url, prefix):
    return sum(float(l.split()[-1]) for l in httpx.get(url + "/metrics").text.splitlines() if l.startswith(prefix))


def zipf_bench(args, bin_dir):
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([str(bin_dir / "make-fixtures"), d, str(args.models), "small"], check=True,
                       stdout=subprocess.DEVNULL)
        probe = Agent(config=f'[[models]]\nid = "probe"\npath = "{d}/model-000.gguf"\nmax_concurrency = 1\n'
                      '[cache]\npreload = false\n')
        size = httpx.get(probe.url + "/admin/models/probe").json()["bytes"]
        probe.stop()
        capacity = size * args.slots + size // 2
        trace = zipf_trace(args.models, args.requests, 1.0, seed=42)
        results = {}
        for residency in ("lru", "demand"):
            cfg = (f"[cache]\npreload = false\nkeep_alive = -1\nmin_residency = 0\n"
                   f"residency = \"{residency}\"\n"
                   f"[[cache.devices]]\nname = \"host0\"\ncapacity = {capacity}\n")
            for i in range(args.models):
                cfg += f'[[models]]\nid = "m{i}"\npath = "{d}/model-{i:03d}.gguf"\nmax_concurrency = 1\n'
            agent = Agent(config=cfg, extra_args=["--log-level", "warn"])
            try:
                lat = []
                with httpx.Client(timeout=60) as c:
                    for m in trace:
                        t = time.perf_counter()
                        r = c.post(agent.url + "/v1/completions",
                                   json={"model": f"m{m}", "prompt": "hi", "max_tokens": 1})
                        r.raise_for_status()
                        lat.append(time.perf_counter() - t)
                loads = sum_metric(agent.url, "flatmesh_model_load_seconds_count")
            finally:
                agent.stop()
            lat.sort()
            results[residency] = (loads, lat)
    n = len(trace)
    print(f"Zipf s=1.0: {n} requests over {args.models} models, memory for {args.slots} "
          f"({size} bytes per copy), one client")
    for residency, (loads, lat) in results.items():
        print(f"  hit ratio, cache.residency = {residency:<6} {1 - loads / n:6.3f}   ({int(loads)} loads)   "
              f"latency p50 {lat[n // 2] * 1000:7.2f} ms   p99 {lat[int(n * 0.99)] * 1000:7.2f} ms")
    print(f"  LRU (simulated)                     {lru_hits(trace, args.slots) / n:6.3f}")
    print(f"  Belady optimal                      {belady_hits(trace, args.slots) / n:6.3f}")


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path):
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 22):
            n += len(chunk)
    return n / (time.perf_counter() - t)


def timed_load(agent):
    t = time.perf_counter()
    httpx.post(agent.url + f"/admin/models/{LLM}/load", timeout=120).raise_for_status()
    return time.perf_counter() - t


def page_in_bench():
    path = MODELS / "smollm2-135m-instruct" / "model.gguf"
    size = path.stat().st_size
    print(f"Page-in of {LLM} ({size / 1e6:.1f} MB file; MB/s below are file bytes per second)")
    agent = Agent(config="[cache]\npreload = false\nwarm_capacity = 0\n", extra_args=["--log-level", "warn"])
    try:
        for label, cold in (("cold (disk)    ", True), ("page cache     ", False)):
            httpx.post(agent.url + f"/admin/models/{LLM}/unload")
            if cold:
                drop_from_page_cache(path)
            load = timed_load(agent)
            if cold:
                drop_from_page_cache(path)
            read = plain_read(path)
            print(f"  {label}: load {size / load / 1e6:8.1f} MB/s ({load:.2f} s)   plain read {read / 1e6:8.1f} MB/s")
    finally:
        agent.stop()
    agent = Agent(config="[cache]\npreload = false\nwarm_capacity = \"2GiB\"\n", extra_args=["--log-level", "warn"])
    try:
        timed_load(agent)  # from the file: leaves the prepared image in the warm tier
        httpx.post(agent.url + f"/admin/models/{LLM}/unload")
        load = timed_load(agent)
        image = sum_metric(agent.url, "flatmesh_warm_bytes")
        warm = sum_metric(agent.url, 'flatmesh_page_ins_total{result="ok",source="warm"}')
        assert warm == 1, "the second load did not come from the warm tier"
        buf = bytearray(int(image))
        t = time.perf_counter()
        bytes(buf)
        copy = image / (time.perf_counter() - t)
        print(f"  warm tier      : load {size / load / 1e6:8.1f} MB/s ({load:.2f} s)   "
              f"memory copy of the {image / 1e6:.0f} MB image {copy / 1e6:8.1f} MB/s")
    finally:
        agent.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--models", type=int, default=120)
    ap.add_argument("--slots", type=int, default=12)
    ap.add_argument("--debug", action="store_true", help="use the debug build (hit ratios only)")
    args = ap.parse_args()
    profile = [] if args.debug else ["--release"]
    subprocess.run(["cargo", "build", *profile, "-p", "flatmesh", "-p", "flatmesh-tests", "--bins"],
                   cwd=ROOT, check=True)
    bin_dir = ROOT / "target" / ("debug" if args.debug else "release")
    conftest.BIN = bin_dir / "flatmesh"
    zipf_bench(args, bin_dir)
    page_in_bench()


if __name__ == "__main__":
    main()
