"""Hostile input against the real agent: files that are not files, numbers out of range, leaks,
cross-site admin calls, slow clients, and who may read /metrics."""
import contextlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import LLM, ROOT, Agent

METRICS_TOKEN = "scrape-me"


@pytest.fixture(scope="module")
def files():
    with tempfile.TemporaryDirectory(prefix="flatmesh-hard-") as d:
        yield Path(d)


@contextlib.contextmanager
def backtraces(value):
    """RUST_BACKTRACE set for the agents started inside (they inherit the environment)."""
    old = os.environ.get("RUST_BACKTRACE")
    os.environ["RUST_BACKTRACE"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["RUST_BACKTRACE"]
        else:
            os.environ["RUST_BACKTRACE"] = old


@pytest.fixture(scope="module")
def hard(files):
    """An open (demo-style, no admin token) agent with tight timeouts and a metrics token,
    started with RUST_BACKTRACE set so that a leaked backtrace would show."""
    with backtraces("1"):
        a = Agent(config=f"""
[cache]
preload = false
[server]
model_roots = ["{files}"]
metrics_token = "{METRICS_TOKEN}"
header_read_timeout = "1s"
body_read_timeout = "1s"
[policy]
plugin_roots = ["{files}", "/dev"]
max_plugin_bytes = "1KiB"
""")
    yield a
    a.stop()


def error_of(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def assert_no_leak(text: str):
    for marker in ("backtrace", ".rs:", "root:", "panicked", "746f6f72", "magic"):
        assert marker not in text, f"{marker!r} in {text!r}"
    assert not re.search(r"0x[0-9a-f]{6,}", text), text


# 1. Policy reloads read only regular files of bounded size.

def test_policy_reload_refuses_devices_pipes_and_huge_files(hard, files):
    fifo = files / "router.wasm"
    os.mkfifo(fifo)
    big = files / "big.wasm"
    big.write_bytes(b"\0asm" + b"\0" * 4096)
    cases = {
        "/dev/zero": "a character device",
        str(fifo): "a named pipe",
        str(big): "more than the limit of 1024 bytes",
        "/etc/passwd": "outside the allowed directories",
        f"{files}/../x.wasm": "must not contain '..'",
    }
    for path, reason in cases.items():
        started = time.monotonic()
        r = httpx.post(f"{hard.url}/admin/policies/router/reload", json={"plugin": path}, timeout=10)
        assert r.status_code == 400, (path, r.text)
        assert reason in error_of(r), (path, r.text)
        assert time.monotonic() - started < 1.0, path
    assert httpx.get(hard.url + "/healthz").status_code == 200


# 2. A FIFO as a model path never blocks the agent.

def test_a_fifo_model_is_refused_at_once_and_the_agent_keeps_answering(hard, files):
    fifo = files / "pipe.gguf"
    os.mkfifo(fifo)
    started = time.monotonic()
    r = httpx.post(f"{hard.url}/admin/models", json={"id": "pipe", "path": str(fifo)}, timeout=10)
    assert time.monotonic() - started < 1.0
    assert r.status_code == 400, r.text
    assert "not a regular file (a named pipe)" in error_of(r) and str(fifo) in error_of(r)
    assert httpx.get(hard.url + "/healthz", timeout=2).status_code == 200
    assert httpx.get(hard.url + "/readyz", timeout=2).status_code == 200
    r = httpx.post(f"{hard.url}/admin/models", json={"id": "dir", "path": str(files) + "/"}, timeout=10)
    assert r.status_code == 400, r.text


# 3. Numbers out of range are 400s, never panics.

@pytest.mark.parametrize("keep_alive", [1e20, 1e300, -5, "1e20", "99999999999h"])
def test_keep_alive_out_of_range_is_a_400(hard, keep_alive):
    r = httpx.post(f"{hard.url}/v1/chat/completions", timeout=30, json={
        "model": LLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "keep_alive": keep_alive})
    assert r.status_code == 400, r.text
    assert "keep_alive" in error_of(r)


@pytest.mark.parametrize("fields", [
    {"max_concurrency": 4611686018427387904},
    {"max_concurrency": 17592186044416},
    {"max_concurrency": 0},
    {"keep_alive": 1e20},
])
def test_registration_numbers_are_range_checked(hard, fields):
    r = httpx.post(f"{hard.url}/admin/models", timeout=10,
                   json={"id": "n", "path": "smollm2-135m-instruct/model.gguf", **fields})
    assert r.status_code == 400, r.text
    assert httpx.get(hard.url + "/healthz").status_code == 200


# 4. Errors carry neither file contents nor backtraces; paths and ids are confined.

def test_errors_carry_no_file_contents_or_backtraces(hard, files):
    r = httpx.post(f"{hard.url}/admin/models", json={"id": "shadow", "path": "/etc/shadow", "format": "gguf"})
    assert r.status_code == 400, r.text
    assert "outside the allowed directories" in error_of(r)
    assert_no_leak(r.text)
    secret = files / "secret.gguf"
    secret.write_bytes(b"root:$6$verysecret:19000:0:99999:7:::\n")
    r = httpx.post(f"{hard.url}/admin/models", json={"id": "secret", "path": str(secret)})
    assert r.status_code == 400, r.text
    assert "not a GGUF file" in error_of(r)
    assert_no_leak(r.text)
    junk = files / "junk.wasm"
    junk.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    r = httpx.post(f"{hard.url}/admin/policies/router/reload", json={"plugin": str(junk)})
    assert r.status_code == 422, r.text
    assert "not a WebAssembly component" in error_of(r)
    assert_no_leak(r.text)
    almost = files / "almost.wasm"
    almost.write_bytes(b"\0asm\x0d\0\x01\0garbage after a component header")
    r = httpx.post(f"{hard.url}/admin/policies/router/reload", json={"plugin": str(almost)})
    assert r.status_code == 422, r.text
    assert "backtrace" not in r.text.lower() and ".rs:" not in r.text


def test_a_trapping_plugin_answers_without_its_backtrace():
    hostile = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "hostile.wasm"
    assert hostile.exists(), "run plugins/build first"
    with backtraces("full"):
        a = Agent(config=f"""
[cache]
preload = false
[policy]
watch = false
[policy.router]
plugin = "{hostile}"
config = "panic"
on_failure = "closed"
""")
    try:
        for mode in ("panic", "trap"):
            r = httpx.post(a.url + "/admin/policies/router/reload", json={"config": mode})
            assert r.status_code == 200, r.text
            r = httpx.post(a.url + "/v1/completions", json={"model": "auto", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 503, r.text
            message = error_of(r)
            assert "router policy failed" in message and "trap" in message, message
            for marker in ("backtrace", "wasm function", "0x", ".rs:"):
                assert marker not in message, (mode, message)
    finally:
        a.stop()


@pytest.mark.parametrize("path", ["../../etc/passwd", "smollm2-135m-instruct/../../x.gguf"])
def test_model_paths_may_not_climb_out(hard, path):
    r = httpx.post(f"{hard.url}/admin/models", json={"id": "climb", "path": path, "format": "gguf"})
    assert r.status_code == 400, r.text
    assert "'..'" in error_of(r)


@pytest.mark.parametrize("bad", ["../../x", "a/b", ".hidden", "x" * 129, "sp ace"])
def test_ids_are_limited_in_length_and_characters(hard, bad):
    r = httpx.post(f"{hard.url}/admin/models",
                   json={"id": bad, "path": "smollm2-135m-instruct/model.gguf"})
    assert r.status_code == 400, r.text
    assert len(r.text) < 1000
    r = httpx.post(f"{hard.url}/admin/tenants", json={"id": bad, "tier": "open"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("name", ["x" * 1000, ".hidden", "..%2F..%2Fx", "a%20b"])
def test_vmodel_names_are_checked(hard, name):
    r = httpx.put(f"{hard.url}/admin/vmodels/{name}", json={"target": LLM})
    assert r.status_code == 400, r.text
    assert "vmodel" in error_of(r) and len(r.text) < 1000
    r = httpx.put(f"{hard.url}/admin/vmodels/fine", json={"target": name})
    assert r.status_code == 400, r.text
    for method, path in [("GET", f"/admin/models/{name}"), ("DELETE", f"/admin/models/{name}"),
                         ("POST", f"/admin/models/{name}/load"), ("DELETE", f"/admin/vmodels/{name}")]:
        r = httpx.request(method, hard.url + path)
        assert r.status_code == 400 and len(r.text) < 1000, (method, path, r.text)


# 5. Cross-site requests to the admin API.

def test_cross_site_admin_writes_are_refused(hard):
    body = '{"id": "csrf", "path": "smollm2-135m-instruct/model.gguf"}'
    r = httpx.post(f"{hard.url}/admin/models", content=body,
                   headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code == 403, r.text
    r = httpx.post(f"{hard.url}/admin/models", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    r = httpx.post(f"{hard.url}/admin/models", content=body,
                   headers={"content-type": "application/json", "sec-fetch-site": "cross-site"})
    assert r.status_code == 403, r.text
    r = httpx.get(f"{hard.url}/admin/models", headers={"origin": "http://evil.example"})
    assert r.status_code == 403, r.text
    assert "csrf" not in httpx.get(f"{hard.url}/admin/models").text
    # The same origin, as the agent's own page would send it, passes.
    origin = hard.url
    r = httpx.get(f"{hard.url}/admin/models", headers={"origin": origin})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{hard.url}/admin/models/{LLM}/unload", headers={"origin": origin})
    assert r.status_code == 200, r.text


# 6. Slow clients are cut off.

def raw(agent: Agent) -> socket.socket:
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_partial_headers_are_closed_after_the_header_timeout(hard):
    s = raw(hard)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    read_all(s)  # returns once the agent closes the connection
    assert time.monotonic() - started < 5
    s.close()


def test_a_short_body_gets_408_after_the_body_timeout(hard):
    s = raw(hard)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\":")
    started = time.monotonic()
    answer = read_all(s)
    assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    s.close()
    assert httpx.get(hard.url + "/healthz").status_code == 200


def test_connections_beyond_the_bound_wait():
    a = Agent(config="[cache]\npreload = false\n[server]\nmax_connections = 1\n")
    try:
        held = raw(a)
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
        with pytest.raises(httpx.TimeoutException):
            httpx.get(a.url + "/healthz", timeout=1)
        held.close()
        assert httpx.get(a.url + "/healthz", timeout=5).status_code == 200
    finally:
        a.stop()


# 7. /metrics: open by default, protected by a token when one is set.

def test_metrics_token_protects_metrics(hard):
    r = httpx.get(hard.url + "/metrics")
    assert r.status_code == 401
    assert "flatmesh_" not in r.text
    assert httpx.get(hard.url + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(hard.url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and "flatmesh_" in r.text


def test_metrics_are_scrapeable_without_a_token_by_default():
    a = Agent(config="[cache]\npreload = false\n")
    try:
        r = httpx.get(a.url + "/metrics")
        assert r.status_code == 200 and "flatmesh_" in r.text
    finally:
        a.stop()
