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

from conftest import EMBED, LLM, ROOT, Agent

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


# --- The second campaign (issue 25): rate farming, idle gRPC sockets, what strangers learn ------

GUARD_TOKEN = "admin-hard"
GUARD = {"authorization": f"Bearer {GUARD_TOKEN}"}


@pytest.fixture(scope="module")
def guarded():
    """An agent with an admin token, a rate-limited tier, and tight gRPC connection limits."""
    a = Agent(config=f"""
[cache]
preload = false
[server]
admin_token = "{GUARD_TOKEN}"
grpc_handshake_timeout = "1s"
grpc_max_connections_per_peer = 4
[tenancy]
[[tenancy.tiers]]
name = "basic"
requests_per_minute = 3
""")
    yield a
    a.stop()


def tenant(agent, name, tier="basic"):
    r = httpx.post(agent.url + "/admin/tenants", headers=GUARD, json={"id": name, "tier": tier})
    assert r.status_code == 201, r.text
    r = httpx.post(agent.url + f"/admin/tenants/{name}/keys", headers=GUARD)
    assert r.status_code == 201, r.text
    return {"authorization": f"Bearer {r.json()['key']}"}


def test_requests_refused_after_admission_count_against_the_rate(guarded):
    # Inputs over the model's context are refused once the engine has them: that is work
    # done, so they keep their place in the tier's 3 requests a minute (no refund to farm).
    key = tenant(guarded, "farmer")
    body = {"model": EMBED, "input": "word " * 3000}
    codes = [httpx.post(guarded.url + "/v1/embeddings", json=body, headers=key, timeout=120).status_code
             for _ in range(5)]
    assert codes == [400, 400, 400, 429, 429], codes


def grpc_socket(agent, source="127.0.0.1") -> socket.socket:
    host, port = agent.grpc.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))


def closed_within(s: socket.socket, limit: float):
    """Seconds until the agent closes `s` (what it sends is read and dropped), or None."""
    s.settimeout(limit)
    started = time.monotonic()
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return None
    return time.monotonic() - started


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_grpc_sockets_without_the_http2_preface_are_closed(guarded):
    idle = grpc_socket(guarded)
    half = grpc_socket(guarded)
    half.sendall(PREFACE[:10])
    try:
        took = closed_within(idle, 6)
        assert took is not None and took < 3, took  # grpc_handshake_timeout = 1s
        took = closed_within(half, 6)
        assert took is not None and took < 3, took
    finally:
        idle.close()
        half.close()
    assert live(guarded)


def live(agent) -> bool:
    """ServerLive over a connection of its own, closed after."""
    import tritonclient.grpc as grpcclient
    c = grpcclient.InferenceServerClient(url=agent.grpc)
    try:
        return c.is_server_live()
    finally:
        c.close()


def test_one_address_holds_at_most_its_share_of_grpc_connections(guarded):
    # From an address of their own (the test's gRPC clients use 127.0.0.1).
    crowd = "127.0.0.3"
    held = []
    try:
        for _ in range(4):  # grpc_max_connections_per_peer = 4, each past the handshake
            s = grpc_socket(guarded, source=crowd)
            s.sendall(PREFACE)
            s.settimeout(5)
            assert s.recv(9), "served: the agent's SETTINGS frame"
            held.append(s)
        extra = grpc_socket(guarded, source=crowd)
        took = closed_within(extra, 5)
        assert took is not None and took < 0.8, f"closed at once, not by the handshake timeout: {took}"
        extra.close()
        # Another address is not held to this one's share.
        assert live(guarded)
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    again = grpc_socket(guarded, source=crowd)
    again.sendall(PREFACE)
    again.settimeout(5)
    assert again.recv(9), "the address may connect again once its connections closed"
    again.close()


def test_non_finite_grpc_parameters_are_invalid_arguments(hard):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    c = grpcclient.InferenceServerClient(url=hard.grpc)
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"Hi"], dtype=np.object_))
    for name, value in (("max_tokens", float("nan")), ("temperature", float("inf")), ("top_p", float("nan"))):
        with pytest.raises(InferenceServerException) as e:
            c.infer(LLM, [inp], parameters={name: value})
        assert "INVALID_ARGUMENT" in e.value.status() and f"parameters.{name}" in e.value.message(), e.value


def test_readiness_is_a_yes_or_no_and_its_details_need_the_admin_token(guarded):
    key = tenant(guarded, "prober")
    for headers in ({}, key, {"authorization": "Bearer wrong"}):
        r = httpx.get(guarded.url + "/readyz", headers=headers)
        assert r.status_code == 200 and r.json() == {"ready": True, "draining": False}, r.text
    r = httpx.get(guarded.url + "/readyz", headers=GUARD)
    assert r.status_code == 200 and {m["id"] for m in r.json()["models"]} >= {LLM, EMBED}, r.text


def test_a_path_that_does_not_exist_is_404_for_everyone(guarded):
    key = tenant(guarded, "wanderer")
    for headers in ({}, key, GUARD, {"authorization": "Bearer wrong"}):
        for method, path in (("GET", "/nope"), ("POST", "/admin/nope"), ("GET", "/admin"), ("GET", "/v1/nope"),
                             ("GET", "/v2/nope"), ("DELETE", "/internal/v1/serve")):
            r = httpx.request(method, guarded.url + path, headers=headers)
            assert r.status_code == 404, (method, path, headers, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "not_found" and path in error["message"], error
    # What exists still asks for its credentials.
    assert httpx.get(guarded.url + "/admin/models").status_code == 401
    assert httpx.get(guarded.url + "/v1/models").status_code == 401


def test_a_body_declared_too_large_is_413_at_once(hard):
    s = raw(hard)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000000\r\n\r\n{")
    started = time.monotonic()
    answer = read_all(s)
    took = time.monotonic() - started
    s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer and took < 0.8, (took, answer[:300])
