"""A node whose pool names a CUDA GPU, on a machine without a CUDA driver (CI).

The agent starts; the GPU's budget is listed with its kind and GPU and why it takes no copies;
every model is served from the host device (a GPU found not usable at start takes no copies, so
no request waits on a load that cannot succeed); a model that only that GPU's budget could hold
fails with the reason; the embedding model never goes to a cuda device. What needs a GPU is
checked by `tests/gpu/run` on a GPU machine.
"""
import subprocess

import httpx
import pytest

from conftest import BIN, EMBED, LLM, Agent

HOST = 2 << 30
GPU = 8 << 30
POOL = f"""
[cache]
[[cache.devices]]
name = "host0"
capacity = "2GiB"

[[cache.devices]]
name = "gpu0"
kind = "cuda"
gpu = 0
capacity = "8GiB"
"""
# A KV pool of 120k positions: more than the host device holds, less than the GPU's budget.
MODELS = f"""
[[models]]
id = "{LLM}"
path = "{LLM}/model.gguf"

[[models]]
id = "{EMBED}"
path = "{EMBED}"

[[models]]
id = "llm-gpu-only"
path = "{LLM}/model.gguf"
kv_cache_tokens = 120000
"""


@pytest.fixture(scope="module")
def node():
    a = Agent(config=POOL + MODELS)
    yield a
    assert a.proc.poll() is None, "the agent exited:\n" + a.logs()
    assert a.stop() == 0


def devices(node):
    return {d["name"]: d for d in httpx.get(node.url + "/admin/models", timeout=30).json()["devices"]}


def models(node):
    return {m["id"]: m for m in httpx.get(node.url + "/admin/models", timeout=30).json()["models"]}


def test_the_agent_starts_and_says_once_that_the_gpu_is_not_usable(node):
    logs = node.logs()
    lines = [ln for ln in logs.splitlines() if "GPU not usable" in ln]
    assert len(lines) == 1, logs
    assert "gpu0" in lines[0], lines[0]


def test_admin_lists_the_gpu_budget_with_its_kind_and_why_it_takes_no_copies(node):
    d = devices(node)
    assert d["host0"]["kind"] == "host" and d["host0"]["gpu"] is None
    assert d["host0"]["capacity_bytes"] == HOST
    assert "driver_total_bytes" not in d["host0"]
    g = d["gpu0"]
    assert (g["kind"], g["gpu"], g["capacity_bytes"], g["used_bytes"]) == ("cuda", 0, GPU, 0)
    assert g["driver_free_bytes"] is None and g["driver_total_bytes"] is None
    assert "driver" in g["unusable"].lower(), g


def test_a_chat_is_served_from_the_host_device(node):
    from openai import OpenAI
    client = OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Say hi"}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    m = models(node)[LLM]
    assert m["state"] == "ready" and m["device"] == "host0", m
    assert devices(node)["gpu0"]["used_bytes"] == 0


def test_the_embedding_model_never_lands_on_the_cuda_device(node):
    from openai import OpenAI
    client = OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    e = client.embeddings.create(model=EMBED, input=["a GPU pool"])
    assert len(e.data[0].embedding) > 0
    assert models(node)[EMBED]["device"] == "host0"


def test_a_model_only_the_gpu_could_hold_fails_with_the_reason_and_the_rest_serve(node):
    r = httpx.post(node.url + "/v1/chat/completions", timeout=60, json={
        "model": "llm-gpu-only", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "GPU 0 is not usable" in msg, msg
    assert "retry-after" in r.headers
    m = models(node)["llm-gpu-only"]
    assert m["state"] == "failed" and "GPU 0 is not usable" in m["error"], m
    ok = httpx.post(node.url + "/v1/completions", timeout=60, json={"model": LLM, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_metrics_and_status_page_show_the_gpu_budget(node):
    text = httpx.get(node.url + "/metrics", timeout=30).text
    assert f'flatmesh_device_capacity_bytes{{device="gpu0"}} {GPU}' in text
    # No driver: nothing to report as the driver's used bytes.
    assert 'flatmesh_device_driver_used_bytes{device="gpu0"}' not in text
    page = httpx.get(node.url + "/status", timeout=30)
    assert page.status_code == 200, page.status_code
    assert "cuda (GPU 0, not usable" in page.text


@pytest.mark.parametrize("device, field", [
    ('kind = "cuda"\ngpu = 0\ncapacity = "0.8"', "cache.devices[0].capacity"),
    ('kind = "cuda"\ncapacity = "1.5"', "cache.devices[0].capacity"),
    ('kind = "tpu"\ncapacity = "1GiB"', "cache.devices[0].kind"),
    ('gpu = 1\ncapacity = "1GiB"', "cache.devices[0].gpu"),
])
def test_bad_gpu_devices_stop_the_start_naming_the_field(tmp_path, device, field):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[[cache.devices]]\nname = "d"\n{device}\n')
    p = subprocess.run([str(BIN), "serve", "--config", str(cfg), "--http-addr", "127.0.0.1:0",
                        "--grpc-addr", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert field in p.stderr, p.stderr
