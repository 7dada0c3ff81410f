#!/usr/bin/env python3
"""Continuous batching: the flatmesh agent beside llama.cpp's llama-server, in one run.

Both serve the demo GGUF (SmolLM2-135M-Instruct Q4_1) with the same number of sequences in
flight (`--parallel`, default 8: llama-server `-np 8 -cb -c 8*2048`, flatmesh
`max_concurrency = 8` and as many scheduler slots). N concurrent streamed chat requests
(`/v1/chat/completions`, `stream: true`, temperature 0, `max_tokens` 128) go to one server,
then the same to the other, turn by turn. Each request starts with its own system line, so no
prompt prefix is reused from the last request. For each N (and one lone stream), per engine:

  decode tok/s (all)   completion tokens of the batch / wall time of the batch
  TTFT p50 / p99       time to the first content token (p99: nearest rank, the max below 100)
  decode tok/s (1)     one lone stream: (tokens - 1) / (last token - first token)

The last column is flatmesh / llama-server: above 1 is flatmesh faster for tok/s, below 1 for
TTFT. `ignore_eos` is sent (both honour it), and the tokens each
engine actually produced (from `usage`) are shown in the table.

    python3 tests/bench/batch.py [--streams 8,32] [--max-tokens 128] [--runs 1] [--parallel 8]
    python3 tests/bench/batch.py --url http://127.0.0.1:8000   # an agent already running (its config)
    python3 tests/bench/batch.py --engines llama-server        # one side only
    python3 tests/bench/batch.py --skip-build --llama-server /path/to/llama-server

flatmesh runs from `target/release/flatmesh` (build it first: `cargo build --release -p
flatmesh`); llama-server is built for this CPU, with every SIMD extension it has, on first use by
`tests/bench/llama-cpp-build` (ten minutes or more; cached; `--skip-build` only looks in the
cache).
"""
import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import conftest  # noqa: E402
from conftest import LLM, MODELS, ROOT, Agent  # noqa: E402

GGUF = MODELS / LLM / "model.gguf"
BUILD = ROOT / "tests" / "bench" / "llama-cpp-build"
USER = ("Write a long story about a lighthouse keeper who finds a message in a bottle. Describe "
        "the sea, the weather, the keeper's daily routine and the people of the nearby village.")


def stream_chat(url, system, max_tokens):
    """One streamed chat completion: (ttft, decode_seconds, completion_tokens)."""
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    body = {"model": LLM, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": USER}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=1200) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            if msg.get("choices") and (msg["choices"][0].get("delta") or {}).get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    if first is None:
        raise RuntimeError(f"{url}: no content streamed")
    return first - t0, last - first, usage["completion_tokens"] if usage else chunks


def run_batch(url, n, max_tokens, tag):
    results = [None] * n
    errors = []

    def one(i):
        try:
            results[i] = stream_chat(url, f"Session {tag}-{i}. You are a helpful assistant.", max_tokens)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, results


def p99(xs):
    xs = sorted(xs)
    return xs[max(0, math.ceil(0.99 * len(xs)) - 1)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary, parallel, threads):
        self.binary = Path(binary)
        self.dir = tempfile.TemporaryDirectory(prefix="llama-server-")
        self.log = open(Path(self.dir.name) / "server.log", "w+")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(GGUF), "-np", str(parallel), "-cb", "-c", str(parallel * 2048),
             "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port),
             "--no-webui"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("llama-server did not become ready:\n" + self.logs())
            time.sleep(0.2)

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def llama_server_binary(args):
    if args.llama_server:
        return Path(args.llama_server)
    env = dict(os.environ, LLAMA_CPP_PYTHON_VERSION=args.llama_cpp_version) if args.llama_cpp_version else None
    if args.skip_build:
        # The build script answers at once when its binary exists; with --skip-build, only ask.
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatmesh"
        found = sorted(cache.glob("llama.cpp-*-native/build/bin/llama-server"))
        if not found:
            sys.exit(f"no llama-server under {cache}: run {BUILD.relative_to(ROOT)} (or drop --skip-build)")
        return found[-1]
    print("llama-server: tests/bench/llama-cpp-build (ten minutes or more the first time) ...", flush=True)
    out = subprocess.run([str(BUILD)], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1]) / "llama-server"


def flatmesh_config(parallel):
    return f"""
[scheduler]
slots = {parallel}
max_wait = "1200s"
max_run = "1200s"

[[models]]
id = "{LLM}"
path = "{LLM}/model.gguf"
max_concurrency = {parallel}
kv_cache_tokens = {parallel * 2048}
"""


def measure(urls, streams, max_tokens, runs):
    """{engine: {n: {...}}} for one lone stream and each n; engines take turns batch by batch,
    so both see the same machine state. Runs are pooled (TTFTs) or medianed (rates)."""
    for name, url in urls.items():
        stream_chat(url, f"Warm-up {name}.", 8)
    res = {name: {} for name in urls}
    for n in [1, *streams]:
        acc = {name: ([], [], [], []) for name in urls}
        for r in range(runs):
            for name, url in urls.items():
                time.sleep(1)  # let the other server's threads go idle
                wall, got = run_batch(url, n, max_tokens, f"{name}-{n}-{r}")
                rates, ttfts, tokens, single = acc[name]
                rates.append(sum(x[2] for x in got) / wall)
                ttfts += [x[0] for x in got]
                tokens += [x[2] for x in got]
                single += [(x[2] - 1) / x[1] for x in got if x[1] > 0]
        for name, (rates, ttfts, tokens, single) in acc.items():
            res[name][n] = m = {"all": statistics.median(rates), "p50": statistics.median(ttfts),
                                "p99": p99(ttfts), "tokens": statistics.mean(tokens),
                                "single": statistics.median(single)}
            print(f"  {name:12s} {n:3d} stream(s): {m['all']:7.1f} tok/s, TTFT p50 {m['p50'] * 1000:7.0f} ms, "
                  f"{m['tokens']:.0f} tokens/stream", flush=True)
    return res


def table(res, streams):
    names = list(res)
    print(f"\n{'':35s}" + "".join(f"{n:>14s}" for n in names) + ("   flatmesh/llama-server" if len(names) == 2 else ""))
    rows = [(1, "decode tok/s (1 stream)", "single", 1), (1, "TTFT ms", "p50", 1000)]
    for n in streams:
        rows += [(n, "decode tok/s (all)", "all", 1), (n, "TTFT p50 ms", "p50", 1000),
                 (n, "TTFT p99 ms", "p99", 1000), (n, "tokens / stream", "tokens", 1)]
    last = None
    for n, label, key, scale in rows:
        head = f"{n} stream{'s' if n > 1 else ''}" if n != last else ""
        last = n
        vals = [res[e][n][key] * scale for e in names]
        line = f"{head:11s}{label:24s}" + "".join(f"{v:14.1f}" for v in vals)
        if len(vals) == 2 and vals[1]:
            line += f"   {vals[0] / vals[1]:10.2f}x"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="8,32", help="concurrent streams, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=8, help="sequences in flight per engine")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t")
    ap.add_argument("--engines", default="flatmesh,llama-server")
    ap.add_argument("--url", help="a flatmesh agent already running (else one is started)")
    ap.add_argument("--skip-build", action="store_true", help="do not build llama-server")
    ap.add_argument("--llama-server", help="path of a llama-server binary to use")
    ap.add_argument("--llama-cpp-version", help="llama-cpp-python version whose llama.cpp to build")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    engines = args.engines.split(",")

    agent = server = None
    urls = {}
    try:
        if "flatmesh" in engines:
            if args.url:
                urls["flatmesh"] = args.url
            else:
                conftest.BIN = ROOT / "target" / "release" / "flatmesh"
                if not conftest.BIN.exists():
                    sys.exit(f"{conftest.BIN} is missing: build it with `cargo build --release -p flatmesh` "
                             "(or pass --url, or --engines llama-server)")
                agent = Agent(config=flatmesh_config(args.parallel), extra_args=["--log-level", "warn"])
                urls["flatmesh"] = agent.url
        if "llama-server" in engines:
            server = LlamaServer(llama_server_binary(args), args.parallel, args.threads)
            urls["llama-server"] = server.url
        print(f"{LLM} (Q4_1), chat streamed, greedy, {args.max_tokens} new tokens, {args.parallel} "
              f"sequences in flight per engine, {os.cpu_count()} cores, {args.runs} run(s)", flush=True)
        print(f"CPU: {cpu_model()}", flush=True)
        if server:
            flags = server.binary.parents[2] / "flags"
            print(f"llama-server build: {flags.read_text().strip() if flags.exists() else 'unknown flags'}")
        table(measure(urls, streams, args.max_tokens, args.runs), streams)
    finally:
        if server:
            server.stop()
        if agent:
            agent.stop()


if __name__ == "__main__":
    main()
