#!/usr/bin/env python3
"""Decode tokens/s with and without a JSON schema, over HTTP against the real agent and the demo LLM.

Each run streams one chat answer of `--tokens` tokens: free text (with `ignore_eos`, so it runs to
`max_tokens`) and under a schema whose `minItems` keeps the JSON open to `max_tokens`. Decode
tokens/s is (completion tokens - 1) / (last token time - first token time); the median of
`--runs` interleaved runs is printed for 1 stream and for `--streams` concurrent streams.

    python3 tests/bench/structured.py                 # starts target/debug/flatmesh (FLATMESH_BIN to change)
    python3 tests/bench/structured.py --url http://127.0.0.1:8000
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import LLM, Agent  # noqa: E402

SCHEMA = {"type": "object", "properties": {"names": {
    "type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200}},
    "required": ["names"], "additionalProperties": False}
ASK = [{"role": "user", "content": "List the names of many cities of the world."}]


def stream_once(url, tokens, schema):
    body = {"model": LLM, "messages": ASK, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "names", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    first = last = usage = None
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += c["delta"]["content"]
    n = usage["completion_tokens"]
    if n < tokens:
        raise SystemExit(f"the answer ended after {n} of {tokens} tokens: {text[:200]!r}")
    return (n - 1) / (last - first)


def rate(url, tokens, schema, streams):
    """Total decode tokens/s of `streams` concurrent streams."""
    rates = [0.0] * streams

    def one(i):
        rates[i] = stream_once(url, tokens, schema)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", type=int, default=4)
    a = ap.parse_args()
    agent = None if a.url else Agent()
    url = a.url or agent.url
    try:
        stream_once(url, 8, False)  # load the model
        stream_once(url, 8, True)  # build the vocabulary's token trie
        for streams in (1, a.streams):
            runs = {False: [], True: []}
            for _ in range(a.runs):  # interleaved, so that load from elsewhere hits both alike
                for schema in (False, True):
                    runs[schema].append(rate(url, a.tokens, schema, streams))
            got = {k: statistics.median(v) for k, v in runs.items()}
            slower = 100 * (1 - got[True] / got[False])
            print(f"{streams} stream(s): free {got[False]:.1f} tok/s, schema {got[True]:.1f} tok/s "
                  f"({slower:+.1f}% slower)")
    finally:
        if agent:
            agent.stop()


if __name__ == "__main__":
    main()
