#!/usr/bin/env python3
"""Serving benchmark over HTTP against the real agent (release build) and the demo models.

Prints, for the LLM: prefill tokens/s, decode tokens/s and time to first token for one
stream and for 8 concurrent streams; for the embedding model: embeddings/s.

    python3 tests/bench/serve.py            # builds target/release/flatmesh if missing
    python3 tests/bench/serve.py --url http://127.0.0.1:8000   # an agent already running
"""
import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import EMBED, LLM, ROOT, Agent  # noqa: E402
import conftest  # noqa: E402

PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the keeper's daily routine and the people of the "
          "nearby village in great detail. ") * 4


def stream_once(url, max_tokens, prompt=PROMPT):
    """One streamed completion; returns (ttft, decode_seconds, prompt_tokens, completion_tokens)."""
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
            "model": LLM, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            elif msg["choices"] and msg["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
    return first - t0, last - first, usage["prompt_tokens"], usage["completion_tokens"]


def llm(url, streams, max_tokens):
    results = [None] * streams

    def run(i):
        results[i] = stream_once(url, max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    prompt_tokens = results[0][2]
    decoded = sum(r[3] - 1 for r in results)
    per_stream = statistics.mean((r[3] - 1) / r[1] for r in results)
    print(f"  {streams} stream(s), prompt {prompt_tokens} tokens, {max_tokens} new tokens each")
    print(f"    time to first token   p50 {statistics.median(ttfts) * 1000:8.1f} ms   max {max(ttfts) * 1000:8.1f} ms")
    print(f"    prefill               {prompt_tokens / min(ttfts):8.1f} tok/s (first stream, incl. HTTP)")
    print(f"    decode per stream     {per_stream:8.1f} tok/s")
    print(f"    decode all streams    {decoded / wall:8.1f} tok/s (wall {wall:.1f} s)")


def embeddings(url, batch, requests, concurrency):
    texts = [f"Sentence number {i} about municipal services and shared computing." for i in range(batch)]
    done = [0]

    def run(n):
        with httpx.Client(timeout=120) as c:
            for _ in range(n):
                r = c.post(url + "/v1/embeddings", json={"model": EMBED, "input": texts})
                r.raise_for_status()
                done[0] += batch

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(requests // concurrency,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(f"  batch {batch:3d}, concurrency {concurrency}: {done[0] / wall:8.1f} embeddings/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="an agent already running (else one is started)")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    agent = None
    if args.url:
        url = args.url
    else:
        subprocess.run(["cargo", "build", "--release", "-p", "flatmesh"], cwd=ROOT, check=True)
        conftest.BIN = ROOT / "target" / "release" / "flatmesh"
        agent = Agent(extra_args=["--log-level", "warn"])
        url = agent.url
    try:
        stream_once(url, 4)  # warm-up
        print(f"LLM {LLM} over HTTP (/v1/completions, streamed, greedy)")
        llm(url, 1, args.max_tokens)
        llm(url, 8, args.max_tokens)
        print(f"Embeddings {EMBED} over HTTP (/v1/embeddings)")
        embeddings(url, 1, 200, 1)
        embeddings(url, 1, 200, 4)
        embeddings(url, 32, 20, 1)
    finally:
        if agent:
            agent.stop()


if __name__ == "__main__":
    main()
