#!/usr/bin/env python3
"""The agent on a GPU, through its real front door (called by `run`; standard library, numpy to
make the model, the `openai` client when it is installed, else plain HTTP — said in the result).

    serve_check.py AGENT SKELETON WORKDIR [--host-only] [--budget SECONDS]

Makes the model (`demo_model.py expand`: the demo's dimensions and tokenizer, random F16
weights), then:
  1. an agent whose pool is two budgets on GPU 0: `gpu0` (half the GPU, a fraction resolved
     through the driver) and `gpu0-huge` (4 TiB, more than any GPU has); admin must list both as
     cuda devices with the driver's bytes;
  2. a chat (temperature 0, the golden prompt) answered by a copy on a cuda device (admin says
     which device holds it);
  3. decode tok/s: (256 tokens − 1 token) / time, from two requests (max_tokens 257 and 1);
  4. a model whose KV pool (4 Mi positions) only the 4 TiB budget admits, more than the GPU has:
     its load must fail with the reason (503 and `error` in admin), the driver's free bytes back
     where they were (±256 MiB), and the first model still answers;
  5. an agent on a host device only: the same chat; its greedy tokens must equal the GPU copy's,
     or differ first where the host copy's top two log-probabilities are within NEAR_TIE (a near
     tie the GPU's other summation order may break the other way).
Prints one `SERVE-CHECK {json}` line per step and a final `SERVE-CHECK-RESULT {json}`.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = "Write one sentence about the sea."
MAX_TOKENS = 24
NEAR_TIE = 0.05  # nats between the host copy's best two tokens where the first difference is
OOM_KV_TOKENS = 1 << 22


def say(step, **kw):
    print("SERVE-CHECK " + json.dumps({"step": step, **kw}), flush=True)


class Agent:
    def __init__(self, binary, work, name, config, timeout=90):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
        (self.dir / "flatmesh.toml").write_text(config)
        addr = self.dir / "addr.json"
        self.logf = open(self.dir / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.dir / "flatmesh.toml"), "--http-addr", "127.0.0.1:0",
             "--grpc-addr", "127.0.0.1:0", "--addr-file", str(addr), "--state-dir", str(self.dir / "state"),
             "--models-dir", str(work)],
            stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: the agent exited ({self.proc.returncode}): {self.log()[-1500:]}")
            if addr.exists():
                try:
                    self.url = "http://" + json.loads(addr.read_text())["http"]
                    if self.get("/readyz")[0] == 200:
                        return
                except (ValueError, KeyError, OSError):
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{name}: the agent did not become ready in {timeout} s: {self.log()[-1500:]}")

    def log(self):
        return (self.dir / "agent.log").read_text(errors="replace")

    def get(self, path):
        return self.call("GET", path)

    def call(self, method, path, body=None, timeout=120):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def admin(self):
        _, body = self.get("/admin/models")
        return {d["name"]: d for d in body["devices"]}, {m["id"]: m for m in body["models"]}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode


def chat(agent, model, max_tokens, logprobs=False):
    """(token strings, their top-2 logprobs, seconds, client) through the openai client if any."""
    msgs = [{"role": "user", "content": GOLDEN}]
    t = time.monotonic()
    try:
        from openai import OpenAI
    except ImportError:
        OpenAI = None
    if OpenAI is not None:
        c = OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        extra = {"logprobs": True, "top_logprobs": 2} if logprobs else {}
        r = c.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0, **extra)
        r = r.model_dump()
        client = "openai " + __import__("openai").__version__
    else:
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
        if logprobs:
            body.update(logprobs=True, top_logprobs=2)
        code, r = agent.call("POST", "/v1/chat/completions", body)
        if code != 200:
            raise RuntimeError(f"chat to {model}: HTTP {code}: {r}")
        client = "urllib (the openai package is not installed here)"
    secs = time.monotonic() - t
    content = (r["choices"][0].get("logprobs") or {}).get("content") or []
    tokens = [c["token"] for c in content]
    tops = [[t["logprob"] for t in c.get("top_logprobs") or []] for c in content]
    return tokens, tops, secs, client, r


def gpu_agent(binary, work, result):
    cfg = f"""
[cache]
preload = false
[[cache.devices]]
name = "gpu0"
kind = "cuda"
gpu = 0
capacity = "0.5"
[[cache.devices]]
name = "gpu0-huge"
kind = "cuda"
gpu = 0
capacity = "4TiB"
[[models]]
id = "demo"
path = "demo.gguf"
[[models]]
id = "demo-oom"
path = "demo.gguf"
kv_cache_tokens = {OOM_KV_TOKENS}
"""
    a = Agent(binary, work, "gpu-agent", cfg)
    try:
        devs, _ = a.admin()
        result["devices"] = devs
        bad = [n for n, d in devs.items() if d.get("kind") != "cuda" or not d.get("driver_total_bytes")]
        say("devices", ok=not bad, devices=devs)
        if bad:
            raise RuntimeError(f"devices {bad} are not cuda devices with the driver's bytes: {devs}")
        tokens, _, secs, client, _ = chat(a, "demo", MAX_TOKENS, logprobs=True)
        _, models = a.admin()
        where = models["demo"].get("device")
        result.update(gpu_tokens=tokens, client=client, gpu_device=where, first_chat_s=round(secs, 3))
        say("gpu_chat", ok=where in devs and bool(tokens), device=where, tokens=len(tokens), seconds=secs)
        if where not in devs:
            raise RuntimeError(f"the chat was not answered from a cuda device (admin says {where!r})")
        _, _, t1, _, _ = chat(a, "demo", 1)
        _, _, t257, _, r = chat(a, "demo", 257)
        n = r["usage"]["completion_tokens"]
        tps = (n - 1) / max(t257 - t1, 1e-9)
        result["decode_tok_s"] = round(tps, 1)
        say("decode", ok=n > 1, completion_tokens=n, tok_s=round(tps, 1), note="one stream, HTTP included")
        devs, models = a.admin()
        free_before, total = devs["gpu0"]["driver_free_bytes"], devs["gpu0"]["driver_total_bytes"]
        need = models["demo-oom"].get("bytes")
        if need is not None and need < total:
            result["oom"] = {"predicted_bytes": need, "driver_total_bytes": total}
            say("oom", ok=False, **result["oom"])
            raise RuntimeError(f"the out-of-memory model needs {need} bytes, which this GPU ({total} bytes) "
                               "holds: no out-of-memory load to test here (an 80 GB GPU has too little)")
        code, body = a.call("POST", "/v1/chat/completions", {
            "model": "demo-oom", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        devs, models = a.admin()
        m = models["demo-oom"]
        free_after = devs["gpu0"]["driver_free_bytes"]
        leaked = free_before - free_after
        still, _ = a.call("POST", "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        ok = code == 503 and m["state"] == "failed" and bool(m.get("error")) and abs(leaked) < 256 << 20 \
            and still == 200 and a.proc.poll() is None
        result["oom"] = {"http": code, "state": m["state"], "error": m.get("error"), "predicted_bytes": m.get("bytes"),
                         "driver_free_before": free_before, "driver_free_after": free_after, "others_serve": still}
        say("oom", ok=ok, **result["oom"])
        if not ok:
            raise RuntimeError(f"the out-of-memory load: {result['oom']}")
    finally:
        result["gpu_agent_exit"] = a.stop()
        result["gpu_agent_log_tail"] = a.log()[-3000:]


def host_agent(binary, work, result):
    cfg = """
[cache]
preload = false
[[cache.devices]]
name = "host0"
capacity = "4GiB"
[[models]]
id = "demo"
path = "demo.gguf"
"""
    a = Agent(binary, work, "host-agent", cfg)
    try:
        tokens, tops, _, client, _ = chat(a, "demo", MAX_TOKENS, logprobs=True)
        result.update(host_tokens=tokens, host_tops=tops, client=result.get("client", client))
        say("host_chat", ok=bool(tokens), tokens=len(tokens))
    finally:
        result["host_agent_exit"] = a.stop()


def compare(result):
    g, h, tops = result.get("gpu_tokens"), result["host_tokens"], result["host_tops"]
    if g is None:
        return None
    if g == h:
        return {"greedy_equal": True}
    i = next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), min(len(g), len(h)))
    gap = tops[i][0] - tops[i][1] if i < len(tops) and len(tops[i]) > 1 else None
    near = gap is not None and gap <= NEAR_TIE
    return {"greedy_equal": False, "first_difference": i, "host_top2_gap": gap, "near_tie": near,
            "gpu": "".join(g), "host": "".join(h)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("agent", type=Path)
    ap.add_argument("skeleton", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--host-only", action="store_true", help="no GPU agent (a smoke test on a CPU machine)")
    a = ap.parse_args()
    result, failed = {}, None
    try:
        sys.path.insert(0, str(HERE))
        from demo_model import expand
        t = time.monotonic()
        expand(a.skeleton, a.work / "demo.gguf")
        say("model", ok=True, seconds=round(time.monotonic() - t, 1), bytes=(a.work / "demo.gguf").stat().st_size)
        if not a.host_only:
            gpu_agent(a.agent, a.work, result)
        host_agent(a.agent, a.work, result)
        result["greedy"] = compare(result)
        if result["greedy"] and not (result["greedy"]["greedy_equal"] or result["greedy"]["near_tie"]):
            failed = f"greedy output differs from the host copy's: {result['greedy']}"
    except Exception as e:  # reported, never raised: `run` reads the result line
        failed = f"{type(e).__name__}: {e}"
    result["ok"], result["failed"] = failed is None, failed
    print("SERVE-CHECK-RESULT " + json.dumps(result), flush=True)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
