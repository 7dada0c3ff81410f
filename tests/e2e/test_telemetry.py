"""Traces: the agent exports OpenTelemetry spans over OTLP/HTTP to a receiver that decodes them
with the official OTLP protobuf definitions (`opentelemetry-proto`), and one trace spans the mesh.
"""
import http.server
import secrets
import threading
import time

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conftest import BIN, EMBED, LLM, ROOT, Agent
from test_mesh import ADMIN, mesh_config, mesh_of, wait_until

PLUGINS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span it was sent, decoded."""

    def __init__(self):
        self.spans = []      # (resource attributes, span)
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path != "/v1/traces" or self.headers["content-type"] != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with receiver.lock:
                    receiver.requests += 1
                    for rs in req.resource_spans:
                        res = attrs(rs.resource.attributes)
                        for ss in rs.scope_spans:
                            receiver.spans.extend((res, s) for s in ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: bytes):
        with self.lock:
            return [(r, s) for r, s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: bytes, pred, what, timeout=15.0):
        wait_until(lambda: pred(self.trace(trace_id)), timeout,
                   lambda: f"{what}; spans of the trace: {[(s.name, attrs(s.attributes)) for _, s in self.trace(trace_id)]}")
        return self.trace(trace_id)

    def close(self):
        self.server.shutdown()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs) -> dict:
    return {kv.key: value(kv.value) for kv in kvs}


def traceparent():
    """A new sampled W3C trace context: (header, trace id, parent span id)."""
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-01", trace_id, span_id


def named(spans, name):
    found = [s for _, s in spans if s.name == name]
    assert found, f"no span {name!r} among {[s.name for _, s in spans]}"
    return found


def telemetry_config(receiver) -> str:
    return f"""
[telemetry]
otlp_endpoint = "{receiver.url}"
export_interval = "100ms"
"""


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced(receiver):
    assert BIN.exists(), f"{BIN} is missing: cargo build -p flatmesh"
    assert (PLUGINS / "solidarity_pricing.wasm").exists(), "run plugins/build first"
    a = Agent(config=f"""
[cache]
preload = false

[policy.pricing]
plugin = "{PLUGINS / 'solidarity_pricing.wasm'}"
config = {{ budgets = {{ trial = 100000000 }}, tokens_per_minute = {{ metered = 100000000 }}, pool_cost = 1500.0 }}
""" + telemetry_config(receiver))
    yield a
    a.stop()


def test_a_streamed_chat_is_one_trace_with_the_genai_attributes_and_its_steps(traced, receiver):
    from openai import OpenAI
    header, trace_id, parent = traceparent()
    client = OpenAI(base_url=traced.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_headers={"traceparent": header})
    usage = [c.usage for c in stream if c.usage][-1]

    spans = receiver.wait_for(trace_id, lambda ss: any(s.name == f"chat {LLM}" for _, s in ss)
                              and any(s.name == "POST /v1/chat/completions" for _, s in ss),
                              "the request's spans never arrived")
    res, _ = spans[0]
    assert res["service.name"] == "flatmesh" and res["service.instance.id"]
    root = named(spans, "POST /v1/chat/completions")[0]
    assert root.parent_span_id == parent, "the front door's span continues the client's trace"
    assert root.kind == Span.SPAN_KIND_SERVER
    assert attrs(root.attributes)["http.response.status_code"] == 200
    serve = named(spans, f"chat {LLM}")[0]
    assert serve.parent_span_id == root.span_id
    a = attrs(serve.attributes)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == LLM and a["gen_ai.response.model"] == LLM
    assert a["gen_ai.provider.name"] == "flatmesh"
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.id"].startswith("chatcmpl-")
    assert a["flatmesh.time_to_first_token_s"] > 0
    # The stream's span lasts until its last token, after the first.
    assert serve.end_time_unix_nano >= serve.start_time_unix_nano
    # Its steps: the pricing plugin, the page-in of the cold model, the wait for a slot.
    children = {s.name: s for _, s in spans if s.parent_span_id == serve.span_id}
    assert "policy pricing" in children, sorted(children)
    assert attrs(children["policy pricing"].attributes)["flatmesh.policy.slot"] == "pricing"
    assert "page-in" in children, sorted(children)
    page_in = attrs(children["page-in"].attributes)
    assert page_in["flatmesh.model"] == LLM and page_in["flatmesh.source"] in ("disk", "warm")
    assert "queue wait" in children, sorted(children)
    assert attrs(children["queue wait"].attributes)["flatmesh.tier"]
    for s in children.values():
        assert s.start_time_unix_nano >= serve.start_time_unix_nano


def test_embeddings_and_a_refused_request_are_traced_too(traced, receiver):
    header, trace_id, _ = traceparent()
    r = httpx.post(traced.url + "/v1/embeddings", headers={"traceparent": header}, timeout=120,
                   json={"model": EMBED, "input": ["a tree", "a forest"]})
    assert r.status_code == 200, r.text
    spans = receiver.wait_for(trace_id, lambda ss: any(s.name == f"embeddings {EMBED}" for _, s in ss),
                              "no embeddings span")
    a = attrs(named(spans, f"embeddings {EMBED}")[0].attributes)
    assert a["gen_ai.operation.name"] == "embeddings"
    assert a["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]

    header, trace_id, _ = traceparent()
    r = httpx.post(traced.url + "/v1/chat/completions", headers={"traceparent": header}, timeout=30,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    spans = receiver.wait_for(trace_id, lambda ss: any(s.name == "chat no-such-model" for _, s in ss),
                              "no span for the refused request")
    assert attrs(named(spans, "chat no-such-model")[0].attributes)["error.type"] == "404"


def test_a_grpc_call_continues_the_callers_trace(traced, receiver):
    import numpy as np
    import tritonclient.grpc as grpcclient
    header, trace_id, parent = traceparent()
    c = grpcclient.InferenceServerClient(traced.grpc)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"a lake"], dtype=np.object_))
    c.infer(EMBED, [inp], headers={"traceparent": header})
    spans = receiver.wait_for(trace_id, lambda ss: any(s.name == f"embeddings {EMBED}" for _, s in ss),
                              "no span of the gRPC call")
    root = named(spans, "inference.GRPCInferenceService/ModelInfer")[0]
    assert root.parent_span_id == parent and root.kind == Span.SPAN_KIND_SERVER
    assert named(spans, f"embeddings {EMBED}")[0].parent_span_id == root.span_id


def test_without_a_traceparent_a_request_starts_its_own_trace(traced, receiver):
    before = len(receiver.spans)
    r = httpx.post(traced.url + "/v1/embeddings", timeout=60, json={"model": EMBED, "input": "solo"})
    assert r.status_code == 200
    wait_until(lambda: any(s.name == f"embeddings {EMBED}" and not s.parent_span_id == b""
                           for _, s in receiver.spans[before:]), 15, "no span for the request")
    roots = [s for _, s in receiver.spans[before:] if s.name == "POST /v1/embeddings"]
    assert roots and roots[0].parent_span_id == b""


def test_one_trace_spans_the_mesh_through_a_forwarded_request(receiver):
    def config(etcd, name):
        return mesh_config(etcd, f"trace-{name}", "/flatmesh-trace") + telemetry_config(receiver)

    with mesh_of(("a", "b"), config) as agents:
        a, b = agents["a"], agents["b"]
        r = httpx.post(b.url + f"/admin/models/{EMBED}/load", headers=ADMIN, timeout=180)
        assert r.status_code == 200, r.text

        def a_sees_b_holding():
            v = httpx.get(a.url + "/admin/mesh", headers=ADMIN, timeout=10).json()
            return any(n["node"] == "trace-b" and any(m["id"] == EMBED and m["ready"] > 0 for m in n["models"])
                       for n in v["nodes"])
        wait_until(a_sees_b_holding, 15, "a never saw b's copy")

        header, trace_id, parent = traceparent()
        r = httpx.post(a.url + "/v1/embeddings", headers={"traceparent": header}, timeout=60,
                       json={"model": EMBED, "input": "across the mesh"})
        assert r.status_code == 200 and r.headers["x-flatmesh-node"] == "trace-b", r.headers
        wanted = {"POST /v1/embeddings", f"embeddings {EMBED}", "forward", "POST /internal/v1/serve"}
        spans = receiver.wait_for(trace_id, lambda ss: wanted <= {s.name for _, s in ss}
                                  and sum(s.name == f"embeddings {EMBED}" for _, s in ss) == 2,
                                  "the mesh's spans never arrived")
        by_node = {}
        for res, s in spans:
            by_node.setdefault(res["service.instance.id"], []).append(s)
        assert set(by_node) == {"trace-a", "trace-b"}, {n: [s.name for s in ss] for n, ss in by_node.items()}
        # a: the front door, the serve path (routing, cache, placement), the hop to b.
        a_root = next(s for s in by_node["trace-a"] if s.name == "POST /v1/embeddings")
        a_serve = next(s for s in by_node["trace-a"] if s.name == f"embeddings {EMBED}")
        forward = next(s for s in by_node["trace-a"] if s.name == "forward")
        assert a_root.parent_span_id == parent and a_serve.parent_span_id == a_root.span_id
        assert forward.parent_span_id == a_serve.span_id
        assert forward.kind == Span.SPAN_KIND_CLIENT
        assert attrs(forward.attributes)["flatmesh.peer"] == b.url
        # b: its front door for peers, a child of a's forward, and the serve path that ran it.
        b_root = next(s for s in by_node["trace-b"] if s.name == "POST /internal/v1/serve")
        assert b_root.parent_span_id == forward.span_id, "b's span is a child of a's forward"
        assert attrs(b_root.attributes)["flatmesh.origin"] == "trace-a"
        b_serve = next(s for s in by_node["trace-b"] if s.name == f"embeddings {EMBED}")
        assert b_serve.parent_span_id == b_root.span_id
        assert attrs(b_serve.attributes)["gen_ai.usage.input_tokens"] > 0
        assert "gen_ai.usage.input_tokens" not in attrs(a_serve.attributes), "counted where it ran"


def test_spans_still_buffered_are_sent_when_the_agent_stops(receiver):
    a = Agent(config="[cache]\npreload = false\n" + f"""
[telemetry]
otlp_endpoint = "{receiver.url}"
export_interval = "1h"
""")
    try:
        header, trace_id, _ = traceparent()
        r = httpx.post(a.url + "/v1/embeddings", headers={"traceparent": header}, timeout=120,
                       json={"model": EMBED, "input": "last words"})
        assert r.status_code == 200
        time.sleep(0.5)
        assert not receiver.trace(trace_id), "nothing is sent before the hour is up"
    finally:
        assert a.stop() == 0
    assert any(s.name == f"embeddings {EMBED}" for _, s in receiver.trace(trace_id))


def test_a_bad_telemetry_setting_is_refused_at_start():
    import subprocess
    out = subprocess.run([str(BIN), "config", "--otlp-endpoint", "collector:4318"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "telemetry.otlp_endpoint" in out.stderr, out.stderr
