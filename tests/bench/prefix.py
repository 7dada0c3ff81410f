#!/usr/bin/env python3
"""Prefix-cache benchmark over HTTP against the real agent (release build) and the demo LLM.

1. 50 chat requests, one after another, that share a ~1,000-token system prompt and ask
   different questions: time to first token and prompt tokens computed (prefilled), with the
   prefix cache (the default) and without it (`prefix_cache = false`).
2. A multi-turn chat where each turn resends the whole history: the same figures per turn.

    python3 tests/bench/prefix.py             # builds target/release/flatmesh if missing
    python3 tests/bench/prefix.py --requests 20 --debug
    python3 tests/bench/prefix.py --bin target/release/flatmesh   # no build
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import LLM, ROOT, Agent  # noqa: E402
import conftest  # noqa: E402

SYSTEM = (
    "You are the assistant of the municipal services desk. You answer residents' questions "
    "about permits, waste collection, parking, libraries, schools and the town archive. Be "
    "brief, name the office and its opening hours when you know them, and never invent a "
    "fee or a date. ") * 16

QUESTIONS = [f"Question {i}: how do I {what}?" for i, what in enumerate([
    "renew a parking permit", "register a new address", "book the town hall", "report a broken street light",
    "get a copy of a birth certificate", "apply for a building permit", "find the library's hours",
    "dispose of an old fridge", "enrol a child in school", "request archive records from 1930",
] * 5)]


def stream_chat(url, messages, max_tokens):
    """One streamed chat; returns (ttft seconds, usage, text)."""
    t0 = time.perf_counter()
    first, usage, text = None, None, []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=600, json={
            "model": LLM, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            elif msg["choices"] and msg["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(msg["choices"][0]["delta"]["content"])
    return (first or time.perf_counter()) - t0, usage, "".join(text)


def shared_system_prompt(url, n):
    ttfts, computed, prompt = [], 0, 0
    for q in QUESTIONS[:n]:
        ttft, usage, _ = stream_chat(url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], 8)
        ttfts.append(ttft)
        prompt += usage["prompt_tokens"]
        computed += usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    return ttfts, prompt, computed


def multi_turn(url, turns):
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts, computed = [], []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        ttft, usage, text = stream_chat(url, messages, 24)
        messages.append({"role": "assistant", "content": text})
        ttfts.append(ttft)
        computed.append(usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"])
    return ttfts, computed


def ms(xs):
    return f"p50 {statistics.median(xs) * 1000:7.1f} ms  mean {statistics.mean(xs) * 1000:7.1f} ms"


def run(prefix_cache, args):
    config = f'[[models]]\nid = "{LLM}"\npath = "{LLM}/model.gguf"\nprefix_cache = {str(prefix_cache).lower()}\n'
    agent = Agent(config=config, extra_args=["--log-level", "warn"])
    try:
        stream_chat(agent.url, [{"role": "user", "content": "Hi"}], 2)  # warm-up
        ttfts, prompt, computed = shared_system_prompt(agent.url, args.requests)
        turn_ttfts, turn_computed = multi_turn(agent.url, args.turns)
    finally:
        agent.stop()
    label = "on " if prefix_cache else "off"
    print(f"  prefix cache {label}: {args.requests} requests, {prompt // args.requests} prompt tokens each")
    print(f"    time to first token   {ms(ttfts)}   (first request {ttfts[0] * 1000:.1f} ms)")
    print(f"    prompt tokens computed {computed:6d} of {prompt} ({computed / args.requests:.0f} a request)")
    print(f"    multi-turn ({args.turns} turns): TTFT {ms(turn_ttfts)}; tokens computed per turn {turn_computed}")
    return statistics.median(ttfts), statistics.median(turn_ttfts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--debug", action="store_true", help="use target/debug/flatmesh")
    ap.add_argument("--bin", help="this flatmesh binary, as it is (no build)")
    args = ap.parse_args()
    if args.bin:
        conftest.BIN = Path(args.bin)
    elif not args.debug:
        subprocess.run(["cargo", "build", "--release", "-p", "flatmesh"], cwd=ROOT, check=True)
        conftest.BIN = ROOT / "target" / "release" / "flatmesh"
    print(f"LLM {LLM} over HTTP (/v1/chat/completions, streamed, greedy, one request at a time)")
    off, off_turns = run(False, args)
    on, on_turns = run(True, args)
    print(f"  median TTFT without / with the prefix cache: {off / on:.1f}x shared system prompt, "
          f"{off_turns / on_turns:.1f}x multi-turn")


if __name__ == "__main__":
    main()
