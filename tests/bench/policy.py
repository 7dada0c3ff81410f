#!/usr/bin/env python3
"""Policy plugins end to end: request latency of one agent with all three example plugins
(cost-router, semantic-cache, solidarity-pricing) against one with none, requests interleaved
between the two so both see the same machine. Prints p50/mean latency and the ratio.

    python3 tests/bench/policy.py [--requests 200]

Chat requests use a new prompt each time (a cache miss: every slot runs, the model too) with
max_tokens 1; embeddings pass the pricing slot only. Cache hits are timed beside them.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import conftest  # noqa: E402
from conftest import EMBED, LLM, ROOT, Agent  # noqa: E402

PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"
ADMIN = {"authorization": "Bearer admin-secret"}
BASE = f"""
[server]
admin_token = "admin-secret"

[tenancy]
[[tenancy.tiers]]
name = "gold"
price = 1000
weight = 3

[[tenancy.tenants]]
id = "city-a"
tier = "gold"

[[models]]
id = "small"
path = "{LLM}/model.gguf"
pinned = true

[[models]]
id = "{EMBED}"
path = "{EMBED}"
pinned = true
"""
PLUGGED = BASE + f"""
[policy.router]
plugin = "{PLUGINS / 'cost_router.wasm'}"
config = {{ alias = "auto", models = ["small"] }}

[policy.cache]
plugin = "{PLUGINS / 'semantic_cache.wasm'}"
config = {{ embedding_model = "{EMBED}", threshold = 0.95 }}

[policy.pricing]
plugin = "{PLUGINS / 'solidarity_pricing.wasm'}"
config = {{ budgets = {{ gold = 1000000000 }}, pool_cost = 1500.0 }}
"""


def start(config):
    a = Agent(config=config, extra_args=["--log-level", "warn"])
    a.config = config
    key = httpx.post(f"{a.url}/admin/tenants/city-a/keys", headers=ADMIN).json()["key"]
    a.http = httpx.Client(base_url=a.url, headers={"authorization": f"Bearer {key}"}, timeout=120)
    return a


def timed(call):
    t = time.perf_counter()
    r = call()
    assert r.status_code == 200, r.text
    return (time.perf_counter() - t) * 1000, r


def chat(agent, model, text):
    return lambda: agent.http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0})


def embed(agent, text):
    return lambda: agent.http.post("/v1/embeddings", json={"model": EMBED, "input": text})


WORDS = ("river permit school budget library tram winter council harbour bridge museum tax clinic "
         "garden archive election bicycle parking recycling theatre forest pension housing water "
         "festival railway heating snow market license statue canal census airport hospital").split()


def unrelated(i):
    """A prompt unlike the others (seeded): the cache, even by similarity, must miss."""
    import random
    r = random.Random(i)
    return "Tell me about " + " and ".join(r.sample(WORDS, 6)) + f" (case {i})."


def summary(ms):
    return statistics.median(ms), statistics.fmean(ms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    subprocess.run([str(ROOT / "plugins" / "build")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "-p", "flatmesh"], cwd=ROOT, check=True)
    conftest.BIN = ROOT / "target" / "release" / "flatmesh"
    none, plugged = start(BASE), start(PLUGGED)
    try:
        rows = {}
        for name, make in (
            ("chat, cache miss (max_tokens 1)", lambda a, m, i: chat(a, m, unrelated(i))),
            ("embeddings (pricing slot only)", lambda a, m, i: embed(a, f"Permit request number {i}")),
        ):
            a_ms, b_ms = [], []
            for i in range(-5, args.requests):  # 5 warm-up rounds
                da, _ = timed(make(none, "small", i))
                db, _ = timed(make(plugged, "auto", i))
                if i >= 0:
                    a_ms.append(da)
                    b_ms.append(db)
            rows[name] = (summary(a_ms), summary(b_ms))
        hit = [timed(chat(plugged, "auto", "Which bus goes to the town hall?"))[0] for _ in range(args.requests)][1:]

        print(f"policy plugins end to end ({args.requests} requests each, interleaved, concurrency 1)")
        for name, ((a50, amean), (b50, bmean)) in rows.items():
            print(f"  {name:34s} none p50 {a50:7.2f} ms mean {amean:7.2f} ms | all three p50 {b50:7.2f} ms "
                  f"mean {bmean:7.2f} ms | ratio p50 {b50 / a50:5.3f} mean {bmean / amean:5.3f}")
        h50, hmean = summary(hit)
        print(f"  {'chat, cache hit':34s} all three p50 {h50:7.2f} ms mean {hmean:7.2f} ms")
        hits = [line for line in httpx.get(plugged.url + "/metrics").text.splitlines()
                if line.startswith("flatmesh_response_cache_total")]
        print("  " + "   ".join(hits))
        m = httpx.get(plugged.url + "/metrics").text
        for line in m.splitlines():
            if line.startswith("flatmesh_policy_call_seconds_sum") or line.startswith("flatmesh_policy_call_seconds_count"):
                print("  " + line)
    finally:
        none.stop()
        plugged.stop()


if __name__ == "__main__":
    main()
